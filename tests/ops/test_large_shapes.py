"""The log-prob ops at a real vocabulary (V = 128256, Llama 3's) with every autotuned tile of the
fused forward, in bf16 and fp16, and past 2**31 logits (int64 offsets), on a GPU; the same checks
at small shapes on the CPU (Triton interpreter), so that the checks themselves are exercised."""
import pytest
import torch

from aihf_fast.ops import aihf_loss, linear_token_logprobs, token_logprobs
from aihf_fast.ops.testing import lm_head_inputs

from helpers import assert_low_precision_close

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="real vocabulary and > 2**31 logits: on a GPU (CPU: the small variants)")


def _reference_rows(x, w, y, g, rows):
    """fp32 log-probs, entropy, d(x) of ``rows`` and the full d(w) for the loss sum(g * logp),
    computed a row block at a time (no fp32 (N x V) buffer)."""
    xf, wf = x.detach().float(), w.detach().float()
    dw = torch.zeros_like(wf)
    for a in range(0, x.shape[0], 2048):
        z = xf[a:a + 2048] @ wf.t()
        p = z.softmax(-1)
        d = -p * g[a:a + 2048, None]
        d[torch.arange(len(z)), y[a:a + 2048]] += g[a:a + 2048]
        dw += d.t() @ xf[a:a + 2048]
    z = xf[rows] @ wf.t()
    logp_all = z.log_softmax(-1)
    p = logp_all.exp()
    d = -p * g[rows, None]
    d[torch.arange(len(rows)), y[rows]] += g[rows]
    return logp_all.gather(1, y[rows, None])[:, 0], -(p * logp_all).sum(-1), d @ wf, dw


def _reference_low(x, w, y, g, rows):
    """The same by PyTorch autograd in the inputs' own precision (logits and their gradient in that
    dtype, as the fused ops have them): the error that precision alone makes, for the comparison
    rule. d(w) from ``rows`` only."""
    xr = x.detach()[rows].clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    logp_all = (xr @ wr.t()).float().log_softmax(-1)
    logp = logp_all.gather(1, y[rows, None])[:, 0]
    (logp * g[rows]).sum().backward()
    return logp.detach(), -(logp_all.exp() * logp_all).sum(-1).detach(), xr.grad, wr.grad


def check_every_tile(config, dtype, S, T, H, V, device, monkeypatch):
    if config is not None:
        monkeypatch.setenv("AIHF_FAST_LINEAR_CONFIG", str(config))
    d = lm_head_inputs(S, T, H, V, dtype=dtype, device=device, seed=7 + (config or 0))
    x = d.hidden.reshape(-1, H).detach().requires_grad_()
    w = d.weight.detach().requires_grad_()
    y = torch.where(d.labels.reshape(-1) < 0, 0, d.labels.reshape(-1))  # every token a loss token
    logp, ent = linear_token_logprobs(x, w, y, return_entropy=True, backend="triton")
    g = torch.randn(len(y), device=device, generator=torch.Generator(device).manual_seed(1))
    (logp * g).sum().backward()
    rows = torch.arange(len(y), device=device)
    want_logp, want_ent, want_dx, want_dw = _reference_rows(x, w, y, g, rows)
    low_logp, low_ent, low_dx, low_dw = _reference_low(x, w, y, g, rows)
    assert_low_precision_close("logp", logp, low_logp, want_logp)
    assert_low_precision_close("entropy", ent, low_ent, want_ent)
    assert_low_precision_close("dx", x.grad, low_dx, want_dx, atol=2e-2)  # atol as test_logprobs' rule
    assert_low_precision_close("dw", w.grad, low_dw, want_dw, atol=2e-2)


