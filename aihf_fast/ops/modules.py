"""``AIHFLoss``: the joint loss as an ``nn.Module`` holding its hyperparameters."""
from __future__ import annotations

import dataclasses

import torch

from .aihf_loss import AIHFLossOutput, LossConfig, aihf_loss


class AIHFLoss(torch.nn.Module):
    """Module form of :func:`aihf_fast.ops.aihf_loss`: the hyperparameters once (a ``LossConfig``,
    or its fields as keywords, checked here), per-batch tensors and the layout to ``forward``.

    Example (padded batch, fused LM head, precomputed reference)::

        loss_fn = AIHFLoss(beta=0.1)
        layout = method_config("aihf", num_pairs=P, num_demos=D, w_P=1.0, w_D=0.5)
        out = loss_fn(labels, hidden=h, weight=model.lm_head.weight, ref_seq_logps=ref, layout=layout)
        out.loss.backward()
    """

    def __init__(self, config: LossConfig | None = None, **hyperparameters):
        super().__init__()
        if config is not None and hyperparameters:
            raise TypeError(f"pass a LossConfig or keywords, not both: {sorted(hyperparameters)}")
        if config is not None and not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        self.config = config if config is not None else LossConfig(**hyperparameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))

    def forward(self, labels: torch.Tensor, **batch) -> AIHFLossOutput:
        clash = sorted(set(batch) & ({f.name for f in dataclasses.fields(LossConfig)} | {"config"}))
        if clash:
            raise TypeError(f"{clash} are set in AIHFLoss(...), not per call")
        return aihf_loss(labels, **batch, config=self.config)
