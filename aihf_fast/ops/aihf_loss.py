"""The joint demonstration + preference loss over a packed batch of sequences.

Notation: S sequences in the batch, N tokens, K comparisons. For sequence i with loss tokens t
(labels != ignore_index):

    logp_i  = sum_t log pi(y_t | ...)                  (policy, fused op, with gradient)
    ref_i   = sum_t log pi_ref(y_t | ...)              (precomputed, or reference hidden + weight)
    rho_i   = logp_i - ref_i                           (implicit reward r_i = beta * rho_i)

Comparison k = (winner a, loser b, weight c_k), h_k = rho_a - rho_b, z_k = beta * h_k:

    sigmoid  l_k = -(1 - eps) log sigmoid(z_k) - eps log sigmoid(-z_k)    (DPO; cDPO for eps > 0)
    ipo      l_k = (h_k - 1 / (2 beta))^2                                 (IPO)
    hinge    l_k = max(0, 1 - z_k)                                        (SLiC)

    L = sum_k c_k l_k / K'  +  sum_i a_i NLL_i / D

K' = K for reduction="mean" (1 for "sum"); NLL_i = -logp_i, and with nll_normalize
"tokens" D = number of loss tokens in sequences with a_i != 0 (the pooled token mean of SFT
and of TRL's/Liger's RPO term); "length": NLL_i /= len_i and D = #{i: a_i != 0};
"sequence": D = #{i: a_i != 0}; "none": D = 1.

Methods as configurations (``method_config`` builds them for a standard batch layout):
    SFT    no comparisons; a_i = 1 on demonstrations
    DPO    (chosen, rejected, 1) per preference pair, sigmoid;      IPO: loss_type="ipo"
    RPO    DPO + a_i = alpha on the chosen answers
    SPIN   (demonstration, own sample, 1), sigmoid, pi_ref = the previous iterate
    AIHF   (chosen, rejected, w_P) + (demonstration, current-policy sample, w_D)
           [+ a_i = lambda on demonstrations], reference fixed or the previous iterate
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import reference
from .logprobs import (
    _check_linear_inputs,
    _pick_backend,
    default_grad_chunk_tokens,
    linear_sequence_loss,
    linear_token_logprobs,
    plan_group_chunks,
    token_logprobs,
)
from .validation import NonFiniteError, check_finite, check_float, check_int, check_same_device, check_shape

REDUCTIONS = ("mean", "sum")
NLL_NORMALIZATIONS = ("tokens", "length", "sequence", "none")
METHODS = ("sft", "dpo", "ipo", "rpo", "spin", "aihf")


@dataclass(frozen=True)
class LossConfig:
    """The loss's hyperparameters, checked once when made (``aihf_loss(..., config=...)``,
    ``AIHFLoss(config)``; or the same names as keywords of ``aihf_loss``).

    loss_type: sigmoid | ipo | hinge; None: the layout's (``method_config("ipo")`` says ipo), else
    sigmoid. label_smoothing: sigmoid only (cDPO). reference_free: no reference, rewards from the
    policy's log-probs alone. shift_labels: labels are causal-LM labels (transformers/TRL), not yet
    shifted to the positions that predict them. temperature: log-probs of softmax(logits / T).
    token_metrics: also report ``entropy`` (the policy's mean per-token entropy over all loss
    tokens) and ``mean_token_accuracy`` (the share of loss tokens of imitated or preferred
    sequences, i.e. comparison winners and NLL sequences, whose label is the policy's top-1
    token), as TRL logs them; needs hidden + weight or logits.
    grad_in_forward: with hidden + weight on the Triton backend, make the gradients of hidden and
    weight in the forward (``linear_sequence_loss``: token chunks that hold whole comparison
    groups, each chunk's logits computed once; 6NHV FLOPs instead of 8NHV, no recompute in the
    backward). None (default): wherever it applies (gradients needed, every group fits one
    chunk); True: always, an error where it cannot; False: never. grad_chunk_tokens: tokens per
    chunk of that path (default: a (tokens x V) logits buffer of at most 640 MiB, env
    ``AIHF_FAST_GRAD_CHUNK_BYTES``). grad_skip_below: approximate gradients on that path, off (0)
    by default: vocabulary tiles whose probabilities are all below it for a whole chunk (and that
    hold none of its labels) are left out of the gradients (``linear_sequence_loss``); the metric
    ``grad/skipped_fraction`` reports the share of work left out.
    chunk_size / backend / validate: passed to the log-prob ops."""

    beta: float = 0.1
    loss_type: str | None = None
    label_smoothing: float = 0.0
    reduction: str = "mean"
    nll_normalize: str = "tokens"
    reference_free: bool = False
    shift_labels: bool = False
    ignore_index: int = -100
    temperature: float = 1.0
    token_metrics: bool = False
    grad_in_forward: bool | None = None
    grad_chunk_tokens: int | None = None
    grad_skip_below: float = 0.0
    chunk_size: int | None = None
    backend: str | None = None
    validate: bool = True

    def __post_init__(self):
        if self.loss_type is not None and self.loss_type not in reference.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {reference.LOSS_TYPES}, got {self.loss_type!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.nll_normalize not in NLL_NORMALIZATIONS:
            raise ValueError(f"nll_normalize must be one of {NLL_NORMALIZATIONS}, got {self.nll_normalize!r}")
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool)
                and 0 < self.beta < float("inf")):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss_type not in (None, "sigmoid"):
            raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={self.loss_type!r}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.grad_in_forward not in (None, True, False):
            raise ValueError(f"grad_in_forward must be None, True or False, got {self.grad_in_forward!r}")
        g = self.grad_chunk_tokens
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"grad_chunk_tokens must be a positive int or None, got {g!r}")
        t = self.grad_skip_below
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t < 1.0):
            raise ValueError(f"grad_skip_below must be a number in [0, 1), got {t!r}")
        if t and self.grad_in_forward is False:
            raise ValueError("grad_skip_below applies to the gradients-in-forward path: not with grad_in_forward=False")


@dataclass(frozen=True)
class BatchLayout:
    """Which sequences of a batch are compared and which are imitated (``method_config`` builds it).

    comparisons: (winners (K,), losers (K,), weights (K,)) sequence indices, or None.
    nll_weights: (S,) demonstration NLL weight per sequence, or None.
    num_sequences: S. loss_type: the method's own (ipo), or None.
    num_pair_comparisons: the first this many comparisons are preference pairs, the rest
    demonstration-vs-own-sample comparisons (their metrics are then reported apart); None: one kind."""

    comparisons: tuple | None
    nll_weights: torch.Tensor | None
    num_sequences: int
    loss_type: str | None = None
    num_pair_comparisons: int | None = None

    def replace(self, **changes) -> BatchLayout:
        """A copy with ``changes`` (e.g. other comparison weights)."""
        return dataclasses.replace(self, **changes)


@dataclass
class AIHFLossOutput:
    """loss: scalar fp32 with gradient. metrics: detached fp32 0-d tensors, TRL-style names (no
    device sync inside the loss; ``float_metrics()`` for a logger). seq_logps / seq_ref_logps: (S,)
    fp32 per-sequence sums (policy has gradient). seq_lengths: (S,) int64 loss tokens per sequence.
    comparison_logratios: (K,) detached h_k."""

    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    seq_logps: torch.Tensor | None = None
    seq_ref_logps: torch.Tensor | None = None
    seq_lengths: torch.Tensor | None = None
    comparison_logratios: torch.Tensor | None = None

    def float_metrics(self) -> dict:
        """The metrics as Python floats (one device sync), as TRL logs them."""
        if not self.metrics:
            return {}
        keys = list(self.metrics)
        values = torch.stack([self.metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        return dict(zip(keys, values))


# ----------------------------------------------------------------------------- layout


def _segments(labels, cu_seqlens, segment_ids, num_sequences, validate):
    """-> flat labels (N,), segment id per token (N,) int64, S."""
    if cu_seqlens is not None and segment_ids is not None:
        raise ValueError("pass cu_seqlens or segment_ids, not both")
    if cu_seqlens is None and segment_ids is None:
        if labels.dim() != 2:
            raise ValueError(
                f"labels must be (B, T) for the padded form (no cu_seqlens / segment_ids), got shape {tuple(labels.shape)}"
            )
        B, T = labels.shape
        seg = torch.arange(B, device=labels.device).repeat_interleave(T)
        return labels.reshape(-1), seg, B
    if labels.dim() != 1:
        raise ValueError(f"labels must be (N,) in the packed form, got shape {tuple(labels.shape)}")
    N = labels.numel()
    if cu_seqlens is not None:
        check_int("cu_seqlens", cu_seqlens, ndim=1)
        check_same_device(labels=labels, cu_seqlens=cu_seqlens)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.numel()}")
        S = cu_seqlens.numel() - 1
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if validate:
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != N:
                raise ValueError(
                    f"cu_seqlens must start at 0 and end at N = {N} tokens, got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}"
                )
            if bool((lengths <= 0).any()):
                i = int((lengths <= 0).nonzero()[0])
                raise ValueError(f"cu_seqlens must be strictly increasing: sequence {i} is empty (length {int(lengths[i])})")
        seg = torch.arange(S, device=labels.device).repeat_interleave(lengths.long(), output_size=N)
        return labels, seg, S
    check_int("segment_ids", segment_ids, ndim=1)
    check_shape("segment_ids", segment_ids, (N,), "one id per token of labels")
    check_same_device(labels=labels, segment_ids=segment_ids)
    if num_sequences is None:
        num_sequences = int(segment_ids.max()) + 1 if N else 0
    if validate and N and (int(segment_ids.min()) < 0 or int(segment_ids.max()) >= num_sequences):
        raise ValueError(f"segment_ids must be in [0, num_sequences = {num_sequences})")
    return labels, segment_ids.long(), int(num_sequences)


def _flat_tokens(name, t, labels_shape, N, trailing: int):
    """Flatten a token-level tensor shaped labels_shape (+ one trailing dim) to (N,) / (N, D)."""
    lead = tuple(t.shape[: t.dim() - trailing])
    if lead != tuple(labels_shape):
        raise ValueError(f"{name} must have leading shape {tuple(labels_shape)} (that of labels), got {tuple(t.shape)}")
    return t.reshape(N, *t.shape[t.dim() - trailing:])


def _parse_comparisons(comparisons, S, device, validate):
    if comparisons is None:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return z, z, torch.zeros(0, dtype=torch.float32, device=device)
    if isinstance(comparisons, torch.Tensor):
        if comparisons.dim() != 2 or comparisons.shape[1] not in (2, 3):
            raise ValueError(f"comparisons tensor must be (K, 2) or (K, 3), got shape {tuple(comparisons.shape)}")
        parts = [p.to(device) for p in comparisons.unbind(1)]
    elif isinstance(comparisons, (tuple, list)) and len(comparisons) in (2, 3):
        parts = [torch.as_tensor(p, device=device) for p in comparisons]
    else:
        raise TypeError("comparisons must be (winners, losers[, weights]) or a (K, 2|3) tensor")
    winners, losers = parts[0], parts[1]
    for name, t in (("comparisons winners", winners), ("comparisons losers", losers)):
        if t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer sequence indices, got a bool tensor")
        if t.is_floating_point():  # the (K, 3) tensor form carries float weights
            if validate and not bool((t.long() == t).all()):
                raise TypeError(f"{name} must hold integer sequence indices")
        else:
            check_int(name, t)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    winners, losers = winners.long(), losers.long()
    K = winners.numel()
    check_shape("comparisons losers", losers, (K,), "one loser per winner")
    weights = parts[2].float() if len(parts) == 3 else torch.ones(K, device=device)
    check_shape("comparisons weights", weights, (K,), "one weight per comparison")
    check_same_device(winners=winners, losers=losers, weights=weights)
    if validate and K:
        for name, t in (("winners", winners), ("losers", losers)):
            if int(t.min()) < 0 or int(t.max()) >= S:
                raise ValueError(
                    f"comparisons {name} must index the batch's S = {S} sequences, got range [{int(t.min())}, {int(t.max())}]"
                )
        if bool((winners == losers).any()):
            k = int((winners == losers).nonzero()[0])
            raise ValueError(f"comparison {k} compares sequence {int(winners[k])} with itself")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("comparisons weights must be finite and >= 0")
    return winners, losers, weights


def _check_reference_head(ref_hidden, ref_weight, validate):
    """The reference's hidden states and head, checked under their own names (the op would
    name them ``hidden`` / ``weight``)."""
    if ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight, the reference (V, H) LM-head weight")
    check_float("ref_hidden", ref_hidden)
    check_float("ref_weight", ref_weight, ndim=2)
    if ref_hidden.dim() == 0:
        raise ValueError("ref_hidden must have a hidden-size dim, got a scalar")
    H = ref_hidden.shape[-1]
    if ref_weight.shape[1] != H:
        raise ValueError(f"ref_weight must have shape (V, {H}) to match ref_hidden's last dim {H}, "
                         f"got {tuple(ref_weight.shape)}")
    if ref_weight.dtype != ref_hidden.dtype:
        raise TypeError(f"ref_weight dtype {ref_weight.dtype} must equal ref_hidden dtype {ref_hidden.dtype}")
    if validate:
        check_finite("ref_hidden", ref_hidden)
        check_finite("ref_weight", ref_weight)


def _shift(labels, seg, ignore_index):
    """Next-token labels at each position: labels[t + 1] of the same sequence, ignore_index at a
    sequence's last position (causal-LM labels as TRL and transformers give them, unshifted)."""
    flat = labels.reshape(-1)
    out = torch.full_like(flat, ignore_index)
    if flat.numel() > 1:
        same = seg[1:] == seg[:-1]
        out[:-1] = torch.where(same, flat[1:], torch.full_like(flat[1:], ignore_index))
    return out.reshape(labels.shape)


