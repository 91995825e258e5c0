"""Control data: trajectories (demonstrations, policy pools) and labelled segment preferences,
with ``.npz`` files that round-trip and carry their metadata.

    Trajectories  flat transitions of whole episodes: obs (M, D), act (M, A), next_obs (M, D),
                  rewards (M,) true rewards, episode (M,) int64 episode ids (contiguous runs)
    SegmentPairs  obs / act / next_obs (K, 2, L, dim), true_returns (K, 2), first_preferred (K,)
                  bool, p_first (K,) the labelling probability, source (K, 2) pool index

Preferences are drawn as PEBBLE and imitation's synthetic gatherer do: two fixed-length segments
from a pool of policies' trajectories, labelled by a Bradley-Terry draw on their true returns
(``aihf_fast.data.preferences.bradley_terry_labels``).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ...data.preferences import bradley_terry_labels


class ControlDataError(ValueError):
    """A data file or array that cannot be used, naming the file and what was expected."""


@dataclass
class Trajectories:
    obs: np.ndarray
    act: np.ndarray
    next_obs: np.ndarray
    rewards: np.ndarray
    episode: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.obs = np.asarray(self.obs, np.float32)
        self.act = np.asarray(self.act, np.float32)
        self.next_obs = np.asarray(self.next_obs, np.float32)
        self.rewards = np.asarray(self.rewards, np.float64)
        self.episode = np.asarray(self.episode, np.int64)
        M = len(self.obs)
        if self.obs.ndim != 2 or self.act.ndim != 2:
            raise ControlDataError(f"obs and act must be (M, dim), got {self.obs.shape} and {self.act.shape}")
        for name in ("act", "next_obs", "rewards", "episode"):
            if len(getattr(self, name)) != M:
                raise ControlDataError(f"{name} has {len(getattr(self, name))} rows, obs has {M}")
        if self.next_obs.shape != self.obs.shape:
            raise ControlDataError(f"next_obs must have obs's shape {self.obs.shape}, got {self.next_obs.shape}")
        if M and not (np.isfinite(self.obs).all() and np.isfinite(self.act).all() and np.isfinite(self.rewards).all()):
            raise ControlDataError("obs, act and rewards must be finite")

    def __len__(self):
        return len(self.obs)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_bounds())

    def episode_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)] of each episode's rows (episodes are contiguous runs of one id)."""
        if not len(self.episode):
            return []
        cut = np.flatnonzero(np.diff(self.episode) != 0) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [len(self.episode)]])
        return list(zip(starts.tolist(), ends.tolist()))

    def episode_returns(self) -> np.ndarray:
        return np.array([self.rewards[a:b].sum() for a, b in self.episode_bounds()])

    def rows(self, sl: slice) -> Trajectories:
        """The transitions in ``sl`` (a slice at episode bounds keeps whole episodes: the caller's choice)."""
        return Trajectories(self.obs[sl], self.act[sl], self.next_obs[sl], self.rewards[sl], self.episode[sl],
                            dict(self.meta))

    @classmethod
    def from_rollout(cls, out: dict, meta: dict | None = None, complete_only: bool = True) -> Trajectories:
        """From ``BatchedMujocoVectorEnv.rollout`` arrays [t, env]: each env's steps in order, cut
        into episodes at terminated/truncated; with ``complete_only`` the unfinished tail of each
        env is dropped."""
        T, N = out["rewards"].shape
        done = out["terminated"] | out["truncated"]
        rows, ep, next_id = [], [], 0
        for n in range(N):
            start = 0
            for t in range(T):
                if done[t, n] or (t == T - 1 and not complete_only):
                    rows.append((n, start, t + 1))
                    start = t + 1
        idx_t = np.concatenate([np.arange(a, b) for _, a, b in rows]) if rows else np.zeros(0, np.int64)
        idx_n = np.concatenate([np.full(b - a, n) for n, a, b in rows]) if rows else np.zeros(0, np.int64)
        for k, (_, a, b) in enumerate(rows):
            ep.append(np.full(b - a, next_id + k))
        episode = np.concatenate(ep) if ep else np.zeros(0, np.int64)
        return cls(out["obs"][idx_t, idx_n], out["actions"][idx_t, idx_n], out["next_obs"][idx_t, idx_n],
                   out["rewards"][idx_t, idx_n], episode, dict(meta or {}))

    @classmethod
    def concatenate(cls, parts: list[Trajectories], meta: dict | None = None) -> Trajectories:
        offset, eps = 0, []
        for p in parts:
            eps.append(p.episode - (p.episode.min() if len(p) else 0) + offset)
            offset = int(eps[-1].max()) + 1 if len(p) else offset
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(cat("obs"), cat("act"), cat("next_obs"), cat("rewards"), np.concatenate(eps), dict(meta or {}))

    def save(self, path: str) -> None:
        np.savez_compressed(path, obs=self.obs, act=self.act, next_obs=self.next_obs, rewards=self.rewards,
                            episode=self.episode, meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str) -> Trajectories:
        z = _load_npz(path, ("obs", "act", "next_obs", "rewards", "episode", "meta"))
        try:
            return cls(z["obs"], z["act"], z["next_obs"], z["rewards"], z["episode"], json.loads(str(z["meta"])))
        except ControlDataError as e:
            raise ControlDataError(f"{path}: {e}") from None


