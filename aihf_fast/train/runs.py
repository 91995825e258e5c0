"""Run plumbing both trainers share: the guard against replacing a run, the resume check of a
checkpoint's options, the log kept up to a checkpoint, the run's config file."""
from __future__ import annotations

import json
import os

from .options import ConfigError


def guard_output_dir(output_dir: str, holds_checkpoint: bool, resume: bool, overwrite: bool) -> None:
    """ConfigError when ``output_dir`` holds a checkpoint and neither ``--resume`` nor
    ``--overwrite`` says what to do with it (the run would otherwise be silently replaced)."""
    if holds_checkpoint and not (resume or overwrite):
        raise ConfigError(f"output_dir {output_dir!r} holds a checkpoint: pass --resume to continue that run, "
                          "--overwrite to start over (deletes it), or choose another output_dir")


def check_resume_options(saved: dict, now: dict, why: str = "") -> None:
    """ConfigError naming every option whose value differs from the checkpointed run's. Options a
    checkpoint predates are not compared (it ran with their defaults)."""
    diff = sorted(k for k in saved if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"--resume: these options differ from the checkpointed run{why}: "
                          + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in diff))


def start_log(path: str, resumed: bool, key: str, upto: int) -> None:
    """A fresh, empty ``log.jsonl``; or, resuming, the records whose ``key`` is <= ``upto`` (those
    after the checkpoint are run again), written to a new file renamed over the log."""
    if not resumed:
        open(path, "w").close()
        return
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.isfile(path) else []
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in lines if json.loads(ln).get(key, 0) <= upto))
    os.replace(path + ".tmp", path)


def write_config(output_dir: str, cfg) -> None:
    """``output_dir/config.json``: the run's options."""
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(vars(cfg), f, indent=1, default=str)
