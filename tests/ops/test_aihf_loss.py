"""The joint loss against each method's published formula, written out here independently."""
import pytest
import torch
import torch.nn.functional as F

from aihf_fast.ops import AIHFLoss, aihf_loss, method_config

from helpers import DEVICE, assert_close_to, random_labels

BETA = 0.1


def seq_logps_by_hand(logits, labels):
    """Sum over each row's non-ignored tokens of log softmax(logits)[label]: (B,)."""
    logp = logits.float().log_softmax(-1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1), mask.sum(-1)


def make_batch(S=6, T=9, V=37, H=16):
    h = torch.randn(S, T, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE) / H**0.5 * 2
    rh = torch.randn(S, T, H, device=DEVICE)
    rw = torch.randn(V, H, device=DEVICE) / H**0.5 * 2
    labels = random_labels((S, T), V, device=DEVICE)
    labels[:, :2] = -100  # prompt tokens
    labels[:, 2] = torch.randint(0, V, (S,), device=DEVICE)  # every sequence has a loss token
    return h, w, rh, rw, labels


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_family_matches_formula(loss_type):
    h, w, rh, rw, labels = make_batch()
    P = 3
    pol, _ = seq_logps_by_hand(h @ w.t(), labels)
    ref, _ = seq_logps_by_hand(rh @ rw.t(), labels)
    hdiff = (pol[:P] - ref[:P]) - (pol[P:] - ref[P:])
    if loss_type == "sigmoid":
        want = -F.logsigmoid(BETA * hdiff).mean()
    elif loss_type == "ipo":
        want = ((hdiff - 1 / (2 * BETA)) ** 2).mean()
    else:
        want = torch.relu(1 - BETA * hdiff).mean()
    layout = method_config("ipo" if loss_type == "ipo" else "dpo", num_pairs=P, device=DEVICE)
    kw = {} if loss_type == "ipo" else dict(loss_type=loss_type)  # ipo: the layout says so
    out = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, beta=BETA, layout=layout, **kw)
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)
    assert_close_to("margins", out.metrics["rewards/margins"], (BETA * hdiff).mean(), 1e-5, 1e-5)
    assert_close_to("accuracy", out.metrics["rewards/accuracies"], (hdiff > 0).float().mean(), 0)


def test_cdpo_label_smoothing():
    h, w, rh, rw, labels = make_batch()
    pol, _ = seq_logps_by_hand(h @ w.t(), labels)
    ref, _ = seq_logps_by_hand(rh @ rw.t(), labels)
    z = BETA * ((pol[:3] - ref[:3]) - (pol[3:] - ref[3:]))
    want = (-0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z)).mean()
    out = aihf_loss(labels, logits=h @ w.t(), ref_logits=rh @ rw.t(), beta=BETA, label_smoothing=0.2,
                    comparisons=(torch.arange(3), torch.arange(3, 6)))
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)


def test_rpo_is_dpo_plus_pooled_chosen_nll():
    h, w, rh, rw, labels = make_batch()
    alpha = 0.7
    logits = h @ w.t()
    pol, _ = seq_logps_by_hand(logits, labels)
    ref, _ = seq_logps_by_hand(rh @ rw.t(), labels)
    dpo = -F.logsigmoid(BETA * ((pol[:3] - ref[:3]) - (pol[3:] - ref[3:]))).mean()
    nll = F.cross_entropy(logits[:3].reshape(-1, logits.shape[-1]), labels[:3].reshape(-1), ignore_index=-100)
    layout = method_config("rpo", num_pairs=3, nll_weight=alpha, device=DEVICE)
    out = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, beta=BETA, layout=layout)
    assert_close_to("loss", out.loss, dpo + alpha * nll, 1e-5, 1e-5)


