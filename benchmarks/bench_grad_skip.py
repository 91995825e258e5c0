"""How much the approximate gradients of ``aihf_loss`` (``grad_skip_below``) leave out, and their
error against the exact gradients, on a real model's hidden states: values, not speed (speed is
``bench_loss.py --grad-skip-below`` on a GPU).

    python benchmarks/bench_grad_skip.py --data model --model-dir DIR --vocab 8192 --hidden 256

Protocol (fixed before the first run): the DPO + NLL configuration of ``bench_loss`` (P pairs of
``--seq-len`` tokens, NLL weight 1 on the chosen answers), the reference as cached per-sequence
log-probs; token chunks as the default budget makes them (640 MiB of logits); for each ``--eps``: the share of (token, vocabulary) products left out (``grad/skipped_fraction``), and
for d(hidden) and d(weight) the relative Frobenius error ||approx - exact|| / ||exact|| and the
largest entry error over the largest exact entry. The exact and approximate runs use the same
path (gradients in the forward) and the same inputs, so the difference is the approximation alone.
The Triton kernels run on CUDA, or on CPU with ``TRITON_INTERPRET=1`` (set here when there is no
GPU); decisions are made per ``GRAD_SKIP_TILE`` (2048) columns on both. Writes JSON with the
data's statistics, device, versions and commit.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aihf_fast's kernels are imported

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, versions  # noqa: E402

from aihf_fast.ops import aihf_loss  # noqa: E402
from aihf_fast.ops.testing import DATA_KINDS, HEAD_MODEL_ENV, lm_head_inputs  # noqa: E402


def gradients(d, P, eps, device):
    """(loss, d(hidden), d(weight), metrics) of the DPO + NLL loss with grad_skip_below = eps."""
    S = 2 * P
    cmp = (torch.arange(P, device=device), torch.arange(P, S, device=device))
    nll = torch.cat([torch.ones(P, device=device), torch.zeros(P, device=device)])
    with torch.no_grad():
        ref = aihf_loss(d.labels, hidden=d.ref_hidden, weight=d.ref_weight, comparisons=cmp, reference_free=True,
                        backend="torch").seq_logps
    x = d.hidden.detach().clone().requires_grad_()
    w = d.weight.detach().clone().requires_grad_()
    out = aihf_loss(d.labels, hidden=x, weight=w, ref_seq_logps=ref, comparisons=cmp, nll_weights=nll, beta=0.1,
                    backend="triton", grad_in_forward=True, grad_skip_below=eps)
    out.loss.backward()
    return out.loss.detach(), x.grad, w.grad, out.float_metrics()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=DATA_KINDS, default="peaked")
    ap.add_argument("--model-dir", default=None, help=f"--data model (default: env {HEAD_MODEL_ENV})")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompt-frac", type=float, default=0.25)
    ap.add_argument("--eps", type=lambda s: [float(v) for v in s.split(",")], default=[2.0 ** -12, 1e-3, 1e-2])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-tile", type=int, default=None,
                    help="vocabulary columns per decision (default: the library's GRAD_SKIP_TILE, 2048); a smaller "
                         "one measures what finer decisions would leave out")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import aihf_fast.ops.logprobs as logprobs

    if a.skip_tile is not None:
        block = logprobs._dlogits_block(a.vocab)  # decisions group whole tiles of the d(logits) kernel
        if a.skip_tile < 1 or a.skip_tile % block:
            raise SystemExit(f"--skip-tile must be a positive multiple of the d(logits) kernel's tile here ({block} "
                             f"columns at V = {a.vocab}), got {a.skip_tile}")
        logprobs.GRAD_SKIP_TILE = a.skip_tile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.time()
    d = lm_head_inputs(2 * a.pairs, a.seq_len, a.hidden, a.vocab, data=a.data, prompt_frac=a.prompt_frac, dtype=dtype,
                       device=device, seed=a.seed, model_dir=a.model_dir)
    loss0, dx0, dw0, _ = gradients(d, a.pairs, 0.0, device)
    rows = []
    for eps in a.eps:
        loss, dx, dw, m = gradients(d, a.pairs, eps, device)
        row = dict(eps=eps, skipped_fraction=m.get("grad/skipped_fraction", 0.0), loss_equal=bool(loss == loss0))
        for part, got, want in (("dhidden", dx, dx0), ("dweight", dw, dw0)):
            err, ref = (got.float() - want.float()), want.float()
            row[f"{part}_rel_err"] = float(err.norm() / ref.norm())
            row[f"{part}_max_err_rel"] = float(err.abs().max() / ref.abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = dict(benchmark="bench_grad_skip", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  interpreter=os.environ.get("TRITON_INTERPRET") == "1", dtype=a.dtype, data=a.data,
                  data_stats=d.stats(), config=dict(pairs=a.pairs, seq_len=a.seq_len, prompt_frac=a.prompt_frac,
                                                    vocab=a.vocab, hidden=a.hidden, seed=a.seed,
                                                    skip_tile=max(1, logprobs.GRAD_SKIP_TILE // logprobs._dlogits_block(
                                                        a.vocab)) * logprobs._dlogits_block(a.vocab)),
                  versions=versions(), commit=commit(), seconds=time.time() - t0, results=rows,
                  command="python benchmarks/bench_grad_skip.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if a.data == "model":
        meta = Path(a.model_dir or os.environ.get(HEAD_MODEL_ENV, ""), "meta.json")
        report["head_model"] = json.loads(meta.read_text())
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"bench_grad_skip_{a.data}_tile{report['config']['skip_tile']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"[bench] wrote {out}")
    return report


if __name__ == "__main__":
    main()
