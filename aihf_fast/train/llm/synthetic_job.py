"""The embedded default job (``--synthetic``): no downloads, a few minutes on a CPU.

1. Generate the known-reward task (``aihf_fast.data.synthetic``) in OUTPUT_DIR/task.
2. Pretrain a tiny randomly initialised Llama on the task's mediocre answers (``sft``) into
   OUTPUT_DIR/base/model: the base policy and the reference (skipped when it exists and was
   trained with the same task options and seed, recorded in OUTPUT_DIR/base/stage_options.json).
3. Train the base with the chosen method (default ``aihf``) into OUTPUT_DIR/METHOD, and print
   the true reward r*(x, y) of the policy's samples on held-out prompts before and after. An
   earlier result there is replaced, saying so (``--overwrite false``: stop instead).

``--resume true`` continues a job that was stopped (a signal writes a checkpoint): finished
stages are reused, the stage that was running continues from its checkpoint when it was started
with the same options (else it starts over, saying so).

The explicit-reward methods run the paper's pipelines from an SFT policy (the base after SFT on
the demonstrations, OUTPUT_DIR/sft/model, cached like the base; also the KL reference):
``rlhf``: a reward model on the preferences (``rm``, OUTPUT_DIR/rm), then RLOO against it;
``aihf_rm``: own samples -> reward model on demonstrations and preferences -> RLOO, per outer
iteration; ``rm``: the reward model alone (held-out pair accuracy before and after).
Trainer flags (``--steps``, ``--method``, ``--w-P``, ...) override the preset below.
"""
from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from ...data import synthetic
from .config import REWARD_METHODS, LLMTrainConfig, parse_args

PRESET = dict(method="aihf", steps=150, lr=5e-4, beta=0.1, pairs_per_batch=16, demos_per_batch=16,
              refresh_every=50, w_P=1.0, w_D=1.0, nll_weight=0.1, max_new_tokens=9, max_length=24,
              gen_batch_size=512, output_dir="runs/synthetic", overwrite=True,
              eval_reward="aihf_fast.data.synthetic:true_reward")
# RLOO and reward-model settings of the explicit-reward pipelines (over PRESET)
RL_PRESET = dict(steps=60, lr=1e-4, prompts_per_batch=32, rloo_k=4, kl_coef=0.05, rm_steps=20, rl_steps=20,
                 rm_lr=3e-4, pairs_per_batch=16, demos_per_batch=16, eval_every=20)
SFT = dict(method="sft", steps=150, lr=5e-4, demos_per_batch=16)
RM = dict(method="rm", steps=60, lr=3e-4, pairs_per_batch=16)
BASE = dict(method="sft", lr=1e-3, demos_per_batch=128, max_new_tokens=9, max_length=24, gen_batch_size=512,
            overwrite=True, eval_reward="aihf_fast.data.synthetic:true_reward")


TASK_OPTIONS = ("design", "num_demos", "num_pairs", "num_base", "num_eval_prompts", "base_steps")