def check_offsets_past(N, V, H, device):
    """Logits with N x V past the int32 range: forward and gradients of the last rows (whose
    offsets overflow int32) on the logits op, the two-pass fused op (one vocabulary slice: an
    (N x V) recompute) and the gradients-in-forward path (one chunk of all N tokens)."""
    dtype = torch.bfloat16
    g_ = torch.Generator(device).manual_seed(3)
    x = (torch.randn(N, H, device=device, generator=g_) * 0.5).to(dtype)
    w = (torch.randn(V, H, device=device, generator=g_) / H ** 0.5).to(dtype)
    y = torch.randint(0, V, (N,), device=device, generator=g_)
    g = torch.ones(N, device=device)
    rows = torch.arange(N - 64, N, device=device)
    want_logp, _, want_dx, _ = _reference_rows(x, w, y, g, rows)
    low_logp, _, low_dx, _ = _reference_low(x, w, y, g, rows)

    logits = (x @ w.t()).requires_grad_()
    logp = token_logprobs(logits, y, backend="triton")
    logp.sum().backward()
    assert_low_precision_close("logits op logp", logp[rows], low_logp, want_logp)
    p = (logits.detach()[rows].float()).softmax(-1)
    want_dz = -p
    want_dz[torch.arange(len(rows)), y[rows]] += 1
    assert (logits.grad[rows].float() - want_dz).abs().max().item() < 1e-2
    del logits, logp

    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    logp = linear_token_logprobs(xx, ww, y, chunk_size=V, backend="triton")
    logp.sum().backward()
    assert_low_precision_close("linear op logp", logp[rows], low_logp, want_logp)
    assert_low_precision_close("linear op dx", xx.grad[rows], low_dx, want_dx, atol=2e-2)
    two_pass = (xx.grad, ww.grad)

    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = aihf_loss(y, hidden=xx, weight=ww, segment_ids=torch.zeros(N, dtype=torch.long, device=device),
                    num_sequences=1, nll_weights=torch.ones(1, device=device), nll_normalize="none",
                    backend="triton", grad_in_forward=True, grad_chunk_tokens=N)
    out.loss.backward()  # loss = -sum logp: the same gradients as above, negated
    for name, got, want in (("dx", xx.grad, two_pass[0]), ("dw", ww.grad, two_pass[1])):
        err = (got.double() + want.double()).abs().max().item()
        assert err <= 2e-2 * want.double().abs().max().item(), f"grad_in_forward {name}: {err:.3g}"


