"""The embedded default job (``--synthetic``): no downloads, a few minutes on a CPU.

1. Generate the known-reward task (``aihf_fast.data.synthetic``) in OUTPUT_DIR/task.
2. Pretrain a tiny randomly initialised Llama on the task's mediocre answers (``sft``) into
   OUTPUT_DIR/base/model: the base policy and the reference (skipped when it exists).
3. Train the base with the chosen method (default ``aihf``) into OUTPUT_DIR/METHOD, and print
   the true reward r*(x, y) of the policy's samples on held-out prompts before and after.
Trainer flags (``--steps``, ``--method``, ``--w-P``, ...) override the preset below.
"""
from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from ...data import synthetic
from .config import LLMTrainConfig, parse_args

PRESET = dict(method="aihf", steps=150, lr=5e-4, beta=0.1, pairs_per_batch=16, demos_per_batch=16,
              refresh_every=50, w_P=1.0, w_D=1.0, nll_weight=0.1, max_new_tokens=9, max_length=24,
              gen_batch_size=512, output_dir="runs/synthetic", overwrite=True,
              eval_reward="aihf_fast.data.synthetic:true_reward")
BASE = dict(method="sft", lr=1e-3, demos_per_batch=128, max_new_tokens=9, max_length=24, gen_batch_size=512,
            overwrite=True, eval_reward="aihf_fast.data.synthetic:true_reward")


def _task_parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--design", default="A", choices=["A", "B"], help="A: expert wrong on the last 2 positions; B: unbiased")
    p.add_argument("--num-demos", type=int, default=2000)
    p.add_argument("--num-pairs", type=int, default=200)
    p.add_argument("--num-base", type=int, default=20000)
    p.add_argument("--num-eval-prompts", type=int, default=500)
    p.add_argument("--base-steps", type=int, default=400, help="SFT steps (128 answers each) of the base model")
    return p


def run(argv) -> dict:
    targs, rest = _task_parser().parse_known_args(argv)
    cfg, _ = parse_args(rest, preset=PRESET)
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
    base_model = os.path.join(root, "base", "model")
    if not os.path.isfile(os.path.join(base_model, "config.json")):
        base = LLMTrainConfig(**{**BASE, **files}, model_config=dict(synthetic.DEFAULT_MODEL_CONFIG),
                              demonstrations=os.path.join(task, "base.jsonl"), steps=targs.base_steps,
                              output_dir=os.path.join(root, "base"), seed=cfg.seed, progress=cfg.progress)
        train(base)
    cfg.model, cfg.model_config = base_model, None
    cfg.tokenizer = cfg.tokenizer or files["tokenizer"]
    cfg.eval_prompts = cfg.eval_prompts or files["eval_prompts"]
    cfg.demonstrations = cfg.demonstrations or os.path.join(task, "demos.jsonl")
    if targs.num_pairs > 0:
        cfg.preferences = cfg.preferences or os.path.join(task, "prefs.jsonl")
    cfg.output_dir = os.path.join(root, cfg.method)
    s = train(cfg)
    if rank == 0 and s["evals"]:
        b, a = s["evals"][0], s["evals"][-1]
        print(f"[synthetic] true reward of {cfg.method} samples on {b['eval/num_samples']} held-out prompts: "
              f"{b['eval/reward']:.3f} +- {b['eval/reward_sem']:.3f} (base) -> {a['eval/reward']:.3f} +- "
              f"{a['eval/reward_sem']:.3f} after {cfg.steps} steps; model in {s['model_dir']}", flush=True)
    return s
