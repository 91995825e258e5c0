"""The training loop: DeepSpeed engine, method layouts, own samples, reference log-probs,
logging, evaluation, checkpoints and exact resume.

Per optimiser step every process runs ``grad_accum`` micro-batches. A micro-batch is laid out
as ``method_config`` expects, ``[chosen(P), rejected(P), demo(D), own sample(D)]`` (blocks the
method does not use are left out), and its loss is ``aihf_loss`` on the fused LM-head path with
per-sequence reference log-probs:

    sft           L = NLL(demos)                                  (token mean)
    dpo / ipo     L = mean_k l(beta * (rho_chosen - rho_rejected))
    rpo           dpo + nll_weight * NLL(chosen)
    sft_then_dpo  sft for sft_steps, then dpo with the SFT model as the reference
    spin          L = mean_i l(beta * (rho_demo_i - rho_sample_i)), reference = the policy at the
                  last refresh (moving)
    aihf          L = [w_P sum_pairs l(beta h) + w_D sum_demos l(beta (rho_demo - rho_sample))]
                      / (P + D)  + nll_weight * NLL(demos)
    (rho = log pi - log pi_ref summed over completion tokens; l = -log sigmoid, IPO's square)

    aihf, lr_P    two updates per step, each from its own terms' gradient with its own AdamW
                  moments (``TermAdamW``): the demonstration terms (w_D comparisons + NLL) at lr,
                  then the preference pairs at lr_P; the two losses add up to the joint one
    aihf, replay  replay_size > 0: each refresh moves the outgoing window's (demo, own sample)
                  pairs into a buffer (the newest replay_size kept, with their reference
                  log-probs); each micro-batch adds replay_per_batch of them (drawn with a
                  fixed seed per step and micro-batch) as more w_D comparisons, without NLL

Own samples and reference log-probs are refreshed every ``refresh_every`` steps for the examples
that the next window of steps will use. The reference is either fixed (the initial model: data
log-probs computed once and cached; samples scored by a frozen copy) or moving (the policy at
the last refresh, the self-play form).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ...data.records import load_demonstrations, load_preferences, load_prompts
from ...data.tokenize import encode_prompt, tokenize_records
from ...ops import method_config
from ..checkpoints import MANIFEST, damage, step_tags, write_latest, write_manifest
from ..optim import TermAdamW
from ..preemption import Interrupted, StopOnSignal, signal_hook
from ..runs import check_resume_options, guard_output_dir, start_log, write_config
from . import sampling
from .batches import DEMOS, PAIRS, build_inputs, micro_batch_indices, replay_draw, replay_push
from .config import NEEDS_DEMOS, REWARD_METHODS, ConfigError, LLMTrainConfig, validate
from .model import PolicyWithLoss, build_model, deepspeed_config, load_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the process group the deepspeed launcher set up, or make a one-process group."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), torch.device(get_accelerator().current_device_name())


def _read_latest(ckpt_dir: str) -> str | None:
    """The tag named by ``ckpt_dir/latest``, or None (absent or unreadable)."""
    try:
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group cleanly: all ranks meet at a barrier (only after a run that
    succeeded, as a failed rank may never arrive), then the group is destroyed.

    Without it a rank can abort at interpreter exit (``terminate called without an active
    exception``, launcher exit code 250) after all its outputs are written. Also removes this
    rank's shared-memory all-reduce buffer, which DeepSpeed's CPU backend creates under the
    launcher (69 MB in /dev/shm per rank) and never removes: a job scheduler's node would
    otherwise lose that much memory to every run."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            _remove_shm_buffer(rank)


def _remove_shm_buffer(rank: int) -> None:
    """Unlink this rank's ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``
    (the name DeepSpeed's shm_comm gives it); the other ranks' mappings stay valid until they exit."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except OSError:
        pass  # not created (one process, or ranks on several nodes), or already gone


def _lr_lambda(cfg, total_steps: int):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def reward_agreement(learned: torch.Tensor, true: torch.Tensor, k: int, prefix: str) -> dict:
    """How well a learned reward orders a policy's own samples against the true reward, both (n,)
    float64 in groups of k samples of one prompt: ``{prefix}true_corr``, the Pearson correlation
    over all samples, and ``{prefix}pair_accuracy`` over the same-prompt pairs whose true rewards
    differ (a learned tie counts 1/2)."""
    out = {}
    if learned.numel() > 1 and learned.std() > 0 and true.std() > 0:
        out[f"{prefix}true_corr"] = float(torch.corrcoef(torch.stack([learned, true]))[0, 1])
    L, T = learned.view(-1, k), true.view(-1, k)
    dl, dt = L[:, :, None] - L[:, None, :], T[:, :, None] - T[:, None, :]
    pairs = dt > 0
    if pairs.any():
        out[f"{prefix}pair_accuracy"] = float((dl[pairs] > 0).double().mean() + 0.5 * (dl[pairs] == 0).double().mean())
    return out


def load_reward_fn(spec: str, option: str = "eval_reward"):
    """The function ``module:function`` named by ``option``."""
    mod, _, fn = spec.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{option}: cannot import {spec!r}: {e}") from e
    if not callable(f):
        raise ConfigError(f"{option}: {spec!r} is not a function")
    return f


# what torch.multinomial raises when it samples from probabilities that are no longer finite
_SAMPLED_NAN = "probability tensor contains either `inf`, `nan` or element < 0"


class Diverged(FloatingPointError):
    """A run's numbers stopped being finite at a step (its loss, its weights, a reward model's
    rewards): the run stops, naming the step; a lower learning rate is the usual fix."""


@contextlib.contextmanager
def _diverging(step: int, lr: float):
    """Non-finite numbers met while making step ``step`` or evaluating after it (``NonFiniteError``
    and other ``FloatingPointError``s, or torch sampling from non-finite probabilities) raise
    ``Diverged`` naming the step; any other error passes unchanged."""
    try:
        yield
    except Diverged:
        raise
    except (FloatingPointError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and _SAMPLED_NAN not in str(e):
            raise
        raise Diverged(f"step {step}: {e}: the run diverged; lower the learning rate (lr = {lr:g})") from e


class Trainer:
    def __init__(self, cfg: LLMTrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.ds_config = deepspeed_config(cfg)
        self.zero3 = cfg.zero_stage == 3
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay alive: partitions weights on load
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        has_ckpt = self._agree(os.path.isfile(os.path.join(self.ckpt_dir, "latest")))  # rank 0 decides
        guard_output_dir(cfg.output_dir, has_ckpt, cfg.resume, cfg.overwrite)
        if cfg.overwrite and not cfg.resume:  # always a clean start, checkpoints or not
            if self.rank == 0:
                import shutil

                if os.path.isfile(os.path.join(self.ckpt_dir, "latest")) or step_tags(self.ckpt_dir):
                    shutil.rmtree(self.ckpt_dir, ignore_errors=True)  # this trainer's checkpoints, finished or not
                ours = os.path.isfile(os.path.join(cfg.output_dir, "log.jsonl"))  # a run of this trainer was here
                for f in os.listdir(cfg.output_dir):  # outputs of the run being replaced
                    if f in ("ref_logps.pt", "ref_logps.pt.tmp") or ours and (
                            f == "summary.json" or f.startswith("eval_samples_step")):
                        os.remove(os.path.join(cfg.output_dir, f))
                    elif ours and f in ("model", "reward_model") and os.path.isdir(os.path.join(cfg.output_dir, f)):
                        shutil.rmtree(os.path.join(cfg.output_dir, f))
            if self.world > 1:
                dist.barrier()
        self.tok = load_tokenizer(cfg)
        self._load_data()
        self.micro_per_step = self.world * cfg.grad_accum
        self.eval_reward = load_reward_fn(cfg.eval_reward) if cfg.eval_reward else None
        self.log_path = os.path.join(cfg.output_dir, "log.jsonl")
        self._gen_time = self._eval_time = 0.0
        self._build()

    def _engine(self, module, lr: float, total_steps: int | None, term_lr_scale: dict | None = None):
        """A trainable DeepSpeed engine of ``module`` with AdamW at ``lr`` and the configured
        schedule over ``total_steps`` training steps (None: constant) -> (engine, scheduler).
        term_lr_scale: ``TermAdamW`` with those terms, one optimiser update per term and step
        (the schedule advances once per training step)."""
        import deepspeed

        cfg = self.cfg
        params = [p for p in module.parameters() if p.requires_grad]
        kw = dict(lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        opt = TermAdamW(params, term_lr_scale, **kw) if term_lr_scale else torch.optim.AdamW(params, **kw)
        per_step = len(term_lr_scale) if term_lr_scale else 1
        base = _lr_lambda(cfg, total_steps) if total_steps else (lambda _: 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda k: base(k // per_step)) if per_step > 1 else base)
        ds = dict(self.ds_config, zero_allow_untested_optimizer=True) if term_lr_scale else self.ds_config
        engine, _, _, sched = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds)
        return engine, sched

    def _build(self):
        """The policy engine, the frozen reference(s) and the method's state."""
        cfg = self.cfg
        self.term_lr_scale = {"D": 1.0, "P": cfg.lr_P / cfg.lr} if cfg.lr_P is not None else None
        self.engine, self.sched = self._engine(PolicyWithLoss(build_model(cfg, self.zero3), self.zero3), cfg.lr, cfg.steps,
                                               self.term_lr_scale)
        self.term_opt = self.engine.client_optimizer if self.term_lr_scale else None  # the TermAdamW DeepSpeed steps
        self.policy = self.engine.module
        self.packed = cfg.packing and self._packing_works()
        need_eval_ref = cfg.eval_kl or bool(self.eval_prefs)
        need_ref = cfg.reference == "fixed" and cfg.uses_samples
        self.ref = self._build_reference() if need_ref or (need_eval_ref and not cfg.eval_reference) else None
        self.eval_ref = None  # scores eval/kl and eval/pref_accuracy: the initial model or eval_reference
        if need_eval_ref:
            same = not cfg.eval_reference or (self.ref is not None and cfg.model is not None and
                                              os.path.realpath(cfg.eval_reference) == os.path.realpath(cfg.model))
            self.eval_ref = self.ref if same else self._build_reference(cfg.eval_reference)
        nP, nD = len(self.prefs), len(self.demos)
        # replay (aihf, replay_size > 0): [(demo index, own sample ids, its reference log-prob, step made)], oldest first
        self.state = dict(step=0, ref_pairs=torch.zeros(nP, 2), ref_demos=torch.zeros(nD), samples={}, sample_ref={},
                          sample_step=0, replay=[])

    # ------------------------------------------------------------------ set-up
    def _agree(self, value):
        """Rank 0's value of a decision, on every rank (file checks on non-shared disks)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _load_data(self):
        cfg = self.cfg
        self.demos, self.prefs, self.eval_prompts = [], [], []
        if cfg.demonstrations and cfg.method in NEEDS_DEMOS:
            t = tokenize_records(self.tok, load_demonstrations(cfg.demonstrations), cfg.max_length, "demonstrations", cfg.append_eos)
            self.demos = t.items
            self._note_truncated(t.truncated, "demonstrations")
        if cfg.preferences and cfg.method not in ("sft", "spin"):
            t = tokenize_records(self.tok, load_preferences(cfg.preferences), cfg.max_length, "preferences", cfg.append_eos)
            self.prefs = t.items
            self._note_truncated(t.truncated, "preference pairs")
        if cfg.eval_prompts:
            recs = load_prompts(cfg.eval_prompts)
            self.eval_prompts = [(r.prompt, encode_prompt(self.tok, r.prompt, r.where)) for r in recs]
        self.eval_demos, self.eval_prefs = [], []
        if cfg.eval_demonstrations:
            self.eval_demos = tokenize_records(self.tok, load_demonstrations(cfg.eval_demonstrations), cfg.max_length,
                                               "demonstrations", cfg.append_eos).items
        if cfg.eval_preferences:
            self.eval_prefs = tokenize_records(self.tok, load_preferences(cfg.eval_preferences), cfg.max_length,
                                               "preferences", cfg.append_eos).items

    def _note_truncated(self, n, what):
        if n and self.rank == 0:
            print(f"[aihf_fast] note: {n} {what} truncated to max_length={self.cfg.max_length}", flush=True)

    def _packing_works(self, module=None) -> bool:
        """Padding-free packing needs the attention to respect sequence boundaries given by
        position_ids (transformers' masking utilities do for sdpa/eager/flash): check it once."""
        module = self.policy if module is None else module
        seqs = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
        seqs = [([t % self.tok.vocab_size for t in p], [t % self.tok.vocab_size for t in c]) for p, c in seqs]
        a = sampling.score(module, seqs, batch_size=2, packed=True, pad_id=self.tok.pad_token_id, device=self.device)
        b = sampling.score(module, seqs, batch_size=2, packed=False, pad_id=self.tok.pad_token_id, device=self.device)
        ok = torch.allclose(a, b, atol=1e-3, rtol=1e-3)
        if not ok and self.rank == 0:
            print("[aihf_fast] note: this model's attention ignores packed sequence boundaries; using padded batches",
                  flush=True)
        return ok

    def _build_reference(self, path: str | None = None):
        """A frozen copy of the initial model (for scoring own samples under a fixed reference),
        or of the model at ``path``."""
        import dataclasses


        cfg = dataclasses.replace(self.cfg, model=path, model_config=None) if path else self.cfg
        return self._frozen(PolicyWithLoss(build_model(cfg, self.zero3, "eval_reference" if path else "model"),
                                           self.zero3))

    def _frozen(self, module):
        """``module`` without gradients, in eval mode, on the device (under ZeRO-3: a DeepSpeed
        inference engine holding its partitioned weights) -> the module to call."""
        import deepspeed

        module.requires_grad_(False)
        if self.zero3:
            conf = {k: v for k, v in self.ds_config.items() if k in ("zero_optimization", "bf16", "train_micro_batch_size_per_gpu")}
            eng, *_ = deepspeed.initialize(model=module, config=conf)
            eng.eval()
            return eng.module
        return module.to(self.device).eval()

    # ------------------------------------------------------------------ schedule
    def method_at(self, step: int) -> str:
        if self.cfg.method == "sft_then_dpo":
            return "sft" if step < self.cfg.sft_steps else "dpo"
        return self.cfg.method

    def _uses(self, method):
        return method in ("dpo", "ipo", "rpo", "aihf") and len(self.prefs) > 0, method in ("sft", "spin", "aihf")

    def micro_indices(self, step: int, j: int):
        """(pair indices, demo indices) of micro-batch j of `step` (empty arrays where unused)."""
        cfg = self.cfg
        use_p, use_d = self._uses(self.method_at(step))
        P = micro_batch_indices(step, j, self.micro_per_step, len(self.prefs), cfg.pairs_per_batch, cfg.seed, PAIRS) if use_p else np.zeros(0, np.int64)
        D = micro_batch_indices(step, j, self.micro_per_step, len(self.demos), cfg.demos_per_batch, cfg.seed, DEMOS) if use_d else np.zeros(0, np.int64)
        return P, D

    def _score(self, module, seqs):
        return sampling.score(module, seqs, batch_size=self.cfg.gen_batch_size, packed=self.packed,
                              pad_id=self.tok.pad_token_id, device=self.device)

    def _pair_seqs(self, idx):
        return self._pair_seqs_of(self.prefs, idx)

    @staticmethod
    def _pair_seqs_of(prefs, idx):
        """[chosen of idx..., rejected of idx...] as (prompt, completion) id lists."""
        return [(prefs[i].prompt, prefs[i].completions[k]) for k in (0, 1) for i in idx]

    def refresh(self, step: int):
        """At step 0, at each ``refresh_every`` boundary (samples / moving reference), and at the
        SFT -> DPO switch: recompute what the next window of steps needs."""
        cfg, st = self.cfg, self.state
        moving = cfg.reference == "moving"
        if step == 0 and not moving and cfg.method != "sft_then_dpo" and cfg.method != "sft":
            self._fixed_reference_logps()
        if cfg.method == "sft_then_dpo" and step == cfg.sft_steps:
            allp = np.arange(len(self.prefs))
            st["ref_pairs"] = self._score(self.policy, self._pair_seqs(allp)).view(2, -1).T.contiguous()
        if not (cfg.uses_samples or (moving and cfg.method != "sft")) or step % cfg.refresh_every:
            return
        end = min(step + cfg.refresh_every, cfg.steps)
        if cfg.method == "sft_then_dpo":
            end = min(end, cfg.sft_steps) if step < cfg.sft_steps else end
        Ps, Ds = zip(*[self.micro_indices(g, j) for g in range(step, end) for j in range(self.micro_per_step)])
        pidx, didx = np.unique(np.concatenate(Ps)), np.unique(np.concatenate(Ds))
        if moving:  # the reference becomes the current policy
            if len(pidx):
                st["ref_pairs"][pidx] = self._score(self.policy, self._pair_seqs(pidx)).view(2, -1).T
            if len(didx):
                st["ref_demos"][didx] = self._score(self.policy, [(self.demos[i].prompt, self.demos[i].completions[0]) for i in didx])
        if cfg.uses_samples and len(didx):
            if cfg.replay_size and st["samples"]:  # the outgoing window's pairs join the replay buffer
                st["replay"] = replay_push(st["replay"], [(i, y, st["sample_ref"][i], st["sample_step"])
                                                          for i, y in sorted(st["samples"].items())], cfg.replay_size,
                                           order_seed=(cfg.seed, step))
            t0 = time.time()
            comps = sampling.generate(self.policy.model, self.tok, [self.demos[i].prompt for i in didx],
                                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                                      top_p=cfg.sample_top_p, batch_size=cfg.gen_batch_size,
                                      seed=cfg.seed * 1_000_003 + step, max_length=cfg.max_length,
                                      synced=self.zero3 and self.world > 1, device=self.device)
            scorer = self.policy if moving else self.ref
            refs = self._score(scorer, [(self.demos[i].prompt, c) for i, c in zip(didx, comps)])
            st["samples"] = {int(i): c for i, c in zip(didx, comps)}
            st["sample_ref"] = {int(i): float(r) for i, r in zip(didx, refs)}
            st["sample_step"] = step
            self._gen_time += time.time() - t0

    def _fixed_reference_logps(self):
        """Reference log-probs of all fixed data under the initial model: one pass, cached."""
        cfg, st = self.cfg, self.state
        cache = os.path.join(cfg.output_dir, "ref_logps.pt")
        key = self._ref_cache_key()
        hit = None
        if self.rank == 0 and os.path.isfile(cache):
            try:
                c = torch.load(cache)
                if c.get("key") == key:
                    hit = (c["ref_pairs"], c["ref_demos"])
            except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                print(f"[aihf_fast] note: {cache} is unreadable ({type(e).__name__}); recomputing it", flush=True)
        hit = self._agree(hit)
        if hit is not None:
            st["ref_pairs"], st["ref_demos"] = hit
            return
        scorer = self.ref if self.ref is not None else self.policy  # the policy is the initial model at step 0
        if self.prefs:
            st["ref_pairs"] = self._score(scorer, self._pair_seqs(np.arange(len(self.prefs)))).view(2, -1).T.contiguous()
        if self.demos and cfg.uses_samples:
            st["ref_demos"] = self._score(scorer, [(d.prompt, d.completions[0]) for d in self.demos])
        if self.rank == 0:  # a temporary file and a rename: never a half-written cache
            torch.save(dict(key=key, ref_pairs=st["ref_pairs"], ref_demos=st["ref_demos"]), cache + ".tmp")
            os.replace(cache + ".tmp", cache)

    def _ref_cache_key(self) -> str:
        """What the cached reference log-probs depend on: every token id scored, the reference
        model's identity (source, its files' sizes and mtimes, seed, dtype, attention), and
        whether the demonstrations were scored."""
        import hashlib

        cfg = self.cfg
        h = hashlib.sha256()
        for e in self.prefs:
            h.update(json.dumps([e.prompt, e.completions]).encode())
        h.update(b"|")
        if self.cfg.uses_samples:
            for e in self.demos:
                h.update(json.dumps([e.prompt, e.completions]).encode())
        files = []
        if cfg.model and os.path.isdir(cfg.model):
            for f in sorted(os.listdir(cfg.model)):
                st = os.stat(os.path.join(cfg.model, f))
                files.append((f, st.st_size, st.st_mtime_ns))
        ident = [cfg.model, cfg.model_config, files, cfg.seed, cfg.bf16, cfg.attn_implementation, cfg.uses_samples,
                 self.packed]
        h.update(json.dumps(ident, default=str).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ one step
    def micro_batch(self, step: int, j: int, term: str | None = None):
        """-> (inputs, loss kwargs) of micro-batch j of `step`; term "D" / "P" (aihf with lr_P):
        only its demonstration / preference blocks, with the comparison weights scaled so that
        the two terms' losses add up to the joint loss."""
        cfg, st = self.cfg, self.state
        method = self.method_at(step)
        pidx, didx = self.micro_indices(step, j)
        replay = self.replayed(step, j) if len(didx) else []
        with_samples = method in ("spin", "aihf") and cfg.uses_samples
        n_all = len(pidx) + (len(didx) + len(replay) if with_samples else 0)  # comparisons of the joint loss
        if term == "D":
            pidx = pidx[:0]
        elif term == "P":
            didx, replay = didx[:0], []
        seqs = self._pair_seqs(pidx)
        refs = [st["ref_pairs"][pidx, 0], st["ref_pairs"][pidx, 1]]
        if len(didx):
            rd = np.asarray([i for i, *_ in replay], dtype=np.int64)  # replayed demonstrations, in the demo block
            seqs += [(self.demos[i].prompt, self.demos[i].completions[0]) for i in np.concatenate([didx, rd])]
            refs.append(st["ref_demos"][np.concatenate([didx, rd])])
            if method in ("spin", "aihf") and cfg.uses_samples:
                seqs += [(self.demos[i].prompt, st["samples"][int(i)]) for i in didx] + [
                    (self.demos[i].prompt, y) for i, y, *_ in replay]
                refs.append(torch.tensor([st["sample_ref"][int(i)] for i in didx] + [r for _, _, r, _ in replay]))
        P, D, R = len(pidx), len(didx), len(replay)
        layout = method_config(method, P, D + R, w_P=cfg.w_P, w_D=cfg.w_D, nll_weight=cfg.nll_weight,
                               device=self.device)
        if R and layout.nll_weights is not None:  # a replayed demonstration is a comparison only, not NLL again
            layout.nll_weights[2 * P + D: 2 * P + D + R] = 0.0
        if term is not None and layout.comparisons is not None:  # mean over all comparisons, as the joint loss
            win, lose, w = layout.comparisons
            layout = layout.replace(comparisons=(win, lose, w * len(w) / n_all))
        kw = dict(layout=layout, beta=cfg.beta,
                  label_smoothing=cfg.label_smoothing if layout.loss_type in (None, "sigmoid") else 0.0)
        if method != "sft":
            kw["ref_seq_logps"] = torch.cat(refs).to(self.device)
        return build_inputs(seqs, self.tok.pad_token_id, self.packed, self.device), kw

    def replayed(self, step: int, j: int) -> list:
        """Replayed (demo index, own sample, reference log-prob, step made) entries of micro-batch j
        of ``step`` (aihf with replay_size > 0)."""
        cfg = self.cfg
        if cfg.method != "aihf" or not cfg.replay_size:
            return []
        return replay_draw(self.state["replay"], cfg.replay_per_batch or cfg.demos_per_batch, cfg.seed, step, j)

    def train_step(self, step: int) -> dict:
        def micro(j, term=None):
            inputs, kw = self.micro_batch(step, j, term)
            out = self.engine(inputs, kw)
            return out["loss"], out["metrics"], inputs["num_tokens"]

        if self.term_opt is None:
            return self.optimizer_step(self.engine, micro)
        lr_P = self.sched.get_last_lr()[0] * self.term_lr_scale["P"]  # this step's, before the schedule moves
        outs = {}
        for term in ("D", "P"):  # demonstration terms at lr, then the preference pairs at lr_P
            self.term_opt.term = term
            outs[term] = self.optimizer_step(self.engine, lambda j, t=term: micro(j, t))
        d, p = outs["D"], outs["P"]
        out = {**{(f"demo_terms/{k}" if k in p else k): v for k, v in d.items()}, **p}
        out.update(loss=d["loss"] + p["loss"], tokens=d["tokens"] + p["tokens"], **{
            "loss/demo_terms": d["loss"], "loss/pref_terms": p["loss"],
            "lr_P": lr_P})
        for k in ("demo_terms/loss", "demo_terms/tokens"):
            out.pop(k, None)
        return out

    def optimizer_step(self, engine, micro) -> dict:
        """One optimiser step of ``engine`` over this process's ``grad_accum`` micro-batches;
        micro(j) -> (loss, metrics of 0-d tensors, tokens) of global micro-batch j. Returns the
        metrics averaged over all micro-batches of the step, and the step's tokens."""
        sums, tokens = {}, 0
        for a in range(self.cfg.grad_accum):
            loss, metrics, n = micro(a * self.world + self.rank)
            engine.backward(loss)
            engine.step()
            tokens += n
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.float()  # stays on the device: no sync per metric
        keys = sorted(sums)
        vec = torch.cat([torch.stack([sums[k] for k in keys]).double().cpu() / self.cfg.grad_accum,
                         torch.tensor([tokens], dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(vec)
            vec[:-1] /= self.world
        out = {k: float(v) for k, v in zip(keys, vec[:-1])}
        out["tokens"] = int(vec[-1])
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        """Evaluation records: sampled true reward (and KL) on eval_prompts, held-out demonstration
        NLL, held-out preference accuracy; None when nothing to evaluate is configured."""
        t0 = time.time()
        res = {"step": step}
        if self.eval_prompts and self.eval_reward:
            res.update(self._evaluate_samples(step))
        if self.eval_demos:  # per-token NLL of held-out demonstrations
            seqs = [(d.prompt, d.completions[0]) for d in self.eval_demos]
            lp = self._score(self.policy, seqs)
            res["eval/demo_nll"] = float(-lp.double().sum() / sum(len(c) for _, c in seqs))
        if self.eval_prefs:  # does the implicit reward log pi - log pi_eval_ref rank held-out pairs right?
            seqs = self._pair_seqs_of(self.eval_prefs, range(len(self.eval_prefs)))
            rho = (self._score(self.policy, seqs) - self._score(self.eval_ref, seqs)).double().view(2, -1)
            h = rho[0] - rho[1]
            res["eval/pref_accuracy"] = float(((h > 0).double() + 0.5 * (h == 0).double()).mean())
            res["eval/pref_margin"] = float(h.mean())
        self._eval_time += time.time() - t0
        return res if len(res) > 1 else None

    def _evaluate_samples(self, step: int) -> dict:
        cfg = self.cfg
        n = cfg.eval_samples_per_prompt
        prompts = [p for p in self.eval_prompts for _ in range(n)]
        comps = sampling.generate(self.policy.model, self.tok, [ids for _, ids in prompts],
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                                  top_p=cfg.sample_top_p, batch_size=cfg.gen_batch_size, seed=cfg.seed * 7919 + 1,
                                  max_length=cfg.max_length, synced=self.zero3 and self.world > 1, device=self.device)
        texts = self.tok.batch_decode(comps, skip_special_tokens=True)
        r = np.asarray(self.eval_reward([p for p, _ in prompts], texts), dtype=np.float64)
        res = {"eval/reward": float(r.mean()), "eval/reward_sem": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
               "eval/num_samples": len(r)}
        seqs = [(ids, c) for (_, ids), c in zip(prompts, comps)]
        kl = None
        if cfg.eval_kl:  # Monte-Carlo KL(pi || pi_init) per sequence, on the same samples
            kl = (self._score(self.policy, seqs) - self._score(self.eval_ref, seqs)).double()
            res["eval/kl"] = float(kl.mean())
            res["eval/kl_sem"] = float(kl.std() / np.sqrt(len(kl))) if len(kl) > 1 else 0.0
        learned = {k: v.cpu() for k, v in self._learned_sample_rewards(seqs, kl).items()}
        if n >= 2:  # does the learned reward order the policy's own samples as the true reward does?
            for name, v in learned.items():
                res[f"eval/{name}_reward"] = float(v.mean())
                res.update(reward_agreement(v, torch.as_tensor(r), n, f"eval/{name}_"))
        if self.rank == 0:  # per sample: the true reward, and the KL / learned rewards when measured
            extra = dict(learned, **({"kl": kl.cpu()} if kl is not None else {}))
            with open(os.path.join(cfg.output_dir, f"eval_samples_step{step}.jsonl"), "w", encoding="utf-8") as f:
                for i, ((p, _), t, x) in enumerate(zip(prompts, texts, r)):
                    row = {"prompt": p, "completion": t, "reward": float(x), **{k: float(v[i]) for k, v in extra.items()}}
                    f.write(json.dumps(row) + "\n")
        return res

    def _learned_sample_rewards(self, seqs, log_ratio) -> dict:
        """{name: (n,) float64} learned rewards of the evaluation samples: the implicit reward
        log pi - log pi_eval_ref (the per-sample KL, with eval_kl) of the methods that have one."""
        implicit = log_ratio is not None and self.cfg.method not in REWARD_METHODS
        return {"implicit": log_ratio} if implicit else {}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int):
        """checkpoints/stepN: our state, every rank's RNG, DeepSpeed's files (and ``_save_extra``'s),
        then a manifest of sizes and checksums, then ``latest``: a crash mid-save leaves the
        previous checkpoint the one ``--resume`` takes."""
        tag = f"step{step}"
        path = os.path.join(self.ckpt_dir, tag)
        if self.rank == 0 and os.path.isdir(path):  # left by a save that did not complete
            import shutil

            shutil.rmtree(path)
        if self.world > 1:
            dist.barrier()
        os.makedirs(path, exist_ok=True)
        if self.rank == 0:
            torch.save(dict(self.state, step=step, run=self._run_signature()), os.path.join(path, "trainer_state.pt"))
        torch.save(dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
                   os.path.join(path, f"rng_rank{self.rank}.pt"))
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, save_latest=False)
        self._save_extra(path)
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            write_manifest(path)
            write_latest(self.ckpt_dir, tag)
        if self.world > 1:
            dist.barrier()

    def _save_extra(self, path: str) -> None:
        """More engines' files into the checkpoint directory ``path`` (before its manifest)."""

    def _load_extra(self, path: str) -> None:
        """Load what ``_save_extra`` wrote."""

    def _pick_checkpoint(self):
        """The newest intact checkpoint tag (rank 0 verifies, every rank gets its answer), or None
        when there is none; damaged ones passed over are reported; all damaged is an error."""
        choice = None
        if self.rank == 0:
            tags, passed = step_tags(self.ckpt_dir), []
            latest = _read_latest(self.ckpt_dir)
            # written before manifests existed: no checkpoint of the run has one (a save cut short
            # leaves `latest` on the previous, complete checkpoint)
            pre_manifest = not any(os.path.exists(os.path.join(self.ckpt_dir, t, MANIFEST)) for t in tags)
            for t in tags:
                why = damage(os.path.join(self.ckpt_dir, t))
                legacy = pre_manifest and t == latest
                if why is None or legacy:  # intact, or written before manifests existed (not verified)
                    choice = (t, passed)
                    break
                passed.append(why)
            if choice is None:
                choice = (None, passed, latest is not None)
        tag, passed, *completed = self._agree(choice)
        if self.rank == 0:
            for why in passed:
                print(f"[aihf_fast] --resume: passing over a damaged checkpoint: {why}", flush=True)
        if tag is None and passed and completed and completed[0]:
            raise ConfigError(f"--resume: no intact checkpoint in {self.ckpt_dir} ({len(passed)} damaged: "
                              f"{passed[0]}); start over with --overwrite")
        return tag  # None with only unfinished saves and no `latest`: the run never completed one

    def _run_signature(self) -> dict:
        """The options that decide data order, windows and targets: a resume must keep them."""
        c = self.cfg
        keys = ("method", "seed", "pairs_per_batch", "demos_per_batch", "refresh_every", "reference", "sft_steps",
                "demonstrations", "preferences", "max_length", "append_eos", "beta", "w_P", "w_D", "nll_weight",
                "max_new_tokens", "sample_temperature", "sample_top_p", "gen_batch_size", "lr", "lr_P",
                "replay_size", "replay_per_batch")  # lr: the checkpoint's optimiser and schedule carry it on
        sig = {k: getattr(c, k) for k in keys}
        sig.update(micro_batches_per_step=self.micro_per_step, num_pairs=len(self.prefs), num_demos=len(self.demos))
        return sig

    def load_checkpoint(self) -> bool:
        tag = self._pick_checkpoint()
        if tag is None:
            if self.rank == 0:
                print(f"[aihf_fast] --resume: no checkpoint in {self.ckpt_dir}, starting from step 0", flush=True)
            return False
        d = os.path.join(self.ckpt_dir, tag)
        try:
            path, _ = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
            self._load_extra(d)
            state = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False)
        except Exception as e:  # noqa: BLE001 - name the checkpoint and what failed
            raise ConfigError(f"--resume: cannot load checkpoint {d}: {type(e).__name__}: {e}") from e
        if path is None:
            raise ConfigError(f"--resume: DeepSpeed could not load checkpoint {d}")
        if self.rank == 0 and tag != _read_latest(self.ckpt_dir):
            print(f"[aihf_fast] --resume: resuming from {tag}", flush=True)
        check_resume_options(state.pop("run", {}), self._run_signature(),
                             ", so the data order, samples or reference would not continue it")
        state.setdefault("replay", [])
        state.setdefault("sample_step", 0)
        self.state = state
        rng_file = os.path.join(d, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng_file):
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return True

    def save_model(self, engine=None, name: str = "model"):
        """save_pretrained (safetensors) of the engine's transformers model + the tokenizer into
        output_dir/name -> that directory."""
        engine = self.engine if engine is None else engine
        out = os.path.join(self.cfg.output_dir, name)
        model = engine.module.model
        if self.zero3:  # gathered onto rank 0 layer by layer; keys are the wrapper's ("model." + HF name)
            sd = engine._zero3_consolidated_16bit_state_dict()
            sd = {k[len("model."):]: v for k, v in (sd or {}).items()}
        else:
            sd = model.state_dict()
        if self.rank == 0:
            model.config.use_cache = True
            model.save_pretrained(out, state_dict=sd, safe_serialization=True)
            self.tok.save_pretrained(out)
        if self.world > 1:
            dist.barrier()
        return out

    # ------------------------------------------------------------------ loop
    def _log(self, rec: dict):
        if self.rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def _step(self, step: int, lr: float, evals: list, bar) -> dict:
        """Refresh, one optimiser step, log, evaluate -> the step's record. A loss that is not
        finite raises ``Diverged``."""
        cfg = self.cfg
        self.refresh(step)  # off a refresh boundary this does nothing: a resumed window comes from the checkpoint
        t0 = time.time()
        m = self.train_step(step)
        dt = time.time() - t0
        bad = [k for k in ("loss", "rm/loss") if k in m and not math.isfinite(m[k])]
        if bad:  # every rank sees the same (all-reduced) loss; the step's update may have made the weights non-finite
            rate = f"rm_lr = {cfg.rm_lr or cfg.lr:g}" if bad[0] == "rm/loss" else f"lr = {lr:g}"
            raise Diverged(f"step {step + 1}: {bad[0]} = {m[bad[0]]}: the run diverged; lower the learning rate "
                           f"({rate})")
        last = dict(step=step + 1, method=self.method_at(step), lr=lr, tokens_per_s=m["tokens"] / max(dt, 1e-9), **m)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or "rm/loss" in m:  # reward phases: always
            self._log(last)
        if bar is not None:
            bar.update(1)
            shown = {"reward": f"{m['rl/reward']:.3f}", "kl": f"{m['rl/kl']:.3f}"} if "rl/reward" in m else \
                {"loss": f"{m['loss']:.4f}"}  # an RL loss is ~0 by construction (mean-zero advantages)
            bar.set_postfix(**shown, tok_s=f"{last['tokens_per_s']:.0f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.steps:
            e = self.evaluate(step + 1)
            if e:
                evals.append(e)
                self._log(e)
        return last

    def _steps(self, start: int, evals: list, bar, stop, kill_at: int):
        """Steps start .. steps-1 (refresh, step, log, evaluate, checkpoint); after each, a stop
        requested by a signal (on any rank) checkpoints and raises ``Interrupted``. Non-finite
        numbers met on the way (the loss, a forward pass or sampling over weights that are no
        longer finite, a reward model's rewards) raise ``Diverged`` naming the step.
        Returns (tokens, the last step's record)."""
        cfg = self.cfg
        tok_total, last = 0, {}
        for step in range(start, cfg.steps):
            lr = self.sched.get_last_lr()[0]  # the rate this step uses
            with _diverging(step + 1, lr):
                last = self._step(step, lr, evals, bar)
            tok_total += last["tokens"]
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                self.save_checkpoint(step + 1)
            if step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            signal_hook(step + 1, self.rank)
            signum = stop.requested(self.world, self.device)
            if signum and step + 1 < cfg.steps:
                if not (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    self.save_checkpoint(step + 1)
                raise Interrupted(signum, step + 1, os.path.join(self.ckpt_dir, f"step{step + 1}"), self.rank)
        return tok_total, last

    def train(self) -> dict:
        """Run (or continue, with resume) to ``steps`` -> the summary (also output_dir/summary.json).
        A signal during start-up stops at once, in the loop after the step (with a checkpoint)."""
        with StopOnSignal() as stop:
            stop.starting()
            signal_hook(0, self.rank)  # test hook: a signal during start-up
            return self._run(stop)

    def _run(self, stop) -> dict:
        cfg = self.cfg
        resumed = cfg.resume and self.load_checkpoint()
        start = self.state["step"]
        if self.rank == 0:
            start_log(self.log_path, resumed, "step", start)
            write_config(cfg.output_dir, cfg)
        summary_path = os.path.join(cfg.output_dir, "summary.json")
        if resumed and start >= cfg.steps and os.path.isfile(summary_path):
            if self.rank == 0:
                print(f"[aihf_fast] --resume: this run already finished ({cfg.steps} steps)", flush=True)
            with open(summary_path) as f:
                return json.load(f)
        evals = []
        if resumed and os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                evals = [r for r in map(json.loads, f) if any(k.startswith("eval/") for k in r)]
        if start == 0:
            e = self.evaluate(0)
            if e:
                evals.append(e)
                self._log(e)
        kill_at = int(os.environ.get("AIHF_FAST_KILL_AFTER_STEP", "-1"))  # test hook: SIGKILL after that step
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method}", dynamic_ncols=True)
        t_start = time.time()
        stop.in_loop()
        try:
            tok_total, last = self._steps(start, evals, bar, stop, kill_at)
        finally:
            if bar is not None:
                bar.close()
        # from here a signal is recorded and the run completes (final evaluation, model saved)
        if not evals or evals[-1]["step"] != cfg.steps:
            with _diverging(cfg.steps, last.get("lr", cfg.lr)):  # the last update may have diverged
                e = self.evaluate(cfg.steps)
            if e:
                evals.append(e)
                self._log(e)
        model_dir = self.save_model() if cfg.save_model else None
        wall = time.time() - t_start
        summary = dict(steps=cfg.steps, method=cfg.method, last=last, evals=evals, model_dir=model_dir,
                       train_seconds=wall, tokens=tok_total, generation_seconds=self._gen_time,
                       eval_seconds=self._eval_time,
                       world_size=self.world, zero_stage=cfg.zero_stage, packed=self.packed)
        if self.rank == 0:
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=1)
            if stop.signum:
                print(f"[aihf_fast] {signal.Signals(stop.signum).name} arrived after the last step: the run was "
                      "completed", file=sys.stderr, flush=True)
        return summary


def train(cfg: LLMTrainConfig) -> dict:
    """Run one training job; returns its summary (also written to output_dir/summary.json)."""
    with StopOnSignal() as stop:  # start-up (models, data, caches): a signal stops at once
        stop.starting()
        if cfg.method in REWARD_METHODS:
            from .trainer_rl import RewardRLTrainer

            return RewardRLTrainer(cfg).train()
        return Trainer(cfg).train()