def check_gradients_in_forward(S, T, H, V, chunk_tokens, device, monkeypatch):
    """The joint loss's gradients-in-forward path in bf16 over several chunks (d(weight) accumulated
    in bf16 across them) against the PyTorch reference in bf16 and in fp32: loss, per-sequence
    log-probs and both gradients by the low-precision rule."""
    from aihf_fast.ops import method_config

    monkeypatch.setattr("aihf_fast.ops.logprobs.FP32_DWEIGHT_MAX_BYTES", 0)
    d = lm_head_inputs(S, T, H, V, prompt_frac=0.25, dtype=torch.bfloat16, device=device, seed=11)
    layout = method_config("aihf", num_pairs=S // 4, num_demos=S // 4, nll_weight=0.5, device=device)
    ref = torch.linspace(-3.0, -1.0, S, device=device) * T
    runs = {}
    for name, dtype, backend, gif in (("fused", torch.bfloat16, "triton", True), ("low", torch.bfloat16, "torch", False),
                                      ("fp32", torch.float32, "torch", False)):
        hh = d.hidden.to(dtype).detach().requires_grad_()
        ww = d.weight.to(dtype).detach().requires_grad_()
        out = aihf_loss(d.labels, hidden=hh, weight=ww, ref_seq_logps=ref, layout=layout, backend=backend,
                        grad_in_forward=gif, grad_chunk_tokens=chunk_tokens if gif else None)
        out.loss.backward()
        runs[name] = (out.loss.detach(), out.seq_logps.detach(), hh.grad, ww.grad)
    for i, part in enumerate(("loss", "seq_logps", "dhidden", "dweight")):
        assert_low_precision_close(part, runs["fused"][i], runs["low"][i], runs["fp32"][i], atol=2e-2)


@gpu
def test_gradients_in_forward_at_a_real_vocabulary(monkeypatch):
    check_gradients_in_forward(16, 256, 4096, 128256, 1024, "cuda", monkeypatch)  # 4 chunks of 2 pairs


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", range(12))
def test_every_autotuned_tile_at_a_real_vocabulary(config, dtype, monkeypatch):
    from aihf_fast.ops._triton_kernels import LINEAR_FWD_SCHEDULES

    assert len(LINEAR_FWD_SCHEDULES) == 12  # a new schedule needs its case here
    if LINEAR_FWD_SCHEDULES[config].kwargs.get("USE_TMA") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA schedules need compute capability >= 9")
    check_every_tile(config, dtype, 3, 173, 4096, 128256, "cuda", monkeypatch)


@gpu
def test_offsets_past_int32():
    N, V = 16800, 128256
    assert N * V > 2**31
    check_offsets_past(N, V, 256, "cuda")


@pytest.mark.skipif(CUDA, reason="the GPU runs the real sizes")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checks_at_small_shapes_on_cpu(dtype, monkeypatch):
    check_every_tile(None, dtype, 2, 13, 32, 301, "cpu", monkeypatch)
    for config in (7, 9):  # the interpreter runs a pinned schedule's TMA loads and persistent programs
        check_every_tile(config, dtype, 2, 13, 32, 301, "cpu", monkeypatch)
    monkeypatch.delenv("AIHF_FAST_LINEAR_CONFIG")
    check_offsets_past(80, 301, 16, "cpu")
    if dtype == torch.bfloat16:
        check_gradients_in_forward(8, 12, 32, 301, 36, "cpu", monkeypatch)


def test_pinned_schedule_is_checked(monkeypatch):
    from aihf_fast.ops.logprobs import _triton_linear_forward

    dev = "cuda" if CUDA else "cpu"
    x, y = torch.randn(4, 64, device=dev), torch.zeros(4, dtype=torch.long, device=dev)
    monkeypatch.setenv("AIHF_FAST_LINEAR_CONFIG", "99")
    with pytest.raises(ValueError, match="AIHF_FAST_LINEAR_CONFIG must be an index in \\[0, 12\\)"):
        _triton_linear_forward(x, x, y, 1.0, False)
    monkeypatch.setenv("AIHF_FAST_LINEAR_CONFIG", "7")  # TMA: rows of 16-byte multiples only
    odd = torch.randn(4, 65, device=dev)[:, :63]
    with pytest.raises(ValueError, match="TMA schedule"):
        _triton_linear_forward(odd, odd, y, 1.0, False)
    repeated = torch.randn(1, 64, device=dev).expand(4, 64)  # stride 0: one row four times
    with pytest.raises(ValueError, match="TMA schedule"):
        _triton_linear_forward(repeated, x, y, 1.0, False)
    monkeypatch.setenv("AIHF_FAST_LINEAR_CONFIG", "2")  # a pointer schedule takes any strides
    logp, *_ = _triton_linear_forward(odd, odd, y, 1.0, False)
    assert logp.shape == (4,) and torch.isfinite(logp).all()


@pytest.mark.skipif(CUDA, reason="the GPU autotunes for real (AIHF_FAST_LINEAR_TMA=1 in bench_loss)")
def test_autotuning_over_the_tma_schedules(monkeypatch):
    """The autotuner over all 12 schedules at their real tile sizes, under the interpreter with
    its timing replaced: every schedule runs (the pre-hook sizing the descriptors of the TMA ones),
    and the one made to win, a persistent TMA schedule, gives the reference's log-probs."""
    import aihf_fast.ops.logprobs as logprobs
    from aihf_fast.ops._triton_kernels import LINEAR_FWD_SCHEDULES
    from aihf_fast.ops._triton_kernels import _linear_lse_fwd_kernel_autotuned_tma as tuned

    win = 10
    assert LINEAR_FWD_SCHEDULES[win].kwargs["USE_TMA"] and LINEAR_FWD_SCHEDULES[win].kwargs["PERSISTENT"]
    timed = []

    def fake_bench(fn, quantiles=None):
        fn()
        timed.append(1)
        return [0.5 if len(timed) == win + 1 else 1.0] * 3

    monkeypatch.setitem(tuned.__dict__, "do_bench", fake_bench)  # a cached property: set, not read
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(logprobs, "_linear_schedule", lambda x, w: (tuned, {}, True))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 72, generator=g)
    w = torch.randn(300, 72, generator=g) / 8
    y = torch.randint(0, 300, (40,), generator=g)
    logp, ent = linear_token_logprobs(x, w, y, return_entropy=True, backend="triton")
    assert len(timed) == len(LINEAR_FWD_SCHEDULES) and tuned.best_config is LINEAR_FWD_SCHEDULES[win]
    ref = (x.double() @ w.double().t()).log_softmax(-1)
    assert (logp.double() - ref.gather(1, y[:, None])[:, 0]).abs().max() < 1e-5
    assert (ent.double() + (ref.exp() * ref).sum(-1)).abs().max() < 1e-5
    again, _ = linear_token_logprobs(x, w, y, return_entropy=True, backend="triton")  # the cached choice
    assert len(timed) == len(LINEAR_FWD_SCHEDULES) and torch.equal(again, logp)
