"""Forward+backward time and peak memory of the joint DPO + NLL loss (the RPO configuration of
aihf_loss: w_P = 1 on P preference pairs, NLL weight alpha on the chosen answers, a reference
model given by its hidden states + LM head) at LLM shapes, side by side in one run:

  aihf_fast      aihf_loss(hidden, weight, ref_hidden, ref_weight) on the Triton kernels (the policy's
                 gradients made in the forward where it applies, the default)
  aihf_fast_two_pass   the same with grad_in_forward=False (forward, then a recomputing backward)
  aihf_fast_cached_ref the default with the reference as ref_seq_logps, computed once per cell
                 outside the timed step (as a trainer that caches them does)
  aihf_fast_approx_<eps>  the default with approximate gradients (``--grad-skip-below eps``): the
                 rows add the gradients' error against aihf_fast's exact ones in the same cell
                 (relative Frobenius and largest-entry) and the share of the work left out
  torch_eager    the same call on the PyTorch reference (full logits, fp32 log-softmax)
  torch_compile  torch.compile of that reference math written as one plain function
  liger          LigerFusedLinearDPOLoss(compute_nll_loss=True), where liger-kernel is installed
  cce            Cut Cross-Entropy per-token NLL (reduction="none") + the same DPO math, where installed

plus forward-only diagnostics of the fused log-prob kernel (autotuned over its pointer schedules,
and on a GPU with TMA also over the TMA / persistent ones: ``_tma``) against cuBLAS logits +
logsumexp.
Data (``--data``, ``aihf_fast.ops.testing``): ``peaked`` (default) logits shaped like a trained LM's,
``randn`` flat ones (largest probability ~1e-4 at V = 128k: a method that skips negligible
probability mass does less work there than on real data), or ``model``: hidden states and head of
a small model trained here (``benchmarks/head_model.py``, ``--model-dir``; its own V and H); the
report records which, and the logits' statistics (``data_stats``).
FLOPs: the useful work is 6NHV (policy fwd+bwd) + 2NHV (reference fwd) = 8NHV, counted for every
provider (achieved TFLOP/s = 8NHV / time); aihf_fast executes 8NHV, aihf_fast_two_pass 10NHV (it
recomputes the policy logits in backward), aihf_fast_cached_ref 6NHV.

On CPU it runs the reference paths (and aihf_fast through its CPU backend) at small shapes.
Writes JSON (device, versions, commit, every measurement) after each measurement and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aihf_fast.ops import aihf_loss, linear_token_logprobs  # noqa: E402
from aihf_fast.ops._backend import resolve_backend  # noqa: E402
from aihf_fast.ops.testing import DATA_KINDS, lm_head_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, versions  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


# ----------------------------------------------------------------------------- providers


def rpo_plain(x, w, rx, rw, y, P, alpha, beta):
    """The loss as users write it by hand (TRL-style): full logits, fp32 log-softmax, gather."""
    mask = y != -100
    logp = torch.log_softmax((x @ w.t()).float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    seq = (logp * mask).sum(-1)
    with torch.no_grad():
        rlogp = torch.log_softmax((rx @ rw.t()).float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        rseq = (rlogp * mask).sum(-1)
    h = (seq[:P] - rseq[:P]) - (seq[P:] - rseq[P:])
    nll = -(logp[:P] * mask[:P]).sum() / mask[:P].sum()
    return -F.logsigmoid(beta * h).mean() + alpha * nll


OURS = ("aihf_fast", "aihf_fast_two_pass", "aihf_fast_cached_ref")


APPROX = "aihf_fast_approx_"


def make_provider(name, P, alpha, beta, backend):
    cmp = ref_seq = None
    approx = name.startswith(APPROX)

    def ours(x, w, rx, rw, y):
        nonlocal cmp, ref_seq
        # which path each row times is fixed (an error row where it cannot apply), never chosen silently
        triton = (name in OURS or approx) and resolve_backend(backend, x) == "triton"
        kw = dict(beta=beta, backend=backend if name in OURS or approx else "torch", validate=False,
                  grad_in_forward=(name != "aihf_fast_two_pass") if triton else None,
                  grad_skip_below=float(name[len(APPROX):]) if approx else 0.0)
        if cmp is None:
            dev = x.device
            cmp = (torch.arange(P, device=dev), torch.arange(P, 2 * P, device=dev))
            ours.nll = torch.cat([torch.full((P,), alpha, device=dev), torch.zeros(P, device=dev)])
        if name == "aihf_fast_cached_ref":
            if ref_seq is None:  # once per cell, outside the timed steps
                with torch.no_grad():
                    ref_seq = aihf_loss(y, hidden=x, weight=w, ref_hidden=rx, ref_weight=rw, comparisons=cmp,
                                        **dict(kw, grad_in_forward=None)).seq_ref_logps
            return aihf_loss(y, hidden=x, weight=w, ref_seq_logps=ref_seq, comparisons=cmp, nll_weights=ours.nll,
                             **kw).loss
        out = aihf_loss(y, hidden=x, weight=w, ref_hidden=rx, ref_weight=rw, comparisons=cmp, nll_weights=ours.nll,
                        **kw)
        ours.metrics = out.metrics
        return out.loss

    if name in OURS + ("torch_eager",) or approx:
        return ours
    if name == "torch_compile":
        compiled = torch.compile(rpo_plain, dynamic=True)
        return lambda x, w, rx, rw, y: compiled(x, w, rx, rw, y, P, alpha, beta)
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=beta, alpha=alpha, compute_nll_loss=True)
        return lambda x, w, rx, rw, y: fn(w, x, y, None, rx, rw)[0]
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(x, w, rx, rw, y):
            B, T, H = x.shape
            mask = y != -100
            nll_tok = linear_cross_entropy(x.reshape(-1, H), w, y.reshape(-1), reduction="none").view(B, T)
            seq = -(nll_tok * mask).sum(-1)
            with torch.no_grad():
                rseq = -(linear_cross_entropy(rx.reshape(-1, H), rw, y.reshape(-1), reduction="none").view(B, T)
                         * mask).sum(-1)
            h = (seq[:P] - rseq[:P]) - (seq[P:] - rseq[P:])
            return -F.logsigmoid(beta * h).mean() + alpha * (nll_tok[:P] * mask[:P]).sum() / mask[:P].sum()

        return cce
    raise ValueError(name)


# ----------------------------------------------------------------------------- timing


@contextlib.contextmanager
def tma_schedules(on: bool):
    """The fused forward autotuned over its TMA schedules too (AIHF_FAST_LINEAR_TMA=1) inside."""
    before = os.environ.get("AIHF_FAST_LINEAR_TMA")
    os.environ["AIHF_FAST_LINEAR_TMA"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["AIHF_FAST_LINEAR_TMA"]
        else:
            os.environ["AIHF_FAST_LINEAR_TMA"] = before


def forward_schedule(x, w, tma: bool) -> dict:
    """Which schedule family the fused forward ran for these inputs, and the one autotuning chose."""
    from aihf_fast.ops.logprobs import _linear_schedule

    with tma_schedules(tma):
        kernel, meta, uses_tma = _linear_schedule(x, w)
    best = getattr(kernel, "best_config", None)
    return {"tma_schedules_tried": uses_tma, "schedule": str(best) if best is not None else str(meta)}


def time_fn(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps * 100))
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def peak_extra_bytes(fn, device):
    """Peak allocation during one step above what was allocated before it: inputs and the
    previous step's gradients (which the step frees and re-creates), so: transient memory."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def measure_cublas_peak(device, dtype):
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device, 3)
    return 2 * 8192**3 / ms / 1e9