def test_sft_is_token_mean_cross_entropy():
    h, w, _, _, labels = make_batch()
    logits = h @ w.t()
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    layout = method_config("sft", num_demos=6, device=DEVICE)
    out = aihf_loss(labels, hidden=h, weight=w, layout=layout)
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)
    pol, n = seq_logps_by_hand(logits, labels)
    assert_close_to("demo/logp_per_token", out.metrics["demo/logp_per_token"], pol.sum() / n.sum(), 1e-5, 1e-5)
    # per-sequence length normalisation: mean over sequences of the per-sequence mean NLL
    out = aihf_loss(labels, hidden=h, weight=w, nll_normalize="length", layout=layout)
    assert_close_to("length-normalised", out.loss, (-pol / n).mean(), 1e-5, 1e-5)


def test_spin_is_demo_vs_own_sample_against_previous_iterate():
    # layout [demo_0..2, sample_0..2]; the reference is the previous iterate's LM head
    h, w, _, _, labels = make_batch()
    w_prev = w + 0.05 * torch.randn_like(w)
    pol, _ = seq_logps_by_hand(h @ w.t(), labels)
    prev, _ = seq_logps_by_hand(h @ w_prev.t(), labels)
    want = torch.log1p(torch.exp(-BETA * ((pol[:3] - prev[:3]) - (pol[3:] - prev[3:])))).mean()
    layout = method_config("spin", num_demos=3, device=DEVICE)
    out = aihf_loss(labels, hidden=h, weight=w, ref_hidden=h, ref_weight=w_prev, beta=BETA, layout=layout)
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)


def test_aihf_weights_pairs_and_demonstrations():
    # layout [chosen_0, rejected_0, demo_0..1, sample_0..1]: S = 6
    h, w, rh, rw, labels = make_batch()
    w_P, w_D, lam = 0.6, 1.5, 0.2
    logits = h @ w.t()
    pol, n = seq_logps_by_hand(logits, labels)
    ref, _ = seq_logps_by_hand(rh @ rw.t(), labels)
    rho = pol - ref
    pref = w_P * -F.logsigmoid(BETA * (rho[0] - rho[1]))
    demo = w_D * -F.logsigmoid(BETA * (rho[2:4] - rho[4:6]))
    want = (pref + demo.sum()) / 3 + lam * (-pol[2:4].sum()) / n[2:4].sum()
    layout = method_config("aihf", num_pairs=1, num_demos=2, w_P=w_P, w_D=w_D, nll_weight=lam, device=DEVICE)
    assert layout.num_sequences == 6 and layout.num_pair_comparisons == 1
    out = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, beta=BETA, layout=layout)
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)
    # the same loss with reduction="sum" and weights divided by K by hand
    c = layout.comparisons
    out2 = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, beta=BETA, reduction="sum",
                     comparisons=(c[0], c[1], c[2] / 3), nll_weights=layout.nll_weights)
    assert_close_to("sum form", out2.loss, want, 1e-5, 1e-5)
    # the pairs' metrics and the demonstration comparisons' apart; the two loss parts add up
    m = out.metrics
    assert_close_to("rewards/margins", m["rewards/margins"], BETA * (rho[0] - rho[1]), 1e-5, 1e-5)
    assert_close_to("demo_rewards/margins", m["demo_rewards/margins"], (BETA * (rho[2:4] - rho[4:6])).mean(), 1e-5, 1e-5)
    assert_close_to("loss parts", m["loss/preference"] + m["loss/demo_comparisons"],
                    (pref + demo.sum()) / 3, 1e-5, 1e-5)
    assert_close_to("logits/chosen", m["logits/chosen"], logits[0][labels[0] != -100].mean(), 1e-5, 1e-5)
    assert_close_to("logits/rejected", m["logits/rejected"], logits[1][labels[1] != -100].mean(), 1e-5, 1e-5)
    f = out.float_metrics()
    assert f.keys() == m.keys() and all(isinstance(v, float) for v in f.values())


