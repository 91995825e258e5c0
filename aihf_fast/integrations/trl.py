"""TRL's ``DPOTrainer`` with its loss computed by the fused ``aihf_loss`` (Triton on CUDA).

    from aihf_fast.integrations.trl import AIHFDPOTrainer      # instead of trl.DPOTrainer
    trainer = AIHFDPOTrainer(model=model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok)
    trainer.train()

or ``use_aihf_loss(trainer)`` on a ``DPOTrainer`` already built. Everything else is TRL's: the
data collator, the reference model (a ``ref_model``, PEFT adapters disabled, or precomputed
reference log-probs), accelerate / DeepSpeed / FSDP, logging. The policy's loss goes through one
``aihf_loss`` call inside the model's forward (so ZeRO-3 gathers the LM head for it): the same
loss and gradients as TRL's for the configurations below, the same ``rewards/*``, ``logps/*``
and ``logits/*`` metrics, and ``num_tokens``; ``entropy`` and ``mean_token_accuracy`` are not
computed on this path.

Fused: ``loss_type`` "sigmoid" or "hinge", alone or with "sft" (RPO: ``loss_type=["sigmoid",
"sft"]``, ``loss_weights``), reverse-KL divergence, no ``ld_alpha``, no WPO weighting, no MoE
auxiliary loss, text only, and an LM head that is a plain linear map. Any other configuration
runs TRL's own loss, saying so once. Tested with TRL ``TRL_VERSIONS``.
"""
from __future__ import annotations

import functools
import types
import warnings

import torch

from ..ops import BatchLayout, LossConfig, aihf_loss

TRL_VERSIONS = ">=1.16,<1.17"  # the range tested; the trainer overrides TRL's private _compute_loss

try:
    import trl
    from packaging.version import Version
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - the optional dependency
    raise ImportError(f"aihf_fast.integrations.trl needs TRL {TRL_VERSIONS}: pip install 'aihf-fast[trl]'") from e

if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
    raise ImportError(f"aihf_fast.integrations.trl is tested with TRL {TRL_VERSIONS}, found {trl.__version__}: "
                      "pip install 'trl>=1.16,<1.17'")

_PAIR_LOSSES = ("sigmoid", "hinge")


def add_aihf_head(model) -> None:
    """Patch ``model`` (a transformers causal LM, not a PEFT wrapper: pass ``get_base_model()``) so
    that ``model(..., labels=labels, aihf_loss_kwargs=kw)`` runs the backbone and returns
    ``aihf_loss(labels, hidden=..., weight=lm_head.weight, **kw)`` as a dict (loss, metrics,
    seq_logps); with TRL's labels ``kw`` needs ``shift_labels=True`` (in its config). Without
    ``aihf_loss_kwargs`` the forward is the one it had (generation unchanged). Under ZeRO-3 the
    head's weight is registered with the model, so that its forward gathers it."""
    if getattr(model, "_aihf_head", False):
        return
    weight = model.get_output_embeddings().weight
    if getattr(weight, "ds_id", None) is not None:  # ZeRO-3 partitioned: gather it for this forward too
        import deepspeed

        deepspeed.zero.register_external_parameter(model, weight)
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, aihf_loss_kwargs=None, labels=None, **kwargs):
        if aihf_loss_kwargs is None:
            if labels is not None:
                kwargs["labels"] = labels
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # (B, T, H)
        weight = self.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # FSDP2 / tensor-parallel DTensor
            weight = weight.full_tensor()
        # the backbone may end on another device than the head (device_map)
        out = aihf_loss(labels.to(weight.device), hidden=hidden.to(weight.device, weight.dtype), weight=weight,
                        **aihf_loss_kwargs)
        # a dict: ZeRO-3 hooks the tensors of dicts, and the head must be gathered again in backward
        return {"loss": out.loss, "metrics": out.metrics, "seq_logps": out.seq_logps}

    model.forward = types.MethodType(forward, model)
    model._aihf_head = True


class AIHFDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is one fused ``aihf_loss`` call (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _prepare(self)

    def _compute_loss(self, model, inputs, return_outputs):
        return _fused_compute_loss(self, model, inputs, return_outputs)


def use_aihf_loss(trainer: DPOTrainer) -> DPOTrainer:
    """Make a built ``trl.DPOTrainer`` compute its loss through ``aihf_loss`` (in place; returned)."""
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"trainer must be a trl.DPOTrainer, got {type(trainer).__name__}")
    _prepare(trainer)
    trainer._compute_loss = types.MethodType(_fused_compute_loss, trainer)
    return trainer


