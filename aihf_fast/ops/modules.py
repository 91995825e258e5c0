"""``AIHFLoss``: the joint loss as an ``nn.Module`` holding its hyper-parameters."""
from __future__ import annotations

import torch

from .aihf_loss import AIHFLossOutput, aihf_loss


class AIHFLoss(torch.nn.Module):
    """Module form of :func:`aihf_fast.ops.aihf_loss`; per-batch tensors go to ``forward``.

    Example (padded batch of S sequences, fused LM head, precomputed reference)::

        loss_fn = AIHFLoss(beta=0.1)
        out = loss_fn(labels, hidden=h, weight=model.lm_head.weight, ref_seq_logps=ref,
                      comparisons=(winners, losers, weights), nll_weights=a)
        out.loss.backward()
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        nll_normalize: str = "tokens",
        reference_free: bool = False,
        shift_labels: bool = False,
        ignore_index: int = -100,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        backend: str | None = None,
        validate: bool = True,
    ):
        super().__init__()
        self.config = dict(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction,
            nll_normalize=nll_normalize, reference_free=reference_free, shift_labels=shift_labels,
            ignore_index=ignore_index,
            temperature=temperature, chunk_size=chunk_size, backend=backend, validate=validate,
        )
        # check the hyper-parameters now rather than at the first batch
        aihf_loss(torch.zeros(1, 1, dtype=torch.long), token_logps=torch.zeros(1, 1),
                  **{**self.config, "backend": "torch"})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def forward(self, labels: torch.Tensor, **batch) -> AIHFLossOutput:
        clash = set(batch) & set(self.config)
        if clash:
            raise TypeError(f"{sorted(clash)} are set in AIHFLoss(...), not per call")
        return aihf_loss(labels, **batch, **self.config)
