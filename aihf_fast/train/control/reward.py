"""The learned reward r_theta(s, a) of the control methods and its reward step.

    r(s, a[, s']) = clip * tanh(mlp(normalise(s), a[, normalise(s')]) / clip)     (clip=None: no clip)
    r_abs         = clip * tanh(mlp(0, 0[, 0], flag=1) / clip)   (absorbing=True: the reward of the
                    absorbing state that follows a termination; as in DAC, Kostrikov et al. 2019, the
                    same network with an absorbing flag input, 0 on every real state-action, so that
                    r_abs learns as fast as any other reward)

Reward step (the upper level of AIHF, ../paper/aihf.md), one loss for every method:

    L(theta) = w_D * (mean_{(s,a) ~ policy samples} r(s, a) - mean_{(s,a) ~ demonstrations} r(s, a))
             + w_P * mean_k -log sigmoid(R(seg_w_k) - R(seg_l_k))          R(seg) = sum_t r(s_t, a_t)
             + l2 * (mean r^2 over the demonstration and sample state-actions
                     + mean r^2 over the preference segments' state-actions)     (each term it has)

    irl   w_P = 0   maximum-likelihood IRL: demonstrations up, current-policy samples down
    rlhf  w_D = 0   a Bradley-Terry reward model on the segment preferences
    aihf  both      the paper's joint reward step on fresh policy samples

The demonstration term is linear in r, so without a bound it runs off: the output clip and the
small l2 term keep the scale (the policy only sees r through RL, where the scale sets the
effective entropy temperature). The l2 term covers the preference segments too, with a mean of
its own (the demonstration term's regularisation does not depend on the pair count), so that a
Bradley-Terry reward model on few pairs (rlhf) is regularised like the others.

Absorbing state: on a horizon of H steps an episode that terminates after t steps spends its other
H - t steps in the absorbing state, so a mean over a policy's (or the demonstrations') state-actions
is (1 - f) * mean over its real ones + f * r_abs, with f the fraction of absorbing visits
(``demo_absorbing``, ``samples_absorbing``). Ending an episode then earns what r_abs is learned to
be (demonstrations that end less often than the policy push it down), not 0 by construction.
"""
from __future__ import annotations

import torch
from torch import nn

from ...ops.reference import comparison_losses

METHOD_WEIGHTS = {"irl": (1.0, 0.0), "rlhf": (0.0, 1.0), "aihf": (1.0, 1.0)}


class RewardModel(nn.Module):
    """r_theta(s, a) (or (s, a, s')) as an MLP. Inputs (..., obs_dim), (..., act_dim) float32;
    output (...,). Observations are normalised by stored mean/std (``fit_normalizer``)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple = (256, 256), use_next_obs: bool = False,
                 clip: float | None = 10.0, activation: str = "relu", absorbing: bool = False):
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.obs_dim, self.act_dim, self.use_next_obs, self.clip = obs_dim, act_dim, use_next_obs, clip
        self.absorbing = absorbing
        dims = [obs_dim * (2 if use_next_obs else 1) + act_dim + int(absorbing), *hidden, 1]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(acts[activation]())
        self.net = nn.Sequential(*layers)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    @torch.no_grad()
    def fit_normalizer(self, obs: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the observation mean/std from data (N, obs_dim) (e.g. demonstrations + samples)."""
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, self.obs_dim)
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0, unbiased=False).clamp_min(eps) if len(obs) > 1 else torch.ones(self.obs_dim))

    def forward(self, obs, act, next_obs=None) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32)
        act = torch.as_tensor(act, dtype=torch.float32)
        if obs.shape[-1] != self.obs_dim or act.shape[-1] != self.act_dim or obs.shape[:-1] != act.shape[:-1]:
            raise ValueError(f"obs must be (..., {self.obs_dim}) and act (..., {self.act_dim}) with the same leading "
                             f"shape, got {tuple(obs.shape)} and {tuple(act.shape)}")
        x = [(obs - self.obs_mean) / self.obs_std, act]
        if self.use_next_obs:
            if next_obs is None:
                raise ValueError("this reward model uses next_obs: pass it")
            next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
            if next_obs.shape != obs.shape:
                raise ValueError(f"next_obs must have obs's shape {tuple(obs.shape)}, got {tuple(next_obs.shape)}")
            x.append((next_obs - self.obs_mean) / self.obs_std)
        if self.absorbing:  # the flag of the absorbing state: 0 on real state-actions
            x.append(obs.new_zeros(obs.shape[:-1] + (1,)))
        return self._bound(self.net(torch.cat(x, -1)).squeeze(-1))

    def _bound(self, r):
        return r if self.clip is None else self.clip * torch.tanh(r / self.clip)

    def absorbing_reward(self) -> torch.Tensor:
        """r_abs (0-d float32), the reward of the absorbing state; needs ``absorbing=True``."""
        if not self.absorbing:
            raise ValueError("this reward model has no absorbing state: build it with absorbing=True")
        x = torch.zeros(self.net[0].in_features, device=self.obs_mean.device)
        x[-1] = 1.0
        return self._bound(self.net(x).squeeze(-1))