def first_episodes(envs, policy, n: int, max_steps: int, seed: int = 0) -> Trajectories:
    """``n`` whole episodes in the batched ``envs``: each round resets every env (seeds ``seed +
    round * num_envs``, ...) and keeps each env's first episode, which must end within
    ``max_steps`` (the time limit). ``policy``: an ``MLPPolicy`` (its noise seeded ``seed +
    round``), or None for uniformly random actions."""
    N, parts, k = envs.num_envs, [], 0
    rng = np.random.default_rng(seed)
    while len(parts) < n:
        envs.reset(seed=seed + k * N)
        if policy is None:
            sp = envs.single_action_space
            acts = rng.uniform(sp.low, sp.high, size=(max_steps, N, sp.shape[0])).astype(np.float32)
            out = envs.rollout(actions=acts, num_steps=max_steps)
        else:
            out = envs.rollout(policy, max_steps, seed=seed + k)
        k += 1
        done = out["terminated"] | out["truncated"]
        for e in range(N):
            d = np.flatnonzero(done[:, e])
            if not len(d):
                raise RuntimeError(f"an episode ran past max_steps={max_steps}: give the task's time limit")
            if len(parts) < n:
                sl = slice(0, d[0] + 1)
                parts.append(Trajectories(out["obs"][sl, e], out["actions"][sl, e], out["next_obs"][sl, e],
                                          out["rewards"][sl, e], np.zeros(d[0] + 1, np.int64)))
    return Trajectories.concatenate(parts)


@dataclass
class SegmentPairs:
    obs: np.ndarray
    act: np.ndarray
    next_obs: np.ndarray
    true_returns: np.ndarray
    first_preferred: np.ndarray
    p_first: np.ndarray
    source: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.first_preferred)

    def __post_init__(self):
        K = len(self.first_preferred)
        if self.obs.ndim != 4 or self.obs.shape[:2] != (K, 2) or self.act.shape[:3] != self.obs.shape[:3]:
            raise ControlDataError(f"obs must be (K, 2, L, D) and act (K, 2, L, A) with K={K}, got "
                                   f"{self.obs.shape} and {self.act.shape}")
        if self.true_returns.shape != (K, 2) or self.p_first.shape != (K,) or self.source.shape != (K, 2):
            raise ControlDataError("true_returns and source must be (K, 2) and p_first (K,)")

    def take(self, idx) -> SegmentPairs:
        """The pairs at indices idx (a minibatch)."""
        idx = np.asarray(idx, np.int64)
        return SegmentPairs(self.obs[idx], self.act[idx], self.next_obs[idx], self.true_returns[idx],
                            self.first_preferred[idx], self.p_first[idx], self.source[idx], dict(self.meta))

    def subset(self, n: int) -> SegmentPairs:
        """The first n pairs (nested preference budgets)."""
        if not 0 <= n <= len(self):
            raise ControlDataError(f"asked for {n} pairs, have {len(self)}")
        return SegmentPairs(self.obs[:n], self.act[:n], self.next_obs[:n], self.true_returns[:n],
                            self.first_preferred[:n], self.p_first[:n], self.source[:n], dict(self.meta))

    def save(self, path: str) -> None:
        np.savez_compressed(path, obs=self.obs, act=self.act, next_obs=self.next_obs, true_returns=self.true_returns,
                            first_preferred=self.first_preferred, p_first=self.p_first, source=self.source,
                            meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str) -> SegmentPairs:
        keys = ("obs", "act", "next_obs", "true_returns", "first_preferred", "p_first", "source", "meta")
        z = _load_npz(path, keys)
        try:
            return cls(*(z[k] for k in keys[:-1]), meta=json.loads(str(z["meta"])))
        except ControlDataError as e:
            raise ControlDataError(f"{path}: {e}") from None


