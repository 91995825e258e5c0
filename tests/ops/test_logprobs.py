"""Triton kernels (interpreted on CPU, real on CUDA) against the PyTorch reference."""
import pytest
import torch

from aihf_fast.ops import linear_token_logprobs, reference, token_logprobs

from helpers import DEVICE, assert_close_to, assert_low_precision_close, random_labels

# (N, V): V below / above / not a multiple of the tile; N > one token block
TOKEN_SHAPES = [(1, 7), (5, 64), (37, 203), (70, 130)]
LINEAR_SHAPES = [(1, 8, 7), (19, 16, 33), (37, 40, 203), (45, 24, 97)]  # (N, H, V)


def _run_token(backend, logits, labels, temperature, entropy, g, ge):
    logits = logits.detach().clone().requires_grad_()
    out = token_logprobs(logits, labels, temperature=temperature, return_entropy=entropy, backend=backend)
    lp, en = out if entropy else (out, None)
    loss = (lp * g).sum() + ((en * ge).sum() if entropy else 0.0)
    loss.backward()
    return lp, en, logits.grad


@pytest.mark.parametrize("N,V", TOKEN_SHAPES)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_fp32(N, V, entropy, temperature):
    logits = torch.randn(N, V, device=DEVICE) * 3
    labels = random_labels((N,), V, device=DEVICE)
    g, ge = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    lp, en, grad = _run_token("triton", logits, labels, temperature, entropy, g, ge)
    lr, er, gr = _run_token("torch", logits, labels, temperature, entropy, g, ge)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert_close_to("logp", lp, lr, 1e-5, 1e-5)
    assert_close_to("dlogits", grad, gr, 1e-5, 1e-5)
    if entropy:
        assert_close_to("entropy", en, er, 1e-5, 1e-5)
    ignored = labels == -100
    assert bool((lp[ignored] == 0).all()) and bool((grad[ignored] == 0).all())


