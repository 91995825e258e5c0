"""The control trainer: one PPO (``ppo.py``), one reward model and reward step (``reward.py``),
five methods.

    expert  PPO on the true reward; policy snapshots kept along training (policies/iterK.pt),
            the pool that demonstrations and preferences are drawn from (``datagen.py``)
    bc      behaviour cloning: max sum log pi(a|s) over the demonstrations (no env interaction)
    irl     each iteration: PPO batch -> ``reward_steps`` reward steps with w_P = 0 (demonstration
            state-actions up, the batch's down) -> PPO update on r_theta
    rlhf    a Bradley-Terry reward model fit on the preferences first (``rlhf_reward_steps``),
            then PPO on it, frozen (actor optionally from BC: ``bc_init``)
    aihf    as irl with w_D * (demonstrations vs the fresh batch) + w_P * Bradley-Terry on the
            preference pairs in every reward step: the paper's single loop

termination: env (nothing follows the task's terminations) | absorbing (irl/aihf: a termination
leads to an absorbing state whose reward the reward step learns; PPO gets r - r_abs) | horizon (the
training envs run every episode to the time limit; evaluation keeps the task's terminations).

Every evaluation runs the deterministic policy for ``eval_episodes`` episodes in the C++ rollouts
and logs the true return and episode length; every iteration logs the Pearson correlation of r_theta with the true
reward on the batch, and the wall-clock split between simulation (rollouts) and learning.
Outputs in output_dir: log.jsonl, checkpoint.pt (--resume continues it; the one before it is kept
as checkpoint.prev.pt, each with a manifest of size and SHA-256, and --resume falls back to the
previous one when the newest is damaged), summary.json, curves.png.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch

from ...envs import make_vec
from ..checkpoints import file_damage, file_manifest, write_file_manifest
from ..optim import TermAdamW
from ..options import ConfigError
from ..preemption import Interrupted, StopOnSignal, signal_hook
from ..runs import check_resume_options, guard_output_dir, start_log, write_config
from .config import ControlConfig, fixed_horizon_options, validate
from .data import SegmentPairs, Trajectories, first_episodes
from .ppo import PPO, PPOConfig
from .reward import RewardModel, reward_step_loss, segment_returns


def behaviour_clone(agent: PPO, demos: Trajectories, steps: int, batch: int = 256, lr: float = 1e-3,
                    seed: int = 0) -> float:
    """Fit the actor's Gaussian (mean and log_std) to the demonstrations' actions by maximum
    likelihood; the observation normaliser is set from the demonstrations. Returns the final NLL."""
    if len(demos) == 0:
        raise ConfigError("demonstrations are empty: behaviour cloning needs at least one transition")
    agent.obs_rms.update(demos.obs)
    obs, act = agent.normalize(demos.obs), torch.as_tensor(demos.act)
    opt = torch.optim.Adam([*agent.actor.parameters(), agent.log_std], lr=lr)
    g = torch.Generator().manual_seed(seed)
    nll = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(obs), (min(batch, len(obs)),), generator=g)
        loss = -agent.log_prob(obs[idx], act[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll = loss.item()
    return nll


HAZARD_WINDOW = 10  # PPO iterations whose terminations estimate the policy's absorbing share


class Trainer:
    def __init__(self, cfg: ControlConfig):
        validate(cfg)
        self.cfg = cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.ckpt = os.path.join(cfg.output_dir, "checkpoint.pt")
        self.prev_ckpt = os.path.join(cfg.output_dir, "checkpoint.prev.pt")
        self.damaged_ckpt = os.path.join(cfg.output_dir, "checkpoint.damaged.pt")  # set aside by --resume
        ckpts = (self.ckpt, self.prev_ckpt)
        guard_output_dir(cfg.output_dir, any(os.path.isfile(p) for c in ckpts for p in (c, file_manifest(c))),
                         cfg.resume, cfg.overwrite)
        if cfg.overwrite and not cfg.resume:
            import shutil

            shutil.rmtree(os.path.join(cfg.output_dir, "policies"), ignore_errors=True)
            for p in (p for c in (*ckpts, self.damaged_ckpt) for p in (c, file_manifest(c), c + ".tmp")):
                if os.path.isfile(p):
                    os.remove(p)
        if cfg.termination == "absorbing":
            import gymnasium

            H = gymnasium.spec(cfg.task).max_episode_steps or 1000
            if cfg.eval_every * cfg.rollout_steps < H:
                raise ConfigError(f"termination='absorbing' needs eval_every x rollout_steps >= the time limit ({H} "
                                  f"steps of {cfg.task}): the training envs restart after each evaluation, and the "
                                  f"policy's termination rate must be seen at every step of an episode; got "
                                  f"{cfg.eval_every} x {cfg.rollout_steps}")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train_options = fixed_horizon_options(cfg.task) if cfg.termination == "horizon" else {}
        self.envs = make_vec(cfg.task, num_envs=cfg.num_envs, num_threads=cfg.sim_threads or min(cfg.num_envs, os.cpu_count() or 1),
                             **train_options)
        self.eval_envs = make_vec(cfg.task, num_envs=min(cfg.eval_episodes, 16), num_threads=1)
        self.max_steps = self.envs.spec.max_episode_steps or 1000
        D, A = self.envs.single_observation_space.shape[0], self.envs.single_action_space.shape[0]
        sp = self.envs.single_action_space
        ppo = PPOConfig(num_envs=cfg.num_envs, rollout_steps=cfg.rollout_steps, epochs=cfg.ppo_epochs,
                        minibatch_size=cfg.minibatch_size, lr=cfg.ppo_lr, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
                        ent_coef=cfg.ent_coef, hidden=(cfg.hidden, cfg.hidden), log_std_init=cfg.log_std_init)
        self.agent = PPO(D, A, sp.low, sp.high, ppo, seed=cfg.seed)
        self.demos = self._load(Trajectories, cfg.demonstrations, D, A, "demonstrations")
        self.prefs = self._load(SegmentPairs, cfg.preferences, D, A, "preferences")
        self.heldout_demos = None
        if cfg.heldout_demos:
            bounds = self.demos.episode_bounds()
            if cfg.heldout_demos >= len(bounds):
                raise ConfigError(f"heldout_demos={cfg.heldout_demos} but {cfg.demonstrations!r} holds {len(bounds)} "
                                  "episodes: none would be left to train on")
            cut = bounds[-cfg.heldout_demos][0]  # the file's last episodes
            self.heldout_demos = self.demos.rows(slice(cut, None))
            self.demos = self.demos.rows(slice(0, cut))
        self.heldout = None
        if cfg.heldout_pairs:
            n = 0 if self.prefs is None else len(self.prefs)
            if cfg.heldout_pairs >= n:
                raise ConfigError(f"heldout_pairs={cfg.heldout_pairs} but {cfg.preferences!r} holds {n} pairs: "
                                  "none would be left to train on")
            self.heldout = self.prefs.take(np.arange(n - cfg.heldout_pairs, n))  # the file's last pairs
            self.prefs = self.prefs.subset(n - cfg.heldout_pairs)
        if self.prefs is not None and cfg.num_pairs is not None:
            if cfg.num_pairs > len(self.prefs):
                held = f" ({cfg.heldout_pairs} more held out)" if cfg.heldout_pairs else ""
                raise ConfigError(f"num_pairs={cfg.num_pairs} but {cfg.preferences!r} holds {len(self.prefs)} pairs"
                                  + held)
            self.prefs = self.prefs.subset(cfg.num_pairs)
        if cfg.method in ("rlhf",) and len(self.prefs) == 0:
            raise ConfigError("rlhf needs at least one preference pair (num_pairs > 0)")
        self.w_D, self.w_P = {"irl": (1.0, 0.0), "rlhf": (0.0, 1.0)}.get(cfg.method, (cfg.w_D, cfg.w_P))
        if cfg.method == "aihf" and (self.prefs is None or len(self.prefs) == 0):
            self.w_P = 0.0  # no pairs at this budget: the demonstration term alone (= irl)
        self.reward = None
        self._two_rates = cfg.reward_lr_P is not None and self.w_D > 0 and self.w_P > 0
        if cfg.reward_lr_P is not None and not self._two_rates:
            print("[aihf_fast] note: no preference pairs at this budget (num_pairs=0): one reward term, "
                  "reward_lr_P unused", flush=True)
        if cfg.uses_reward_model:
            self.reward = RewardModel(D, A, hidden=(cfg.reward_hidden, cfg.reward_hidden),
                                      use_next_obs=cfg.reward_next_obs, clip=cfg.reward_clip,
                                      absorbing=cfg.termination == "absorbing")
            # rlhf's reward never sees a demonstration (not even through bc_init's demonstrations)
            use_demos = cfg.method != "rlhf" and self.demos is not None and len(self.demos)
            ref = self.demos.obs if use_demos else self.prefs.obs.reshape(-1, D)
            self.reward.fit_normalizer(ref)
            if self._two_rates:  # Adam per term (TermAdamW without decay is Adam)
                self.ropt = TermAdamW(self.reward.parameters(), {"D": 1.0, "P": cfg.reward_lr_P / cfg.reward_lr},
                                      lr=cfg.reward_lr, weight_decay=0.0)
            else:
                self.ropt = torch.optim.Adam(self.reward.parameters(), lr=cfg.reward_lr, fused=True)
        # policy state-actions of earlier iterations (reward_replay > 0), newest last
        self.replay = None
        # termination='absorbing': the demonstrations' share of absorbing visits on the horizon; the
        # steps each training env's episode has run (reset with the envs); per recent iteration, the
        # episodes at risk and ended at each step of the horizon (the policy's termination hazard)
        self.demo_absorbing = self._absorbing_share(self.demos) if cfg.termination == "absorbing" else 0.0
        self.elapsed = np.zeros(cfg.num_envs, np.int64)
        self.hazard_counts = []
        # iterations whose terminations estimate the policy's share: at least one whole stretch
        # between two restarts, and at least the horizon
        self.hazard_window = max(HAZARD_WINDOW, cfg.eval_every, -(-self.max_steps // cfg.rollout_steps))
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.it = 0
        self.iterations = cfg.env_steps // (cfg.num_envs * cfg.rollout_steps) if cfg.method != "bc" else 0
        self.log_path = os.path.join(cfg.output_dir, "log.jsonl")
        self.sim_s = self.learn_s = 0.0

    def _load(self, cls, path, D, A, name):
        if not path:
            return None
        data = cls.load(path)
        obs_dim, act_dim = data.obs.shape[-1], data.act.shape[-1]
        if (obs_dim, act_dim) != (D, A):
            raise ConfigError(f"{name} {path!r}: obs/act dims ({obs_dim}, {act_dim}) do not match {self.cfg.task} ({D}, {A})")
        if len(data) == 0 and (name == "demonstrations"):
            raise ConfigError(f"{name} {path!r} is empty")
        return data

    # ------------------------------------------------------------------ absorbing state
    def _absorbing_share(self, demos: Trajectories) -> float:
        """f = absorbing visits / all visits of the demonstrations on the horizon H: an episode of
        t < H steps ended by termination and spends H - t steps absorbed."""
        lengths = np.array([b - a for a, b in demos.episode_bounds()])
        absorbed = np.clip(self.max_steps - lengths, 0, None).sum()
        return float(absorbed / (lengths.sum() + absorbed))

    def _policy_absorbing_share(self, batch) -> float | None:
        """The policy's f = 1 - E[T] / H, with E[T] = sum_t S(t) the expected episode length on
        the horizon from its termination hazard h(t) = ended(t) / at_risk(t) at each step t of an
        episode (S(t) = prod_{k<t} (1 - h(k))), counted over this batch and the iterations before
        it (``self.hazard_window`` in all). Episodes cut by the restarts at evaluations count while
        they run (the hazard handles censoring), and one estimate over several batches does not
        follow the bunched terminations of a single one. None while some episodes outlive every
        step observed (the start of training): the share is not known yet."""
        H = self.max_steps
        at_risk, ended = np.zeros(H, np.int64), np.zeros(H, np.int64)
        term, done = batch["terminated"], batch["terminated"] | batch["truncated"]
        for t in range(len(term)):
            step = np.minimum(self.elapsed, H - 1)
            np.add.at(at_risk, step, 1)
            np.add.at(ended, step[term[t]], 1)
            self.elapsed += 1
            self.elapsed[done[t]] = 0
        self.hazard_counts = [*self.hazard_counts, (at_risk, ended)][-self.hazard_window:]
        n = sum(c[0] for c in self.hazard_counts)
        d = sum(c[1] for c in self.hazard_counts)
        hazard = np.divide(d, n, out=np.zeros(H), where=n > 0)
        survival = np.concatenate([[1.0], np.cumprod(1.0 - hazard)[:-1]])
        if ((n == 0) & (survival > 0)).any():
            return None
        return float(1.0 - survival.sum() / H)

    def _reset_envs(self):
        """Seeded reset of the training envs (start, resume, after each evaluation)."""
        self.envs.reset(seed=self.cfg.seed + 1000 * self.it)
        self.elapsed[:] = 0

    # ------------------------------------------------------------------ pieces
    def _reward_step(self, batch=None, samples_absorbing: float = 0.0):
        """One reward step (``reward_step_loss``); with reward_lr_P two Adam updates, the
        demonstration term then the preference term, each from its own gradient and moments.
        Returns its metrics as 0-d tensors (``float`` the ones logged)."""
        cfg = self.cfg
        demo = samples = pairs = None
        if self.w_D > 0:
            i = self.rng.integers(len(self.demos), size=cfg.reward_batch)
            T, N = batch["rewards"].shape
            j = self.rng.integers(T * N, size=cfg.reward_batch)
            flat = lambda k: batch[k].reshape(T * N, -1)[j]  # noqa: E731
            demo = (self.demos.obs[i], self.demos.act[i]) + ((self.demos.next_obs[i],) if cfg.reward_next_obs else ())
            samples = (flat("obs"), flat("actions")) + ((flat("next_obs"),) if cfg.reward_next_obs else ())
            if self.replay is not None:  # and as many policy samples of earlier iterations
                k = self.rng.integers(len(self.replay[0]), size=cfg.reward_batch)
                samples = tuple(torch.cat([torch.as_tensor(a), b[k]]) for a, b in zip(samples, self.replay))
        if self.w_P > 0:
            pairs = self.prefs.take(self.rng.integers(len(self.prefs), size=min(cfg.pair_batch, len(self.prefs))))
        shares = dict(demo_absorbing=self.demo_absorbing, samples_absorbing=samples_absorbing) if self.w_D > 0 else {}
        if not self._two_rates:
            loss, m = reward_step_loss(self.reward, demo=demo, samples=samples, pairs=pairs, w_D=self.w_D, w_P=self.w_P,
                                       l2=cfg.reward_l2, **shares)
            self._update(loss)
            return m
        loss_D, m = reward_step_loss(self.reward, demo=demo, samples=samples, w_D=self.w_D, w_P=0.0, l2=cfg.reward_l2,
                                     **shares)
        self._update(loss_D, "D")
        loss_P, m_P = reward_step_loss(self.reward, pairs=pairs, w_D=0.0, w_P=self.w_P, l2=cfg.reward_l2)
        self._update(loss_P, "P")
        return {**m, **m_P, "loss": m["loss"] + m_P["loss"]}

    @torch.no_grad()
    def _heldout_metrics(self) -> dict:
        """Bradley-Terry NLL and accuracy of r_theta on the held-out pairs."""
        R = segment_returns(self.reward, self.heldout)
        first = torch.as_tensor(self.heldout.first_preferred, dtype=torch.bool)
        h = torch.where(first, R[:, 0] - R[:, 1], R[:, 1] - R[:, 0])
        return {"reward/heldout_nll": float(torch.nn.functional.softplus(-h).mean()),
                "reward/heldout_accuracy": float((h > 0).float().mean())}

    def _fit_rlhf_reward(self) -> dict:
        """rlhf's reward model before RL: ``rlhf_reward_steps`` steps; with held-out pairs, checked
        at step 0, every 50 steps and at the last, stopped after ``rlhf_patience`` checks without a
        better held-out likelihood, and the best parameters kept (the untrained model included).
        Logs the kept model's loss and accuracy on all its training pairs."""
        cfg = self.cfg
        best, best_state, best_step, bad, step = float("inf"), None, 0, 0, 0
        while True:
            if self.heldout is not None and (step % 50 == 0 or step == cfg.rlhf_reward_steps):
                nll = self._heldout_metrics()["reward/heldout_nll"]
                if nll < best:
                    best, best_step, bad = nll, step, 0
                    best_state = {k: v.clone() for k, v in self.reward.state_dict().items()}
                else:
                    bad += 1
                    if bad >= cfg.rlhf_patience:
                        break
            if step == cfg.rlhf_reward_steps:
                break
            self._reward_step()
            step += 1
        out = {}
        if best_state is not None:
            self.reward.load_state_dict(best_state)
            out.update({"rlhf/steps": step, "rlhf/best_step": best_step, "rlhf/heldout_nll": best})
        with torch.no_grad():
            _, m = reward_step_loss(self.reward, pairs=self.prefs, w_D=0.0, w_P=1.0, l2=cfg.reward_l2)
        out.update({f"rlhf/{k}": float(v) for k, v in m.items()})
        return out

    def _update(self, loss, term=None):
        if term is not None:
            self.ropt.term = term
        self.ropt.zero_grad()
        loss.backward()
        self.ropt.step()

    def _remember_samples(self, batch):
        """reward_replay: this iteration's policy state-actions join the buffer (the newest kept)."""
        cfg = self.cfg
        if not cfg.reward_replay or self.w_D == 0:
            return
        T, N = batch["rewards"].shape
        keys = ("obs", "actions") + (("next_obs",) if cfg.reward_next_obs else ())
        # shuffled (seed, iteration) so that a buffer smaller than a batch keeps a uniform subset of it
        order = torch.as_tensor(np.random.default_rng([cfg.seed, 4, self.it]).permutation(T * N))
        new = [torch.as_tensor(batch[k]).reshape(T * N, -1)[order].float() for k in keys]
        joined = new if self.replay is None else [torch.cat([a, b]) for a, b in zip(self.replay, new)]
        self.replay = [x[-cfg.reward_replay:].clone() for x in joined]

    @torch.no_grad()
    def _learned_rewards(self, batch):
        T, N = batch["rewards"].shape
        nxt = batch["next_obs"].reshape(T * N, -1) if self.cfg.reward_next_obs else None
        r = self.reward(batch["obs"].reshape(T * N, -1), batch["actions"].reshape(T * N, -1), nxt)
        return r.double().numpy().reshape(T, N)

    def _rl_rewards(self, learned):
        """What PPO maximises: r_theta (or sigmoid(r_theta)), minus the absorbing state's with
        termination='absorbing'. Nothing follows a termination then, and on an infinite horizon
        that ranks policies exactly as the absorbing state would (a trajectory that ends after t
        steps and stays absorbed returns sum_{k<t} gamma^k r_k + gamma^t r_abs / (1 - gamma), which
        is sum_{k<t} gamma^k (r_k - r_abs) plus the same r_abs / (1 - gamma) for every policy),
        while the critic's values stay on the rewards' scale."""
        rl = (lambda r: 1.0 / (1.0 + np.exp(-r))) if self.cfg.rl_reward == "sigmoid" else (lambda r: r)  # noqa: E731
        if self.cfg.termination != "absorbing":
            return rl(learned)
        with torch.no_grad():
            r_abs = float(self.reward.absorbing_reward())
        return rl(learned) - rl(r_abs)

    def evaluate(self) -> dict:
        eps = first_episodes(self.eval_envs, self.agent.policy(deterministic=True), self.cfg.eval_episodes,
                             self.max_steps, seed=10_000 + self.cfg.seed)
        ret = eps.episode_returns()
        length = np.array([b - a for a, b in eps.episode_bounds()])
        rec = {"iter": self.it, "env_steps": self.agent.env_steps, "eval/return": float(ret.mean()),
               "eval/return_std": float(ret.std()), "eval/episodes": len(ret), "eval/length": float(length.mean())}
        if self.reward is not None and self.heldout is not None:
            rec.update(self._heldout_metrics())
        if self.heldout_demos is not None:
            with torch.no_grad():
                logp = self.agent.log_prob(self.agent.normalize(self.heldout_demos.obs), torch.as_tensor(self.heldout_demos.act))
            rec["eval/heldout_demo_nll"] = float(-logp.mean())
        return rec

    def _log(self, rec):
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        st = dict(it=self.it, agent=self.agent.state_dict(), sim_s=self.sim_s, learn_s=self.learn_s,
                  rng=self.rng.bit_generator.state, torch_rng=torch.get_rng_state(), np_rng=np.random.get_state(),
                  reward=self.reward.state_dict() if self.reward is not None else None,
                  ropt=self.ropt.state_dict() if self.reward is not None else None, replay=self.replay,
                  hazard_counts=self.hazard_counts,
                  run={k: getattr(self.cfg, k) for k in ("task", "method", "seed", "demonstrations", "preferences",
                                                         "num_pairs", "num_envs", "rollout_steps", "w_D", "w_P",
                                                         "reward_lr", "reward_lr_P", "reward_replay",
                                                         "heldout_pairs", "heldout_demos", "termination",
                                                         "rl_reward")})
        tmp = self.ckpt + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(st, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isfile(self.ckpt):  # the previous checkpoint stays as the fallback
            os.replace(self.ckpt, self.prev_ckpt)
            if os.path.isfile(file_manifest(self.ckpt)):
                os.replace(file_manifest(self.ckpt), file_manifest(self.prev_ckpt))
        os.replace(tmp, self.ckpt)
        write_file_manifest(self.ckpt)  # last: a checkpoint without it is one whose save was cut short

    def _read_checkpoint(self):
        """The state of the newest intact checkpoint (checkpoint.pt, else checkpoint.prev.pt, saying
        why the newer one was passed over), None when there is none, ConfigError when all are damaged."""
        found = [p for p in (self.ckpt, self.prev_ckpt) if os.path.isfile(p)]
        if not found:
            return None
        # written before manifests existed: no checkpoint of the run has one (not verified)
        legacy = not any(os.path.isfile(file_manifest(p)) for p in found)
        passed = []
        manifests = tuple(file_manifest(p) for p in (self.ckpt, self.prev_ckpt))
        for p in found:
            why = None if legacy else file_damage(p, manifests)
            if why is None:
                try:
                    st = torch.load(p, weights_only=False)
                    if not isinstance(st, dict) or "run" not in st:
                        raise ValueError("not a control trainer checkpoint")
                    for w in passed:
                        print(f"[aihf_fast] --resume: passing over a damaged checkpoint: {w}", file=sys.stderr, flush=True)
                    if passed:  # set the damaged one aside: the next save must not make it the fallback
                        for src, dst in ((self.ckpt, self.damaged_ckpt),
                                         (file_manifest(self.ckpt), file_manifest(self.damaged_ckpt))):
                            if os.path.isfile(src):
                                os.replace(src, dst)
                        print(f"[aihf_fast] --resume: resuming from {p} (iteration {st.get('it')}); the damaged one is "
                              f"kept as {self.damaged_ckpt}", file=sys.stderr, flush=True)
                    return st
                except Exception as e:  # noqa: BLE001 - an unreadable file: name it, try the older one
                    why = f"{p}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            passed.append(why)
        raise ConfigError(f"--resume: no intact checkpoint in {self.cfg.output_dir} ({'; '.join(passed)}); "
                          "start over with --overwrite")

    def load(self) -> bool:
        st = self._read_checkpoint()
        if st is None:
            print(f"[aihf_fast] --resume: no checkpoint in {self.cfg.output_dir}, starting from iteration 0",
                  file=sys.stderr, flush=True)
            return False
        check_resume_options(st["run"], {k: getattr(self.cfg, k) for k in st["run"]})
        self.it, self.sim_s, self.learn_s = st["it"], st["sim_s"], st["learn_s"]
        self.agent.load_state_dict(st["agent"])
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        np.random.set_state(st["np_rng"])
        if self.reward is not None:
            self.reward.load_state_dict(st["reward"])
            self.ropt.load_state_dict(st["ropt"])
            if not self._two_rates:  # a checkpoint written before the fused optimiser
                for group in self.ropt.param_groups:
                    group.update(fused=True, foreach=None)
            self.replay = st.get("replay")
            self.hazard_counts = st.get("hazard_counts") or []
        return True

    def _snapshot(self, ev):
        """expert: keep the policy (deterministic and stochastic) and its evaluation."""
        d = os.path.join(self.cfg.output_dir, "policies")
        os.makedirs(d, exist_ok=True)
        out = os.path.join(d, f"iter{self.it}.pt")
        torch.save(dict(iter=self.it, env_steps=self.agent.env_steps, eval_return=ev["eval/return"],
                        policy=self.agent.policy(deterministic=True).__dict__,
                        stochastic=self.agent.policy(deterministic=False).__dict__), out + ".tmp")
        os.replace(out + ".tmp", out)

    # ------------------------------------------------------------------ loop
    def _iterations(self, bar, stop):
        """PPO iterations until the budget; after each, a stop requested by a signal checkpoints
        and raises ``Interrupted``."""
        cfg = self.cfg
        last_eval = None
        while self.it < self.iterations:
            t0 = time.time()
            batch = self.agent.collect(self.envs, seed=cfg.seed * 1_000_003 + self.it)
            t1 = time.time()
            rec = {"iter": self.it + 1, "env_steps": self.agent.env_steps}
            if cfg.method in ("irl", "aihf"):
                share = self._policy_absorbing_share(batch) if cfg.termination == "absorbing" else 0.0
                if share is None:  # not known yet: the demonstrations' share, so r_abs is left alone
                    share = self.demo_absorbing
                for _ in range(cfg.reward_steps):
                    m = self._reward_step(batch, share)
                rec.update({f"reward_step/{k}": float(v) for k, v in m.items()})
                if cfg.termination == "absorbing":
                    rec["reward_step/samples_absorbing_share"] = share
                self._remember_samples(batch)
            if self.reward is not None:
                rewards = self._learned_rewards(batch)
                true = batch["rewards"].reshape(-1)
                rec["reward/corr_true"] = float(np.corrcoef(rewards.reshape(-1), true)[0, 1]) if true.std() > 0 else None
                rewards = self._rl_rewards(rewards)
            else:
                rewards = None
            rec.update({f"ppo/{k}": v for k, v in self.agent.update(batch, rewards).items()})
            self.it += 1
            self.sim_s += t1 - t0
            self.learn_s += time.time() - t1
            rec.update(sim_s=self.sim_s, learn_s=self.learn_s, train_return=float(batch["rewards"].sum(0).mean()))
            self._log(rec)
            if self.it % cfg.eval_every == 0 or self.it == self.iterations:
                last_eval = self.evaluate()
                self._log(last_eval)
                if cfg.method == "expert" and (self.it % cfg.save_every == 0 or self.it == self.iterations):
                    self._snapshot(last_eval)
                self._reset_envs()  # the eval used other envs; keep runs reproducible
            if self.it % cfg.save_every == 0 or self.it == self.iterations:
                self.save()
            if bar is not None:
                bar.update(1)
                if last_eval:
                    bar.set_postfix(ret=f"{last_eval['eval/return']:.0f}")
            signal_hook(self.it)
            # a stop waits for an evaluation boundary: there the environments restart from a seeded
            # reset, as a resumed run's do, so the resume is exact (at most eval_every - 1 more iterations)
            if stop.requested() and self.it < self.iterations:
                if self.it % cfg.eval_every == 0:
                    if self.it % cfg.save_every:
                        self.save()
                    raise Interrupted(stop.signum, self.it, self.ckpt)
                if not getattr(self, "_stop_noted", False):
                    self._stop_noted = True
                    nxt = min(self.iterations, (self.it // cfg.eval_every + 1) * cfg.eval_every)
                    print(f"[aihf_fast] stop requested: continuing to iteration {nxt} (the next evaluation boundary, "
                          "or the end), then a checkpoint", file=sys.stderr, flush=True)

    def train(self) -> dict:
        """Run (or continue, with resume) to ``env_steps`` -> the summary (also summary.json). A
        signal during start-up (incl. behaviour cloning and rlhf's reward fit) stops at once, in
        the loop at the next evaluation boundary (with a checkpoint)."""
        threads = torch.get_num_threads()
        if self.cfg.learn_threads is not None:
            torch.set_num_threads(self.cfg.learn_threads)
        try:
            with StopOnSignal() as stop:
                stop.starting()
                signal_hook(0, 0)  # test hook: a signal during start-up
                return self._run(stop)
        finally:
            torch.set_num_threads(threads)

    def _run(self, stop) -> dict:
        cfg = self.cfg
        resumed = cfg.resume and self.load()
        start_log(self.log_path, resumed, "iter", self.it)
        if not resumed:
            write_config(cfg.output_dir, cfg)
            t0 = time.time()
            pre = {}
            if cfg.method == "bc" or cfg.bc_init:
                pre["bc/nll"] = behaviour_clone(self.agent, self.demos, cfg.bc_steps, seed=cfg.seed)
            if cfg.method == "rlhf":
                pre.update(self._fit_rlhf_reward())
            self.learn_s += time.time() - t0
            ev = self.evaluate()
            self._log({**ev, **pre})
            if cfg.method == "expert":
                self._snapshot(ev)
        self._reset_envs()
        bar = None
        if cfg.progress and self.iterations > self.it:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.iterations, initial=self.it, desc=f"{cfg.method} {cfg.task}", dynamic_ncols=True)
        stop.in_loop()
        try:
            self._iterations(bar, stop)
        finally:
            if bar is not None:
                bar.close()
        if cfg.method == "bc":
            self.save()
        with open(self.log_path, encoding="utf-8") as f:
            evals = [r for r in map(json.loads, f) if "eval/return" in r]
        summary = dict(task=cfg.task, method=cfg.method, seed=cfg.seed, iterations=self.it, env_steps=self.agent.env_steps,
                       evals=evals, final_return=evals[-1]["eval/return"], sim_seconds=self.sim_s,
                       learn_seconds=self.learn_s,
                       num_pairs=len(self.prefs) if self.prefs is not None else 0,
                       num_demo_transitions=len(self.demos) if self.demos is not None else 0)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        _plot(self.log_path, os.path.join(cfg.output_dir, "curves.png"), f"{cfg.method} on {cfg.task}")
        self.envs.close()
        self.eval_envs.close()
        return summary


def _plot(log_path, out, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[control] {out} not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    recs = [json.loads(x) for x in open(log_path)]
    ev = [r for r in recs if "eval/return" in r]
    co = [r for r in recs if r.get("reward/corr_true") is not None]
    fig, ax = plt.subplots(1, 2 if co else 1, figsize=(10 if co else 5, 3.5), squeeze=False)
    ax[0][0].plot([r["env_steps"] for r in ev], [r["eval/return"] for r in ev], marker="o")
    ax[0][0].set_xlabel("env steps")
    ax[0][0].set_ylabel("true return (deterministic)")
    ax[0][0].set_title(title)
    if co:
        ax[0][1].plot([r["env_steps"] for r in co], [r["reward/corr_true"] for r in co])
        ax[0][1].set_xlabel("env steps")
        ax[0][1].set_ylabel("corr(r_theta, true reward)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def train(cfg: ControlConfig) -> dict:
    """Run one control job; returns its summary (also output_dir/summary.json)."""
    with StopOnSignal() as stop:  # start-up (environments, data): a signal stops at once
        stop.starting()
        return Trainer(cfg).train()
