"""The joint loss with the policy's gradients made in the forward (``grad_in_forward``): equal to
the two-pass op and to the PyTorch reference for every method, layout and chunking, with no
recompute (6 M H V FLOPs for M loss tokens)."""
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import aihf_fast.ops.logprobs as lp
from aihf_fast.ops import LossConfig, aihf_loss, method_config

from helpers import DEVICE, assert_close_to, assert_low_precision_close

BETA = 0.1
H, V = 16, 53


def _batch(S, T=11, dtype=torch.float32, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) * 0.6).to(DEVICE, dtype)
    ref = (torch.randn(S, generator=g) * 3 - 30).to(DEVICE)
    labels = torch.randint(0, V, (S, T), generator=g).to(DEVICE)
    lengths = torch.randint(prompt + 1, T + 1, (S,), generator=g)  # ragged answers, right padding
    for i, n in enumerate(lengths.tolist()):
        labels[i, :prompt] = -100
        labels[i, n:] = -100
    return h, w, ref, labels


def _run(labels, h, w, ref, grad_in_forward, extra=None, **kw):
    """loss, d(hidden), d(weight), seq_logps, metrics of one call (+ backward)."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    out = aihf_loss(labels, hidden=hh, weight=ww, ref_seq_logps=ref, grad_in_forward=grad_in_forward, **kw)
    total = out.loss if extra is None else out.loss + extra(out)
    total.backward()
    return out.loss, hh.grad, ww.grad, out.seq_logps, out.float_metrics()


def _assert_same(name, got, want, atol=2e-5, rtol=2e-5):
    for part, a, b in zip(("loss", "dhidden", "dweight", "seq_logps"), got[:4], want[:4]):
        assert_close_to(f"{name} {part}", a, b, atol, rtol)
    assert got[4].keys() == want[4].keys()
    for k in want[4]:
        assert abs(got[4][k] - want[4][k]) <= atol + rtol * abs(want[4][k]), f"{name} metric {k}"


LAYOUTS = {
    "sft": dict(num_demos=4),
    "dpo": dict(num_pairs=3),
    "ipo": dict(num_pairs=3),
    "rpo": dict(num_pairs=3, nll_weight=0.5),
    "spin": dict(num_demos=3),
    "aihf": dict(num_pairs=2, num_demos=2, w_P=0.7, w_D=1.3, nll_weight=0.4),
}


@pytest.mark.parametrize("method", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk_tokens", [None, 20, 1])
def test_every_method_matches_two_pass_and_reference(method, chunk_tokens):
    layout = method_config(method, **LAYOUTS[method], device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    kw = dict(layout=layout, beta=BETA, grad_chunk_tokens=chunk_tokens, token_metrics=True)
    want = _run(labels, h, w, ref, False, backend="torch", **kw)
    two_pass = _run(labels, h, w, ref, False, backend="triton", **kw)
    if chunk_tokens == 1:  # a group holds more tokens than a chunk: the two-pass op, or an error
        with pytest.raises(ValueError, match="grad_chunk_tokens"):
            _run(labels, h, w, ref, True, backend="triton", **kw)
        got = _run(labels, h, w, ref, None, backend="triton", **kw)
    else:
        got = _run(labels, h, w, ref, True, backend="triton", **kw)
    _assert_same(f"{method} vs reference", got, want)
    _assert_same(f"{method} vs two-pass", got, two_pass)


def _packed(h, labels):
    keep = torch.ones_like(labels, dtype=torch.bool)
    keep[:, -1] = False  # drop each row's last position, so that rows are packed ragged
    lengths = keep.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0)
    return h[keep], labels[keep], cu


@pytest.mark.parametrize("form", ["cu_seqlens", "segment_ids_shuffled"])
@pytest.mark.parametrize("chunk_tokens", [None, 24])
def test_packed_layouts_and_chunks_split_at_group_boundaries(form, chunk_tokens):
    # comparisons that couple sequences far apart (0-5, 1-4, 2-3) and a ragged group of three (6 > 7 > 8)
    S = 10
    h, w, ref, labels = _batch(S)
    h_p, y_p, cu = _packed(h, labels)
    cmp = (torch.tensor([0, 1, 2, 6, 7]), torch.tensor([5, 4, 3, 7, 8]), torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3]))
    nll = torch.tensor([0.3, 0.0, 0.0, 0.0, 1.0, 0.0, 0.2, 0.0, 0.0, 0.0], device=DEVICE)  # 9: unused
    lay = dict(cu_seqlens=cu)
    if form == "segment_ids_shuffled":  # tokens of a sequence scattered over the pack
        seg = torch.repeat_interleave(torch.arange(S, device=DEVICE), (cu[1:] - cu[:-1]).long())
        perm = torch.randperm(seg.numel(), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        h_p, y_p, lay = h_p[perm], y_p[perm], dict(segment_ids=seg[perm], num_sequences=S)
    kw = dict(comparisons=cmp, nll_weights=nll, beta=BETA, grad_chunk_tokens=chunk_tokens, **lay)
    want = _run(y_p, h_p, w, ref, False, backend="torch", **kw)
    got = _run(y_p, h_p, w, ref, True, backend="triton", **kw)
    _assert_same(form, got, want)


def test_unused_and_all_ignored_sequences():
    h, w, ref, labels = _batch(6)
    labels[4] = -100  # no loss tokens, used by nothing
    labels[5, :] = -100
    labels[5, 7] = 3  # one loss token, used by nothing
    kw = dict(comparisons=(torch.tensor([0, 2]), torch.tensor([1, 3])), beta=BETA, grad_chunk_tokens=16)
    want = _run(labels, h, w, ref, False, backend="torch", **kw)
    got = _run(labels, h, w, ref, True, backend="triton", **kw)
    _assert_same("unused", got, want)
    assert got[0].isfinite() and bool((got[1][4] == 0).all()) and bool((got[1][5] == 0).all())


@pytest.mark.parametrize("options", [
    dict(loss_type="hinge"), dict(label_smoothing=0.2), dict(reduction="sum"), dict(nll_normalize="length"),
    dict(nll_normalize="sequence"), dict(nll_normalize="none"), dict(temperature=0.7), dict(reference_free=True),
])
def test_loss_options(options):
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    if options.get("reference_free"):
        ref = None
    kw = dict(layout=layout, beta=BETA, grad_chunk_tokens=16, **options)
    want = _run(labels, h, w, ref, False, backend="torch", **kw)
    got = _run(labels, h, w, ref, True, backend="triton", **kw)
    _assert_same(str(options), got, want)


def test_shift_labels_and_reference_head():
    S, T = 4, 9
    h, w, _, labels = _batch(S, T)
    rh = torch.randn(S, T, H, device=DEVICE)
    ids = torch.where(labels == -100, torch.randint(0, V, labels.shape, device=DEVICE), labels)
    causal = ids.clone()
    causal[:, :3] = -100
    kw = dict(comparisons=(torch.tensor([0, 2]), torch.tensor([1, 3])), beta=BETA, shift_labels=True,
              ref_hidden=rh, ref_weight=w * 0.9)
    outs = {}
    for name, gif, backend in (("reference", False, "torch"), ("fused", True, "triton")):
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        out = aihf_loss(causal, hidden=hh, weight=ww, grad_in_forward=gif, backend=backend, **kw)
        out.loss.backward()
        outs[name] = (out.loss, hh.grad, ww.grad, out.seq_logps)
    for part, a, b in zip(("loss", "dhidden", "dweight", "seq_logps"), outs["fused"], outs["reference"]):
        assert_close_to(part, a, b, 2e-5, 2e-5)


def test_gradient_through_seq_logps_and_a_scaled_loss():
    """The loss's gradients are made in the forward; a gradient that also reaches the returned
    log-probs (or a scale on the loss) takes the recompute path for its share."""
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    c = torch.linspace(-1, 1, layout.num_sequences, device=DEVICE)
    kw = dict(layout=layout, beta=BETA, grad_chunk_tokens=16)
    for extra in (lambda o: (c * o.seq_logps).sum(), lambda o: 2.0 * o.loss):
        want = _run(labels, h, w, ref, False, extra, backend="torch", **kw)
        got = _run(labels, h, w, ref, True, extra, backend="triton", **kw)
        _assert_same("extra", got, want)


def test_only_one_input_needs_a_gradient():
    layout = method_config("dpo", num_pairs=3, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    for needs in ("hidden", "weight"):
        grads = {}
        for gif, backend in ((False, "torch"), (True, "triton")):
            hh = h.detach().clone().requires_grad_(needs == "hidden")
            ww = w.detach().clone().requires_grad_(needs == "weight")
            aihf_loss(labels, hidden=hh, weight=ww, ref_seq_logps=ref, layout=layout, grad_in_forward=gif,
                      backend=backend).loss.backward()
            grads[gif] = (hh if needs == "hidden" else ww).grad
        assert_close_to(needs, grads[True], grads[False], 2e-5, 2e-5)


def test_no_recompute_six_mhv_flops(monkeypatch):
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    M = int((labels != -100).sum())
    calls = []
    monkeypatch.setattr(lp, "_linear_backward", lambda *a, **k: calls.append(1))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with FlopCounterMode(display=False) as fc:
        aihf_loss(labels, hidden=hh, weight=ww, ref_seq_logps=ref, layout=layout, backend="triton",
                  grad_chunk_tokens=16).loss.backward()
    assert not calls
    mm = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "mm" in str(k))
    # logits once (2MHV), d(weight) (2MHV), d(hidden) (2MHV); the rest is the (1, V) @ (V, H) row
    # mean of the head behind the logits/* metrics
    assert mm == 6 * M * H * V + 2 * V * H


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("fp32_dweight", [True, False])
def test_low_precision(dtype, fp32_dweight, monkeypatch):
    if not fp32_dweight:  # d(weight) accumulated over chunks in the weight's own dtype
        monkeypatch.setattr(lp, "FP32_DWEIGHT_MAX_BYTES", 0)
    layout = method_config("aihf", num_pairs=3, num_demos=3, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences, T=13)
    kw = dict(layout=layout, beta=BETA, grad_chunk_tokens=20)
    exact = _run(labels, h, w, ref, False, backend="torch", **kw)
    low = _run(labels, h.to(dtype), w.to(dtype), ref, False, backend="torch", **kw)
    got = _run(labels, h.to(dtype), w.to(dtype), ref, True, backend="triton", **kw)
    for i, part in enumerate(("loss", "dhidden", "dweight", "seq_logps")):
        assert_low_precision_close(part, got[i], low[i], exact[i])


def test_when_it_cannot_apply():
    layout = method_config("dpo", num_pairs=2, device=DEVICE)
    h, w, ref, labels = _batch(4)
    hh = h.clone().requires_grad_()
    base = dict(layout=layout, ref_seq_logps=ref, grad_in_forward=True)
    with pytest.raises(ValueError, match="needs the policy as hidden"):
        aihf_loss(labels, logits=hh @ w.t(), **base)
    with pytest.raises(ValueError, match="Triton backend"):
        aihf_loss(labels, hidden=hh, weight=w, backend="torch", **base)
    with torch.no_grad(), pytest.raises(ValueError, match="no gradient"):
        aihf_loss(labels, hidden=hh, weight=w, backend="triton", **base)
    nll = torch.ones(4, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="nll_weights"):
        aihf_loss(labels, hidden=hh, weight=w, backend="triton", comparisons=layout.comparisons, nll_weights=nll,
                  ref_seq_logps=ref, grad_in_forward=True)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="grad_chunk_tokens"):
            LossConfig(grad_chunk_tokens=bad)
    with pytest.raises(ValueError, match="grad_in_forward"):
        LossConfig(grad_in_forward="yes")
    with pytest.raises(ValueError, match="fp16"):  # gradients rounded before a loss scale is known
        aihf_loss(labels, hidden=hh.half(), weight=w.half(), backend="triton", **base)
    # auto: under no_grad (or in fp16) the two-pass op, same values
    with torch.no_grad():
        a = aihf_loss(labels, hidden=hh, weight=w, layout=layout, ref_seq_logps=ref, backend="triton").loss
    b = aihf_loss(labels, hidden=h, weight=w, layout=layout, ref_seq_logps=ref, backend="torch").loss
    assert_close_to("no_grad loss", a, b, 1e-5, 1e-5)
    half = _run(labels, h.half(), w.half(), ref, None, backend="triton", layout=layout)
    half_two_pass = _run(labels, h.half(), w.half(), ref, False, backend="triton", layout=layout)
    for a, b in zip(half[:4], half_two_pass[:4]):
        assert torch.equal(a, b)


def test_backward_twice_with_retain_graph_and_no_double_backward():
    """The gradients made in the forward go to the first backward (owned by the caller from then:
    changing them in place breaks nothing); a second backward recomputes them; a double backward
    (create_graph) is refused, not silently wrong."""
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    labels[labels == -100] = 1  # every token a loss token: the gradient reaches hidden without a gather
    grads = {}
    for gif, backend in ((False, "torch"), (True, "triton")):
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        out = aihf_loss(labels, hidden=hh, weight=ww, ref_seq_logps=ref, layout=layout, grad_in_forward=gif,
                        backend=backend, grad_chunk_tokens=40 if gif else None)
        out.loss.backward(retain_graph=True)
        first = (hh.grad.clone(), ww.grad.clone())
        hh.grad.zero_()
        ww.grad.mul_(0.5)
        out.loss.backward(retain_graph=True)
        (3.0 * out.loss).backward()
        grads[gif] = first, (hh.grad, ww.grad)
    for when in range(2):  # after the first backward, and after all three
        for i, part in enumerate(("dhidden", "dweight")):
            assert_close_to(f"{part} {when}", grads[True][when][i], grads[False][when][i], 2e-5, 2e-5)
    hh = h.detach().clone().requires_grad_()
    out = aihf_loss(labels, hidden=hh, weight=w, ref_seq_logps=ref, layout=layout, grad_in_forward=True,
                    backend="triton", grad_chunk_tokens=40)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, hh, create_graph=True)


def test_two_pass_when_asked(monkeypatch):
    layout = method_config("dpo", num_pairs=2, device=DEVICE)
    h, w, ref, labels = _batch(4)

    def refuse(*a, **k):
        raise AssertionError("grad_in_forward=False ran the gradients-in-forward path")

    loss_module = importlib.import_module("aihf_fast.ops.aihf_loss")  # the module (the package exports the function)
    monkeypatch.setattr(loss_module, "linear_sequence_loss", refuse)
    _run(labels, h, w, ref, False, backend="triton", layout=layout)
    with pytest.raises(AssertionError, match="ran the gradients-in-forward"):
        _run(labels, h, w, ref, None, backend="triton", layout=layout)


def _peaked_batch(S=6, T=12, V_=700, H_=24, prompt_frac=0.25, seed=0):
    from aihf_fast.ops.testing import lm_head_inputs

    d = lm_head_inputs(S, T, H_, V_, prompt_frac=prompt_frac, device=DEVICE, seed=seed)
    return d.hidden, d.weight, d.labels


@pytest.fixture(autouse=True)
def _small_skip_tiles(monkeypatch):
    monkeypatch.setattr(lp, "GRAD_SKIP_TILE", 64)  # decisions per 64 columns: tiles to leave out at small V


def _approx_run(h, w, labels, skip, layout, ref, chunk_tokens=None):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    out = aihf_loss(labels, hidden=hh, weight=ww, ref_seq_logps=ref, layout=layout, beta=BETA, backend="triton",
                    grad_skip_below=skip, grad_chunk_tokens=chunk_tokens)
    out.loss.backward()
    return out, hh.grad, ww.grad


def test_autocast_and_a_fractional_loss_scale():
    """Under autocast the path computes in the inputs' precision, as the two-pass op does; a loss
    scale (e.g. 1 / accumulation steps) is applied in fp32, not rounded to the gradients' dtype."""
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.5, device=DEVICE)
    h, w, ref, labels = _batch(layout.num_sequences)
    kw = dict(layout=layout, beta=BETA, backend="triton", grad_chunk_tokens=16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _run(labels, h, w, ref, True, **kw)
        two_pass = _run(labels, h, w, ref, False, **kw)
    _assert_same("autocast", got, two_pass)
    hb, wb = h.bfloat16(), w.bfloat16()
    one = _run(labels, hb, wb, ref, True, **kw)
    third = _run(labels, hb, wb, ref, True, lambda o: -(2.0 / 3.0) * o.loss, **kw)  # loss / 3
    for i in (1, 2):
        nz = one[i] != 0
        rel = (third[i][nz].double() / one[i][nz].double() - 1 / 3) * 3  # relative error of each entry
        assert rel.abs().max() <= 2 ** -8 and abs(rel.mean()) < 3e-4, (rel.abs().max(), rel.mean())


@pytest.mark.parametrize("chunk_tokens", [None, 20])
def test_approximate_gradients_leave_out_only_tiny_probabilities(chunk_tokens):
    """grad_skip_below: the loss and log-probs exact; d(hidden) and d(weight) differ from the exact
    ones by at most what the left-out entries (|d logits| = |g| p < |g| eps) can add up to; the
    left-out rows of d(weight) exactly 0; the labels' tiles kept (a label made improbable on
    purpose); the same result twice (no atomics); with one chunk or several (then a row of
    d(weight) is left out only where every chunk leaves it out)."""
    h, w, labels = _peaked_batch(V_=2000)  # 32 tiles of 64 columns (the interpreter's), most without a label
    labels[0, -1] = w.shape[0] - 1  # a rare token as label: its tile must be kept although p is tiny
    layout = method_config("aihf", num_pairs=1, num_demos=2, nll_weight=0.5, device=DEVICE)
    ref = torch.linspace(-40, -20, layout.num_sequences, device=DEVICE)
    exact, dx0, dw0 = _approx_run(h, w, labels, 0.0, layout, ref, chunk_tokens)
    eps = 0.03  # large, so that whole 64-column tiles are left out at this small vocabulary
    approx, dx1, dw1 = _approx_run(h, w, labels, eps, layout, ref, chunk_tokens)
    again = _approx_run(h, w, labels, eps, layout, ref, chunk_tokens)
    assert torch.equal(again[1], dx1) and torch.equal(again[2], dw1)
    assert torch.equal(approx.loss, exact.loss) and torch.equal(approx.seq_logps, exact.seq_logps)
    skipped = approx.metrics["grad/skipped_fraction"].item()
    assert 0.05 < skipped < 1.0, skipped
    assert "grad/skipped_fraction" not in exact.metrics
    # per-token coefficients g = d loss / d logp_t, from the reference path
    tok = (h @ w.t()).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    tok = torch.where(labels != -100, tok, 0.0).detach().requires_grad_()
    aihf_loss(labels, token_logps=tok, ref_seq_logps=ref, layout=layout, beta=BETA).loss.backward()
    g = tok.grad.abs().reshape(-1)
    x = h.reshape(-1, h.shape[-1])
    bound_dx = eps * g[:, None] * w.abs().sum(0)[None, :]  # |sum over left-out v of g p w_v| per element
    bound_dw = eps * (g[:, None] * x.abs()).sum(0)[None, :]
    assert bool(((dx1 - dx0).abs().reshape(x.shape) <= bound_dx + 1e-6).all())
    changed = (dw1 - dw0).abs()
    assert bool((changed <= bound_dw + 1e-6).all())
    left_out = (dw1 == 0).all(1)
    assert int(left_out.sum()) < w.shape[0] and bool((dw0[left_out] != 0).any()) == bool(left_out.any())
    if chunk_tokens is None:
        assert int(left_out.sum()) > 0
    assert not bool(left_out[labels[labels != -100]].any())  # no label's row of d(weight) is left out
    assert (dx1 - dx0).abs().max() > 0  # it is an approximation


def test_approximate_gradients_at_a_threshold_nothing_is_below_are_exact():
    h, w, labels = _peaked_batch(V_=200, seed=1)
    layout = method_config("dpo", num_pairs=3, device=DEVICE)
    ref = torch.full((6,), -30.0, device=DEVICE)
    exact = _approx_run(h, w, labels, 0.0, layout, ref)
    approx = _approx_run(h, w, labels, 1e-37, layout, ref)  # below every probability here
    assert approx[0].metrics["grad/skipped_fraction"].item() == 0.0
    assert torch.equal(approx[1], exact[1]) and torch.equal(approx[2], exact[2])


def test_approximate_gradients_options():
    for bad in (-0.1, 1.0, True, "1e-3"):
        with pytest.raises(ValueError, match="grad_skip_below"):
            LossConfig(grad_skip_below=bad)
    with pytest.raises(ValueError, match="grad_skip_below"):
        LossConfig(grad_skip_below=1e-3, grad_in_forward=False)
    layout = method_config("dpo", num_pairs=2, device=DEVICE)
    h, w, ref, labels = _batch(4)
    with pytest.raises(ValueError, match="grad_skip_below > 0 .* Triton backend"):
        aihf_loss(labels, hidden=h.clone().requires_grad_(), weight=w, layout=layout, ref_seq_logps=ref,
                  backend="torch", grad_skip_below=1e-3)
    with torch.no_grad():  # no gradients: nothing to approximate, the loss as always
        out = aihf_loss(labels, hidden=h, weight=w, layout=layout, ref_seq_logps=ref, backend="torch",
                        grad_skip_below=1e-3)
    assert out.loss.isfinite()


def test_skip_decisions_are_per_grad_skip_tile(monkeypatch):
    """The approximate mode decides per GRAD_SKIP_TILE columns whatever the kernel's own tile:
    with 128 (two interpreter tiles) it leaves out whole aligned 128-column blocks, no more than
    with 64."""
    h, w, labels = _peaked_batch(V_=2000, prompt_frac=0.75)  # few labels, so that some 128-column tiles hold none
    layout = method_config("dpo", num_pairs=3, device=DEVICE)
    ref = torch.full((6,), -30.0, device=DEVICE)
    small = _approx_run(h, w, labels, 0.1, layout, ref)
    monkeypatch.setattr(lp, "GRAD_SKIP_TILE", 128)
    big = _approx_run(h, w, labels, 0.1, layout, ref)
    frac = lambda r: r[0].metrics["grad/skipped_fraction"].item()  # noqa: E731
    assert 0 < frac(big) <= frac(small)
    left_out = (big[2] == 0).all(1)
    blocks = torch.nn.functional.pad(left_out, (0, -len(left_out) % 128)).view(-1, 128)
    assert bool((blocks.all(1) | ~blocks.any(1))[:-1].all())  # each full block all in or all out
