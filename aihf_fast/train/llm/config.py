"""Configuration of the LLM trainer: one dataclass, read from YAML/JSON and overridden by flags.

Batch sizes are per micro-batch and per process: each micro-batch holds ``pairs_per_batch``
preference pairs and ``demos_per_batch`` demonstrations (each followed by the policy's own
sample where the method uses one). One optimiser step consumes
``world_size * grad_accum`` micro-batches; a single process with ``grad_accum = k * world``
sees exactly the same global batch as ``world`` processes with ``grad_accum = k``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from .. import options
from ..options import ConfigError  # noqa: F401 - re-exported: the trainer's errors

METHODS = ("sft", "dpo", "ipo", "rpo", "sft_then_dpo", "spin", "aihf", "rm", "rlhf", "aihf_rm")
NEEDS_DEMOS = ("sft", "sft_then_dpo", "spin", "aihf")
NEEDS_PREFS = ("dpo", "ipo", "rpo", "sft_then_dpo")
USES_SAMPLES = ("spin", "aihf")
REWARD_METHODS = ("rm", "rlhf", "aihf_rm")  # explicit reward model and/or RL (trainer_rl.py)


@dataclass
class LLMTrainConfig:
    # model and tokenizer
    model: str | None = field(default=None, metadata={"help": "hub id or local path of an AutoModelForCausalLM"})
    model_config: dict | str | None = field(default=None, metadata={"help": "config (dict or JSON path, with model_type) of a randomly initialised model"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer id/path (default: the model's)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention implementation"})
    # data
    demonstrations: str | None = field(default=None, metadata={"help": "demonstrations: JSONL path, dataset dir or hf:NAME[:SPLIT]"})
    preferences: str | None = field(default=None, metadata={"help": "preference pairs: JSONL path, dataset dir or hf:NAME[:SPLIT]"})
    eval_prompts: str | None = field(default=None, metadata={"help": "held-out prompts for sampling evaluations"})
    eval_reward: str | None = field(default=None, metadata={"help": "'module:function'(prompts, completions) -> rewards, for evaluations"})
    eval_demonstrations: str | None = field(default=None, metadata={"help": "held-out demonstrations: evaluations log eval/demo_nll (per token)"})
    eval_preferences: str | None = field(default=None, metadata={"help": "held-out preference pairs: evaluations log eval/pref_accuracy of the policy's implicit reward log pi - log pi_eval_ref (every method that trains a policy, RL included); with a reward model (rm, rlhf, aihf_rm) also eval/rm_accuracy and eval/rm_nll of the reward model"})
    eval_reference: str | None = field(default=None, metadata={"help": "model for eval/kl and eval/pref_accuracy (default: the initial model)"})
    max_length: int = field(default=512, metadata={"help": "max prompt + completion tokens"})
    append_eos: bool = field(default=True, metadata={"help": "append EOS to string completions"})
    packing: bool = field(default=True, metadata={"help": "padding-free packed batches (position_ids); else padded"})
    # method
    method: str = field(default="aihf", metadata={"help": "|".join(METHODS)})
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit reward r = beta (log pi - log pi_ref) in the comparison losses"})
    w_P: float = field(default=1.0, metadata={"help": "aihf: weight of the human preference pairs"})
    w_D: float = field(default=1.0, metadata={"help": "aihf: weight of (demonstration > own sample) pairs"})
    nll_weight: float = field(default=0.0, metadata={"help": "aihf lambda / rpo alpha: demonstration (chosen) NLL weight"})
    label_smoothing: float = field(default=0.0, metadata={"help": "sigmoid loss only: assumed rate of flipped preference labels (cDPO)"})
    reference: str | None = field(default=None, metadata={"help": "fixed (the initial model) | moving (the policy at the last sample refresh); default: moving for spin, else fixed"})
    sft_steps: int = field(default=0, metadata={"help": "sft_then_dpo: SFT steps before the DPO steps (of `steps` in all)"})
    # explicit reward model and RL (rm, rlhf, aihf_rm)
    prompts: str | None = field(default=None, metadata={"help": "rlhf/aihf_rm: RL prompts (rows with 'prompt'); default: the demonstration prompts, else the preference prompts"})
    reward_model: str | None = field(default=None, metadata={"help": "rlhf: the reward model to optimise; rm/aihf_rm: its initialisation (a reward model, or a causal LM whose backbone gets a new head; default: the policy's initial model)"})
    reward_fn: str | None = field(default=None, metadata={"help": "rlhf: 'module:function'(prompts, completions) -> rewards, instead of a reward model"})
    sample_policy: str | None = field(default=None, metadata={"help": "rm: the policy whose samples for the demonstration prompts are the rejected side of (demo > sample) pairs"})
    rloo_k: int = field(default=4, metadata={"help": "RLOO samples per prompt (>= 2)"})
    prompts_per_batch: int = field(default=4, metadata={"help": "RL prompts per micro-batch (each with rloo_k samples)"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the RL reward (initial value when kl_target is set)"})
    kl_target: float | None = field(default=None, metadata={"help": "adapt kl_coef to this per-sequence KL (nats); none: fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon (samples)"})
    clip_range: float = field(default=0.2, metadata={"help": "RLOO token-level importance-ratio clip"})
    rl_epochs: int = field(default=1, metadata={"help": "optimiser steps on each RL rollout batch"})
    rm_steps: int = field(default=20, metadata={"help": "aihf_rm: reward-model optimiser steps per outer iteration"})
    rl_steps: int = field(default=20, metadata={"help": "aihf_rm: RL steps per outer iteration (steps = RL steps in all)"})
    rm_lr: float | None = field(default=None, metadata={"help": "aihf_rm: reward-model learning rate (default: lr)"})
    replay_size: int = field(default=0, metadata={"help": "aihf / aihf_rm: (demonstration, own sample) pairs of earlier refreshes / outer iterations kept (the newest replay_size; 0: none)"})
    replay_per_batch: int | None = field(default=None, metadata={"help": "aihf / aihf_rm: replayed pairs added to each micro-batch's demonstration comparisons (default: demos_per_batch)"})
    # own samples (spin, aihf)
    refresh_every: int = field(default=50, metadata={"help": "steps between regenerating the policy's own samples"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest own sample / evaluation sample, in tokens"})
    sample_temperature: float = field(default=1.0, metadata={"help": "temperature of own samples and RL rollouts"})
    sample_top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of own samples (1: off; RL methods refuse < 1)"})
    gen_batch_size: int = field(default=64, metadata={"help": "sequences per generation / scoring call"})
    # optimisation
    steps: int = field(default=100, metadata={"help": "optimiser steps in all"})
    pairs_per_batch: int = field(default=4, metadata={"help": "preference pairs per micro-batch and process"})
    demos_per_batch: int = field(default=4, metadata={"help": "demonstrations per micro-batch and process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimiser step and process"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    lr_P: float | None = field(default=None, metadata={"help": "aihf: learning rate of the preference terms; given, each step takes two AdamW updates with their own moments: the demonstration terms (demo > own sample, NLL) at lr, then the preference pairs at lr_P"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant | linear | cosine (after warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_betas: tuple = field(default=(0.9, 0.999), metadata={"help": "AdamW betas (two numbers)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping by global norm (0: off)"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and compute (else fp32)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    deepspeed_config: dict | str | None = field(default=None, metadata={"help": "DeepSpeed config (dict or JSON path) merged over the generated one"})
    # output, logging, checkpoints
    output_dir: str = field(default="runs/llm", metadata={"help": "where logs, checkpoints and the model go"})
    log_every: int = field(default=1, metadata={"help": "steps between log.jsonl training records"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0: at the start and the end only)"})
    eval_samples_per_prompt: int = field(default=1, metadata={"help": "samples per held-out prompt in an evaluation"})
    eval_kl: bool = field(default=False, metadata={"help": "also log eval/kl: mean log pi(y|x) - log pi_init(y|x) of the eval samples (keeps a frozen initial model)"})
    save_every: int = field(default=0, metadata={"help": "DeepSpeed checkpoint every N steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "start over even if output_dir holds checkpoints (deletes them)"})
    save_model: bool = field(default=True, metadata={"help": "save_pretrained (safetensors) at the end"})
    seed: int = field(default=0, metadata={"help": "seed of the model initialisation, data order and sampling"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @property
    def uses_samples(self) -> bool:
        return self.method in USES_SAMPLES and (self.method == "spin" or self.w_D > 0)


def from_dict(data: dict) -> LLMTrainConfig:
    return options.from_dict(LLMTrainConfig, data)


def build_parser() -> argparse.ArgumentParser:
    p = options.build_parser(LLMTrainConfig, "python -m aihf_fast.train.llm", __doc__.split("\n")[0])
    from .synthetic_job import add_task_arguments

    g = p.add_argument_group("the embedded default job (--synthetic)")
    g.add_argument("--synthetic", action="store_true",
                   help="generate the known-reward task, pretrain a tiny Llama base on mediocre answers, train it "
                        "with the chosen method, report the true reward before/after (no downloads)")
    add_task_arguments(g, defaults=False)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parse_args(argv=None, preset: dict | None = None) -> tuple[LLMTrainConfig, argparse.Namespace]:
    """Flags over the --config file over ``preset`` -> (config, namespace with --synthetic)."""
    from .synthetic_job import TASK_OPTIONS

    cfg, ns = options.parse_args(LLMTrainConfig, build_parser(), argv, preset)
    given = [k for k in TASK_OPTIONS if k in vars(ns)]
    if given and not ns.synthetic:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: options of the --synthetic job; "
                          "add --synthetic, or drop them")
    return cfg, ns


def load_mapping(name: str, value) -> dict | None:
    """A mapping option (model_config, deepspeed_config) given as a dict, inline JSON or a JSON file."""
    if value is None or isinstance(value, dict):
        return value
    text, where = value, name
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise ConfigError(f"{name}: file not found: {value!r}")
        with open(value, encoding="utf-8") as f:
            text, where = f.read(), f"{name} {value!r}"
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(out).__name__}")
    return out


def _looks_like_path(v: str) -> bool:
    """A local path rather than a hub id: absolute, relative (./ ../ ~), or more than one '/'."""
    return v.startswith(("/", "./", "../", "~")) or v.count("/") > 1 or os.sep != "/" and os.sep in v


def validate(cfg: LLMTrainConfig) -> None:
    """Fail early, naming the option, on a configuration that cannot run."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if (cfg.model is None) == (cfg.model_config is None):
        raise ConfigError("give exactly one of model (hub id / path) or model_config (random init)")
    if cfg.model_config is not None and cfg.tokenizer is None:
        raise ConfigError("model_config (random init) needs tokenizer")
    for name in ("model", "tokenizer"):  # a local path (not a hub id "org/name") must exist
        v = getattr(cfg, name)
        if isinstance(v, str) and _looks_like_path(v) and not os.path.exists(v):
            raise ConfigError(f"{name}: no such directory: {v!r}")
    _validate_reward(cfg)
    if cfg.method in NEEDS_DEMOS and not cfg.demonstrations:
        raise ConfigError(f"method {cfg.method!r} needs demonstrations")
    if cfg.method in NEEDS_PREFS and not cfg.preferences:
        raise ConfigError(f"method {cfg.method!r} needs preferences")
    for name in ("demonstrations", "preferences", "eval_prompts", "eval_demonstrations", "eval_preferences", "prompts"):
        v = getattr(cfg, name)
        if v and not v.startswith("hf:") and not os.path.exists(v):
            raise ConfigError(f"{name}: file not found: {v!r}")
    if cfg.eval_reward and ":" not in cfg.eval_reward:
        raise ConfigError(f"eval_reward must be 'module:function', got {cfg.eval_reward!r}")
    for name in ("beta", "lr", "max_new_tokens", "gen_batch_size", "max_length", "grad_accum", "log_every"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("w_P", "w_D", "nll_weight", "label_smoothing", "weight_decay", "max_grad_norm", "sft_steps",
                 "warmup_steps", "save_every", "eval_every", "steps", "refresh_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.method in ("dpo", "ipo", "rpo", "sft_then_dpo", "aihf") and cfg.preferences and cfg.pairs_per_batch < 1:
        raise ConfigError("pairs_per_batch must be >= 1 when preferences are used")
    if cfg.method in NEEDS_DEMOS and cfg.demos_per_batch < 1:
        raise ConfigError(f"demos_per_batch must be >= 1 for method {cfg.method!r}")
    if cfg.method == "aihf" and cfg.w_D == 0 and cfg.w_P == 0:
        raise ConfigError("aihf needs w_D > 0 or w_P > 0")
    if cfg.method == "aihf" and cfg.w_D == 0 and not (cfg.preferences and cfg.w_P > 0):
        raise ConfigError("aihf with w_D = 0 (DPO on the pairs + nll_weight * demonstration NLL, no own samples) "
                          "needs preferences and w_P > 0")
    if cfg.lr_P is not None:
        if cfg.method != "aihf":
            raise ConfigError(f"lr_P (a step size of its own for the preference terms) is an option of method "
                              f"'aihf', not {cfg.method!r}")
        if not cfg.lr_P > 0:
            raise ConfigError(f"lr_P must be > 0, got {cfg.lr_P}")
        if not (cfg.preferences and cfg.w_P > 0):
            raise ConfigError("lr_P is the preference terms' step size: it needs preferences and w_P > 0")
        if cfg.w_D == 0 and cfg.nll_weight == 0:
            raise ConfigError("lr_P splits the update into demonstration and preference terms: with w_D = 0 and "
                              "nll_weight = 0 there are no demonstration terms (use lr alone)")
    if cfg.method == "sft_then_dpo" and not 0 < cfg.sft_steps < cfg.steps:
        raise ConfigError(f"sft_then_dpo needs 0 < sft_steps < steps, got sft_steps={cfg.sft_steps}, steps={cfg.steps}")
    if cfg.uses_samples and cfg.refresh_every < 1:
        raise ConfigError(f"refresh_every must be >= 1 for method {cfg.method!r}")
    if cfg.reference is None:
        cfg.reference = "moving" if cfg.method == "spin" else "fixed"
    if cfg.reference not in ("fixed", "moving"):
        raise ConfigError(f"reference must be 'fixed' or 'moving', got {cfg.reference!r}")
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"lr_schedule must be constant, linear or cosine, got {cfg.lr_schedule!r}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.eval_samples_per_prompt < 1:
        raise ConfigError(f"eval_samples_per_prompt must be >= 1, got {cfg.eval_samples_per_prompt}")
    if not cfg.sample_temperature > 0:
        raise ConfigError(f"sample_temperature must be > 0, got {cfg.sample_temperature}")
    if not 0 < cfg.sample_top_p <= 1:
        raise ConfigError(f"sample_top_p must be in (0, 1], got {cfg.sample_top_p}")
    if cfg.eval_reference and not (cfg.eval_kl or cfg.eval_preferences):
        raise ConfigError("eval_reference is used by eval_kl and eval_preferences: give one of them too")
    if bool(cfg.eval_reward) != bool(cfg.eval_prompts):
        raise ConfigError("eval_reward and eval_prompts go together: give both (or neither)")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")


def _validate_reward(cfg: LLMTrainConfig) -> None:
    """The explicit-reward methods' options (and that other methods are not given them)."""
    m = cfg.method
    if cfg.replay_size or cfg.replay_per_batch is not None:
        if m not in ("aihf", "aihf_rm"):
            raise ConfigError(f"replay_size / replay_per_batch are options of methods 'aihf' and 'aihf_rm', not {m!r}")
        if cfg.replay_size < 0:
            raise ConfigError(f"replay_size must be >= 0, got {cfg.replay_size}")
        if cfg.replay_size and cfg.w_D == 0:
            raise ConfigError("replay_size keeps (demonstration, own sample) pairs: it needs w_D > 0")
        if cfg.replay_per_batch is not None and (cfg.replay_per_batch < 1 or not cfg.replay_size):
            raise ConfigError(f"replay_per_batch must be >= 1 and goes with replay_size > 0, got replay_per_batch="
                              f"{cfg.replay_per_batch}, replay_size={cfg.replay_size}")
        if cfg.replay_size and m == "aihf" and cfg.refresh_every >= cfg.steps:
            raise ConfigError(f"replay_size replays the pairs of earlier refreshes: with refresh_every="
                              f"{cfg.refresh_every} >= steps={cfg.steps} there are none")
        if cfg.replay_size and m == "aihf_rm" and cfg.rl_steps >= cfg.steps:
            raise ConfigError(f"replay_size replays the pairs of earlier outer iterations: with rl_steps="
                              f"{cfg.rl_steps} >= steps={cfg.steps} there are none")
        if m == "aihf" and cfg.reference == "moving":
            raise ConfigError("replay with aihf needs reference 'fixed': an old sample's reference log-prob is "
                              "that of the reference it was scored by")
    if m not in REWARD_METHODS:
        for name in ("reward_model", "reward_fn", "sample_policy", "prompts"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{name} is an option of the explicit-reward methods {REWARD_METHODS}, not {m!r}")
        return
    if m == "rm":
        if not (cfg.preferences and cfg.w_P > 0) and not (cfg.demonstrations and cfg.sample_policy and cfg.w_D > 0):
            raise ConfigError("method 'rm' needs preferences with w_P > 0, or demonstrations with sample_policy and "
                              "w_D > 0 (demo > sample pairs): otherwise it has nothing to fit")
        if cfg.sample_policy and not cfg.demonstrations:
            raise ConfigError("sample_policy is used for (demo > sample) pairs: give demonstrations too")
        if cfg.demonstrations and not cfg.sample_policy:
            raise ConfigError("method 'rm' uses demonstrations only as (demo > sample of sample_policy) pairs: "
                              "give sample_policy, or leave demonstrations out")
        for name in ("prompts", "eval_reference", "eval_demonstrations"):
            if getattr(cfg, name):
                raise ConfigError(f"{name} does not apply to method 'rm' (it trains a reward model, not a policy)")
        if cfg.demonstrations and cfg.sample_policy and cfg.demos_per_batch < 1:
            raise ConfigError("demos_per_batch must be >= 1 for (demo > sample) pairs")
        if cfg.preferences and cfg.pairs_per_batch < 1:
            raise ConfigError("pairs_per_batch must be >= 1 when preferences are used")
        if cfg.eval_prompts or cfg.eval_kl:
            raise ConfigError("method 'rm' trains a reward model, not a policy: eval_prompts / eval_reward / eval_kl "
                              "do not apply (use eval_preferences for its held-out accuracy)")
    elif cfg.sample_policy:
        raise ConfigError(f"sample_policy is an option of method 'rm', not {m!r}")
    if m == "rlhf" and (cfg.reward_model is None) == (cfg.reward_fn is None):
        raise ConfigError("method 'rlhf' needs exactly one reward: reward_model (a directory) or reward_fn "
                          "('module:function')")
    if cfg.reward_fn is not None:
        if m != "rlhf":
            raise ConfigError(f"reward_fn is an option of method 'rlhf', not {m!r}")
        if ":" not in cfg.reward_fn:
            raise ConfigError(f"reward_fn must be 'module:function', got {cfg.reward_fn!r}")
    for name in ("reward_model", "sample_policy"):
        v = getattr(cfg, name)
        if v is not None and not os.path.isdir(v) and _looks_like_path(v):
            raise ConfigError(f"{name}: no such directory: {v!r}")
    if m in ("rlhf", "aihf_rm"):
        if not (cfg.prompts or cfg.demonstrations or cfg.preferences):
            raise ConfigError(f"method {m!r} needs prompts (or demonstrations / preferences to take them from)")
        if not isinstance(cfg.rloo_k, int) or cfg.rloo_k < 2:
            raise ConfigError(f"rloo_k must be an integer >= 2 (the leave-one-out baseline needs 2 samples per "
                              f"prompt), got {cfg.rloo_k!r}")
        for name in ("prompts_per_batch", "rl_epochs", "kl_horizon"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {cfg.kl_coef}")
        if cfg.kl_target is not None and not cfg.kl_target > 0:
            raise ConfigError(f"kl_target must be > 0 (or unset for a fixed kl_coef), got {cfg.kl_target}")
        if cfg.kl_target is not None and cfg.kl_coef == 0:
            raise ConfigError("kl_target adapts kl_coef multiplicatively: give an initial kl_coef > 0")
        if cfg.sample_top_p != 1:
            raise ConfigError(f"method {m!r} needs sample_top_p = 1: RLOO's importance ratios and KL are of the "
                              f"distribution sampled from, which top-p truncation changes (got {cfg.sample_top_p})")
        if not 0 < cfg.clip_range < 1:
            raise ConfigError(f"clip_range must be in (0, 1), got {cfg.clip_range}")
    if m == "aihf_rm":
        if cfg.w_D > 0 and not cfg.demonstrations:
            raise ConfigError("aihf_rm with w_D > 0 needs demonstrations")
        if cfg.w_P > 0 and not cfg.preferences:
            raise ConfigError("aihf_rm with w_P > 0 needs preferences (or set w_P = 0)")
        if cfg.w_D == 0 and cfg.w_P == 0:
            raise ConfigError("aihf_rm needs w_D > 0 or w_P > 0")
        for name in ("rm_steps", "rl_steps"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.rm_lr is not None and not cfg.rm_lr > 0:
            raise ConfigError(f"rm_lr must be > 0, got {cfg.rm_lr}")
        if cfg.w_D > 0 and cfg.demos_per_batch < 1:
            raise ConfigError("demos_per_batch must be >= 1 for aihf_rm with w_D > 0")
        if cfg.w_P > 0 and cfg.pairs_per_batch < 1:
            raise ConfigError("pairs_per_batch must be >= 1 for aihf_rm with w_P > 0")