def _comparison_metrics(rho, seq_logps, winners, losers, weighted, beta, seg, valid, mean_logit, S, n_pairs):
    """TRL's DPO metrics of the preference pairs (rewards/*, logps/*, logits/*: the mean raw logit,
    before any temperature, over the chosen / rejected answers' tokens and the vocabulary), and with
    a layout (``n_pairs`` known) the demonstration-vs-own-sample comparisons apart (demo_rewards/*,
    also when there are no pairs, as in SPIN); loss/preference and loss/demo_comparisons: the two
    parts of the comparison loss. Without a layout every comparison is reported under TRL's names."""
    K = winners.numel()
    if n_pairs is None:  # one kind (a layout of raw comparisons): TRL's names
        parts = [("rewards/", slice(0, K))]
    else:
        parts = [p for p in (("rewards/", slice(0, n_pairs)), ("demo_rewards/", slice(n_pairs, K)))
                 if p[1].stop > p[1].start]
    out = {}
    for prefix, sl in parts:
        w, lo = winners[sl], losers[sl]
        r_w, r_l = beta * rho[w], beta * rho[lo]
        names = ("chosen", "rejected") if prefix == "rewards/" else ("demo", "sample")
        out.update({prefix + names[0]: r_w.mean(), prefix + names[1]: r_l.mean(),
                    prefix + "margins": (r_w - r_l).mean(), prefix + "accuracies": (r_w > r_l).float().mean()})
        if prefix == "rewards/":
            out.update({"logps/chosen": seq_logps[w].mean(), "logps/rejected": seq_logps[lo].mean(),
                        "loss/preference": weighted[sl].sum()})
            if mean_logit is not None:
                tok_sum = reference.segment_sum(torch.where(valid, mean_logit, 0.0), seg, S)
                tok_n = reference.segment_sum(valid.float(), seg, S)
                for name, idx in (("chosen", w), ("rejected", lo)):
                    out["logits/" + name] = tok_sum[idx].sum() / tok_n[idx].sum().clamp(min=1)
        else:
            out["loss/demo_comparisons"] = weighted[sl].sum()
    return out