@pytest.mark.parametrize("N,V", [(37, 203), (70, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_low_precision(N, V, dtype):
    logits32 = torch.randn(N, V, device=DEVICE) * 3
    logits = logits32.to(dtype)
    labels = random_labels((N,), V, device=DEVICE)
    g, ge = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    lp, en, grad = _run_token("triton", logits, labels, 1.0, True, g, ge)
    assert grad.dtype == dtype  # the one (N x V) buffer is in the logits' dtype
    lr, er, gr = _run_token("torch", logits, labels, 1.0, True, g, ge)
    l32, e32, g32 = _run_token("torch", logits.float(), labels, 1.0, True, g, ge)
    assert_low_precision_close("logp", lp, lr, l32)
    assert_low_precision_close("entropy", en, er, e32)
    assert_low_precision_close("dlogits", grad, gr, g32, atol=1e-2)


def test_token_logprobs_batched_shape_and_all_ignored():
    logits = torch.randn(3, 5, 40, device=DEVICE)
    labels = random_labels((3, 5), 40, device=DEVICE)
    labels[1] = -100  # a whole row of padding
    logits.requires_grad_()
    lp = token_logprobs(logits, labels, backend="triton")
    assert lp.shape == (3, 5)
    lp.sum().backward()
    assert bool((lp[1] == 0).all()) and bool((logits.grad[1] == 0).all())
    assert_close_to("logp", lp, reference.token_logprobs(logits, labels), 1e-5, 1e-5)


def _run_linear(backend, h, w, labels, temperature, entropy, g, ge, chunk_size=None):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = linear_token_logprobs(h, w, labels, temperature=temperature, return_entropy=entropy,
                                backend=backend, chunk_size=chunk_size)
    lp, en = out if entropy else (out, None)
    loss = (lp * g).sum() + ((en * ge).sum() if entropy else 0.0)
    loss.backward()
    return lp, en, h.grad, w.grad


@pytest.mark.parametrize("N,H,V", LINEAR_SHAPES)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_linear_token_logprobs_fp32(N, H, V, entropy, chunk_size):
    h = torch.randn(N, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE) / H**0.5 * 2
    labels = random_labels((N,), V, device=DEVICE)
    g, ge = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    got = _run_linear("triton", h, w, labels, 0.8, entropy, g, ge, chunk_size)
    want = _run_linear("torch", h, w, labels, 0.8, entropy, g, ge)
    for name, a, b in zip(("logp", "entropy", "dhidden", "dweight"), got, want):
        if a is not None:
            assert_close_to(name, a, b, 1e-5, 1e-5)
    ignored = labels == -100
    assert bool((got[0][ignored] == 0).all()) and bool((got[2][ignored] == 0).all())


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_token_logprobs_low_precision(chunk_size, dtype):
    N, H, V = 45, 32, 97
    h32 = torch.randn(2, N, H, device=DEVICE)
    w32 = torch.randn(V, H, device=DEVICE) / H**0.5 * 2
    labels = random_labels((2, N), V, device=DEVICE)
    g, ge = torch.randn(2, N, device=DEVICE), torch.randn(2, N, device=DEVICE)
    h, w = h32.to(dtype), w32.to(dtype)
    got = _run_linear("triton", h, w, labels, 1.0, True, g, ge, chunk_size)
    low = _run_linear("torch", h, w, labels, 1.0, True, g, ge)
    f32 = _run_linear("torch", h.float(), w.float(), labels, 1.0, True, g, ge)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # the forward rounds the logits to the input dtype as an LM head does: it matches the
    # low-precision reference up to accumulation order (a logit may differ by one ulp)
    assert_close_to("logp vs low-precision reference", got[0], low[0], 3e-2)
    for name, a, b, c in zip(("logp", "entropy", "dhidden", "dweight"), got, low, f32):
        assert_low_precision_close(name, a, b, c, atol=2e-2)


def test_linear_all_ignored_and_single_token():
    h = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(33, 16, device=DEVICE, requires_grad=True)
    labels = torch.full((4,), -100, device=DEVICE)
    lp = linear_token_logprobs(h, w, labels, backend="triton")
    lp.sum().backward()
    assert bool((lp == 0).all()) and bool((h.grad == 0).all()) and bool((w.grad == 0).all())
    labels = torch.tensor([5], device=DEVICE)
    one = linear_token_logprobs(h[:1], w, labels, backend="triton")
    assert_close_to("logp", one, reference.linear_token_logprobs(h[:1], w, labels), 1e-5, 1e-5)


def test_linear_reference_forward_no_grad():
    h = torch.randn(9, 16, device=DEVICE)
    w = torch.randn(40, 16, device=DEVICE)
    labels = random_labels((9,), 40, device=DEVICE)
    with torch.no_grad():
        lp = linear_token_logprobs(h, w, labels, backend="triton")
    assert not lp.requires_grad
    assert_close_to("logp", lp, reference.linear_token_logprobs(h, w, labels), 1e-5, 1e-5)


def test_env_backend_switch(monkeypatch):
    logits = torch.randn(6, 30, device=DEVICE)
    labels = random_labels((6,), 30, device=DEVICE)
    monkeypatch.setenv("AIHF_FAST_BACKEND", "torch")
    a = token_logprobs(logits, labels)
    monkeypatch.setenv("AIHF_FAST_BACKEND", "triton")
    b = token_logprobs(logits, labels)
    assert_close_to("logp", b, a, 1e-5, 1e-5)
    monkeypatch.setenv("AIHF_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="AIHF_FAST_BACKEND"):
        token_logprobs(logits, labels)


def test_reference_gradcheck_float64():
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 10, 0])
    assert torch.autograd.gradcheck(
        lambda z: reference.token_logprobs(z, labels, temperature=0.9, return_entropy=True), (logits,)
    )
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: reference.linear_token_logprobs(a, b, labels), (h, w))


@pytest.mark.parametrize("dtype,V", [(torch.uint8, 256), (torch.int16, 40000), (torch.int32, 300)])
def test_narrow_integer_labels(dtype, V):
    logits = torch.randn(6, V, device=DEVICE)
    y = torch.tensor([0, 1, 156 % V, min(V - 1, 32000), 2, 3], device=DEVICE)  # representable in dtype
    want = reference.token_logprobs(logits, y)
    for backend in ("torch", "triton"):
        got = token_logprobs(logits, y.to(dtype), backend=backend)
        assert_close_to(f"{backend} {dtype}", got, want, 1e-5, 1e-5)


def test_linear_float64_with_ignored_tokens_on_the_torch_backend():
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([1, -100, 3, -100, 8])
    lp = linear_token_logprobs(h, w, y, backend="torch")
    assert lp.dtype == torch.float64 and bool((lp[[1, 3]] == 0).all())
    assert_close_to("logp", lp, reference.linear_token_logprobs(h, w, y), 1e-12)
    lp.sum().backward()
    assert bool((h.grad[[1, 3]] == 0).all())


def _planted(N, V, H=None):
    """Random inputs whose labels are the argmax in about half the rows (so top-1 is both True and False)."""
    g = torch.Generator().manual_seed(N * 1000 + V)
    if H is None:
        x = torch.randn(N, V, generator=g) * 3
        logits = x
    else:
        x = torch.randn(N, H, generator=g)
        w = torch.randn(V, H, generator=g) / H**0.5 * 2
        logits = x @ w.t()
    labels = torch.randint(0, V, (N,), generator=g)
    hit = torch.rand(N, generator=g) < 0.5
    labels = torch.where(hit, logits.argmax(-1), labels)
    labels[::7] = -100
    if H is None:
        return x.to(DEVICE), labels.to(DEVICE), logits.to(DEVICE)
    return (x.to(DEVICE), w.to(DEVICE)), labels.to(DEVICE), logits.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("N,V", [(5, 64), (37, 203), (70, 130)])
def test_token_logprobs_top1(backend, N, V):
    logits, labels, _ = _planted(N, V)
    lp, en, top1 = token_logprobs(logits, labels, return_entropy=True, return_top1=True, backend=backend,
                                  temperature=0.7)
    valid = labels != -100
    want = valid & (logits.argmax(-1) == labels)
    assert top1.dtype == torch.bool and top1.shape == labels.shape
    assert torch.equal(top1, want) and bool(want.any()) and bool((valid & ~want).any())
    assert_close_to("logp", lp, reference.token_logprobs(logits, labels, temperature=0.7), 1e-5, 1e-5)
    lp2, top1b = token_logprobs(logits, labels, return_top1=True, backend=backend)  # top-1 alone: (logp, top1)
    assert torch.equal(top1b, want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("N,H,V", [(19, 16, 33), (37, 40, 203), (45, 24, 97)])
def test_linear_token_logprobs_top1(backend, N, H, V):
    (h, w), labels, logits = _planted(N, V, H)
    lp, top1 = linear_token_logprobs(h, w, labels, return_top1=True, backend=backend)
    valid = labels != -100
    want = valid & (logits.argmax(-1) == labels)
    assert torch.equal(top1, want) and bool(want.any()) and bool((valid & ~want).any())
    _, en, top1b = linear_token_logprobs(h, w, labels, return_entropy=True, return_top1=True, backend=backend)
    assert torch.equal(top1b, want)
    assert_close_to("entropy", en, reference.linear_token_logprobs(h, w, labels, return_entropy=True)[1], 1e-5, 1e-5)


@pytest.mark.parametrize("op", ["token", "linear"])
def test_entropy_read_as_a_metric_leaves_the_gradient_unchanged(op):
    """An entropy asked for but not in the loss (a logged metric): the same gradients as without it."""
    if op == "token":
        logits, labels, _ = _planted(37, 203)
        inputs = (logits,)
        fn = lambda z, **kw: token_logprobs(z, labels, backend="triton", **kw)  # noqa: E731
    else:
        (h, w), labels, _ = _planted(37, 203, 40)
        inputs = (h, w)
        fn = lambda a, b, **kw: linear_token_logprobs(a, b, labels, backend="triton", **kw)  # noqa: E731
    grads = []
    for kw in ({}, dict(return_entropy=True, return_top1=True)):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, **kw)
        lp = out[0] if isinstance(out, tuple) else out
        (lp * torch.linspace(-1, 1, lp.numel(), device=lp.device)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_top1_counts_a_label_tied_for_the_top_logit(backend):
    """The spec: top-1 when the label's logit equals the row's largest, ties included (TRL counts
    only the first of tied indices)."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0]] * 3, device=DEVICE)
    labels = torch.tensor([3, 1, 4], device=DEVICE)
    _, top1 = token_logprobs(logits, labels, return_top1=True, backend=backend)
    assert top1.tolist() == [True, True, False]
    h = torch.eye(5, device=DEVICE)[:3] * 0 + torch.tensor([1.0, 0, 0, 0, 0], device=DEVICE)  # hidden e_0
    w = torch.zeros(5, 5, device=DEVICE)
    w[:, 0] = logits[0]  # logits = h @ w.T = row 0 of logits for every token
    _, top1 = linear_token_logprobs(h, w, labels, return_top1=True, backend=backend)
    assert top1.tolist() == [True, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_on_peaked_logits(dtype):
    """On logits shaped like a trained LM's (``aihf_fast.ops.testing``, the benchmarks' data: one
    token often holds most of the mass), values and gradients, entropy included, equal the
    reference's; prompt positions are ignored."""
    from aihf_fast.ops.testing import lm_head_inputs

    d = lm_head_inputs(2, 40, 48, 1500, data="peaked", prompt_frac=0.25, device=DEVICE, seed=3)
    assert d.stats()["top1_prob"] > 0.4  # peaked, not flat
    h, w = d.hidden.to(dtype), d.weight.to(dtype)
    g, ge = torch.randn(2, 40, device=DEVICE), torch.randn(2, 40, device=DEVICE)
    got = _run_linear("triton", h, w, d.labels, 1.0, True, g, ge, None)
    want = _run_linear("torch", h, w, d.labels, 1.0, True, g, ge)
    if dtype == torch.float32:
        for name, a, b in zip(("logp", "entropy", "dhidden", "dweight"), got, want):
            assert_close_to(name, a, b, 1e-4, 1e-5)
    else:
        f32 = _run_linear("torch", h.float(), w.float(), d.labels, 1.0, True, g, ge)
        for name, a, b, c in zip(("logp", "entropy", "dhidden", "dweight"), got, want, f32):
            assert_low_precision_close(name, a, b, c, atol=2e-2)
    assert bool((got[0][:, :10] == 0).all())


def test_backward_slice_grows_with_the_tokens(monkeypatch):
    """The two-pass backward's vocabulary slice: 16384 columns while the buffer stays within
    256 - 512 MiB (fewer slices, so less fp32 d(hidden) read-modify-write, at many tokens), a
    multiple of 128; AIHF_FAST_CHUNK_BYTES fixes the buffer instead."""
    from aihf_fast.ops import default_chunk_size

    monkeypatch.delenv("AIHF_FAST_CHUNK_BYTES", raising=False)
    V = 128256
    assert default_chunk_size(8192, V, 2) == 16384  # 256 MiB
    assert default_chunk_size(16384, V, 2) == 16384  # 512 MiB
    assert default_chunk_size(32768, V, 2) == 8192  # the 512 MiB cap (a fixed 256 MiB gave 4096)
    assert default_chunk_size(1024, V, 2) == V  # 256 MiB floor: the whole vocabulary
    assert default_chunk_size(3000, V, 4) % 128 == 0 and default_chunk_size(3000, V, 4) * 3000 * 4 <= 256 << 20
    assert default_chunk_size(10 ** 7, V, 2) == 128 and default_chunk_size(4, 100, 2) == 100
    monkeypatch.setenv("AIHF_FAST_CHUNK_BYTES", str(64 << 20))
    assert default_chunk_size(32768, V, 2) == 1024