def _load_npz(path: str, keys) -> dict:
    if not os.path.isfile(path):
        raise ControlDataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # numpy would call it "pickled data" and mention allow_pickle
        raise ControlDataError(f"{path}: not an .npz archive (aihf_fast writes demonstrations and preferences "
                               "with `python -m aihf_fast.train.control data`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ControlDataError(f"{path}: missing arrays {missing} (has {sorted(z.files)}); is it the "
                                       "other kind of file (demonstrations vs preferences)?")
            return {k: z[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, ControlDataError):
            raise
        raise ControlDataError(f"{path}: cannot read as .npz: {e}") from None


def sample_segment_pairs(pools: list[Trajectories], num_pairs: int, length: int, rng: np.random.Generator,
                         temperature: float = 1.0, label_noise: float = 0.0, meta: dict | None = None) -> SegmentPairs:
    """``num_pairs`` pairs of ``length``-step segments, each segment from a uniformly chosen pool
    (policy), a uniformly chosen episode of it at least ``length`` long, and a uniform start;
    labelled by a Bradley-Terry draw on the true segment returns. Rows are drawn pair by pair, so
    the first m pairs do not depend on num_pairs >= m (nested budgets)."""
    if num_pairs < 0 or length < 1:
        raise ValueError(f"need num_pairs >= 0 and length >= 1, got {num_pairs}, {length}")
    if not pools:
        raise ValueError("pools is empty: give at least one pool of trajectories")
    eligible = [[(a, b) for a, b in p.episode_bounds() if b - a >= length] for p in pools]
    for i, e in enumerate(eligible):
        if not e:
            raise ValueError(f"pool {i} has no episode of at least {length} steps")
    D, A = pools[0].obs.shape[1], pools[0].act.shape[1]
    obs = np.empty((num_pairs, 2, length, D), np.float32)
    act = np.empty((num_pairs, 2, length, A), np.float32)
    nxt = np.empty_like(obs)
    ret = np.empty((num_pairs, 2))
    src = np.empty((num_pairs, 2), np.int64)
    first, p_first = np.empty(num_pairs, bool), np.empty(num_pairs)
    for k in range(num_pairs):
        for j in range(2):
            p = int(rng.integers(len(pools)))
            a, b = eligible[p][int(rng.integers(len(eligible[p])))]
            s = a + int(rng.integers(b - a - length + 1))
            pool = pools[p]
            obs[k, j], act[k, j], nxt[k, j] = pool.obs[s:s + length], pool.act[s:s + length], pool.next_obs[s:s + length]
            ret[k, j] = pool.rewards[s:s + length].sum()
            src[k, j] = p
        f, pf = bradley_terry_labels(ret[k, :1], ret[k, 1:], rng, temperature, label_noise)
        first[k], p_first[k] = f[0], pf[0]
    info = dict(meta or {}, length=length, temperature=temperature, label_noise=label_noise)
    return SegmentPairs(obs, act, nxt, ret, first, p_first, src, info)