def _joint_terms(seq_logps, *, seq_ref, winners, losers, cw, a, seq_len, beta, loss_type, label_smoothing,
                 reduction, nll_normalize):
    """The loss's two parts from the per-sequence log-probs (S,) fp32 (module docstring):
    (pref 0-d, nll 0-d, h (K,) or None, weighted per-comparison losses (K,) or None)."""
    K = winners.numel()
    if K:
        rho = seq_logps - seq_ref
        h = rho[winners] - rho[losers]
        weighted = cw * reference.comparison_losses(h, beta, loss_type, label_smoothing) / (K if reduction == "mean" else 1)
        pref = weighted.sum()
    else:
        # zero, but on the graph (a batch with no comparisons still backpropagates); masked so
        # that -inf log-probs of unused sequences cannot turn it into NaN
        h = weighted = None
        pref = torch.where(torch.isfinite(seq_logps), seq_logps, 0.0).sum() * 0.0
    has_nll = a != 0
    nll_i = -seq_logps
    if nll_normalize == "length":
        nll_i = nll_i / seq_len.clamp(min=1)
    if nll_normalize == "tokens":
        denom = (seq_len * has_nll).sum().clamp(min=1)
    elif nll_normalize in ("length", "sequence"):
        denom = has_nll.sum().clamp(min=1)
    else:
        denom = 1
    # masked, not multiplied: a sequence the loss does not use may hold -inf log-probs
    nll = torch.where(has_nll, a * nll_i, 0.0).sum() / denom
    return pref, nll, h, weighted


