"""The explicit-reward methods, on the same loop, checkpoints and logs as ``Trainer``.

    rm       a reward model (``RewardModel``) trained with the weighted Bradley-Terry loss
             (``rl.bradley_terry_loss``) on preference pairs and, with ``sample_policy``, on
             (demonstration > that policy's sample) pairs; ``steps`` optimiser steps.
    rlhf     RLOO (``rl.rloo_loss``) of the policy against a frozen reward model (``reward_model``)
             or a function (``reward_fn``), KL penalty to the initial policy in the reward;
             ``steps`` rollout batches, each followed by ``rl_epochs`` optimiser steps.
    aihf_rm  the loop of AIHF with an explicit reward: every ``rl_steps`` RL steps an outer
             iteration first samples the policy's answers to the demonstration prompts the
             iteration's reward steps use, then takes ``rm_steps`` reward-model steps on
             w_D (demonstration > own sample) + w_P (chosen > rejected) at ``rm_lr`` (constant),
             warm-started; then RLOO on the updated reward. With w_D = 0 it is ``rm`` on the
             preferences followed by ``rlhf`` with that reward model (one outer iteration).
             Replay (``replay_size`` > 0): the (demonstration, own sample) pairs of earlier
             iterations are kept, the newest ``replay_size`` of them in the order they were made
             (older ones dropped first), and each reward micro-batch adds ``replay_per_batch``
             of them drawn uniformly (seed, iteration, step, micro-batch) to its fresh pairs.

A rollout batch of step g: micro-batch j holds ``prompts_per_batch`` prompts (stream PROMPTS,
position g * M + j as for every stream) x ``rloo_k`` samples, generated with seed (seed, g) in
fixed chunks, so the rollouts, rewards and advantages do not depend on the number of processes.
The reward model's scores and the policy and reference log-probs of the whole batch are computed
sharded and gathered; a reward function runs on rank 0 and its values are broadcast; each process
then trains on its own micro-batches. Log-probs are of softmax(logits / sample_temperature), the
distribution sampled from; dropout is off in every model of these methods (ratio 1 on the first
update of a batch).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from ...data.records import DataError, load_demonstrations, load_preferences, load_prompts
from ...data.tokenize import encode_prompt, tokenize_records
from . import sampling
from .batches import DEMOS, PAIRS, PROMPTS, build_inputs, micro_batch_indices, replay_draw, replay_push
from .model import PolicyWithLoss, RewardModel, build_model, build_reward_model, disable_dropout
from .rl import AdaptiveKLController, rloo_advantages, rloo_loss
from .trainer import Trainer, load_reward_fn, reward_agreement

_OWN_SAMPLE_SEED = 500_000_000  # own samples of the reward steps: another seed range than rollouts


class RewardRLTrainer(Trainer):
    """``Trainer`` for methods rm, rlhf and aihf_rm (module docstring)."""

    # ------------------------------------------------------------------ set-up
    def _load_data(self):
        cfg, m = self.cfg, self.cfg.method
        self.demos, self.prefs, self.rl_prompts, self.eval_prompts, self.eval_demos = [], [], [], [], []
        use_demos = (m == "rm" and cfg.sample_policy) or (m == "aihf_rm" and cfg.w_D > 0)
        use_prefs = m == "rm" and cfg.preferences or (m == "aihf_rm" and cfg.w_P > 0)
        demo_recs = load_demonstrations(cfg.demonstrations) if cfg.demonstrations and (
            use_demos or (m != "rm" and not cfg.prompts)) else []
        pref_recs = load_preferences(cfg.preferences) if cfg.preferences and (
            use_prefs or (m != "rm" and not cfg.prompts and not demo_recs)) else []
        if use_demos:
            t = tokenize_records(self.tok, demo_recs, cfg.max_length, "demonstrations", cfg.append_eos)
            self.demos = t.items
            self._note_truncated(t.truncated, "demonstrations")
        if use_prefs:
            t = tokenize_records(self.tok, pref_recs, cfg.max_length, "preferences", cfg.append_eos)
            self.prefs = t.items
            self._note_truncated(t.truncated, "preference pairs")
        if m != "rm":  # RL prompts: (prompt as given, its token ids)
            recs = load_prompts(cfg.prompts) if cfg.prompts else demo_recs or pref_recs
            self.rl_prompts = [(r.prompt, self._prompt_ids(r)) for r in recs]
            if not self.rl_prompts:
                raise DataError(f"no RL prompts in {cfg.prompts or cfg.demonstrations or cfg.preferences!r}")
        if cfg.eval_prompts:
            self.eval_prompts = [(r.prompt, encode_prompt(self.tok, r.prompt, r.where)) for r in load_prompts(cfg.eval_prompts)]
        if cfg.eval_demonstrations and m != "rm":  # eval/demo_nll of the policy
            self.eval_demos = tokenize_records(self.tok, load_demonstrations(cfg.eval_demonstrations), cfg.max_length,
                                               "demonstrations", cfg.append_eos).items
        self.eval_rm_prefs = tokenize_records(self.tok, load_preferences(cfg.eval_preferences), cfg.max_length,
                                              "preferences", cfg.append_eos).items if cfg.eval_preferences else []
        # the policy's implicit reward log pi - log pi_eval_ref on them too (the base class's evaluation)
        self.eval_prefs = self.eval_rm_prefs if m != "rm" else []

    def _prompt_ids(self, rec) -> list:
        ids = encode_prompt(self.tok, rec.prompt, rec.where)
        if not ids or len(ids) >= self.cfg.max_length:
            raise DataError(f"{rec.where}: the prompt has {len(ids)} tokens; it needs 1 to max_length - 1 = "
                            f"{self.cfg.max_length - 1} (raise max_length or shorten the prompt)")
        return ids

    def _build(self):
        cfg, m = self.cfg, self.cfg.method
        self.rm = self.rm_engine = self.ref = self.eval_ref = self.sampler = self.reward_fn = None
        if m == "rm":
            if cfg.sample_policy:  # first: a bad path fails before the reward model is built
                import dataclasses

                scfg = dataclasses.replace(cfg, model=cfg.sample_policy, model_config=None)
                sampler = build_model(scfg, self.zero3, "sample_policy")
                self.sampler = self._frozen(PolicyWithLoss(sampler, self.zero3))
            self.engine, self.sched = self._engine(RewardModel(self._reward_model(cfg.reward_model)), cfg.lr, cfg.steps)
            self.policy = self.rm = self.engine.module  # the trained module
            self.packed = self.rm_packed = cfg.packing and self._packing_works(self.rm)
        else:
            model = build_model(cfg, self.zero3)
            disable_dropout(model)
            self.engine, self.sched = self._engine(PolicyWithLoss(model, self.zero3), cfg.lr, cfg.steps * cfg.rl_epochs)
            self.policy = self.engine.module
            self.packed = cfg.packing and self._packing_works()
            self.ref = self._build_reference()
            if cfg.eval_kl or self.eval_prefs:  # the reference itself when eval_reference is the initial model
                same = not cfg.eval_reference or (cfg.model is not None and
                                                  os.path.realpath(cfg.eval_reference) == os.path.realpath(cfg.model))
                self.eval_ref = self.ref if same else self._build_reference(cfg.eval_reference)
            if cfg.reward_fn:
                self.reward_fn = load_reward_fn(cfg.reward_fn, "reward_fn")
            elif m == "rlhf":
                self.rm = self._frozen(RewardModel(self._reward_model(cfg.reward_model, trained=True)))
            else:
                rm = RewardModel(self._reward_model(cfg.reward_model))
                self.rm_engine, _ = self._engine(rm, cfg.rm_lr or cfg.lr, None)
                self.rm = self.rm_engine.module
            # the reward model's own check: its attention may ignore packed boundaries when the policy's does not
            self.rm_packed = cfg.packing and self.rm is not None and self._packing_works(self.rm)
        self.kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        # replay: [(demo index, own sample ids, outer iteration)] of earlier iterations, oldest first
        self.state = dict(step=0, samples={}, kl=self.kl.state_dict(), replay=[])
        self._rm_metrics = {}

    def _reward_model(self, source, trained: bool = False):
        model = build_reward_model(self.cfg, source, self.tok.pad_token_id, trained)
        disable_dropout(model)
        return model

    def _score_rm(self, seqs) -> torch.Tensor:
        """Rewards (S,) fp32 of (prompt, completion) ids under the reward model; finite or an error."""
        r = sampling.score(self.rm, seqs, batch_size=self.cfg.gen_batch_size, packed=self.rm_packed,
                           pad_id=self.tok.pad_token_id, device=self.device)
        if not torch.isfinite(r).all():
            raise FloatingPointError(f"the reward model gave {int((~torch.isfinite(r)).sum())} non-finite rewards "
                                     f"of {r.numel()} (diverged? lower rm_lr / lr, or check reward_model)")
        return r

    def _on_rank0(self, fn):
        """fn() computed on rank 0 only and sent to every rank (a reward function may be random or
        costly, e.g. a judge: every rank must see the same rewards)."""
        box = [fn() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ reward model
    def _rm_micro(self, engine, step: int, j: int):
        """Loss of reward micro-batch j of reward step ``step``: [chosen, rejected, demo, own sample]."""
        cfg, M = self.cfg, self.micro_per_step
        P = micro_batch_indices(step, j, M, len(self.prefs), cfg.pairs_per_batch, cfg.seed, PAIRS) if self.prefs else []
        D = micro_batch_indices(step, j, M, len(self.demos), cfg.demos_per_batch, cfg.seed, DEMOS) if self.demos else []
        pairs = [(self.demos[i].prompt, self.demos[i].completions[0], self.state["samples"][int(i)]) for i in D]
        pairs += [(self.demos[i].prompt, self.demos[i].completions[0], y) for i, y, _ in self.replayed(step, j)]
        seqs = self._pair_seqs(P) + [(x, d) for x, d, _ in pairs] + [(x, y) for x, _, y in pairs]
        inputs = build_inputs(seqs, self.tok.pad_token_id, self.rm_packed, self.device)
        out = engine(inputs, dict(num_pairs=len(P), num_demos=len(pairs), w_P=cfg.w_P if len(P) else 0.0,
                                  w_D=cfg.w_D if pairs else 0.0))
        return out["loss"], out["metrics"], inputs["num_tokens"]

    def replayed(self, step: int, j: int) -> list:
        """The replayed (demo index, own sample, iteration) entries of reward micro-batch j of reward
        step ``step`` (aihf_rm)."""
        cfg = self.cfg
        if cfg.method != "aihf_rm" or not cfg.replay_size:
            return []
        return replay_draw(self.state["replay"], cfg.replay_per_batch or cfg.demos_per_batch, cfg.seed, step, j)

    def _own_samples(self, module, didx, seed: int):
        """state["samples"] = {demo index: the answer of ``module``'s model to its prompt}."""
        cfg = self.cfg
        t0 = time.time()
        comps = sampling.generate(module.model, self.tok, [self.demos[i].prompt for i in didx],
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                                  top_p=cfg.sample_top_p, batch_size=cfg.gen_batch_size, seed=seed,
                                  max_length=cfg.max_length, synced=self.zero3 and self.world > 1, device=self.device)
        self.state["samples"] = {int(i): c for i, c in zip(didx, comps)}
        self._gen_time += time.time() - t0

    def refresh(self, step: int):
        cfg = self.cfg
        if cfg.method == "rm":
            if self.sampler is not None and not self.state["samples"]:  # once; a resumed run has them
                self._own_samples(self.sampler, np.arange(len(self.demos)), cfg.seed * 1_000_003 + _OWN_SAMPLE_SEED)
            return
        if cfg.method == "aihf_rm" and step % cfg.rl_steps == 0:
            self._reward_phase(step // cfg.rl_steps)

    def _reward_phase(self, it: int):
        """Outer iteration ``it`` of aihf_rm: own samples, then ``rm_steps`` reward-model steps."""
        cfg, M = self.cfg, self.micro_per_step
        first = it * cfg.rm_steps
        if cfg.replay_size and self.state["samples"]:  # the last iteration's pairs join the buffer
            self.state["replay"] = replay_push(self.state["replay"], [(i, y, it - 1) for i, y in
                                                                      sorted(self.state["samples"].items())],
                                               cfg.replay_size, order_seed=(cfg.seed, it))
        if self.demos:
            didx = np.unique(np.concatenate([
                micro_batch_indices(first + s, j, M, len(self.demos), cfg.demos_per_batch, cfg.seed, DEMOS)
                for s in range(cfg.rm_steps) for j in range(M)]))
            self._own_samples(self.policy, didx, cfg.seed * 1_000_003 + _OWN_SAMPLE_SEED + it)
        sums = {}
        for s in range(cfg.rm_steps):
            out = self.optimizer_step(self.rm_engine, lambda j, g=first + s: self._rm_micro(self.rm_engine, g, j))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
        self._rm_metrics = {("rm/loss" if k == "loss" else "rm/tokens" if k == "tokens" else k):
                            (v if k == "tokens" else v / cfg.rm_steps) for k, v in sums.items()}

    # ------------------------------------------------------------------ RL
    def _rollout(self, step: int) -> dict:
        """Samples, rewards, KL and advantages of the whole rollout batch of ``step``."""
        cfg, M, k = self.cfg, self.micro_per_step, self.cfg.rloo_k
        pidx = np.concatenate([micro_batch_indices(step, j, M, len(self.rl_prompts), cfg.prompts_per_batch, cfg.seed,
                                                   PROMPTS) for j in range(M)])
        prompts = [self.rl_prompts[i] for i in pidx for _ in range(k)]
        t0 = time.time()
        comps = sampling.generate(self.policy.model, self.tok, [ids for _, ids in prompts],
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                                  top_p=cfg.sample_top_p, batch_size=cfg.gen_batch_size, seed=cfg.seed * 1_000_003 + step,
                                  max_length=cfg.max_length, synced=self.zero3 and self.world > 1, device=self.device)
        t1 = time.time()
        seqs = [(ids, c) for (_, ids), c in zip(prompts, comps)]
        texts = (self.tok.batch_decode(comps, skip_special_tokens=True)  # only for a reward function
                 if self.reward_fn is not None or (self.rm is not None and self.eval_reward is not None) else None)
        if self.reward_fn is not None:
            reward = self._on_rank0(lambda: _call_reward(self.reward_fn, cfg.reward_fn, [p for p, _ in prompts], texts))
        else:
            reward = self._score_rm(seqs).double()
        kw = dict(batch_size=cfg.gen_batch_size, packed=self.packed, pad_id=self.tok.pad_token_id, device=self.device,
                  temperature=cfg.sample_temperature)
        old = sampling.score_tokens(self.policy, seqs, **kw)
        ref = sampling.score_tokens(self.ref, seqs, **kw)
        kl = torch.stack([(o - r).double().sum() for o, r in zip(old, ref)])
        coef = self.kl.coef
        adv = rloo_advantages((reward - coef * kl).view(-1, k)).reshape(-1)
        self.kl.update(float(kl.mean()), len(seqs))
        self.state["kl"] = self.kl.state_dict()
        t2 = time.time()
        n_gen = sum(len(c) for c in comps)
        met = {"rl/reward": float(reward.mean()), "rl/kl": float(kl.mean()), "rl/kl_coef": coef,
               "rl/completion_tokens": n_gen / len(comps), "time/generation_s": t1 - t0, "time/scoring_s": t2 - t1,
               "generation_tokens_per_s": n_gen / max(t1 - t0, 1e-9),
               "scoring_tokens_per_s": sum(len(p) + len(c) for p, c in seqs) * (2 + (self.rm is not None)) / max(t2 - t1, 1e-9)}
        if self.rm is not None and self.eval_reward is not None:  # is the learned reward right on these samples?
            true = self._on_rank0(lambda: _call_reward(self.eval_reward, cfg.eval_reward, [p for p, _ in prompts], texts))
            met.update(reward_agreement(reward, true, k, "rl/rm_"), **{"rl/true_reward": float(true.mean())})
        self._gen_time += t1 - t0
        return dict(seqs=seqs, old=old, adv=adv, metrics=met)

    def _rl_micro(self, roll: dict, j: int):
        """RLOO loss of RL micro-batch j of a rollout batch."""
        n = self.cfg.prompts_per_batch * self.cfg.rloo_k
        sl = slice(j * n, (j + 1) * n)
        seqs = roll["seqs"][sl]
        inputs = build_inputs(seqs, self.tok.pad_token_id, self.packed, self.device)
        tok = self.engine(inputs, None, True, self.cfg.sample_temperature)
        mask = inputs["labels"] != -100
        old = torch.zeros_like(tok)
        old[mask] = torch.cat(roll["old"][sl]).to(self.device)
        adv = torch.zeros_like(tok)
        lens = torch.tensor([len(c) for _, c in seqs])
        adv[mask] = torch.repeat_interleave(roll["adv"][sl].float(), lens).to(self.device)
        loss, metrics = rloo_loss(tok, old, adv, mask, self.cfg.clip_range)
        return loss, metrics, inputs["num_tokens"]

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        if cfg.method == "rm":
            return self.optimizer_step(self.engine, lambda j: self._rm_micro(self.engine, step, j))
        roll = self._rollout(step)
        t0 = time.time()
        sums = {}
        for _ in range(cfg.rl_epochs):
            for key, v in self.optimizer_step(self.engine, lambda j: self._rl_micro(roll, j)).items():
                sums[key] = sums.get(key, 0.0) + v
        dt = time.time() - t0
        out = {key: (int(v) if key == "tokens" else v / cfg.rl_epochs) for key, v in sums.items()}
        out.update(roll["metrics"], **{"time/update_s": dt, "update_tokens_per_s": out["tokens"] / max(dt, 1e-9)})
        out.update(self._rm_metrics)
        self._rm_metrics = {}
        return out

    # ------------------------------------------------------------------ evaluation, checkpoints
    def _learned_sample_rewards(self, seqs, log_ratio) -> dict:
        """The reward model's scores of the evaluation samples (none without a reward model)."""
        return {"rm": self._score_rm(seqs).double()} if self.rm is not None else {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        res = (super().evaluate(step) if self.cfg.method != "rm" else None) or {"step": step}
        if self.eval_rm_prefs and self.rm is not None:  # the reward model on held-out pairs: accuracy, BT likelihood
            t0 = time.time()
            seqs = self._pair_seqs_of(self.eval_rm_prefs, range(len(self.eval_rm_prefs)))
            r = self._score_rm(seqs).double().view(2, -1)
            h = r[0] - r[1]
            res["eval/rm_accuracy"] = float(((h > 0).double() + 0.5 * (h == 0).double()).mean())
            res["eval/rm_nll"] = float(-torch.nn.functional.logsigmoid(h).mean())
            self._eval_time += time.time() - t0
        return res if len(res) > 1 else None

    def _run_signature(self) -> dict:
        sig = super()._run_signature()
        c = self.cfg
        for key in ("prompts", "reward_model", "reward_fn", "sample_policy", "rloo_k", "prompts_per_batch", "rm_steps",
                    "rl_steps", "rl_epochs", "kl_coef", "kl_target", "kl_horizon", "clip_range", "rm_lr"):
            sig[key] = getattr(c, key)
        sig["num_prompts"] = len(self.rl_prompts)
        return sig

    def _save_extra(self, path: str) -> None:
        if self.rm_engine is not None:  # the reward model's engine, inside the step's directory
            self.rm_engine.save_checkpoint(path, tag="reward_model", save_latest=False)

    def _load_extra(self, path: str) -> None:
        if self.rm_engine is not None:
            got, _ = (self.rm_engine.load_checkpoint(path, tag="reward_model")
                      if os.path.isdir(os.path.join(path, "reward_model")) else  # the earlier layout:
                      self.rm_engine.load_checkpoint(os.path.join(os.path.dirname(path), "reward_model"),
                                                     tag=os.path.basename(path)))  # checkpoints/reward_model/stepN
            if got is None:
                raise RuntimeError(f"the reward model's checkpoint in {path}/reward_model did not load")

    def load_checkpoint(self) -> bool:
        if not super().load_checkpoint():
            return False
        self.kl.load_state_dict(self.state["kl"])
        return True

    def save_model(self, engine=None, name: str = "model"):
        out = super().save_model(engine, name)
        if engine is None and self.rm_engine is not None:
            super().save_model(self.rm_engine, "reward_model")
        return out


def _call_reward(fn, name: str, prompts: list, completions: list) -> torch.Tensor:
    """fn(prompts, completions) as float64 (n,), checked: one finite number per completion."""
    r = torch.as_tensor(np.asarray(fn(prompts, completions), dtype=np.float64))
    if r.shape != (len(completions),) or not torch.isfinite(r).all():
        raise ValueError(f"{name!r} returned {tuple(r.shape)} values (finite: {bool(torch.isfinite(r).all())}) for "
                         f"{len(completions)} completions; it must return one finite number per completion")
    return r
