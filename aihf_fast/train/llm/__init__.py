"""The LLM trainer: SFT, DPO, IPO, RPO, SFT-then-DPO, SPIN and single-stage AIHF on any
transformers causal LM, and with an explicit reward model: rm (reward model), rlhf (RLOO) and
aihf_rm (AIHF's reward-model + RL loop), with DeepSpeed ZeRO 0-3, through the fused loss ops.

    python -m aihf_fast.train.llm --config run.yaml [--flag value ...]
    deepspeed --num_gpus 8 --module aihf_fast.train.llm --config run.yaml
    python -m aihf_fast.train.llm --synthetic        # the embedded known-reward job
"""
from .config import ConfigError, LLMTrainConfig, parse_args, validate
from .trainer import Diverged, Trainer, train

__all__ = ["ConfigError", "Diverged", "LLMTrainConfig", "Trainer", "parse_args", "train", "validate"]