def test_aihf_without_demonstration_comparisons_is_dpo_plus_nll():
    # w_D = 0: no own-sample block, layout [chosen_0, rejected_0, demo_0..3]: S = 6
    h, w, rh, rw, labels = make_batch()
    w_P, lam = 0.6, 0.2
    pol, n = seq_logps_by_hand(h @ w.t(), labels)
    ref, _ = seq_logps_by_hand(rh @ rw.t(), labels)
    rho = pol - ref
    want = w_P * -F.logsigmoid(BETA * (rho[0] - rho[1])) + lam * (-pol[2:6].sum()) / n[2:6].sum()
    layout = method_config("aihf", num_pairs=1, num_demos=4, w_P=w_P, w_D=0.0, nll_weight=lam, device=DEVICE)
    assert layout.num_sequences == 6
    assert layout.comparisons[0].numel() == 1
    out = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, beta=BETA, layout=layout)
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)


def _as_packed(labels, *token_tensors):
    lengths = torch.tensor([3, 9, 5, 7, 9, 4], device=DEVICE)  # drop trailing padding per row
    keep = torch.arange(labels.shape[1], device=DEVICE)[None, :] < lengths[:, None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0)
    return cu, labels[keep], [t[keep] for t in token_tensors], keep


def test_packed_equals_padded_and_backends_agree():
    h, w, rh, rw, labels = make_batch()
    labels[:, 2] = torch.randint(0, w.shape[0], (6,), device=DEVICE)
    cu, y_p, (h_p, rh_p), keep = _as_packed(labels, h, rh)
    labels_masked = torch.where(keep, labels, torch.full_like(labels, -100))
    cmp = (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([1.0, 0.5, 2.0]))
    nll = torch.tensor([0.3, 0.0, 0.3, 0.0, 1.0, 0.0], device=DEVICE)
    kw = dict(comparisons=cmp, nll_weights=nll, beta=BETA)
    results = {}
    for backend in ("torch", "triton"):
        for form in ("padded", "cu_seqlens", "segment_ids"):
            hh = (h if form == "padded" else h_p).detach().clone().requires_grad_()
            ww = w.detach().clone().requires_grad_()
            if form == "padded":
                lay = dict(labels=labels_masked, ref_hidden=rh, ref_weight=rw)
            elif form == "cu_seqlens":
                lay = dict(labels=y_p, cu_seqlens=cu, ref_hidden=rh_p, ref_weight=rw)
            else:
                seg = torch.repeat_interleave(torch.arange(6, device=DEVICE), (cu[1:] - cu[:-1]).long())
                lay = dict(labels=y_p, segment_ids=seg, ref_hidden=rh_p, ref_weight=rw)
            out = aihf_loss(hidden=hh, weight=ww, backend=backend, **lay, **kw)
            out.loss.backward()
            dh = hh.grad[keep] if form == "padded" else hh.grad
            results[backend, form] = (out.loss, dh, ww.grad, out.seq_logps)
    base = results["torch", "padded"]
    for key, val in results.items():
        for name, a, b in zip(("loss", "dhidden", "dweight", "seq_logps"), val, base):
            assert_close_to(f"{key} {name}", a, b, 1e-5, 1e-5)


def test_reference_inputs_are_interchangeable():
    h, w, rh, rw, labels = make_batch()
    ref_logits = rh @ rw.t()
    ref_tok = ref_logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ref_tok = torch.where(labels != -100, ref_tok, torch.full_like(ref_tok, 123.0))  # junk at padding
    ref_seq, _ = seq_logps_by_hand(ref_logits, labels)
    cmp = (torch.arange(3), torch.arange(3, 6))
    outs = [
        aihf_loss(labels, logits=h @ w.t(), comparisons=cmp, **ref)
        for ref in (dict(ref_hidden=rh, ref_weight=rw), dict(ref_logits=ref_logits),
                    dict(ref_token_logps=ref_tok), dict(ref_seq_logps=ref_seq))
    ]
    for o in outs[1:]:
        assert_close_to("loss", o.loss, outs[0].loss, 1e-5, 1e-5)