def _comparison_groups(winners, losers, S) -> torch.Tensor:
    """(S,) int64 group of each sequence: the connected components of the comparison graph (a
    sequence no comparison touches is a group of its own), numbered in order of first sequence."""
    parent = list(range(S))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for w, lo in zip(winners.tolist(), losers.tolist()):
        rw, rl = root(w), root(lo)
        if rw != rl:
            parent[max(rw, rl)] = min(rw, rl)
    roots = [root(i) for i in range(S)]
    number = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return torch.tensor([number[r] for r in roots], dtype=torch.long, device=winners.device)


def _grad_in_forward_plan(x, weight, flat_labels, valid, seg, winners, losers, a, cw, S, config):
    """Whether the policy's gradients are made in the forward (``LossConfig.grad_in_forward``):
    None (the two-pass op), or (chunks, compact token index or None)."""
    want = config.grad_in_forward
    if want is False:
        return None
    if config.grad_skip_below > 0 and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        want = True  # the approximate gradients exist on this path only
    why = None
    if _pick_backend(config.backend, x, "hidden") != "triton":
        why = "it needs the Triton backend (CUDA tensors, or TRITON_INTERPRET=1)"
    elif not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        why = "no gradient of hidden or weight is needed here"
    elif a.requires_grad or cw.requires_grad:
        why = "nll_weights or the comparison weights require a gradient"
    elif x.dtype == torch.float16:  # small gradients would round to 0 in fp16 before a loss scale is applied
        why = "fp16: the logits' gradients would be rounded before the loss scale (GradScaler) is known; use bf16"
    if why is None:
        idx = valid.nonzero().squeeze(1) if not bool(valid.all()) else None
        seg_c = seg if idx is None else seg[idx]
        max_tokens = config.grad_chunk_tokens or default_grad_chunk_tokens(weight.shape[0], x.element_size())
        chunks = plan_group_chunks(seg_c, _comparison_groups(winners, losers, S), max_tokens)
        if chunks is not None:
            return chunks, idx
        why = (f"a comparison group has more loss tokens than a chunk holds ({max_tokens}: grad_chunk_tokens or "
               "AIHF_FAST_GRAD_CHUNK_BYTES)")
    if want:
        asked = "grad_in_forward=True" if config.grad_in_forward else "grad_skip_below > 0 (the gradients-in-forward path)"
        raise ValueError(f"{asked} cannot apply: {why}")
    return None


