"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs."""
import re

import pytest
import torch

from aihf_fast.ops import NonFiniteError, aihf_loss, linear_token_logprobs, token_logprobs

from helpers import DEVICE

V, H = 20, 8


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    return request.param


def test_token_logprobs_errors(backend):
    logits = torch.randn(4, V, device=DEVICE)
    y = torch.randint(0, V, (4,), device=DEVICE)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        token_logprobs(logits, y[:3], backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        token_logprobs(logits, y.float(), backend=backend)
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        token_logprobs(y[:, None].expand(4, V), y, backend=backend)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\).*labels\[2\] = 20"):
        token_logprobs(logits, torch.tensor([1, 2, V, -100], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"labels\[1\] = -5"):
        token_logprobs(logits, torch.tensor([1, -5, 0, 0], device=DEVICE), backend=backend)
    bad = logits.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="logits has 1 non-finite") as err:
        token_logprobs(bad, y, backend=backend)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FloatingPointError)  # bad input or divergence
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, y, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="V >= 1"):
        token_logprobs(torch.randn(4, 0, device=DEVICE), y, backend=backend)


def test_linear_token_logprobs_errors(backend):
    h = torch.randn(4, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE)
    y = torch.randint(0, V, (4,), device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        linear_token_logprobs(h, w[:, :5], y, backend=backend)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 must equal hidden dtype torch.float32"):
        linear_token_logprobs(h, w.bfloat16(), y, backend=backend)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        linear_token_logprobs(h, w[None], y, backend=backend)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_token_logprobs(h, w, y + V, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(h, w, y, chunk_size=0, backend=backend)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight has 1 non-finite"):
        linear_token_logprobs(h, bad, y, backend=backend)
    if DEVICE == "cpu" and torch.cuda.is_available() is False:
        meta = torch.randn(4, H, device="meta")
        with pytest.raises(ValueError, match="weight is on cpu but hidden is on meta"):
            linear_token_logprobs(meta, w, y, backend=backend, validate=False)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    import aihf_fast.ops._backend as backend_mod

    monkeypatch.setattr(backend_mod, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        token_logprobs(torch.randn(2, V), torch.zeros(2, dtype=torch.long), backend="triton")


def _batch():
    logits = torch.randn(4, 5, V, device=DEVICE)
    labels = torch.randint(0, V, (4, 5), device=DEVICE)
    return logits, labels


def test_aihf_loss_errors(backend):
    logits, labels = _batch()
    ref = torch.zeros(4, device=DEVICE)
    cmp = (torch.tensor([0, 2]), torch.tensor([1, 3]))
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match=r"comparisons winners must index the batch's S = 4 sequences"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(torch.tensor([0, 4]), cmp[1]), **kw)
    with pytest.raises(ValueError, match="comparisons losers must index"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(cmp[0], torch.tensor([-1, 3])), **kw)
    with pytest.raises(ValueError, match="compares sequence 2 with itself"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(cmp[0], torch.tensor([1, 2])), **kw)
    with pytest.raises(ValueError, match=r"comparisons losers must have shape \(2,\)"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(cmp[0], torch.tensor([1])), **kw)
    with pytest.raises(ValueError, match="comparisons weights must be finite"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(*cmp, torch.tensor([1.0, -1.0])), **kw)
    with pytest.raises(ValueError, match="comparisons need a reference"):
        aihf_loss(labels, logits=logits, comparisons=cmp, **kw)
    with pytest.raises(ValueError, match="exactly one policy input"):
        aihf_loss(labels, comparisons=cmp, ref_seq_logps=ref, **kw)
    with pytest.raises(ValueError, match="at most one reference"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, ref_logits=logits, comparisons=cmp, **kw)
    with pytest.raises(ValueError, match=r"ref_seq_logps must have shape \(4,\)"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref[:3], comparisons=cmp, **kw)
    with pytest.raises(ValueError, match=r"logits must have leading shape \(4, 5\)"):
        aihf_loss(labels, logits=logits[:, :4], ref_seq_logps=ref, comparisons=cmp, **kw)
    with pytest.raises(ValueError, match=r"nll_weights must have shape \(4,\)"):
        aihf_loss(labels, logits=logits, nll_weights=torch.ones(3, device=DEVICE), **kw)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp, loss_type="orpo", **kw)
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='sigmoid' only"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp, loss_type="ipo",
                  label_smoothing=0.1, **kw)
    with pytest.raises(ValueError, match="beta must be"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp, beta=0.0, **kw)
    bad_ref = ref.clone()
    bad_ref[1] = float("nan")
    with pytest.raises(NonFiniteError, match="ref_seq_logps has non-finite"):
        aihf_loss(labels, logits=logits, ref_seq_logps=bad_ref, comparisons=cmp, **kw)
    empty = labels.clone()
    empty[3] = -100
    with pytest.raises(ValueError, match="sequence 3 has no loss tokens"):
        aihf_loss(empty, logits=logits, ref_seq_logps=ref, comparisons=cmp, **kw)