def test_gradcheck_float64_reference_path():
    S, T, V = 4, 5, 7
    logits = torch.randn(S, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (S, T))
    labels[:, 0] = -100
    ref = torch.randn(S, dtype=torch.float64)
    cmp = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([1.0, 0.5]))
    nll = torch.tensor([0.5, 0.0, 0.0, 0.2], dtype=torch.float64)

    def f(z):
        return aihf_loss(labels, logits=z, ref_seq_logps=ref, comparisons=cmp, nll_weights=nll,
                         backend="torch", label_smoothing=0.1).loss

    assert torch.autograd.gradcheck(f, (logits,))


def test_module_matches_functional_and_rejects_per_call_config():
    h, w, rh, rw, labels = make_batch()
    cmp = (torch.arange(3), torch.arange(3, 6))
    mod = AIHFLoss(beta=0.2, loss_type="hinge")
    a = mod(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, comparisons=cmp)
    b = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, comparisons=cmp, beta=0.2,
                  loss_type="hinge")
    assert_close_to("loss", a.loss, b.loss, 0)
    with pytest.raises(TypeError, match="beta"):
        mod(labels, hidden=h, weight=w, comparisons=cmp, reference_free=True, beta=0.3)
    with pytest.raises(ValueError, match="loss_type"):
        AIHFLoss(loss_type="kto")