def _fused_policy(x, weight, flat_labels, valid, seg, S, terms, plan, config, token_kw):
    """The policy's loss and per-token log-probs (N,) [+ entropy, top-1] with the gradients made in
    the forward (``linear_sequence_loss``) -> (loss, tok as the two-pass op returns it, the share
    of the gradient work skipped)."""
    chunks, idx = plan
    temperature = _check_linear_inputs(x, weight, flat_labels, config.ignore_index, config.temperature,
                                       config.chunk_size, config.validate)
    xc, yc, sc = (x, flat_labels, seg) if idx is None else (x[idx], flat_labels[idx], seg[idx])

    def loss_of(seq_logps):
        pref, nll, _, _ = _joint_terms(seq_logps, **terms)
        return pref + nll

    out = linear_sequence_loss(xc, weight, yc.contiguous(), sc.contiguous(), S, loss_of, chunks,
                               temperature=temperature, chunk_size=config.chunk_size,
                               grad_skip_below=config.grad_skip_below, **token_kw)
    loss, per_token, skipped = out[0], list(out[1:-1]), out[-1]
    if idx is not None:  # back to every token: 0 (and False) at ignored positions, as the two-pass op
        N = x.shape[0]
        per_token = [torch.zeros(N, dtype=t.dtype, device=t.device).index_copy(0, idx, t) for t in per_token]
    return loss, (per_token[0] if len(per_token) == 1 else tuple(per_token)), skipped


# ----------------------------------------------------------------------------- the loss


