"""Plain PyTorch implementations: the specification of every op and the CPU path.

Shapes: N tokens, V vocabulary, H hidden size, S sequences, K comparisons.
Labels are already aligned with the logits (``labels[t]`` is the target of ``logits[t]``);
positions equal to ``ignore_index`` contribute 0 and get no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_top1: bool = False,
):
    """log softmax(logits / temperature)[label] per token (computed in fp32, fp64 for fp64 logits).

    logits: (..., V) any float dtype; labels: (...) int. Returns fp32 (...); then, when asked, the
    fp32 entropy of softmax(logits / temperature) per token (``return_entropy``) and whether the
    label is the top-1 token (``return_top1``, bool; a tie with another top logit counts) (0 /
    False at ignored positions).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    out = [logp]
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        out.append(torch.where(valid, entropy, torch.zeros_like(entropy)))
    if return_top1:
        with torch.no_grad():
            out.append(valid & (x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) >= x.amax(-1)))
    return out[0] if len(out) == 1 else tuple(out)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_top1: bool = False,
):
    """token_logprobs(hidden @ weight.T, labels): hidden (..., H), weight (V, H) -> fp32 (...).

    The logits are computed in the inputs' dtype (as an LM head does), then upcast.
    """
    return token_logprobs(hidden @ weight.t(), labels, ignore_index, temperature, return_entropy, return_top1)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of ``values`` (N,) per segment: (num_segments,) fp32, differentiable."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.zeros(num_segments, dtype=dtype, device=values.device)
    return out.index_add(0, segment_ids, values.to(dtype))


LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def comparison_losses(
    logratio_diff: torch.Tensor, beta: float, loss_type: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-comparison loss from h = [log pi/pi_ref](winner) - [log pi/pi_ref](loser), shape (K,).

    sigmoid (DPO, SPIN; cDPO when label_smoothing = eps):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo:    (h - 1 / (2 beta))^2
    hinge:  max(0, 1 - beta h)   (SLiC)
    """
    z = beta * logratio_diff
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "ipo":
        return (logratio_diff - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