def test_loss_config_and_layout_objects():
    """Hyperparameters once in a frozen LossConfig (checked when made), the layout whole from
    method_config; mixing the forms or contradicting the layout is a named error."""
    import dataclasses

    from aihf_fast.ops import BatchLayout, LossConfig

    h, w, rh, rw, labels = make_batch()
    cfg = LossConfig(beta=0.2, loss_type="hinge")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.3
    layout = method_config("dpo", num_pairs=3, device=DEVICE)
    assert isinstance(layout, BatchLayout) and layout.num_sequences == 6
    a = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, layout=layout, config=cfg)
    b = aihf_loss(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, layout=layout, beta=0.2, loss_type="hinge")
    c = AIHFLoss(cfg)(labels, hidden=h, weight=w, ref_hidden=rh, ref_weight=rw, layout=layout)
    assert_close_to("config = keywords", a.loss, b.loss, 0)
    assert_close_to("module = functional", c.loss, a.loss, 0)
    kw = dict(hidden=h, weight=w, ref_hidden=rh, ref_weight=rw)
    with pytest.raises(TypeError, match="not both"):
        aihf_loss(labels, **kw, layout=layout, config=cfg, beta=0.1)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['betta'\]"):
        aihf_loss(labels, **kw, layout=layout, betta=0.1)
    with pytest.raises(TypeError, match="layout already holds \\['comparisons'\\]"):
        aihf_loss(labels, **kw, layout=layout, comparisons=layout.comparisons)
    with pytest.raises(ValueError, match="loss_type='hinge' but the layout is 'ipo'"):
        aihf_loss(labels, **kw, layout=method_config("ipo", num_pairs=3, device=DEVICE), loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='sigmoid' only"):
        aihf_loss(labels, **kw, layout=method_config("ipo", num_pairs=3, device=DEVICE), label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        LossConfig(beta=0)
    with pytest.raises(ValueError, match="num_pairs must be an int >= 0"):
        method_config("dpo", num_pairs=-1)
    with pytest.raises(TypeError, match="not per call"):
        AIHFLoss(cfg)(labels, **kw, layout=layout, config=cfg)


liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dpo_plus_nll_equals_liger_fused_linear_dpo(alpha, backend):
    P, T, H, V = 3, 8, 16, 41
    x = torch.randn(2 * P, T, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE) / 2
    rx, rw = torch.randn(2 * P, T, H, device=DEVICE), torch.randn(V, H, device=DEVICE) / 2
    y = random_labels((2 * P, T), V, device=DEVICE)
    y[:, 0] = torch.randint(0, V, (2 * P,), device=DEVICE)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    lig = liger.LigerFusedLinearDPOLoss(beta=BETA, alpha=alpha, compute_nll_loss=True, compiled=False)
    want = lig(w1, x1, y, None, rx, rw)[0]
    want.backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    layout = method_config("rpo", num_pairs=P, nll_weight=alpha, device=DEVICE)
    got = aihf_loss(y, hidden=x2, weight=w2, ref_hidden=rx, ref_weight=rw, beta=BETA, backend=backend,
                    layout=layout).loss
    got.backward()
    assert_close_to("loss", got, want, 1e-5, 1e-5)
    assert_close_to("dhidden", x2.grad, x1.grad, 1e-5, 1e-5)
    assert_close_to("dweight", w2.grad, w1.grad, 1e-5, 1e-5)


def test_single_token_sequences_in_a_pack():
    V, H = 23, 8
    h = torch.randn(7, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE)
    y = torch.randint(0, V, (7,), device=DEVICE)
    cu = torch.tensor([0, 1, 2, 7], device=DEVICE)  # two one-token sequences and a longer one
    ref = torch.zeros(3, device=DEVICE)
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, y[:, None]).squeeze(-1)
    want = -F.logsigmoid(BETA * (logp[0] - logp[1])) + 0.5 * (-logp[2:].sum()) / 5
    for backend in ("torch", "triton"):
        out = aihf_loss(y, hidden=h, weight=w, cu_seqlens=cu, ref_seq_logps=ref, beta=BETA, backend=backend,
                        comparisons=(torch.tensor([0]), torch.tensor([1])),
                        nll_weights=torch.tensor([0.0, 0.0, 0.5], device=DEVICE))
        assert_close_to(f"{backend} loss", out.loss, want, 1e-5, 1e-5)


def test_shift_labels_takes_causal_lm_labels_as_trl_gives_them():
    """TRL / transformers labels (input_ids, prompt and padding = -100, not shifted) with
    shift_labels=True: the same loss and gradients as logits[:, :-1] scored against
    labels[:, 1:] by hand, padded and packed alike (the op's log-probs are fp32: 1e-5)."""
    S, T, V = 4, 7, 23
    logits = torch.randn(S, T, V, device=DEVICE, dtype=torch.float64)
    labels = torch.randint(0, V, (S, T), device=DEVICE)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    ref = torch.randn(S, device=DEVICE, dtype=torch.float64)
    cmp = (torch.tensor([0, 2]), torch.tensor([1, 3]))
    nll = torch.tensor([0.5, 0.0, 1.0, 0.0], device=DEVICE)
    lg = logits.clone().requires_grad_()
    out = aihf_loss(labels, logits=lg, ref_seq_logps=ref, comparisons=cmp, nll_weights=nll, beta=BETA,
                    shift_labels=True)
    out.loss.backward()
    by_hand_lg = logits.clone().requires_grad_()
    seq, n = seq_logps_by_hand(by_hand_lg[:, :-1], labels[:, 1:])
    h = (seq[[0, 2]] - ref[[0, 2]]) - (seq[[1, 3]] - ref[[1, 3]])
    want = -F.logsigmoid(BETA * h).mean() + (-(nll * seq).sum() / (n * (nll != 0)).sum())
    want.backward()
    assert_close_to("loss", out.loss, want, 1e-5, 1e-5)
    assert_close_to("grad", lg.grad, by_hand_lg.grad, 1e-5, 1e-5)
    # packed: the shift stays inside each sequence (a sequence's last position reads nothing)
    cu = torch.arange(0, S * T + 1, T, device=DEVICE)
    packed = aihf_loss(labels.reshape(-1), logits=logits.reshape(S * T, V), cu_seqlens=cu, ref_seq_logps=ref,
                       comparisons=cmp, nll_weights=nll, beta=BETA, shift_labels=True)
    assert_close_to("packed loss", packed.loss, want, 1e-5, 1e-5)
    unshifted = aihf_loss(labels, logits=logits, ref_seq_logps=ref, comparisons=cmp, nll_weights=nll, beta=BETA)
    assert (unshifted.loss - want).abs() > 1e-3  # without the flag the labels mean something else


def test_metric_names_follow_the_layout_and_shift_needs_ordered_segments():
    """With a layout, (demonstration, own sample) comparisons are demo_rewards/* even without pairs
    (SPIN); raw comparisons keep TRL's names; shift_labels refuses interleaved segment_ids."""
    h, w, rh, rw, labels = make_batch()
    kw = dict(hidden=h, weight=w, ref_hidden=rh, ref_weight=rw)
    spin = aihf_loss(labels, **kw, layout=method_config("spin", num_demos=3, device=DEVICE)).metrics
    assert "demo_rewards/margins" in spin and "rewards/margins" not in spin and "logits/chosen" not in spin
    raw = aihf_loss(labels, **kw, comparisons=(torch.arange(3), torch.arange(3, 6))).metrics
    assert "rewards/margins" in raw and "demo_rewards/margins" not in raw
    flat = labels.reshape(-1)
    seg = torch.arange(flat.numel(), device=DEVICE) % 6  # interleaved: sequence i's tokens are not together
    with pytest.raises(ValueError, match="segment_ids must be non-decreasing"):
        aihf_loss(flat, hidden=h.reshape(-1, h.shape[-1]), weight=w, segment_ids=seg, shift_labels=True)


@pytest.mark.parametrize("source", ["hidden_triton", "hidden_torch", "logits_triton", "logits_torch"])
def test_token_metrics_entropy_and_top1_accuracy(source):
    """token_metrics: entropy over every loss token, top-1 accuracy over the winners' and NLL
    sequences' loss tokens, computed here by hand; the loss and its gradients do not change."""
    h, w, rh, rw, labels = make_batch(S=8, T=9, V=37)
    logits = h @ w.t()
    labels[1, 3:6] = logits[1, 3:6].argmax(-1)  # some top-1 hits, on a winner (row 1) and a loser (row 2)
    labels[2, 3:6] = logits[2, 3:6].argmax(-1)
    layout = method_config("aihf", num_pairs=2, num_demos=2, nll_weight=0.3, device=DEVICE)  # [c c r r d d s s]
    backend = source.split("_")[1]
    outs, grads = [], []
    for tm in (False, True):
        hh = h.detach().clone().requires_grad_()
        pol = dict(hidden=hh, weight=w) if source.startswith("hidden") else dict(logits=hh @ w.t())
        out = aihf_loss(labels, **pol, ref_hidden=rh, ref_weight=rw, layout=layout, beta=BETA, token_metrics=tm,
                        backend=backend)
        out.loss.backward()
        outs.append(out)
        grads.append(hh.grad)
    assert "entropy" not in outs[0].metrics
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=0, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-6)
    valid = labels != -100
    p = logits.float().log_softmax(-1)
    ent = -(p.exp() * p).sum(-1)
    assert_close_to("entropy", outs[1].metrics["entropy"], ent[valid].mean(), 1e-5, 1e-5)
    hit = logits.argmax(-1) == labels
    target = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    target[[0, 1, 4, 5]] = True  # chosen of the pairs (0, 1), demonstrations (4, 5): winners and NLL rows
    on = valid & target[:, None]
    want = (hit & on).sum() / on.sum()
    assert 0 < float(want) < 1
    assert_close_to("mean_token_accuracy", outs[1].metrics["mean_token_accuracy"], want, 1e-6, 0)


def test_token_metrics_need_logits():
    h, w, rh, rw, labels = make_batch()
    tok = torch.zeros(labels.shape, device=DEVICE)
    with pytest.raises(ValueError, match="token_metrics needs the policy's logits"):
        aihf_loss(labels, token_logps=tok, ref_hidden=rh, ref_weight=rw, token_metrics=True,
                  layout=method_config("dpo", num_pairs=3, device=DEVICE))
