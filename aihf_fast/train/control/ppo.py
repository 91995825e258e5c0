"""PPO on the batched C++ rollouts: the RL solver every control method shares.

Why PPO: one SAC update (batch 256, two 256-unit layers, actor + twin critics) runs ~140/s on a
2-core CPU, ~12 minutes per 100k env steps at one update per step, while PPO collects whole
batches in C++ (``envs.rollout(MLPPolicy)``, no Python per step) and updates on them at a small
fraction of that (measured in ``benchmarks/bench_alignment_control.py``).

    actor:  obs -> tanh MLP -> mean (nu);  log_std a free vector;  u ~ N(mean, exp(log_std))
            the env gets u (MuJoCo clamps it to ctrlrange; gymnasium's control costs see u)
    critic: obs -> tanh MLP -> V
    update: GAE(gamma, lambda) on the rewards given (the true reward for experts, r_theta for the
            learned-reward methods), bootstrapping V(s') on time-limit truncation; clipped
            surrogate + value loss, minibatch Adam, advantages normalised per batch.

Observations are normalised by running statistics, frozen during each rollout, and clamped to
[-OBS_CLIP, OBS_CLIP]; the exported ``MLPPolicy`` folds the normalisation into its first layer and
applies the clamp as raw bounds (so the C++ rollouts see raw observations and act as trained).

Speed (the networks are small, so per-operation overhead, not arithmetic, sets the cost): a
minibatch's gradients are written by hand (``_loss_and_grads``; ``loss`` is the autograd
reference it is tested against) into one flat gradient buffer that the 13 parameter tensors view,
so clipping is one norm and Adam one fused kernel; tanh is numpy's (torch's CPU tanh was slower at
these sizes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ...envs import MLPPolicy

OBS_CLIP = 10.0  # the normalised observation's clamp, in training and in the exported rollout policy


@dataclass
class PPOConfig:
    num_envs: int = 16
    rollout_steps: int = 128           # per env per iteration
    epochs: int = 10
    minibatch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    hidden: tuple = (64, 64)
    log_std_init: float = -0.5
    normalize_obs: bool = True
    normalize_reward: bool = True      # divide rewards by a running std of the discounted return

    def validate(self):
        for k in ("num_envs", "rollout_steps", "epochs", "minibatch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"ppo {k} must be >= 1, got {getattr(self, k)}")
        for k in ("lr", "clip", "max_grad_norm"):
            if not getattr(self, k) > 0:
                raise ValueError(f"ppo {k} must be > 0, got {getattr(self, k)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError(f"ppo gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")


class RunningMeanStd:
    """Running mean / variance of a stream of (n, dim) batches (parallel-variance update)."""

    def __init__(self, dim: int):
        self.mean, self.var, self.count = np.zeros(dim), np.ones(dim), 1e-4

    def update(self, x: np.ndarray):
        x = np.asarray(x, np.float64).reshape(-1, len(self.mean))
        m, v, n = x.mean(0), x.var(0), len(x)
        d, tot = m - self.mean, self.count + n
        self.mean = self.mean + d * n / tot
        self.var = (self.var * self.count + v * n + d ** 2 * self.count * n / tot) / tot
        self.count = tot

    def state_dict(self):
        return dict(mean=self.mean.copy(), var=self.var.copy(), count=self.count)

    def load_state_dict(self, d):
        self.mean, self.var, self.count = np.asarray(d["mean"]), np.asarray(d["var"]), float(d["count"])


def _mlp(inp, hidden, out):
    dims, layers = [inp, *hidden], []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(dims[-1], out))
    return nn.Sequential(*layers)


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place; a contiguous float32 CPU tensor (no autograd) by numpy's vectorised tanh."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        np.tanh(x.numpy(), out=x.numpy())
        return x
    return x.tanh_()


def _linears(net: nn.Sequential) -> list:
    return [m for m in net if isinstance(m, nn.Linear)]


def _forward(linears: list, x: torch.Tensor):
    """A tanh MLP without autograd: (output, inputs of each linear layer)."""
    ins = [x]
    for lin in linears[:-1]:
        x = _tanh_(torch.addmm(lin.bias, x, lin.weight.t()))
        ins.append(x)
    return torch.addmm(linears[-1].bias, x, linears[-1].weight.t()), ins


def _backward(linears: list, ins: list, d_out: torch.Tensor, grads: list) -> None:
    """Gradients of a ``_forward`` given d loss / d output (B, out), written into ``grads``
    [(d weight, d bias)] per layer."""
    d = d_out
    for k in reversed(range(len(linears))):
        g_w, g_b = grads[k]
        torch.mm(d.t(), ins[k], out=g_w)
        torch.sum(d, 0, out=g_b)
        if k:
            d = torch.ops.aten.tanh_backward(torch.mm(d, linears[k].weight), ins[k])


class PPO:
    """PPO agent for one task. ``collect`` runs the stochastic policy in the batched envs;
    ``update(batch, rewards)`` takes one PPO iteration on it; ``policy(deterministic)`` is the
    C++ ``MLPPolicy`` for rollouts and evaluation."""

    def __init__(self, obs_dim: int, act_dim: int, low, high, cfg: PPOConfig | None = None, seed: int = 0):
        self.cfg = cfg or PPOConfig()
        self.cfg.validate()
        torch.manual_seed(seed)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.actor = _mlp(obs_dim, self.cfg.hidden, act_dim)
        self.critic = _mlp(obs_dim, self.cfg.hidden, 1)
        with torch.no_grad():  # small initial actions, as in the usual PPO initialisation
            self.actor[-1].weight.mul_(0.01)
            self.actor[-1].bias.zero_()
        self.log_std = nn.Parameter(torch.full((act_dim,), float(self.cfg.log_std_init)))
        self.params = [*self.actor.parameters(), *self.critic.parameters(), self.log_std]
        # one flat parameter (what Adam steps) that every parameter tensor views, and one flat
        # gradient: clipping is one norm, Adam one fused kernel
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.params]))
        self._bind_flat()
        self.opt = torch.optim.Adam([self.flat], lr=self.cfg.lr, eps=1e-5, fused=True)
        self.obs_rms = RunningMeanStd(obs_dim)
        self.ret_rms = RunningMeanStd(1)
        self._ret = None  # running discounted return per env (reward normalisation)
        self.env_steps = 0

    def _bind_flat(self):
        """Make every parameter tensor a view of ``flat`` and the gradient views ``_grads`` views of
        ``flat.grad`` (again, if a deepcopy or ``opt.zero_grad()`` undid it; the values are kept)."""
        at, views = 0, self.flat.data
        if self.flat.grad is None:
            self.flat.grad = torch.zeros_like(self.flat)
        offsets = np.cumsum([0] + [p.numel() for p in self.params])
        if getattr(self, "_grad_of", None) is self.flat.grad and all(
                p.data_ptr() == views.data_ptr() + views.element_size() * int(o) for p, o in zip(self.params, offsets)):
            return
        self._grads = []
        for p in self.params:
            views[at:at + p.numel()] = p.detach().reshape(-1)
            p.data = views[at:at + p.numel()].view_as(p)
            self._grads.append(self.flat.grad[at:at + p.numel()].view_as(p))
            at += p.numel()
        self._grad_of = self.flat.grad
        self._actor_linears, self._critic_linears = _linears(self.actor), _linears(self.critic)
        n_actor = 2 * len(_linears(self.actor))
        pairs = lambda g: list(zip(g[0::2], g[1::2]))  # noqa: E731 - [(d weight, d bias)] per layer
        self._actor_grads = pairs(self._grads[:n_actor])
        self._critic_grads = pairs(self._grads[n_actor:-1])
        self._log_std_grad = self._grads[-1]

    # ------------------------------------------------------------------ normalisation / export
    def _norm(self):
        if not self.cfg.normalize_obs:
            return np.zeros(self.obs_dim), np.ones(self.obs_dim)
        return self.obs_rms.mean, np.sqrt(self.obs_rms.var + 1e-8)

    def normalize(self, obs) -> torch.Tensor:
        m, s = self._norm()
        return torch.as_tensor((np.asarray(obs, np.float64) - m) / s, dtype=torch.float32).clamp(-OBS_CLIP, OBS_CLIP)

    def policy(self, deterministic: bool = False) -> MLPPolicy:
        """The actor for the C++ rollouts: observation normalisation folded into layer 1
        (W' = W / std, b' = b - W' mean) and training's [-10, 10] clamp of the normalised
        observation applied as raw bounds (mean -+ 10 std), so that the rollouts act with the
        policy the update trains (an observation the clamp reaches, e.g. Ant's rare contact
        forces, would otherwise get actions many standard deviations from its training mean)."""
        m, s = self._norm()
        bounds = dict(obs_low=m - OBS_CLIP * s, obs_high=m + OBS_CLIP * s)
        lin = [x for x in self.actor if isinstance(x, nn.Linear)]
        w = [x.weight.detach().double().numpy().copy() for x in lin]
        b = [x.bias.detach().double().numpy().copy() for x in lin]
        w[0] = w[0] / s[None, :]
        b[0] = b[0] - w[0] @ m
        if deterministic:
            return MLPPolicy(w, b, activation="tanh", squash="clip", **bounds)
        return MLPPolicy(w, b, activation="tanh", squash="none", gaussian=True,
                         log_std=self.log_std.detach().numpy(), **bounds)

    # ------------------------------------------------------------------ data
    def collect(self, envs, steps: int | None = None, seed: int | None = None) -> dict:
        """One rollout of the stochastic policy: arrays [t, env] (see ``envs.rollout``)."""
        out = envs.rollout(self.policy(), int(steps or self.cfg.rollout_steps), seed=seed)
        self.env_steps += out["rewards"].size
        return out

    def _scaled(self, rewards, done):
        """Rewards divided by the running std of the discounted return (per env)."""
        if not self.cfg.normalize_reward:
            return rewards
        T, N = rewards.shape
        if self._ret is None or len(self._ret) != N:
            self._ret = np.zeros(N)
        rets = np.empty((T, N))
        for t in range(T):
            self._ret = self._ret * self.cfg.gamma + rewards[t]
            rets[t] = self._ret
            self._ret = np.where(done[t], 0.0, self._ret)
        self.ret_rms.update(rets.reshape(-1, 1))
        return rewards / math.sqrt(float(self.ret_rms.var[0]) + 1e-8)

    # ------------------------------------------------------------------ update
    def update(self, batch: dict, rewards: np.ndarray | None = None) -> dict:
        """One PPO iteration on a ``collect`` batch; ``rewards`` (T, N) replaces the env's."""
        cfg = self.cfg
        r = np.asarray(batch["rewards"] if rewards is None else rewards, np.float64)
        T, N = r.shape
        for name, v in (("rewards", r), ("observations", batch["obs"]), ("next observations", batch["next_obs"])):
            if not np.isfinite(v).all():  # not the update's fault: say where it came from
                raise FloatingPointError(f"the PPO update got non-finite {name} ({int((~np.isfinite(v)).sum())} "
                                         f"values): {'the reward given to PPO' if name == 'rewards' else 'the env'} "
                                         "produced them")
        term, trunc = batch["terminated"], batch["truncated"]
        r = self._scaled(r, term | trunc)
        obs = self.normalize(batch["obs"].reshape(T * N, -1))
        nxt = self.normalize(batch["next_obs"].reshape(T * N, -1))
        act = torch.as_tensor(batch["actions"].reshape(T * N, -1), dtype=torch.float32)
        self._bind_flat()
        with torch.no_grad():
            v = _forward(_linears(self.critic), obs)[0].view(T, N).double().numpy()
            v_next = _forward(_linears(self.critic), nxt)[0].view(T, N).double().numpy()
            old_logp = self._gaussian(_forward(_linears(self.actor), obs)[0], act)[0]
        # GAE: the episode continues from next_obs unless terminated; a done step cuts the trace
        adv = np.zeros((T, N))
        last = np.zeros(N)
        for t in reversed(range(T)):
            boot = np.where(term[t], 0.0, v_next[t])
            delta = r[t] + cfg.gamma * boot - v[t]
            cont = ~(term[t] | trunc[t])
            last = delta + cfg.gamma * cfg.gae_lambda * cont * last
            adv[t] = last
        ret = torch.as_tensor((adv + v).reshape(-1), dtype=torch.float32)
        adv_t = torch.as_tensor(adv.reshape(-1), dtype=torch.float32)
        M, B = T * N, cfg.minibatch_size
        losses, ratios = [], []  # per minibatch: (pg_loss, v_loss); the ratios (statistics at the end: one sync)
        for _ in range(cfg.epochs):
            perm = torch.randperm(M)
            o, a, lp, ad, rt = obs[perm], act[perm], old_logp[perm], adv_t[perm], ret[perm]
            for i in range(0, M, B):
                pg, vl, ratio = self._minibatch_step(o[i:i + B], a[i:i + B], lp[i:i + B], ad[i:i + B], rt[i:i + B])
                losses.append(torch.stack([pg, vl]))
                ratios.append(ratio)
        # statistics for the next rollout's normalisation (after this batch's update: the
        # update used the same frozen statistics as the rollout)
        self.obs_rms.update(batch["obs"].reshape(T * N, -1))
        pg_loss, v_loss = torch.stack(losses).mean(0).tolist()
        ratio = torch.cat(ratios)  # every minibatch's transitions, every epoch
        stats = dict(pg_loss=pg_loss, v_loss=v_loss, approx_kl=float(((ratio - 1) - ratio.log()).mean()),
                     clip_frac=float(((ratio - 1).abs() > cfg.clip).float().mean()))
        if not bool(torch.isfinite(self.flat).all()):
            raise FloatingPointError(
                f"the PPO update diverged: the policy's parameters are no longer finite (this update's approx_kl "
                f"{stats['approx_kl']:.3g}, clip_frac {stats['clip_frac']:.2f}): its steps were too large for this "
                f"policy (log_std {self.log_std.detach().mean().item():.2f}); lower ppo_lr or raise the policy's "
                "entropy (ent_coef)")
        return stats

    def _minibatch_step(self, obs, act, old_logp, adv, ret):
        """One Adam step on a minibatch's ``loss``, its gradient norm clipped to max_grad_norm;
        returns (pg_loss, v_loss, ratio) as 0-d / (B,) tensors."""
        pg, vl, ratio = self._loss_and_grads(obs, act, old_logp, adv, ret)
        g = self.flat.grad
        g.mul_(torch.clamp(self.cfg.max_grad_norm / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))
        self.opt.step()
        return pg, vl, ratio

    def _normalized_advantages(self, adv):
        return (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv

    def loss(self, obs, act, old_logp, adv, ret):
        """The minibatch loss by autograd: clipped surrogate + vf_coef x value loss - ent_coef x
        entropy, advantages normalised within the minibatch: the reference the hand-written
        ``_loss_and_grads`` is tested against. obs (B, obs_dim), act (B, act_dim), old_logp / adv / ret (B,): float32.
        Returns (loss, pg_loss, v_loss, ratio)."""
        cfg = self.cfg
        a = self._normalized_advantages(adv)
        ratio = (self.log_prob(obs, act) - old_logp).exp()
        pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
        vl = 0.5 * (self.critic(obs).squeeze(-1) - ret).pow(2).mean()
        loss = pg + cfg.vf_coef * vl
        if cfg.ent_coef:
            loss = loss - cfg.ent_coef * (0.5 + 0.5 * math.log(2 * math.pi) + self.log_std).sum()
        return loss, pg, vl, ratio

    @torch.no_grad()
    def _loss_and_grads(self, obs, act, old_logp, adv, ret):
        """``loss``'s gradients, by hand, written into the flat gradient buffer; returns
        (pg_loss, v_loss, ratio) as 0-d / (B,) tensors."""
        cfg, B = self.cfg, len(obs)
        a = self._normalized_advantages(adv)
        actor, critic = self._actor_linears, self._critic_linears
        mean, actor_in = _forward(actor, obs)
        logp, z, inv_std = self._gaussian(mean, act)                # (B,), (B, A), (A,)
        ratio = (logp - old_logp).exp()
        surr = ratio * a
        clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a
        pg = -torch.minimum(surr, clipped).mean()
        # d pg / d ratio: the unclipped branch wherever it is the minimum (a tie is inside the
        # clip range, where both branches have slope a)
        d_logp = torch.where(surr <= clipped, a, 0.0).mul_(ratio).mul_(-1.0 / B)   # (B,)
        # d logp / d mean = z / std;  d logp / d log_std = z^2 - 1
        _backward(actor, actor_in, (z * inv_std).mul_(d_logp[:, None]), self._actor_grads)
        torch.mm(d_logp[None, :], z * z, out=self._log_std_grad[None, :])
        self._log_std_grad.sub_(d_logp.sum())
        if cfg.ent_coef:
            self._log_std_grad.sub_(cfg.ent_coef)
        value, critic_in = _forward(critic, obs)
        err = value.squeeze(-1) - ret
        vl = 0.5 * (err * err).mean()
        _backward(critic, critic_in, err.mul(cfg.vf_coef / B)[:, None], self._critic_grads)
        return pg, vl, ratio

    def log_prob(self, obs, act) -> torch.Tensor:
        """log pi(act | obs) of the stochastic policy, by autograd: obs (B, obs_dim) normalised,
        act (B, act_dim) -> (B,) float32."""
        return self._gaussian(self.actor(obs), act)[0]

    def _gaussian(self, mean, act):
        """log N(act; mean, exp(log_std)) summed over action dims (B,), and z = (act - mean) / std."""
        inv_std = torch.exp(-self.log_std)
        z = (act - mean) * inv_std
        return -0.5 * (z * z).sum(-1) - self.log_std.sum() - 0.5 * math.log(2 * math.pi) * z.shape[-1], z, inv_std

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return dict(actor=self.actor.state_dict(), critic=self.critic.state_dict(), log_std=self.log_std.detach().clone(),
                    opt=self.opt.state_dict(), obs_rms=self.obs_rms.state_dict(), ret_rms=self.ret_rms.state_dict(),
                    ret=None if self._ret is None else self._ret.copy(), env_steps=self.env_steps, cfg=asdict(self.cfg))

    def load_state_dict(self, d: dict):
        self.actor.load_state_dict(d["actor"])
        self.critic.load_state_dict(d["critic"])
        with torch.no_grad():
            self.log_std.copy_(d["log_std"])
        self.opt.load_state_dict(_flat_adam_state(d["opt"]))
        for group in self.opt.param_groups:  # whatever the checkpoint's optimiser flags were
            group.update(fused=True, foreach=None)
        self.obs_rms.load_state_dict(d["obs_rms"])
        self.ret_rms.load_state_dict(d["ret_rms"])
        self._ret = None if d["ret"] is None else np.asarray(d["ret"])
        self.env_steps = int(d["env_steps"])



def _flat_adam_state(sd: dict) -> dict:
    """An Adam state dict over the flat parameter; one written over the 13 parameter tensors (older
    checkpoints) has its moments concatenated in the same order."""
    ids = sd["param_groups"][0]["params"]
    if len(ids) == 1:
        return sd
    state = sd["state"]
    flat = {}
    if state:
        per = [state[i] for i in ids]
        flat = {0: dict(step=per[0]["step"], **{k: torch.cat([p[k].reshape(-1) for p in per])
                                              for k in ("exp_avg", "exp_avg_sq")})}
    return dict(state=flat, param_groups=[dict(sd["param_groups"][0], params=[0])])