def run(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in dev_name), None) if device.type == "cuda" else None
    report = {
        "benchmark": "bench_loss", "device": dev_name, "device_type": device.type, "dtype": args.dtype,
        "versions": versions("liger_kernel", "cut_cross_entropy"), "commit": commit(), "argv": sys.argv[1:],
        "peak_bf16_tflops_spec": peak, "cublas_bf16_tflops_measured": measure_cublas_peak(device, dtype),
        "config": {"hidden": args.hidden, "seq_len": args.seq_len, "prompt_frac": args.prompt_frac,
                   "alpha": args.alpha, "beta": args.beta, "backend": args.backend, "data": args.data,
                   "model_dir": args.model_dir},
        "data_stats": {},
        "results": [],
    }
    if args.data == "model":  # which trained model the inputs came from
        from aihf_fast.ops.testing import HEAD_MODEL_ENV

        model_dir = args.model_dir or os.environ.get(HEAD_MODEL_ENV, "")
        meta = Path(model_dir, "meta.json")
        report["head_model"] = json.loads(meta.read_text()) if meta.is_file() else None
    if device.type == "cuda":
        from aihf_fast.ops.logprobs import _addmm_out_dtype_works

        report["addmm_bf16_to_fp32_accumulate"] = _addmm_out_dtype_works(device)

    def save():
        out_path.write_text(json.dumps(report, indent=1))

    save()
    t_start = time.time()
    H = args.hidden
    for V in args.vocab:
        for N in args.tokens:
            S = max(2, N // args.seq_len)
            S -= S % 2
            T = N // S
            P = S // 2
            d = lm_head_inputs(S, T, H, V, data=args.data, prompt_frac=args.prompt_frac, dtype=dtype, device=device,
                               model_dir=args.model_dir)
            if f"V={V}" not in report["data_stats"]:  # what the logits look like (per vocabulary)
                report["data_stats"][f"V={V}"] = d.stats(max_tokens=1024)
            x, w = d.hidden.requires_grad_(), d.weight.requires_grad_()
            rx, rw, y = d.ref_hidden, d.ref_weight, d.labels
            n_loss = int((y != -100).sum())
            useful = 8.0 * n_loss * H * V
            losses, exact = {}, None
            for name in args.providers + [f"{APPROX}{e!r}" for e in args.grad_skip_below]:  # repr: exact eps
                row = {"provider": name, "mode": "fwd+bwd", "tokens": N, "loss_tokens": n_loss, "hidden": H,
                       "vocab": V, "seqs": S, "seq_len": T}
                if time.time() - t_start > args.time_budget:
                    row["status"] = "skipped: time budget"
                    report["results"].append(row)
                    continue
                try:
                    fn = make_provider(name, P, args.alpha, args.beta, args.backend)

                    def step(fn=fn, x=x, w=w, rx=rx, rw=rw, y=y):  # this cell's tensors, bound now
                        x.grad = None
                        w.grad = None
                        loss = fn(x, w, rx, rw, y)
                        loss.backward()
                        return loss

                    t0 = time.time()
                    losses[name] = float(step().detach())
                    row["first_call_s"] = round(time.time() - t0, 3)
                    if name == "aihf_fast":  # the exact gradients, for the approximate rows of this cell
                        exact = (x.grad.detach().clone(), w.grad.detach().clone())
                    elif name.startswith(APPROX):
                        row["skipped_fraction"] = float(fn.metrics["grad/skipped_fraction"])
                        if exact is not None:
                            for part, got, want in (("dhidden", x.grad, exact[0]), ("dweight", w.grad, exact[1])):
                                err = (got.float() - want.float())
                                row[f"{part}_rel_err"] = float(err.norm() / want.float().norm())
                                row[f"{part}_max_err_rel"] = float(err.abs().max() / want.float().abs().max())
                    row["peak_extra_bytes"] = peak_extra_bytes(step, device)
                    row["ms"] = time_fn(step, device, args.reps)
                    row["tflops_useful"] = useful / row["ms"] / 1e9
                    if peak:
                        row["frac_of_peak"] = row["tflops_useful"] / peak
                    row["loss"] = losses[name]
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                except ImportError as e:
                    row["status"] = f"not installed: {e.name}"
                except Exception as e:  # record and go on: one broken baseline must not lose the rest
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                x.grad = None
                w.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if "aihf_fast" in losses and name in losses:
                    row["loss_rel_diff_vs_aihf_fast"] = abs(losses[name] - losses["aihf_fast"]) / abs(losses["aihf_fast"])
                report["results"].append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
                save()
            if args.fwd_diag and time.time() - t_start <= args.time_budget:
                xf, yf = x.detach().reshape(-1, H), y.reshape(-1)
                for name, f in (
                    ("aihf_fast_logprobs_fwd", lambda xf=xf, w=w, yf=yf: linear_token_logprobs(
                        xf, w.detach(), yf, validate=False, backend=args.backend)),
                    ("aihf_fast_logprobs_fwd_tma", lambda xf=xf, w=w, yf=yf: linear_token_logprobs(
                        xf, w.detach(), yf, validate=False, backend=args.backend)),
                    ("cublas_logits+logsumexp_fwd", lambda xf=xf, w=w: torch.logsumexp((xf @ w.detach().t()).float(), -1)),
                ):
                    if name.endswith("_tma") and not (device.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9):
                        continue  # TMA schedules: compute capability >= 9
                    try:
                        with torch.no_grad(), tma_schedules(name.endswith("_tma")):
                            ms = time_fn(f, device, args.reps)
                            mem = peak_extra_bytes(f, device)
                        row = {"provider": name, "mode": "fwd", "tokens": N, "loss_tokens": n_loss, "hidden": H,
                               "vocab": V, "ms": ms, "tflops_useful": 2.0 * n_loss * H * V / ms / 1e9,
                               "peak_extra_bytes": mem, "status": "ok"}
                        if name.startswith("aihf_fast"):
                            row.update(forward_schedule(xf, w.detach(), name.endswith("_tma")))
                    except torch.cuda.OutOfMemoryError:
                        row = {"provider": name, "mode": "fwd", "tokens": N, "vocab": V, "status": "oom"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
            step = None  # its defaults hold this cell's tensors
            del x, w, rx, rw, y, d  # d holds them too
            exact = None
    report["wall_s"] = time.time() - t_start
    save()
    if args.plot:
        plot(report, out_path.with_suffix(".png"))
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("status") == "ok" and r["mode"] == "fwd+bwd"]
    vocabs = sorted({r["vocab"] for r in rows})
    if not rows:
        return
    fig, axes = plt.subplots(2, len(vocabs), figsize=(6 * len(vocabs), 8), squeeze=False)
    for j, V in enumerate(vocabs):
        for name in sorted({r["provider"] for r in rows}):
            rs = sorted((r for r in rows if r["vocab"] == V and r["provider"] == name), key=lambda r: r["tokens"])
            if not rs:
                continue
            axes[0, j].plot([r["tokens"] for r in rs], [r["ms"] for r in rs], "o-", label=name)
            if rs[0].get("peak_extra_bytes") is not None:
                axes[1, j].plot([r["tokens"] for r in rs], [r["peak_extra_bytes"] / 2**30 for r in rs], "o-", label=name)
        axes[0, j].set(title=f"fwd+bwd time, V={V}, H={rows[0]['hidden']}", xlabel="tokens", ylabel="ms",
                       xscale="log", yscale="log")
        axes[1, j].set(title="peak memory above inputs and gradients", xlabel="tokens", ylabel="GiB", xscale="log")
        for ax in axes[:, j]:
            if ax.get_lines():
                ax.legend()
    fig.suptitle(f"DPO + NLL loss, {report['dtype']}, prompt fraction {report['config']['prompt_frac']}, "
                 f"{report['device']} (commit {str(report['commit'])[:8]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--tokens", type=ints, default=[4096, 8192, 16384, 32768] if cuda else [256, 1024])
    p.add_argument("--vocab", type=ints, default=[128256, 151936] if cuda else [8192])
    p.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    p.add_argument("--seq-len", type=int, default=1024 if cuda else 128)
    p.add_argument("--prompt-frac", type=float, default=0.0)
    p.add_argument("--data", choices=DATA_KINDS, default="peaked",
                   help="logits like a trained LM's (peaked), flat (randn), or a model trained here (model: "
                        "benchmarks/head_model.py; --hidden and --vocab must be its sizes); aihf_fast.ops.testing")
    p.add_argument("--model-dir", default=None, help="--data model: the head model's directory")
    p.add_argument("--grad-skip-below", type=lambda s: [float(v) for v in s.split(",")], default=[],
                   help="comma-separated eps: add aihf_fast_approx_<eps> rows (approximate gradients; run aihf_fast "
                        "too for their error)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if cuda else "fp32")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   default=["aihf_fast", "aihf_fast_two_pass", "aihf_fast_cached_ref", "liger", "cce", "torch_eager",
                            "torch_compile"] if cuda
                   else ["aihf_fast", "torch_eager", "torch_compile", "liger"])
    p.add_argument("--backend", default=None, help="aihf_fast backend (default: auto)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later rows are skipped")
    p.add_argument("--fwd-diag", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / ("bench_loss_gpu.json" if cuda else "bench_loss_cpu.json")))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
