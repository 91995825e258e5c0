"""Checkpoint integrity: every checkpoint has a manifest (sizes, SHA-256) written before
``latest``; ``--resume`` passes over a damaged or missing newest checkpoint, names the file,
falls back to the newest intact one and then equals the uninterrupted run; with none intact it is
a one-line error. A damaged reference-log-prob cache is rebuilt."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from llm_helpers import losses, make_task, run_trainer
from test_llm_distributed import _args, _assert_same_run, _check

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # trainer runs in fresh processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_ckpt")
    task = make_task(str(root / "task"))
    kw = dict(save_every=2, refresh_every=3)
    full = str(root / "full")  # 8 steps straight
    _check(run_trainer(_args(task, full, steps=8, **kw)))
    part = str(root / "part")  # 6 steps: checkpoints step2, step4, step6
    _check(run_trainer(_args(task, part, steps=6, **kw)))
    return task, full, part, kw


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _files(step_dir):
    return sorted(f for f in os.listdir(step_dir) if os.path.isfile(os.path.join(step_dir, f)) and f != "manifest.json")


def test_manifest_lists_every_file(runs):
    _, _, part, _ = runs
    d = os.path.join(part, "checkpoints", "step6")
    man = json.load(open(os.path.join(d, "manifest.json")))["files"]
    assert sorted(man) == _files(d) and {"trainer_state.pt", "rng_rank0.pt"} <= set(man)
    assert open(os.path.join(part, "checkpoints", "latest")).read().strip() == "step6"


@pytest.mark.parametrize("damage", ["trainer_state.pt", "rng_rank0.pt", "model_states", "manifest", "missing_dir"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(runs, tmp_path, damage):
    task, full, part, kw = runs
    out = str(tmp_path / "run")
    shutil.copytree(part, out)
    step6 = os.path.join(out, "checkpoints", "step6")
    if damage == "missing_dir":
        shutil.rmtree(step6)  # `latest` names a step that is not there
    elif damage == "manifest":
        os.remove(os.path.join(step6, "manifest.json"))  # a save that did not complete
    else:
        name = next(f for f in _files(step6) if damage in f)
        _truncate(os.path.join(step6, name))
    r = run_trainer(_args(task, out, steps=8, resume="true", **kw))
    _check(r)
    if damage != "missing_dir":
        assert "passing over a damaged checkpoint" in r.stdout and "step6" in r.stdout, r.stdout[-2000:]
        if damage != "manifest":
            assert damage in r.stdout
    assert "resuming from step4" in r.stdout
    _assert_same_run(full, out, tol=1e-7)
    assert sorted(losses(out)) == list(range(1, 9))


def test_no_intact_checkpoint_is_a_one_line_error(runs, tmp_path):
    task, _, part, kw = runs
    out = str(tmp_path / "run")
    shutil.copytree(part, out)
    for t in ("step2", "step4", "step6"):
        _truncate(os.path.join(out, "checkpoints", t, "trainer_state.pt"))
    r = run_trainer(_args(task, out, steps=8, resume="true", **kw))
    assert r.returncode == 2 and "no intact checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_run_is_not_replaced_without_resume_or_overwrite(runs, tmp_path):
    task, _, _, kw = runs
    out = str(tmp_path / "run")
    _check(run_trainer(_args(task, out, steps=2, **kw)))
    r = run_trainer(_args(task, out, steps=2, **kw))
    assert r.returncode == 2 and "holds a checkpoint: pass --resume" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]


def test_damaged_reference_cache_is_rebuilt(runs, tmp_path):
    task, _, _, kw = runs
    out = str(tmp_path / "run")
    _check(run_trainer(_args(task, out, steps=2, **kw)))
    shutil.rmtree(os.path.join(out, "checkpoints"))
    _truncate(os.path.join(out, "ref_logps.pt"))
    r = run_trainer(_args(task, out, steps=2, **kw))  # no checkpoints: a fresh run over the damaged cache
    _check(r)
    assert "is unreadable" in r.stdout
    _truncate(os.path.join(out, "ref_logps.pt"))
    _check(run_trainer(_args(task, out, steps=2, overwrite="true", **kw)))  # --overwrite starts clean


def test_legacy_and_unfinished_saves(runs, tmp_path):
    """Checkpoints without manifests (written before them) resume from `latest` even with a newer
    unfinished step directory; a run whose first save never completed (no `latest`) starts over
    from step 0 under --resume instead of failing."""
    task, full, part, kw = runs
    out = str(tmp_path / "legacy")
    shutil.copytree(part, out)
    for t in ("step2", "step4", "step6"):
        os.remove(os.path.join(out, "checkpoints", t, "manifest.json"))
    shutil.rmtree(os.path.join(out, "checkpoints", "step6"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step4")
    os.makedirs(os.path.join(out, "checkpoints", "step6"))  # an unfinished newer save
    shutil.copy(os.path.join(part, "checkpoints", "step6", "trainer_state.pt"), os.path.join(out, "checkpoints", "step6"))
    _check(run_trainer(_args(task, out, steps=8, resume="true", **kw)))
    _assert_same_run(full, out, tol=1e-7)
    first = str(tmp_path / "first")
    os.makedirs(os.path.join(first, "checkpoints", "step2"))
    shutil.copy(os.path.join(part, "checkpoints", "step2", "trainer_state.pt"), os.path.join(first, "checkpoints", "step2"))
    r = run_trainer(_args(task, first, steps=8, resume="true", **kw))
    _check(r)
    assert "starting from step 0" in r.stdout
    _assert_same_run(full, first, tol=1e-7)


def test_signal_at_start_up_stops_at_once_and_after_the_last_step_completes(runs, tmp_path):
    """SIGTERM while the run is starting (models loaded, nothing trained): exit 143 at once, one
    line, no checkpoint; after the last step (final evaluation, model saved): the run completes."""
    task, _, _, kw = runs
    out = str(tmp_path / "early")
    r = run_trainer(_args(task, out, steps=4, **kw), env_extra={"AIHF_FAST_SIGNAL_AFTER_STEP": "0"})
    assert r.returncode == 143, r.stderr[-2000:]
    assert "interrupted by SIGTERM while a run was starting" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    late = str(tmp_path / "late")
    r = run_trainer(_args(task, late, steps=4, **kw), env_extra={"AIHF_FAST_SIGNAL_AFTER_STEP": "4"})
    _check(r)
    assert "SIGTERM arrived after the last step: the run was completed" in r.stderr
    assert os.path.isfile(os.path.join(late, "model", "model.safetensors"))


def test_synthetic_job_resumes_its_stages_and_says_when_it_replaces_a_result(tmp_path, capsys, monkeypatch):
    """--synthetic stopped by SIGTERM inside its base-model stage: exit 143; --resume true continues
    that stage from its checkpoint and then equals an uninterrupted job. A rerun says it replaces
    the earlier result and reuses the base model."""
    from aihf_fast.train.llm.cli import main

    tiny = ["--synthetic", "--num-demos", "32", "--num-pairs", "16", "--num-base", "64", "--num-eval-prompts", "8",
            "--base-steps", "4", "--steps", "3", "--pairs-per-batch", "4", "--demos-per-batch", "4",
            "--refresh-every", "2", "--gen-batch-size", "32", "--progress", "false"]
    full = str(tmp_path / "full")
    assert main(tiny + ["--output-dir", full]) == 0
    cut = str(tmp_path / "cut")
    monkeypatch.setenv("AIHF_FAST_SIGNAL_AFTER_STEP", "2")  # step 2 of the base model's pretraining
    assert main(tiny + ["--output-dir", cut]) == 143
    assert "interrupted by SIGTERM after step 2" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(cut, "aihf"))
    monkeypatch.delenv("AIHF_FAST_SIGNAL_AFTER_STEP")
    assert main(tiny + ["--output-dir", cut, "--resume", "true"]) == 0
    for stage in ("base", "aihf"):
        _assert_same_run(os.path.join(full, stage), os.path.join(cut, stage), tol=1e-6)
    stamp = os.path.getmtime(os.path.join(cut, "base", "model", "model.safetensors"))
    capsys.readouterr()
    assert main(tiny + ["--output-dir", cut]) == 0
    out = capsys.readouterr().out
    assert f"{os.path.join(cut, 'aihf')}: replacing the earlier result" in out and "pretraining the base" not in out
    assert os.path.getmtime(os.path.join(cut, "base", "model", "model.safetensors")) == stamp
    # --resume with other options for the result stage: it starts over (its checkpoints are not
    # continued), saying so; --overwrite false refuses instead
    assert main(tiny + ["--output-dir", cut, "--beta", "0.2", "--overwrite", "false", "--resume", "true"]) == 2
    assert "made with other options (it cannot be resumed)" in capsys.readouterr().err
    assert main(tiny + ["--output-dir", cut, "--beta", "0.2", "--resume", "true"]) == 0
    assert "the run there was made with other options: starting it over" in capsys.readouterr().out
