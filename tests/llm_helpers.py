"""Tiny task + tiny model for the LLM trainer tests (no downloads)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch


def make_task(root: str, num_demos=48, num_pairs=24, num_eval=16, seed=0) -> dict:
    """A small synthetic task and a randomly initialised tiny Llama saved as a local model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aihf_fast.data import synthetic

    task = os.path.join(root, "task")
    synthetic.write_task(task, seed=seed, num_base=0, num_demos=num_demos, num_pairs=num_pairs, num_eval_prompts=num_eval)
    mc = dict(synthetic.DEFAULT_MODEL_CONFIG)
    mc.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc))
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    return dict(model=model_dir, tokenizer=os.path.join(task, "tokenizer"),
                demonstrations=os.path.join(task, "demos.jsonl"), preferences=os.path.join(task, "prefs.jsonl"),
                eval_prompts=os.path.join(task, "eval_prompts.jsonl"), task=task)


def flags(d: dict) -> list:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(args: list, nproc: int = 1, env_extra: dict | None = None, timeout=600):
    """Run the trainer in fresh processes: python -m (nproc=1) or the deepspeed launcher."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)
    env.update(env_extra or {})
    if nproc == 1:
        cmd = [sys.executable, "-m", "aihf_fast.train.llm", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port()), "--module", "aihf_fast.train.llm", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def read_log(output_dir: str) -> list:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(output_dir: str) -> dict:
    return {r["step"]: r["loss"] for r in read_log(output_dir) if "loss" in r}


def final_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model", "model.safetensors"))