def test_packed_layout_errors(backend):
    logits = torch.randn(10, V, device=DEVICE)
    labels = torch.randint(0, V, (10,), device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at N = 10"):
        aihf_loss(labels, logits=logits, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        aihf_loss(labels, logits=logits, cu_seqlens=torch.tensor([0, 4, 4, 10], device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        aihf_loss(labels, logits=logits, cu_seqlens=torch.tensor([0.0, 10.0], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        aihf_loss(labels, logits=logits, cu_seqlens=torch.tensor([0, 10], device="meta"), backend=backend)
    with pytest.raises(ValueError, match="padded form"):
        aihf_loss(labels, logits=logits, backend=backend)
    with pytest.raises(ValueError, match="segment_ids must be in"):
        aihf_loss(labels, logits=logits, segment_ids=torch.arange(10, device=DEVICE) - 1, num_sequences=9, backend=backend)


def test_unused_sequences_cannot_poison_the_loss():
    # sequence 1 is neither compared nor a demonstration: its -inf log-prob must not give NaN
    labels = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    tok = torch.tensor([[-1.0, -2.0, -0.5], [float("-inf"), -1.0, -1.0]], device=DEVICE, requires_grad=True)
    out = aihf_loss(labels, token_logps=tok, nll_weights=torch.tensor([1.0, 0.0], device=DEVICE))
    assert torch.isfinite(out.loss) and torch.isfinite(out.metrics["loss/nll"])
    out.loss.backward()
    assert torch.isfinite(tok.grad).all()
    # and a batch with no terms at all still backpropagates (zero gradients)
    tok.grad = None
    aihf_loss(labels, token_logps=tok).loss.backward()
    assert bool((tok.grad == 0).all())


def test_more_aihf_loss_argument_errors():
    logits, labels = _batch()
    ref = torch.zeros(4, device=DEVICE)
    with pytest.raises(TypeError, match="bool tensor"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref,
                  comparisons=(torch.tensor([True, False]), torch.tensor([1, 3])))
    with pytest.raises(ValueError, match="beta must be a finite number"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=(torch.tensor([0]), torch.tensor([1])),
                  beta=float("inf"))
    with pytest.raises(ValueError, match="num_sequences=3 but the layout holds 4"):
        aihf_loss(labels, logits=logits, num_sequences=3)
    # the (K, 3) tensor form: float weights, integral indices
    cmp = torch.tensor([[0.0, 1.0, 0.5], [2.0, 3.0, 1.0]], device=DEVICE)
    out = aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp)
    assert torch.isfinite(out.loss)
    with pytest.raises(TypeError, match="integer sequence indices"):
        aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp + 0.5)


def test_reference_errors_name_the_reference_argument():
    """A bad reference is named as the reference (ref_hidden / ref_weight / ref_logits), not as the
    policy's hidden / weight; a reference with another vocabulary, NaN policy token log-probs at
    loss positions, and a reference passed with reference_free=True are refused."""
    S, T, H, V = 2, 5, 8, 11
    h, w = torch.randn(S, T, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    labels = torch.randint(0, V, (S, T), device=DEVICE)
    cmp = (torch.tensor([0]), torch.tensor([1]))
    kw = dict(hidden=h, weight=w, comparisons=cmp)
    nan_h = h.clone()
    nan_h[0, 1, 2] = float("nan")
    cases = [
        (dict(ref_hidden=nan_h, ref_weight=w), "ref_hidden has 1 non-finite"),
        (dict(ref_hidden=h, ref_weight=w.clone().fill_(float("inf"))), "ref_weight has"),
        (dict(ref_hidden=h, ref_weight=torch.randn(V, H + 1, device=DEVICE)), "ref_weight must have shape (V, 8)"),
        (dict(ref_hidden=torch.randn(S, T, H + 1, device=DEVICE), ref_weight=w), "to match ref_hidden's last dim 9"),
        (dict(ref_hidden=h, ref_weight=torch.randn(V + 3, H, device=DEVICE)), "ref_weight has a vocabulary of 14"),
        (dict(ref_logits=torch.randn(S, T, V + 1, device=DEVICE)), "ref_logits has a vocabulary of 12"),
        (dict(ref_logits=torch.full((S, T, V), float("nan"), device=DEVICE)), "ref_logits has"),
        (dict(ref_weight=w), "pass ref_hidden too"),
        (dict(ref_seq_logps=torch.zeros(S, device=DEVICE), reference_free=True), "reference_free=True takes no reference"),
    ]
    for extra, msg in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
            aihf_loss(labels, **kw, **extra)
    with pytest.raises(TypeError, match="ref_weight dtype"):
        aihf_loss(labels, **kw, ref_hidden=h, ref_weight=w.double())
    tok = torch.randn(S, T, device=DEVICE)
    tok[1, 3] = float("nan")
    with pytest.raises(ValueError, match="token_logps has 1 NaN values at loss positions"):
        aihf_loss(labels, token_logps=tok, comparisons=cmp, reference_free=True)
    masked = labels.clone()
    masked[1, 3] = -100  # NaN at an ignored position is not read
    assert torch.isfinite(aihf_loss(masked, token_logps=tok, comparisons=cmp, reference_free=True).loss)
