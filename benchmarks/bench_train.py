"""Tokens/s and peak memory of one ``aihf`` training step of a Llama-style model: the trainer's
fused path against the same model with TRL-style full-logit log-probs, in one run.

  aihf_fast   the trainer's module (``PolicyWithLoss``): base model -> last hidden states ->
              ``aihf_loss(hidden, lm_head.weight)``; the (tokens x vocab) logits are never built
              (on CUDA the policy's gradients are made in the loss's forward, the default)
  aihf_fast_two_pass  the same with ``grad_in_forward=False`` (forward, then a recomputing
              backward; what the default replaces)
  full_logit  ``model(...).logits`` -> ``log_softmax`` -> ``gather`` (what TRL's DPOTrainer
              does), then the same ``aihf_loss(token_logps=...)`` combination

One step = forward + backward + AdamW step on a packed micro-batch in the trainer's ``aihf``
layout (P preference pairs, D demonstrations, D own samples; prompt tokens masked), reference
log-probs precomputed (as the trainer does). No DeepSpeed: the loss path is what differs.
Each provider runs in its own subprocess so that peak memory is its own: on CUDA
``max_memory_allocated`` minus the memory held before the step; on CPU the process's peak RSS
minus its RSS before the first step (includes allocator slack; comparable across providers).
Tokens/s: all tokens in the micro-batch (prompt + completion) / median step time after warm-up;
the providers run alternately ``--rounds`` times and each keeps its best round (shared, noisy
machines); peak memory is that round's.

``--step rl``: one RLOO step of methods ``rlhf`` / ``aihf_rm`` instead, in three phases timed
apart: generation (``model.generate`` of ``pairs`` prompts x ``demos`` samples each, KV cache,
``seq - prompt`` new tokens, no early stop), scoring (per-token log-probs of the samples under the
policy and the frozen reference, and a reward model of the same shape reading the last token),
and the update (forward + backward + AdamW of ``rloo_loss`` on the per-token log-probs).
Generation and reward scoring are the same code for both providers; the log-prob paths differ
(``aihf_fast``: ``linear_token_logprobs`` on the last hidden states; ``full_logit``: logits ->
log_softmax -> gather). Tokens/s of each phase count prompt + completion tokens (generation:
new tokens only).

    python benchmarks/bench_train.py                        # CPU, small model (defaults)
    python benchmarks/bench_train.py --preset gpu-1b        # ~1B params, V = 128256, bf16
    python benchmarks/bench_train.py --step rl              # the RL step (CPU, small model)
    python benchmarks/bench_train.py --preset gpu-1b --max-batch   # + the largest micro-batch that fits

``--max-batch``: per provider, the largest micro-batch (``pairs`` = ``demos`` = k, so 4k sequences)
whose training step runs: k doubles from 1 until a step fails (CUDA out of memory, or a peak
transient memory above ``--memory-budget-gb`` when given) or reaches ``--max-batch-limit``, then
bisects; every attempt is one step in a fresh subprocess and is recorded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_result, commit, print_result, versions, write_report  # noqa: E402

PRESETS = {
    # CPU: small model, vocabulary of a real tokenizer, 2k tokens per micro-batch
    "cpu-small": dict(vocab=32000, hidden=256, layers=2, heads=4, kv_heads=4, inter=688, seq=128,
                      prompt=32, pairs=4, demos=4, dtype="float32"),
    # GPU: a Llama-3.2-1B-shaped model (V = 128256), 8k tokens per micro-batch
    "gpu-1b": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, seq=512,
                   prompt=128, pairs=4, demos=4, dtype="bfloat16"),
}
PROVIDERS = ("aihf_fast", "aihf_fast_two_pass", "full_logit")
OURS = ("aihf_fast", "aihf_fast_two_pass")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _start_measuring(model, opt, device):
    """Allocate the optimizer state (not part of what is measured), then start the memory count
    -> (cuda, sync, baseline bytes: CUDA allocated memory or the process's RSS)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return cuda, sync, torch.cuda.memory_allocated()
    return cuda, sync, _rss_bytes()


def _llama_config(p: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                       num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                       intermediate_size=p["inter"], max_position_embeddings=p["seq"], tie_word_embeddings=False,
                       use_cache=False, pad_token_id=0)


def _token_logps(provider, module, model, inputs):
    """Per-token log-probs of the labels (N,) fp32, 0 where ignored: the trainer's fused path
    (``aihf_fast``) or full logits -> log_softmax -> gather (``full_logit``)."""
    if provider in OURS:
        return module(inputs, per_token=True)
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits[0]
    labels = inputs["labels"]
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return logp.masked_fill(labels == -100, 0.0)


def run_one_rl(provider: str, p: dict, device: str, steps: int, warmup: int) -> dict:
    """One RLOO step (module docstring), warmup + steps times; phase times are medians."""
    import types

    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from aihf_fast.train.llm import sampling
    from aihf_fast.train.llm.batches import build_inputs
    from aihf_fast.train.llm.model import PolicyWithLoss, RewardModel
    from aihf_fast.train.llm.rl import rloo_advantages, rloo_loss

    dtype = getattr(torch, p["dtype"])
    torch.manual_seed(0)
    conf = _llama_config(p)
    with torch.device(device):
        model = LlamaForCausalLM(conf).to(dtype=dtype)
        ref = LlamaForCausalLM(conf).to(dtype=dtype).eval().requires_grad_(False)
        rm_conf = _llama_config(p)
        rm_conf.num_labels = 1
        rm = RewardModel(LlamaForSequenceClassification(rm_conf).to(dtype=dtype))
    for m in (model, ref, rm.model):
        m.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = None  # fixed-length samples: every step does the same work
    module, ref_module = PolicyWithLoss(model), PolicyWithLoss(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, k, new = p["pairs"], p["demos"], p["seq"] - p["prompt"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, p["vocab"], (p["prompt"],), generator=g).tolist() for _ in range(B)]
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
    cuda, sync, base = _start_measuring(model, opt, device)
    phases = {"generation": [], "scoring": [], "update": []}
    losses, n_tokens, n_new = [], 0, 0
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        comps = sampling.generate(model, tok, [x for x in prompts for _ in range(k)], max_new_tokens=new,
                                  temperature=1.0, top_p=1.0, batch_size=B * k, seed=i, max_length=p["seq"],
                                  synced=False, device=device)
        sync()
        t1 = time.perf_counter()
        seqs = [(x, c) for x, c in zip([x for x in prompts for _ in range(k)], comps)]
        inputs = build_inputs(seqs, 0, True, device)
        mask = inputs["labels"] != -100
        with torch.no_grad():
            old = _token_logps(provider, module, model, inputs)
            ref_lp = _token_logps(provider, ref_module, ref, inputs)
            reward = rm(inputs).double()
        kl = torch.zeros(len(seqs), dtype=torch.float64, device=device).index_add_(
            0, torch.repeat_interleave(torch.arange(len(seqs), device=device),
                                       torch.tensor([len(a) + len(b) for a, b in seqs], device=device)),
            (old - ref_lp).double())
        adv = rloo_advantages((reward - 0.05 * kl).view(B, k)).reshape(-1)
        adv_tok = torch.repeat_interleave(adv.float(), torch.tensor([len(a) + len(b) for a, b in seqs], device=device))
        sync()
        t2 = time.perf_counter()
        loss, _ = rloo_loss(_token_logps(provider, module, model, inputs), old, adv_tok, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i == 0:  # what the two log-prob paths must agree on (the RLOO loss is ~0 on a fresh batch)
            first_logp_sum = float(old.double().sum())
        if i >= warmup:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(dt)
        n_tokens, n_new = inputs["num_tokens"], sum(len(c) for c in comps)
    peak = (torch.cuda.max_memory_allocated() - base if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    med = {name: sorted(v)[len(v) // 2] for name, v in phases.items()}
    step_s = sum(med.values())
    return dict(provider=provider, status="ok", step="rl", tokens=n_tokens, new_tokens=n_new, step_s_median=step_s,
                generation_s=med["generation"], scoring_s=med["scoring"], update_s=med["update"],
                generation_tokens_per_s=n_new / med["generation"], scoring_tokens_per_s=3 * n_tokens / med["scoring"],
                update_tokens_per_s=n_tokens / med["update"], tokens_per_s=n_tokens / step_s,
                peak_transient_bytes=int(peak), first_loss=losses[0], first_logp_sum=first_logp_sum,
                params=sum(q.numel() for q in model.parameters()))


def run_one(provider: str, p: dict, device: str, steps: int, warmup: int) -> dict:
    """Build the model and batch, run warmup + steps training steps, measure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aihf_fast.ops import aihf_loss, method_config
    from aihf_fast.train.llm.batches import build_inputs
    from aihf_fast.train.llm.model import PolicyWithLoss

    dtype = getattr(torch, p["dtype"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      intermediate_size=p["inter"], max_position_embeddings=p["seq"], tie_word_embeddings=False,
                      use_cache=False)
    with torch.device(device):  # initialised where it runs (a 1B model's CPU init takes minutes)
        model = LlamaForCausalLM(cfg).to(dtype=dtype)
    model.config._attn_implementation = "sdpa"
    module = PolicyWithLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    P, D = p["pairs"], p["demos"]
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(2 * P + 2 * D):
        ids = torch.randint(0, p["vocab"], (p["seq"],), generator=g).tolist()
        seqs.append((ids[: p["prompt"]], ids[p["prompt"]:]))
    inputs = build_inputs(seqs, pad_id=0, packed=True, device=device)
    kw = dict(layout=method_config("aihf", P, D, w_P=1.0, w_D=1.0, nll_weight=0.1, device=device), beta=0.1,
              ref_seq_logps=-torch.rand(2 * P + 2 * D, generator=g).to(device) * 100)

    if provider == "aihf_fast_two_pass":
        kw["grad_in_forward"] = False

    def step():
        if provider in OURS:
            loss = module(inputs, kw)["loss"]
        else:
            logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits[0]
            labels = inputs["labels"]
            logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
            logp = logp.masked_fill(labels == -100, 0.0)
            loss = aihf_loss(labels, token_logps=logp, cu_seqlens=inputs["cu_seqlens"], **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    cuda, sync, base = _start_measuring(model, opt, device)
    losses, times = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    med = times[len(times) // 2]
    return dict(provider=provider, status="ok", tokens=inputs["num_tokens"],
                loss_tokens=int((inputs["labels"] != -100).sum()), step_s_median=med, step_s_min=times[0],
                tokens_per_s=inputs["num_tokens"] / med, peak_transient_bytes=int(peak), first_loss=losses[0],
                params=sum(q.numel() for q in model.parameters()))


def largest_batch(attempt, budget_bytes, limit):
    """The largest k in [1, limit] whose step fits: ``attempt(k)`` -> a result row (status "ok" and
    ``peak_transient_bytes``, or "oom: ..."); fits = ok and, with a budget, peak <= budget; any other
    status (a crash) raises, so that a broken run is not reported as a small batch. Doubling, then
    bisection (fitting is taken as monotone in k) -> {"k": largest fitting (0: none), "attempts"}."""
    attempts = []

    def fits(k):
        row = attempt(k)
        status = str(row.get("status"))
        if status != "ok" and not status.startswith("oom"):
            raise RuntimeError(f"micro-batch k = {k} failed for another reason than memory: {status[:500]}")
        ok = status == "ok" and (budget_bytes is None or row["peak_transient_bytes"] <= budget_bytes)
        attempts.append(dict(k=k, fits=ok, status=row.get("status"), peak_transient_bytes=row.get("peak_transient_bytes"),
                             tokens_per_s=row.get("tokens_per_s")))
        return ok

    good, bad, k = 0, None, 1
    while k <= limit:
        if not fits(k):
            bad = k
            break
        good, k = k, 2 * k
    if bad is None:  # every doubling up to the limit fitted
        if good == limit or fits(limit):
            return dict(k=limit, attempts=attempts)
        bad = limit
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return dict(k=good, attempts=attempts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu-small on CPU, gpu-1b on CUDA")
    for k in PRESETS["cpu-small"]:
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=str if k == "dtype" else int, default=None)
    ap.add_argument("--step", default="aihf", choices=["aihf", "rl"],
                    help="aihf: one aihf training step; rl: one RLOO step (generation + scoring + update); "
                         "with rl, --pairs is the number of prompts and --demos the samples per prompt")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="providers run alternately this many times; best round kept")
    ap.add_argument("--providers", default=None,
                    help=f"default: {','.join(PROVIDERS)} (the rl step: aihf_fast,full_logit, its log-prob paths)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-batch", action="store_true", help="also find each provider's largest micro-batch")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="--max-batch: a step fits when its peak transient memory is at most this (default: no OOM)")
    ap.add_argument("--max-batch-limit", type=int, default=256, help="--max-batch: the largest k tried")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    preset = a.preset or ("gpu-1b" if a.device.startswith("cuda") else "cpu-small")
    p = dict(PRESETS[preset])
    for k in p:
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    if a._child:  # one provider, this process: print its JSON row
        try:
            row = (run_one_rl if a.step == "rl" else run_one)(a._child, p, a.device, a.steps, a.warmup)
        except torch.OutOfMemoryError as e:
            row = dict(provider=a._child, status=f"oom: {str(e)[:200]}")
        print_result(row)
        return row
    if a.providers is None:
        a.providers = ",".join(PROVIDERS if a.step == "aihf" else ("aihf_fast", "full_logit"))
    if a.max_batch and a.step != "aihf":
        raise SystemExit("--max-batch: the aihf step only")
    if a.max_batch_limit < 1:
        raise SystemExit(f"--max-batch-limit must be >= 1, got {a.max_batch_limit}")

    def child(prov, shape, steps, warmup):
        cmd = [sys.executable, __file__, "--_child", prov, "--device", a.device, "--steps", str(steps),
               "--warmup", str(warmup), "--preset", preset, "--step", a.step]
        for k, v in shape.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        row, err = child_result(cmd)
        return row or dict(provider=prov, status=f"failed: {err[-500:]}")

    rows = {}
    for prov in [q for _ in range(a.rounds) for q in a.providers.split(",")]:
        row = child(prov, p, a.steps, a.warmup)
        print(json.dumps(row), flush=True)
        old = rows.get(prov)
        if old is None or old.get("status") != "ok" or (row.get("status") == "ok" and row["step_s_median"] < old["step_s_median"]):
            rows[prov] = row
    rows = list(rows.values())
    ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    ratios = {}
    if "aihf_fast" in ok and "full_logit" in ok:
        f, b = ok["aihf_fast"], ok["full_logit"]
        ratios = dict(tokens_per_s=f["tokens_per_s"] / b["tokens_per_s"],
                      peak_transient_memory=f["peak_transient_bytes"] / max(b["peak_transient_bytes"], 1),
                      loss_abs_diff=abs(f["first_loss"] - b["first_loss"]))
        if "first_logp_sum" in f:
            ratios["logp_sum_rel_diff"] = abs(f["first_logp_sum"] - b["first_logp_sum"]) / abs(b["first_logp_sum"])
        for phase in ("generation", "scoring", "update"):
            if f"{phase}_tokens_per_s" in f:
                ratios[f"{phase}_tokens_per_s"] = f[f"{phase}_tokens_per_s"] / b[f"{phase}_tokens_per_s"]
        phases = ", ".join(f"{k[:-len('_tokens_per_s')]} x{v:.2f}" for k, v in ratios.items()
                           if k.endswith("_tokens_per_s") and k != "tokens_per_s")
        if phases:
            print(f"aihf_fast / full_logit tokens/s by phase: {phases}", flush=True)
        print(f"aihf_fast / full_logit: tokens/s x{ratios['tokens_per_s']:.2f}, "
              f"peak transient memory x{ratios['peak_transient_memory']:.2f}", flush=True)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    report = dict(benchmark="bench_train", device=dev, device_type="cuda" if a.device.startswith("cuda") else "cpu",
                  step=a.step, preset=preset, shape=p, steps=a.steps, warmup=a.warmup, rounds=a.rounds, versions=versions(), commit=commit(),
                  results=rows, ratios=ratios)
    tail = "_rl" if a.step == "rl" else ""
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_train_{report['device_type']}_{preset}{tail}.json")
    write_report(report, out)
    if a.max_batch:  # after the timings are written; the report is rewritten after each provider's search
        budget = None if a.memory_budget_gb is None else a.memory_budget_gb * 2**30
        report.update(max_batch={}, memory_budget_gb=a.memory_budget_gb, max_batch_limit=a.max_batch_limit)
        for prov in a.providers.split(","):
            try:
                found = largest_batch(lambda k, prov=prov: child(prov, dict(p, pairs=k, demos=k), 1, 0), budget,
                                      a.max_batch_limit)
                print(f"{prov}: largest micro-batch k = {found['k']} ({4 * found['k']} sequences of {p['seq']} "
                      f"tokens)", flush=True)
            except RuntimeError as e:
                found = dict(k=None, error=str(e))
                print(f"{prov}: {e}", flush=True)
            report["max_batch"][prov] = found
            mb = report["max_batch"]
            if mb.get("aihf_fast", {}).get("k") and mb.get("full_logit", {}).get("k"):
                ratios["max_batch"] = mb["aihf_fast"]["k"] / mb["full_logit"]["k"]
            write_report(report, out)
    return report


if __name__ == "__main__":
    main()