def _unsupported(trainer) -> str | None:
    """Why this trainer's configuration cannot take the fused path (None: it can)."""
    types_ = list(trainer.loss_types)
    pair = [t for t in types_ if t in _PAIR_LOSSES]
    if len(pair) != 1 or not set(types_) <= {*_PAIR_LOSSES, "sft"} or len(types_) != len(set(types_)):
        return f"loss_type {types_} (fused: 'sigmoid' or 'hinge', optionally with 'sft')"
    checks = (
        (trainer.f_divergence_type != "reverse_kl", f"f_divergence_type={trainer.f_divergence_type!r}"),
        (trainer.ld_alpha is not None, "ld_alpha"),
        (trainer.use_weighting, "use_weighting (WPO)"),
        (trainer.aux_loss_enabled, "a MoE auxiliary loss"),
        (trainer._is_vision_dataset, "a vision dataset"),
    )
    for bad, what in checks:
        if bad:
            return what
    base = trainer.accelerator.unwrap_model(trainer.model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    from ..train.llm.model import _fused_head_ok

    if not _fused_head_ok(base):
        return "an LM head that is not a plain linear map (bias, logit scaling or soft-capping)"
    return None


def _prepare(trainer) -> None:
    trainer._aihf_why_not = _unsupported(trainer)
    if trainer._aihf_why_not is not None:
        warnings.warn(f"aihf_fast: TRL's own loss is used for {trainer._aihf_why_not}", stacklevel=3)
        return
    base = trainer.accelerator.unwrap_model(trainer.model)
    add_aihf_head(base.get_base_model() if hasattr(base, "get_base_model") else base)


def _layout(trainer, P: int, device) -> BatchLayout:
    """[chosen (P), rejected (P)]: the pair loss with its weight, and 'sft' as NLL on the chosen."""
    weight = dict(zip(trainer.loss_types, trainer.loss_weights))
    w_pair = float(next(weight[t] for t in trainer.loss_types if t in _PAIR_LOSSES))
    nll = None
    if "sft" in weight and weight["sft"] != 0:
        nll = torch.zeros(2 * P, device=device)
        nll[:P] = float(weight["sft"])
    ar = torch.arange(P, device=device)
    return BatchLayout(comparisons=(ar, ar + P, torch.full((P,), w_pair, device=device)), nll_weights=nll,
                       num_sequences=2 * P, num_pair_comparisons=P)


def _fused_compute_loss(self, model, inputs, return_outputs):
    if self._aihf_why_not is not None or return_outputs:  # TRL's own loss (return_outputs: TRL recomputes logits)
        return DPOTrainer._compute_loss(self, model, inputs, return_outputs)
    mode = "train" if self.model.training else "eval"
    non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    P = labels.shape[0] // 2
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:  # TRL's own reference path: ref_model, PEFT adapters disabled, ...
        ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None
                                                              else self.model, inputs)
    loss_type = next(t for t in self.loss_types if t in _PAIR_LOSSES)
    kw = dict(layout=_layout(self, P, labels.device), ref_seq_logps=torch.cat([ref_chosen, ref_rejected]).float(),
              config=LossConfig(beta=self.beta, loss_type=loss_type, shift_labels=True))
    out = model(**model_kwargs, labels=labels, aihf_loss_kwargs=kw)
    loss, m = out["loss"], out["metrics"]

    # the metrics as TRL logs them (gathered over processes)
    gather = self.accelerator.gather_for_metrics
    logps = out["seq_logps"].detach()
    chosen_logps, rejected_logps = logps[:P], logps[P:]
    chosen_rewards = self.beta * (chosen_logps - ref_chosen.float())
    rejected_rewards = self.beta * (rejected_logps - ref_rejected.float())
    if mode == "train":
        n = gather(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += n // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    shift_mask = completion_mask[..., 1:]
    for name, rows in (("chosen", shift_mask[:P]), ("rejected", shift_mask[P:])):
        tokens = rows.sum()
        total = gather(m[f"logits/{name}"].detach() * tokens).sum().item()
        count = gather(tokens).sum().item()
        self._metrics[mode][f"logits/{name}"].append(total / count if count > 0 else 0.0)
    agg_c, agg_r = self.accelerator.gather(chosen_rewards), self.accelerator.gather(rejected_rewards)
    self._metrics[mode]["rewards/chosen"].append(agg_c.mean().item())
    self._metrics[mode]["rewards/rejected"].append(agg_r.mean().item())
    self._metrics[mode]["rewards/accuracies"].append(
        self.accelerator.gather((chosen_rewards > rejected_rewards).float()).mean().item())
    self._metrics[mode]["rewards/margins"].append(
        self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
    self._metrics[mode]["logps/chosen"].append(self.accelerator.gather(chosen_logps).mean().item())
    self._metrics[mode]["logps/rejected"].append(self.accelerator.gather(rejected_logps).mean().item())
    return loss