def add_task_arguments(p, defaults: bool = True) -> None:
    """The task and base-model options of ``--synthetic`` (also in the trainer's parser, for its
    --help and to refuse them without --synthetic: there ``defaults=False``, unset ones absent)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)  # noqa: E731
    p.add_argument("--design", default=d("A"), choices=["A", "B"],
                   help="expert demonstrations: A wrong on the last 2 positions, B unbiased (default: A)")
    p.add_argument("--num-demos", type=int, default=d(2000), help="demonstrations (default: 2000)")
    p.add_argument("--num-pairs", type=int, default=d(200), help="preference pairs (default: 200)")
    p.add_argument("--num-base", type=int, default=d(20000), help="mediocre answers the base model learns (default: 20000)")
    p.add_argument("--num-eval-prompts", type=int, default=d(500), help="held-out prompts of the evaluations (default: 500)")
    p.add_argument("--base-steps", type=int, default=d(400),
                   help="pretraining steps of the base model, 128 answers each (default: 400)")


def _task_parser():
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--synthetic", action="store_true")
    add_task_arguments(p)
    return p


def _method_of(argv) -> str:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--method", default=PRESET["method"])
    return p.parse_known_args(argv)[0].method


def run(argv) -> dict:
    targs, rest = _task_parser().parse_known_args(argv)
    reward_method = _method_of(rest) in REWARD_METHODS
    cfg, _ = parse_args(rest, preset={**PRESET, **RL_PRESET} if reward_method else PRESET)
    from .trainer import init_distributed, train

    rank, world, _ = init_distributed()
    root = cfg.output_dir
    task = os.path.join(root, "task")
    if rank == 0:
        meta = synthetic.write_task(task, seed=cfg.seed, design=targs.design, num_base=targs.num_base,
                                    num_demos=targs.num_demos, num_pairs=targs.num_pairs,
                                    num_eval_prompts=targs.num_eval_prompts)
        print(f"[synthetic] task in {task}: {targs.num_demos} demonstrations (expert data reward "
              f"{meta['demo_mean_reward']:.2f}), {targs.num_pairs} preference pairs, design {targs.design}",
              flush=True)
    if world > 1:
        dist.barrier()
    files = dict(tokenizer=os.path.join(task, "tokenizer"), eval_prompts=os.path.join(task, "eval_prompts.jsonl"))
    task_key = dict(vars(targs), seed=cfg.seed)
    task_key.pop("synthetic", None)
    resume = cfg.resume
    base = LLMTrainConfig(**{**BASE, **files}, model_config=dict(synthetic.DEFAULT_MODEL_CONFIG),
                          demonstrations=os.path.join(task, "base.jsonl"), steps=targs.base_steps,
                          output_dir=os.path.join(root, "base"), seed=cfg.seed, progress=cfg.progress)
    base_key = _key(base, task=task_key)
    if _stage_state(base.output_dir, base_key, rank) != "done" and rank == 0:
        print(f"[synthetic] pretraining the base model (a tiny Llama, {targs.base_steps} steps on the task's "
              f"mediocre answers) into {base.output_dir}; reused by later runs with the same task options", flush=True)
    _stage(train, base, base_key, rank, resume)
    cfg.model, cfg.model_config = os.path.join(root, "base", "model"), None
    cfg.tokenizer = cfg.tokenizer or files["tokenizer"]
    cfg.eval_prompts = cfg.eval_prompts or files["eval_prompts"]
    cfg.demonstrations = cfg.demonstrations or os.path.join(task, "demos.jsonl")
    if targs.num_pairs > 0:
        cfg.preferences = cfg.preferences or os.path.join(task, "prefs.jsonl")
    cfg.output_dir = os.path.join(root, cfg.method)
    if reward_method:
        return _run_reward_pipeline(cfg, root, rank, train, dict(task=task_key, base=base_key), resume)
    s = _stage(train, cfg, _key(cfg, task=task_key, base=base_key), rank, resume, result=True)
    if rank == 0 and s["evals"]:
        b, a = s["evals"][0], s["evals"][-1]
        print(f"[synthetic] true reward of {cfg.method} samples on {b['eval/num_samples']} held-out prompts: "
              f"{b['eval/reward']:.3f} +- {b['eval/reward_sem']:.3f} (base) -> {a['eval/reward']:.3f} +- "
              f"{a['eval/reward_sem']:.3f} after {cfg.steps} steps; model in {s['model_dir']}", flush=True)
    return s


def _agree(value, rank: int):
    """rank 0's value on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _stage_state(stage_dir: str, key: dict, rank: int) -> str:
    """'done' when stage_dir/model was trained with exactly these options, 'started' when a run
    with them began there and did not finish (it may have a checkpoint), else 'new'."""
    state = "new"
    if rank == 0:
        try:
            with open(os.path.join(stage_dir, "stage_options.json"), encoding="utf-8") as f:
                rec = json.load(f)
            if "options" not in rec:  # written before unfinished stages were recorded: a finished one
                rec = {"options": rec, "done": True}
            if rec["options"] == json.loads(json.dumps(key)):
                done = rec["done"] and os.path.isfile(os.path.join(stage_dir, "model", "config.json"))
                state = "done" if done else "started"
        except (OSError, ValueError, KeyError, TypeError):
            state = "new"
    return _agree(state, rank)