def segment_returns(model: RewardModel, pairs) -> torch.Tensor:
    """R(seg) = sum_t r(s_t, a_t) of ``pairs`` (a ``SegmentPairs``: obs (K, 2, L, D), act
    (K, 2, L, A), next_obs) -> (K, 2)."""
    return model(pairs.obs, pairs.act, pairs.next_obs if model.use_next_obs else None).sum(-1)


def reward_step_loss(model: RewardModel, *, demo: tuple | None = None, samples: tuple | None = None,
                     pairs=None, w_D: float = 1.0, w_P: float = 1.0, l2: float = 0.0,
                     demo_absorbing: float = 0.0, samples_absorbing: float = 0.0):
    """The reward step's loss (module docstring) -> (loss, metrics: a dict of detached 0-d tensors;
    ``float()`` the ones you log, no device sync meanwhile).

    demo / samples: (obs (N, obs_dim), act (N, act_dim)[, next_obs]) state-action batches of the
    demonstrations and of the current policy; pairs: a ``SegmentPairs`` (or any object with obs,
    act, next_obs, first_preferred of its shapes), e.g. a minibatch ``pairs.take(idx)``. A term whose weight is
    0 needs no data; a term with weight > 0 must have it. demo_absorbing / samples_absorbing: the
    fraction f in [0, 1) of the demonstrations' / policy's occupancy spent in the absorbing state
    (module docstring; > 0 needs a model with ``absorbing=True``).
    """
    if w_D < 0 or w_P < 0 or l2 < 0:
        raise ValueError(f"w_D, w_P and l2 must be >= 0, got {w_D}, {w_P}, {l2}")
    if w_D > 0 and (demo is None or samples is None):
        raise ValueError("w_D > 0 needs demo and samples state-action batches")
    if w_P > 0 and (pairs is None or len(pairs.first_preferred) == 0):
        raise ValueError("w_P > 0 needs preference pairs")
    if w_D == 0 and w_P == 0:
        raise ValueError("w_D and w_P are both 0: the reward step has nothing to fit")
    for name, f in (("demo_absorbing", demo_absorbing), ("samples_absorbing", samples_absorbing)):
        if not 0 <= f < 1:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    absorbing = demo_absorbing > 0 or samples_absorbing > 0
    if absorbing and not model.absorbing:
        raise ValueError("demo_absorbing/samples_absorbing > 0 need a reward model with absorbing=True")
    loss = torch.zeros(())
    metrics = {}
    rs = []
    if w_D > 0:
        r_demo, r_samp = model(*demo), model(*samples)
        if absorbing:  # (1 - f) * mean over the real state-actions + f * r_abs
            r_abs = model.absorbing_reward()
            m_demo = (1 - demo_absorbing) * r_demo.mean() + demo_absorbing * r_abs
            m_samp = (1 - samples_absorbing) * r_samp.mean() + samples_absorbing * r_abs
            metrics["reward/absorbing"] = r_abs.detach()
        else:
            m_demo, m_samp = r_demo.mean(), r_samp.mean()
        term = m_samp - m_demo
        loss = loss + w_D * term
        rs += [r_demo, r_samp]
        metrics.update({"reward/demo": m_demo.detach(), "reward/samples": m_samp.detach(),
                        "loss/demo": term.detach()})
    if w_P > 0:
        r_seg = model(pairs.obs, pairs.act, pairs.next_obs if model.use_next_obs else None)  # (K, 2, L)
        R = r_seg.sum(-1)
        rs.append(r_seg)
        first = torch.as_tensor(pairs.first_preferred, dtype=torch.bool)
        h = torch.where(first, R[:, 0] - R[:, 1], R[:, 1] - R[:, 0])  # R(preferred) - R(other)
        term = comparison_losses(h, 1.0, "sigmoid").mean()
        loss = loss + w_P * term
        metrics.update({"loss/preference": term.detach(), "preference/accuracy": (h > 0).float().mean().detach()})
    if l2 > 0 and rs:
        if w_D > 0 and absorbing:  # every row stands for (1 - f) of its share, r_abs for the rest
            n_d, n_s = rs[0].numel(), rs[1].numel()
            sq = ((1 - demo_absorbing) * rs[0].pow(2).sum() + (1 - samples_absorbing) * rs[1].pow(2).sum()
                  + (demo_absorbing * n_d + samples_absorbing * n_s) * model.absorbing_reward().pow(2))
            loss = loss + l2 * sq / (n_d + n_s)
        elif w_D > 0:
            loss = loss + l2 * torch.cat([rs[0].reshape(-1), rs[1].reshape(-1)]).pow(2).mean()
        if w_P > 0:
            loss = loss + l2 * rs[-1].pow(2).mean()
    metrics["loss"] = loss.detach()
    return loss, metrics