def aihf_loss(
    labels: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    token_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_token_logps: torch.Tensor | None = None,
    ref_seq_logps: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    layout: BatchLayout | None = None,
    comparisons=None,
    nll_weights: torch.Tensor | None = None,
    num_sequences: int | None = None,
    config: LossConfig | None = None,
    **hyperparameters,
) -> AIHFLossOutput:
    """Joint demonstration + preference loss (formulas in the module docstring).

    Policy (exactly one): ``hidden`` (..., H) + ``weight`` (V, H) (fused, logits never built),
    ``logits`` (..., V), or precomputed ``token_logps`` (...) with their own graph.
    Reference (at most one): ``ref_hidden`` + ``ref_weight``, ``ref_logits``, ``ref_token_logps``
    (shaped like labels), or ``ref_seq_logps`` (S,); computed without gradient. None only with
    ``reference_free=True`` (which takes no reference) or without comparisons. A reference head
    must have the policy's vocabulary size.
    Layout: padded ``labels`` (B, T), one sequence per row; or packed ``labels`` (N,) with
    ``cu_seqlens`` (S + 1,) or ``segment_ids`` (N,) (+ ``num_sequences``).
    ``labels`` at position t are the token that position t predicts (already shifted). With
    ``shift_labels=True`` they are the causal-LM labels of transformers/TRL instead (``input_ids``
    with prompt and padding set to ignore_index): the loss reads labels[t + 1] of the same
    sequence at position t (and nothing at a sequence's last position).
    What is compared and imitated: ``layout`` (a ``BatchLayout``, e.g. ``method_config(...)``), or
    ``comparisons`` = (winners (K,), losers (K,)[, weights (K,)]) sequence indices or (K, 2|3) and
    ``nll_weights`` (S,) demonstration NLL weight per sequence (0 = none).
    Hyperparameters: ``config`` (a ``LossConfig``) or its fields as keywords (``beta=0.1``, ...).
    """
    if config is None:
        names = {f.name for f in dataclasses.fields(LossConfig)}
        unknown = sorted(set(hyperparameters) - names)
        if unknown:
            raise TypeError(f"aihf_loss() got unknown keyword argument(s) {unknown}; the hyperparameters are "
                            f"LossConfig's fields {sorted(names)}")
        config = LossConfig(**hyperparameters)
    elif hyperparameters:
        raise TypeError(f"pass the hyperparameters in config or as keywords, not both: {sorted(hyperparameters)}")
    elif not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    if layout is not None:
        if not isinstance(layout, BatchLayout):
            raise TypeError(f"layout must be a BatchLayout (see method_config), got {type(layout).__name__}")
        given = [n for n, v in (("comparisons", comparisons), ("nll_weights", nll_weights),
                                ("num_sequences", num_sequences)) if v is not None]
        if given:
            raise TypeError(f"layout already holds {given}: pass one or the other")
        comparisons, nll_weights, num_sequences = layout.comparisons, layout.nll_weights, layout.num_sequences
        if config.loss_type and layout.loss_type and config.loss_type != layout.loss_type:
            raise ValueError(f"loss_type={config.loss_type!r} but the layout is {layout.loss_type!r}'s: drop one")
    loss_type = config.loss_type or (layout.loss_type if layout is not None else None) or "sigmoid"
    if config.label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")
    beta, label_smoothing, reduction = config.beta, config.label_smoothing, config.reduction
    nll_normalize, reference_free, ignore_index = config.nll_normalize, config.reference_free, config.ignore_index
    temperature, chunk_size, backend, validate = config.temperature, config.chunk_size, config.backend, config.validate
    check_int("labels", labels)

    labels = labels.long()  # narrow integer dtypes would wrap ignore_index
    labels_shape = tuple(labels.shape)
    flat_labels, seg, S = _segments(labels, cu_seqlens, segment_ids, num_sequences, validate)
    if config.shift_labels:
        if segment_ids is not None and validate and seg.numel() > 1 and bool((seg[1:] < seg[:-1]).any()):
            raise ValueError("shift_labels needs each sequence's tokens together and in order: segment_ids must be "
                             "non-decreasing (or use cu_seqlens)")
        flat_labels = _shift(flat_labels, seg, ignore_index)
    if num_sequences is not None and num_sequences != S:
        raise ValueError(f"num_sequences={num_sequences} but the layout holds {S} sequences")
    N = flat_labels.numel()
    device = labels.device
    valid = flat_labels != ignore_index
    op_kw = dict(ignore_index=ignore_index, temperature=temperature, backend=backend, validate=validate)
    token_kw = dict(return_entropy=True, return_top1=True) if config.token_metrics else {}

    # policy per-token log-probs
    sources = [n for n, v in (("hidden", hidden), ("logits", logits), ("token_logps", token_logps)) if v is not None]
    if len(sources) != 1:
        raise ValueError(f"pass exactly one policy input: hidden (+ weight), logits or token_logps; got {sources or 'none'}")
    if hidden is not None:
        if weight is None:
            raise ValueError("hidden needs weight, the (V, H) LM-head weight")
        check_float("hidden", hidden)
        x = _flat_tokens("hidden", hidden, labels_shape, N, 1)
        tok = None  # the op runs once the layout is known (its gradients may be made in the forward)
        with torch.no_grad():  # each token's logits averaged over the vocabulary: h . mean(W rows), the
            # row mean as a (1, V) @ (V, H) product (no fp32 copy of the head weight on every call)
            w = weight.detach()
            w_mean = (torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device) @ w)[0] / w.shape[0]
            mean_logit = (x.detach() @ w_mean.to(x.dtype)).float()
    elif logits is not None:
        check_float("logits", logits)
        flat_logits = _flat_tokens("logits", logits, labels_shape, N, 1)
        tok = token_logprobs(flat_logits, flat_labels, **op_kw, **token_kw)
        with torch.no_grad():
            mean_logit = flat_logits.detach().mean(-1).float()  # no fp32 copy of the logits
    else:
        mean_logit = None  # no logits: no logits/* metrics
        if config.token_metrics:
            raise ValueError("token_metrics needs the policy's logits (hidden + weight, or logits), not token_logps")
        check_float("token_logps", token_logps)
        check_same_device(labels=labels, token_logps=token_logps)
        tok = _flat_tokens("token_logps", token_logps, labels_shape, N, 0).float()
        tok = torch.where(valid, tok, torch.zeros_like(tok))
        if validate and bool(torch.isnan(tok).any()):  # -inf is a log-prob (of an impossible token); NaN is not
            raise NonFiniteError(f"token_logps has {int(torch.isnan(tok).sum())} NaN values at loss positions")

    if config.grad_in_forward and hidden is None:
        raise ValueError("grad_in_forward=True needs the policy as hidden + weight, not logits or token_logps")

    # reference per-sequence log-probs
    refs = [
        n for n, v in (("ref_hidden", ref_hidden), ("ref_logits", ref_logits),
                       ("ref_token_logps", ref_token_logps), ("ref_seq_logps", ref_seq_logps)) if v is not None
    ]
    if len(refs) > 1:
        raise ValueError(f"pass at most one reference input, got {refs}")
    if reference_free and refs:
        raise ValueError(f"reference_free=True takes no reference, got {refs[0]}; drop one of them")
    if ref_weight is not None and ref_hidden is None:
        raise ValueError("ref_weight is the reference head for ref_hidden: pass ref_hidden too (or neither)")
    policy_vocab = weight.shape[0] if hidden is not None and weight.dim() == 2 else \
        logits.shape[-1] if logits is not None and logits.dim() else None
    with torch.no_grad():
        if ref_hidden is not None:
            _check_reference_head(ref_hidden, ref_weight, validate)
            if policy_vocab is not None and ref_weight.shape[0] != policy_vocab:
                raise ValueError(f"ref_weight has a vocabulary of {ref_weight.shape[0]} rows but the policy's has "
                                 f"{policy_vocab}: the reference must share the policy's tokenizer")
            xr = _flat_tokens("ref_hidden", ref_hidden, labels_shape, N, 1)
            ref_tok = linear_token_logprobs(xr, ref_weight, flat_labels, chunk_size=chunk_size, **op_kw)
        elif ref_logits is not None:
            check_float("ref_logits", ref_logits)
            if ref_logits.dim() == 0:
                raise ValueError("ref_logits must have a vocabulary dim, got a scalar")
            if policy_vocab is not None and ref_logits.shape[-1] != policy_vocab:
                raise ValueError(f"ref_logits has a vocabulary of {ref_logits.shape[-1]} but the policy's has "
                                 f"{policy_vocab}: the reference must share the policy's tokenizer")
            if validate:
                check_finite("ref_logits", ref_logits)
            ref_tok = token_logprobs(_flat_tokens("ref_logits", ref_logits, labels_shape, N, 1), flat_labels, **op_kw)
        elif ref_token_logps is not None:
            check_float("ref_token_logps", ref_token_logps)
            check_same_device(labels=labels, ref_token_logps=ref_token_logps)
            ref_tok = _flat_tokens("ref_token_logps", ref_token_logps, labels_shape, N, 0).float()
            ref_tok = torch.where(valid, ref_tok, torch.zeros_like(ref_tok))
        else:
            ref_tok = None
        if ref_seq_logps is not None:
            check_float("ref_seq_logps", ref_seq_logps, ndim=1)
            check_shape("ref_seq_logps", ref_seq_logps, (S,), "one per sequence")
            check_same_device(labels=labels, ref_seq_logps=ref_seq_logps)
            seq_ref = ref_seq_logps.detach().float()
        elif ref_tok is not None:
            seq_ref = reference.segment_sum(ref_tok, seg, S)
        else:
            seq_ref = torch.zeros(S, dtype=torch.float32, device=device)
        if validate and ref_seq_logps is not None and not bool(torch.isfinite(seq_ref).all()):
            raise NonFiniteError("ref_seq_logps has non-finite values")
        if validate and ref_token_logps is not None and not bool(torch.isfinite(ref_tok).all()):
            raise NonFiniteError("ref_token_logps has non-finite values")

    seq_len = torch.zeros(S, dtype=torch.long, device=device).index_add(0, seg, valid.long())

    winners, losers, cw = _parse_comparisons(comparisons, S, device, validate)
    K = winners.numel()
    if K and not refs and not reference_free:
        raise ValueError("comparisons need a reference (ref_hidden/ref_logits/ref_token_logps/ref_seq_logps); "
                         "pass reference_free=True to compare raw log-probs")
    if nll_weights is not None:
        check_float("nll_weights", nll_weights, ndim=1)
        check_shape("nll_weights", nll_weights, (S,), "one weight per sequence")
        check_same_device(labels=labels, nll_weights=nll_weights)
        a = nll_weights.float()
        if validate and (not bool(torch.isfinite(a).all()) or bool((a < 0).any())):
            raise ValueError("nll_weights must be finite and >= 0")
    else:
        a = torch.zeros(S, dtype=torch.float32, device=device)
    if validate:
        used = a != 0
        if K:
            used = used.index_fill(0, winners, True).index_fill(0, losers, True)
        empty = used & (seq_len == 0)
        if bool(empty.any()):
            i = int(empty.nonzero()[0])
            raise ValueError(f"sequence {i} has no loss tokens (all labels == ignore_index) but is used by the loss")

    terms = dict(seq_ref=seq_ref, winners=winners, losers=losers, cw=cw, a=a, seq_len=seq_len, beta=beta,
                 loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction, nll_normalize=nll_normalize)
    fused_loss = skipped = None
    tok_entropy = tok_top1 = None
    if hidden is not None:
        plan = _grad_in_forward_plan(x, weight, flat_labels, valid, seg, winners, losers, a, cw, S, config)
        if plan is None:
            tok = linear_token_logprobs(x, weight, flat_labels, chunk_size=chunk_size, **op_kw, **token_kw)
        else:
            fused_loss, tok, skipped = _fused_policy(x, weight, flat_labels, valid, seg, S, terms, plan, config,
                                                     token_kw)
    if token_kw:
        tok, tok_entropy, tok_top1 = tok
    seq_logps = reference.segment_sum(tok, seg, S)

    if fused_loss is None:
        pref, nll, h, weighted = _joint_terms(seq_logps, **terms)
        loss = pref + nll
    else:  # the loss and its gradients came from the fused op; the parts again, for the metrics
        with torch.no_grad():
            pref, nll, h, weighted = _joint_terms(seq_logps.detach(), **terms)
        loss = fused_loss
    rho = seq_logps - seq_ref
    metrics = {}
    if K:
        with torch.no_grad():
            metrics.update(_comparison_metrics(rho, seq_logps, winners, losers, weighted, beta, seg, valid,
                                               mean_logit, S, layout.num_pair_comparisons if layout else None))
        h_out = h.detach()
    else:
        h_out = rho.new_zeros(0)
    has_nll = a != 0
    with torch.no_grad():
        n_demo = has_nll.sum()
        metrics["loss"] = loss.detach()
        metrics["loss/nll"] = nll.detach()
        if config.grad_skip_below > 0 and skipped is not None:
            metrics["grad/skipped_fraction"] = skipped
        if tok_entropy is not None:
            metrics["entropy"] = torch.where(valid, tok_entropy.detach(), 0.0).sum() / valid.sum().clamp(min=1)
            target = has_nll.index_fill(0, winners, True) if K else has_nll  # imitated or preferred sequences
            on_target = valid & target[seg]
            metrics["mean_token_accuracy"] = (tok_top1 & on_target).sum() / on_target.sum().clamp(min=1)
        if nll_weights is not None:
            metrics["demo/logp"] = torch.where(has_nll, seq_logps, 0.0).sum() / n_demo.clamp(min=1)
            metrics["demo/logp_per_token"] = (
                torch.where(has_nll, seq_logps, 0.0).sum() / (seq_len * has_nll).sum().clamp(min=1)
            )
    return AIHFLossOutput(loss, metrics, seq_logps, seq_ref, seq_len, h_out)


