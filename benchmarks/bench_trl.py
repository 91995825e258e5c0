"""Tokens/s and peak memory of a DPO training step in TRL's own ``DPOTrainer`` against the
drop-in ``AIHFDPOTrainer`` (the fused ``aihf_loss`` on the LM head), as users run them, in one run.

  trl        ``trl.DPOTrainer`` (TRL 1.16: its own fused, tiled LM head, with entropy / top-1
             metrics; on CUDA it scores only the completion positions, elsewhere every position)
  aihf_fast  ``aihf_fast.integrations.trl.AIHFDPOTrainer``: the same trainer, loss through one
             ``aihf_loss(hidden, lm_head.weight)`` call (no logits built)

Protocol (fixed before the first run): a Llama-style model from a config (no downloads), a
word-level tokenizer of the preset's vocabulary, preference pairs of random words (prompt
``--prompt`` words, chosen and rejected ``--seq - --prompt`` words each, so every completion token
is a loss token), ``loss_type="sigmoid"``, ``beta=0.1``, a separate frozen reference model,
TRL's defaults otherwise (gradient checkpointing on, AdamW). Each provider runs in its own
process: ``Trainer.train`` for ``--warmup + --steps`` optimiser steps; a callback times each
step (``on_step_begin`` -> ``on_step_end``; median of the steps after warm-up) and measures its
peak memory above what is held when the step starts: on CUDA ``max_memory_allocated``; on CPU
the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` at each step start,
large blocks returned to the system at once: ``MALLOC_MMAP_THRESHOLD_=65536``). Tokens/s: all
tokens of the step's batch (prompt + completions, both sides) / median step time. The providers
run alternately ``--rounds`` times, each keeps its fastest round. The first step's loss of both
must agree (same model, same batches). Compared as ratios aihf_fast / trl.

    python benchmarks/bench_trl.py                       # CPU, V = 32000 (defaults)
    python benchmarks/bench_trl.py --preset gpu-1b       # Llama-3.2-1B shape, V = 128256, bf16
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_result, commit, print_result, versions, write_report  # noqa: E402

PRESETS = {
    "cpu-small": dict(vocab=32000, hidden=256, layers=2, heads=4, kv_heads=4, inter=688, seq=256, prompt=32,
                      pairs=4, dtype="float32"),
    "gpu-1b": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, seq=1024, prompt=128,
                   pairs=4, dtype="bfloat16"),
}
PROVIDERS = ("trl", "aihf_fast")


def _word_tokenizer(vocab: int):
    """A word-level tokenizer with ids 0..vocab-1 (specials first), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    words = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _pairs(p: dict, n: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, p["vocab"] - 3, (k,), generator=g))

    comp = p["seq"] - p["prompt"] - 1  # + EOS
    return Dataset.from_list([dict(prompt=words(p["prompt"]), chosen=" " + words(comp), rejected=" " + words(comp))
                              for _ in range(n)])


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(provider: str, p: dict, device: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from aihf_fast.integrations.trl import AIHFDPOTrainer

    cuda = device.startswith("cuda")
    dtype = getattr(torch, p["dtype"])
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      intermediate_size=p["inter"], max_position_embeddings=p["seq"] + 8,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype=dtype)
        ref = LlamaForCausalLM(cfg).to(dtype=dtype)
    ref.load_state_dict(model.state_dict())
    tok = _word_tokenizer(p["vocab"])
    data = _pairs(p, p["pairs"] * (warmup + steps))
    args = DPOConfig(output_dir=f"/tmp/bench_trl_{provider}_{os.getpid()}", per_device_train_batch_size=p["pairs"],
                     max_steps=warmup + steps, learning_rate=1e-6, logging_steps=1, report_to=[], save_strategy="no",
                     seed=0, use_cpu=not cuda, bf16=dtype == torch.bfloat16, max_length=p["seq"] + 8,
                     dataloader_num_workers=0, disable_tqdm=True)
    cls = AIHFDPOTrainer if provider == "aihf_fast" else DPOTrainer
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    rec = dict(times=[], peaks=[])

    class Measure(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                rec["base"] = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                rec["base"] = _vm("VmRSS")
            rec["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            rec["times"].append(time.perf_counter() - rec["t0"])
            peak = torch.cuda.max_memory_allocated() if cuda else _vm("VmHWM")
            rec["peaks"].append(peak - rec["base"])

    trainer.add_callback(Measure())
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    times, peaks = rec["times"][warmup:], rec["peaks"][warmup:]
    i = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    tokens = 2 * p["pairs"] * p["seq"]
    return dict(provider=provider, status="ok", tokens=tokens, step_s_median=times[i], step_s_min=min(times),
                tokens_per_s=tokens / times[i], peak_transient_bytes=int(max(peaks)), first_loss=logs[0]["loss"],
                metrics_first_step=sorted(logs[0]), params=sum(q.numel() for q in model.parameters()))


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu-small on CPU, gpu-1b on CUDA")
    for k in PRESETS["cpu-small"]:
        ap.add_argument(f"--{k}", dest=k, type=str if k == "dtype" else int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="providers run alternately this many times; fastest kept")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    preset = a.preset or ("gpu-1b" if a.device.startswith("cuda") else "cpu-small")
    p = dict(PRESETS[preset])
    for k in p:
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    if a._child:
        try:
            row = run_one(a._child, p, a.device, a.steps, a.warmup)
        except torch.OutOfMemoryError as e:
            row = dict(provider=a._child, status=f"oom: {str(e)[:200]}")
        print_result(row)
        return row
    rows, t_start = {}, time.time()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TQDM_DISABLE="1")
    for prov in [q for _ in range(a.rounds) for q in a.providers.split(",")]:
        cmd = [sys.executable, __file__, "--_child", prov, "--device", a.device, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--preset", preset]
        for k, v in p.items():
            cmd += [f"--{k}", str(v)]
        row, err = child_result(cmd, env=env)
        row = row or dict(provider=prov, status=f"failed: {err[-800:]}")
        print(json.dumps(row), flush=True)
        old = rows.get(prov)
        if old is None or old.get("status") != "ok" or (row.get("status") == "ok"
                                                         and row["step_s_median"] < old["step_s_median"]):
            rows[prov] = row
    ok = {k: v for k, v in rows.items() if v.get("status") == "ok"}
    ratios = {}
    if set(PROVIDERS) <= set(ok):
        f, b = ok["aihf_fast"], ok["trl"]
        ratios = dict(tokens_per_s=f["tokens_per_s"] / b["tokens_per_s"],
                      peak_transient_memory=f["peak_transient_bytes"] / max(b["peak_transient_bytes"], 1),
                      first_loss_abs_diff=abs(f["first_loss"] - b["first_loss"]))
        print(f"aihf_fast / trl: tokens/s x{ratios['tokens_per_s']:.2f}, peak transient memory "
              f"x{ratios['peak_transient_memory']:.2f}, first loss diff {ratios['first_loss_abs_diff']:.2e}",
              flush=True)
    cuda = a.device.startswith("cuda")
    dev = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    report = dict(benchmark="bench_trl", device=dev, device_type="cuda" if cuda else "cpu", preset=preset, shape=p,
                  steps=a.steps, warmup=a.warmup, rounds=a.rounds, versions=versions("trl", "accelerate"),
                  commit=commit(), wall_s=round(time.time() - t_start, 1), results=list(rows.values()),
                  ratios=ratios)
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_trl_{report['device_type']}_{preset}.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
