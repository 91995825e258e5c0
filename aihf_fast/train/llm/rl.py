"""The losses of the explicit-reward methods (``rm``, ``rlhf``, ``aihf_rm``), in plain PyTorch.

Reward model (weighted Bradley-Terry) on rewards r of the layout
``[chosen(P), rejected(P), demo(D), own sample(D)]``:

    L_rm = [w_P sum_k l(r_chosen_k - r_rejected_k) + w_D sum_i l(r_demo_i - r_sample_i)] / (P + D)
    l(h) = -log sigmoid(h)

RLOO (k samples per prompt, Ahmadian et al. 2024) with a KL penalty in the reward and a
token-level clipped importance ratio (PPO's surrogate):

    R_i   = r(x, y_i) - kl_coef * KL_i,    KL_i = sum_t [log pi_old(y_it) - log pi_ref(y_it)]
    A_i   = R_i - 1/(k-1) sum_{j != i} R_j                       (leave-one-out baseline)
    rho_t = exp(log pi(y_it) - log pi_old(y_it))
    L_rl  = sum_{i,t} max(-rho_t A_i, -clip(rho_t, 1 - eps, 1 + eps) A_i) / (completion tokens)

per micro-batch (the trainer averages micro-batches, as for every method). pi_old is the policy
that sampled the batch (rho = 1 on the first update of a batch).
"""
from __future__ import annotations

import math

import torch

from ...ops.reference import comparison_losses


def bradley_terry_loss(rewards: torch.Tensor, num_pairs: int, num_demos: int, w_P: float = 1.0,
                       w_D: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L_rm above. rewards: (2P + 2D,) float in the layout above -> (loss (), metrics of 0-d tensors)."""
    P, D = num_pairs, num_demos
    if rewards.dim() != 1 or rewards.numel() != 2 * P + 2 * D:
        raise ValueError(f"rewards must have shape (2 * {P} + 2 * {D},), got {tuple(rewards.shape)}")
    if P + D == 0:
        raise ValueError("bradley_terry_loss needs at least one pair")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    h_pref, h_demo = r[:P] - r[P:2 * P], r[2 * P:2 * P + D] - r[2 * P + D:]
    loss = (w_P * comparison_losses(h_pref, 1.0, "sigmoid").sum()
            + w_D * comparison_losses(h_demo, 1.0, "sigmoid").sum()) / (P + D)
    metrics = {}
    with torch.no_grad():
        if P:
            metrics.update({"rm/pref_accuracy": (h_pref > 0).float().mean(), "rm/pref_margin": h_pref.mean()})
        if D:
            metrics.update({"rm/demo_accuracy": (h_demo > 0).float().mean(), "rm/demo_margin": h_demo.mean()})
    return loss, metrics


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of sequence rewards (B, k), k >= 2 samples per prompt -> (B, k)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, k) with k >= 2, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def rloo_loss(token_logps: torch.Tensor, old_token_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """L_rl above, token mean over ``mask``.

    token_logps: (...) fp32 log pi of the sampled tokens (with grad); old_token_logps: same shape,
    log pi_old; advantages: same shape, each token carrying its sequence's A_i; mask: same shape,
    bool, the completion tokens. Returns (loss (), metrics of 0-d tensors)."""
    for name, t in (("old_token_logps", old_token_logps), ("advantages", advantages), ("mask", mask)):
        if t.shape != token_logps.shape:
            raise ValueError(f"{name} must have token_logps' shape {tuple(token_logps.shape)}, got {tuple(t.shape)}")
    if not 0 < clip_range < 1:
        raise ValueError(f"clip_range must be in (0, 1), got {clip_range}")
    m = mask.to(token_logps.dtype)
    n = m.sum().clamp_min(1.0)
    ratio = torch.exp((token_logps - old_token_logps) * m)
    a = advantages.to(token_logps.dtype)
    per_tok = torch.maximum(-ratio * a, -ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * a)
    loss = (per_tok * m).sum() / n
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_range).to(m.dtype) * m
        metrics = {"rl/clip_fraction": clipped.sum() / n, "rl/ratio": (ratio * m).sum() / n}
    return loss, metrics


class AdaptiveKLController:
    """The KL coefficient, fixed, or adapted to a target per-sequence KL (Ziegler et al. 2019):
    after a batch of n samples with mean KL,  coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + err * n / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, d: dict) -> None:
        self.coef = float(d["coef"])