# ----------------------------------------------------------------------------- method presets


def method_config(
    method: str,
    num_pairs: int = 0,
    num_demos: int = 0,
    *,
    w_P: float = 1.0,
    w_D: float = 1.0,
    nll_weight: float = 0.0,
    device=None,
) -> BatchLayout:
    """The ``BatchLayout`` of a method for the batch

        [chosen_0..P-1, rejected_0..P-1, demo_0..D-1, sample_0..D-1]

    (P = num_pairs preference pairs; D = num_demos demonstrations, each followed in the second
    block by the current policy's own sample for the same prompt; blocks a method does not use
    are omitted). Pass it whole: ``aihf_loss(labels, ..., layout=method_config(...))``.
    nll_weight is RPO's alpha / AIHF's lambda; SFT uses 1. ``aihf`` with ``w_D = 0`` has no
    own-sample block: ``[chosen, rejected, demo]``, i.e. DPO on the pairs plus lambda * NLL on the
    demonstrations.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, v in (("num_pairs", num_pairs), ("num_demos", num_demos)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    P = num_pairs if method in ("dpo", "ipo", "rpo", "aihf") else 0
    D = num_demos if method in ("sft", "spin", "aihf") else 0
    with_samples = method == "spin" or (method == "aihf" and w_D != 0)
    n_demo_seqs = 2 * D if with_samples else D
    S = 2 * P + n_demo_seqs
    ar = lambda n, off=0: torch.arange(off, off + n, device=device)  # noqa: E731
    win, lose, wts = [], [], []
    if P:
        win.append(ar(P))
        lose.append(ar(P, P))
        wts.append(torch.full((P,), float(w_P if method == "aihf" else 1.0), device=device))
    if D and with_samples:
        win.append(ar(D, 2 * P))
        lose.append(ar(D, 2 * P + D))
        wts.append(torch.full((D,), float(w_D if method == "aihf" else 1.0), device=device))
    nll = torch.zeros(S, device=device)
    if method == "sft":
        nll[:D] = 1.0
    elif method == "rpo":
        nll[:P] = nll_weight
    elif method == "aihf" and D:
        nll[2 * P: 2 * P + D] = nll_weight
    comparisons = (torch.cat(win), torch.cat(lose), torch.cat(wts)) if win else None
    return BatchLayout(
        comparisons=comparisons,
        nll_weights=nll if bool((nll != 0).any()) else None,
        num_sequences=S,
        loss_type="ipo" if method == "ipo" else None,
        num_pair_comparisons=P,
    )