def _mark_stage(stage_dir: str, key: dict, rank: int, done: bool) -> None:
    if rank == 0:
        os.makedirs(stage_dir, exist_ok=True)
        tmp = os.path.join(stage_dir, "stage_options.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"options": key, "done": done}, f, indent=1)
        os.replace(tmp, os.path.join(stage_dir, "stage_options.json"))


def _key(cfg: LLMTrainConfig, **extra) -> dict:
    """What makes a stage's result: every trainer option but where it goes and how it is run,
    plus ``extra`` (the task options, the stage a model came from)."""
    skip = ("output_dir", "resume", "overwrite", "progress")
    return json.loads(json.dumps({**{k: v for k, v in vars(cfg).items() if k not in skip}, **extra}, default=str))


def _stage(train, cfg: LLMTrainConfig, key: dict, rank: int, resume: bool, result: bool = False):
    """Run one stage of the job into cfg.output_dir -> its summary, or None when it is cached
    (``result=False``: an intermediate model). With ``resume`` an unfinished stage started with the
    same options (``key``) continues from its checkpoint; otherwise the stage starts clean (its
    earlier checkpoints removed before it is recorded as started, so that they can never be
    continued under other options). ``result=True``: the stage is always run, and an earlier
    result is replaced only with a message (``--overwrite false``: an error instead)."""
    from .config import ConfigError

    state = _stage_state(cfg.output_dir, key, rank)
    if state == "done" and not result:
        return None
    cfg.resume = resume and state != "new"
    if not cfg.resume:
        earlier = _agree(os.path.isdir(os.path.join(cfg.output_dir, "checkpoints")) or
                         os.path.isfile(os.path.join(cfg.output_dir, "summary.json")), rank)
        if earlier and not cfg.overwrite:
            raise ConfigError(f"--overwrite false: {cfg.output_dir} holds an earlier run"
                              + (" made with other options (it cannot be resumed)" if resume else "")
                              + "; choose another --output-dir, or leave --overwrite on to replace it")
        if earlier and rank == 0:
            print(f"[synthetic] {cfg.output_dir}: " + ("the run there was made with other options: starting it over"
                                                       if resume else "replacing the earlier result")
                  + " (--overwrite false keeps it and stops)", flush=True)
            import shutil

            shutil.rmtree(os.path.join(cfg.output_dir, "checkpoints"), ignore_errors=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    _mark_stage(cfg.output_dir, key, rank, done=False)
    s = train(cfg)
    _mark_stage(cfg.output_dir, key, rank, done=True)
    return s


def _run_reward_pipeline(cfg: LLMTrainConfig, root: str, rank: int, train, made_of: dict, resume: bool) -> dict:
    """SFT policy (cached) -> [reward model on the preferences ->] the chosen explicit-reward method.
    ``made_of``: the task options and the base model's stage key."""
    shared = dict(tokenizer=cfg.tokenizer, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                  gen_batch_size=cfg.gen_batch_size, seed=cfg.seed, progress=cfg.progress, overwrite=True)
    sft_model = os.path.join(root, "sft", "model")
    sft_cfg = LLMTrainConfig(**SFT, **shared, model=cfg.model, demonstrations=cfg.demonstrations,
                             eval_prompts=cfg.eval_prompts, eval_reward=cfg.eval_reward,
                             output_dir=os.path.join(root, "sft"))
    sft_key = _key(sft_cfg, **made_of)
    _stage(train, sft_cfg, sft_key, rank, resume)
    cfg.model = sft_model
    if cfg.method == "rm":
        cfg.eval_prompts = cfg.eval_reward = None
        if not cfg.sample_policy:  # demonstrations enter rm only as (demo > sample of sample_policy) pairs
            cfg.demonstrations = None
        cfg.eval_preferences = cfg.eval_preferences or _held_out_pairs(root, rank)
        s = _stage(train, cfg, _key(cfg, sft=sft_key), rank, resume, result=True)
        if rank == 0 and s["evals"]:
            b, a = s["evals"][0], s["evals"][-1]
            print(f"[synthetic] reward model accuracy on {_count(cfg.eval_preferences)} held-out pairs: "
                  f"{b['eval/rm_accuracy']:.3f} (initial head) -> {a['eval/rm_accuracy']:.3f}; model in "
                  f"{s['model_dir']}", flush=True)
        return s
    if cfg.method == "rlhf" and cfg.reward_model is None and cfg.reward_fn is None:
        if not cfg.preferences:
            from .config import ConfigError

            raise ConfigError("--synthetic --method rlhf fits its reward model on preferences: --num-pairs must be > 0")
        rm_cfg = LLMTrainConfig(**{**RM, **shared}, model=sft_model, preferences=cfg.preferences,
                                eval_preferences=_held_out_pairs(root, rank), output_dir=os.path.join(root, "rm"))
        rm = _stage(train, rm_cfg, _key(rm_cfg, sft=sft_key), rank, resume, result=True)
        if rank == 0 and rm["evals"]:
            print(f"[synthetic] reward model on the preferences: held-out pair accuracy "
                  f"{rm['evals'][0]['eval/rm_accuracy']:.3f} -> {rm['evals'][-1]['eval/rm_accuracy']:.3f}", flush=True)
        cfg.reward_model = rm["model_dir"]
    if cfg.method == "aihf_rm" and cfg.preferences and not cfg.eval_preferences:
        cfg.eval_preferences = _held_out_pairs(root, rank)
    s = _stage(train, cfg, _key(cfg, sft=sft_key), rank, resume, result=True)
    if rank == 0 and s["evals"]:
        b, a = s["evals"][0], s["evals"][-1]
        print(f"[synthetic] true reward of {cfg.method} samples on {b['eval/num_samples']} held-out prompts: "
              f"{b['eval/reward']:.3f} +- {b['eval/reward_sem']:.3f} (SFT policy) -> {a['eval/reward']:.3f} +- "
              f"{a['eval/reward_sem']:.3f} after {cfg.steps} RL steps; model in {s['model_dir']}", flush=True)
    return s


def _held_out_pairs(root: str, rank: int) -> str:
    """500 preference pairs on held-out prompts, labelled like the task's (for rm's accuracy)."""
    out = os.path.join(root, "task_eval", "prefs.jsonl")
    if rank == 0:
        synthetic.write_task(os.path.dirname(out), seed=10_000 + 1, num_base=0, num_demos=0, num_pairs=500,
                             num_eval_prompts=0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out


def _count(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
