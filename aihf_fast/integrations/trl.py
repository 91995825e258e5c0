"""TRL integrations: ``DPOTrainer`` with its loss computed by the fused ``aihf_loss`` (Triton on
CUDA), and ``AIHFTrainer``, single-stage AIHF on TRL's trainer.

    from aihf_fast.integrations.trl import AIHFDPOTrainer      # instead of trl.DPOTrainer
    trainer = AIHFDPOTrainer(model=model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok)
    trainer.train()

or ``use_aihf_loss(trainer)`` on a ``DPOTrainer`` already built. Everything else is TRL's: the
data collator, the reference model (a ``ref_model``, PEFT adapters disabled, or precomputed
reference log-probs), accelerate / DeepSpeed / FSDP, logging. The policy's loss goes through one
``aihf_loss`` call inside the model's forward (so ZeRO-3 gathers the LM head for it): the same
loss and gradients as TRL's for the configurations below, and the same metrics (``rewards/*``,
``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``).

Fused: ``loss_type`` "sigmoid" or "hinge", alone or with "sft" (RPO: ``loss_type=["sigmoid",
"sft"]``, ``loss_weights``), reverse-KL divergence, no ``ld_alpha``, no WPO weighting, no MoE
auxiliary loss, text only, and an LM head that is a plain linear map. Any other configuration
runs TRL's own loss, saying so once.

``AIHFTrainer`` / ``AIHFConfig``: preference pairs and demonstrations, each demonstration
compared with a fresh sample of the policy (see their docstrings). Tested with TRL ``TRL_VERSIONS``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings

import torch

from ..ops import BatchLayout, LossConfig, aihf_loss

TRL_VERSIONS = ">=1.16,<1.17"  # the range tested; the trainer overrides TRL's private _compute_loss

try:
    import trl
    from packaging.version import Version
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
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
    seq_logps); with TRL's labels ``kw`` needs ``shift_labels=True`` (in its config). A head that
    is not a plain linear map (bias, logit scaling or soft-capping) goes through the model's own
    logits instead (``aihf_loss(labels, logits=...)``). Without ``aihf_loss_kwargs`` the forward is
    the one it had (generation unchanged). Under ZeRO-3 the head's weight is registered with the
    model, so that its forward gathers it."""
    if getattr(model, "_aihf_head", False):
        return
    from ..train.llm.model import _fused_head_ok

    fused = _fused_head_ok(model)
    weight = model.get_output_embeddings().weight
    if fused and getattr(weight, "ds_id", None) is not None:  # ZeRO-3 partitioned: gather it for this forward too
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
        if not fused:
            logits = inner(*args, **kwargs).logits  # (B, T, V)
            out = aihf_loss(labels.to(logits.device), logits=logits, **aihf_loss_kwargs)
            return {"loss": out.loss, "metrics": out.metrics, "seq_logps": out.seq_logps}
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
              config=LossConfig(beta=self.beta, loss_type=loss_type, shift_labels=True, token_metrics=True))
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
    # token means over every process's tokens: (metric, its tokens here) -> sum / count
    for name, rows in (("logits/chosen", shift_mask[:P]), ("logits/rejected", shift_mask[P:]),
                       ("entropy", shift_mask), ("mean_token_accuracy", shift_mask[:P])):
        tokens = rows.sum()
        total = gather(m[name].detach() * tokens).sum().item()
        count = gather(tokens).sum().item()
        self._metrics[mode][name].append(total / count if count > 0 else 0.0)
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


# ---------------------------------------------------------------------------------------------
# single-stage AIHF on TRL's DPOTrainer: preference pairs + (demonstration > own sample) pairs


@dataclasses.dataclass
class AIHFConfig(DPOConfig):
    """``trl.DPOConfig`` plus AIHF's weights and the sampling of the policy's own completions.

    The loss of a batch (P preference pairs, D demonstrations, each with a fresh sample of the
    current policy for its prompt) is one mean over its P + D comparisons (DPO's sigmoid or
    hinge on beta-scaled log-ratios to the reference), the pairs weighted ``w_P``, the
    (demonstration > own sample) comparisons ``w_D``, plus ``nll_weight`` times the demonstrations'
    mean token NLL: the effective balance is ``w_P * P : w_D * D``.
    """

    w_P: float = dataclasses.field(default=1.0, metadata={"help": "weight of the human preference pairs"})
    w_D: float = dataclasses.field(default=1.0, metadata={
        "help": "weight of the (demonstration > the policy's own sample) comparisons"})
    nll_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "weight of the demonstrations' token NLL (0: none)"})
    max_completion_length: int = dataclasses.field(default=256, metadata={
        "help": "longest own sample, in tokens"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "temperature of the own samples"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus sampling of the own samples (1: off)"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("w_P", "w_D", "nll_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.w_D == 0:
            raise ValueError("w_D must be > 0: with w_D = 0 AIHF is DPO plus an NLL term (AIHFDPOTrainer with "
                             "loss_type=['sigmoid', 'sft'])")
        if not (isinstance(self.max_completion_length, int) and self.max_completion_length >= 1):
            raise ValueError(f"max_completion_length must be an int >= 1, got {self.max_completion_length!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.loss_type) != 1 or self.loss_type[0] not in _PAIR_LOSSES:
            raise ValueError(f"loss_type must be 'sigmoid' or 'hinge' for AIHF, got {self.loss_type} (the "
                             "demonstrations' NLL is nll_weight, not 'sft')")
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs=True cannot hold for AIHF: the own samples are new at every "
                             "step, so their reference log-probs are computed with them")
        for name, bad in (("f_divergence_type", self.f_divergence_type != "reverse_kl"),
                          ("ld_alpha", self.ld_alpha is not None), ("use_weighting", self.use_weighting),
                          ("label_smoothing", self.label_smoothing != 0),
                          ("loss_weights", self.loss_weights not in (None, [1.0])),
                          ("pad_token", self.pad_token is not None)):
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by AIHFTrainer (the weights "
                                 "are w_P, w_D and nll_weight; set a pad token on the tokenizer)")


class DataCollatorForAIHF:
    """Keeps a batch's tokenized rows as lists (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
    ``is_demo``): the demonstrations' rejected side is sampled, and the batch padded, in the loss."""

    def __call__(self, examples: list[dict]) -> dict:
        out = {k: [list(e[k]) for e in examples] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        if "is_demo" in examples[0]:  # the training mix (an evaluation set of pairs has no such column)
            out["is_demo"] = [bool(e["is_demo"]) for e in examples]
        return out


class AIHFTrainer(DPOTrainer):
    """Single-stage AIHF with TRL: ``train_dataset`` holds preference pairs (TRL's preference
    format, may be None), ``demonstrations`` prompt/completion rows (TRL's prompt-completion
    format, standard or conversational like the pairs). Each batch mixes both; every
    demonstration is compared with a sample of the current policy for its prompt, drawn fresh
    (``AIHFConfig.max_completion_length``, ``temperature``, ``top_p``), and the loss is one
    ``aihf_loss`` call (fused on the LM head; see ``AIHFConfig``). The reference is TRL's: a
    ``ref_model``, PEFT adapters disabled, and ``sync_ref_model`` for a moving one.

        trainer = AIHFTrainer(model=model, ref_model=ref, args=AIHFConfig(output_dir="out"),
                              train_dataset=pairs, demonstrations=demos, processing_class=tok)
        trainer.train()

    Logged: ``rewards/*`` and ``logps/*`` of the pairs, ``demo_rewards/*`` of the
    (demonstration > own sample) comparisons, ``entropy``, ``mean_token_accuracy``,
    ``samples/mean_length``, ``num_tokens``.
    """

    def __init__(self, model, ref_model=None, args: AIHFConfig | None = None, train_dataset=None,
                 demonstrations=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            raise ValueError("args is required: an AIHFConfig(output_dir=...)")
        if not isinstance(args, AIHFConfig):
            raise TypeError(f"args must be an AIHFConfig, got {type(args).__name__}")
        if demonstrations is None:
            raise ValueError("demonstrations is required (prompt/completion rows); preferences alone are DPO: "
                             "use AIHFDPOTrainer")
        if "data_collator" in kwargs:
            raise TypeError("data_collator is AIHFTrainer's own (the own samples are drawn in the loss)")
        mixed = _mix_datasets(train_dataset, demonstrations, args.w_P)
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=mixed, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=DataCollatorForAIHF(), **kwargs)
        why = _unsupported_for_aihf(self)
        if why is not None:
            raise ValueError(f"AIHFTrainer does not support {why}")
        import pyarrow.compute as pc

        table = self.train_dataset.with_format("arrow")[:]
        empty = pc.sum(pc.and_(table.column("is_demo"), pc.equal(pc.list_value_length(table.column("prompt_ids")),
                                                                      0))).as_py() or 0
        if empty:
            raise ValueError(f"demonstrations: {empty} rows have an empty tokenized prompt; the policy's own sample "
                             "needs a prompt to answer")
        base = self.accelerator.unwrap_model(self.model)
        add_aihf_head(base.get_base_model() if hasattr(base, "get_base_model") else base)
        self._preference_collator = DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
            truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)
        self._sample_calls = (-1, 0)  # (global step, micro-batches in it): the own samples' seed
        self._eval_calls = 0

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "is_demo"]

    @torch.no_grad()
    def _own_samples(self, prompts: list, seed: int) -> list:
        """One completion (token ids, cut after the first stop token, kept) per prompt, from the
        current policy (``sampling.sample_completions``)."""
        from trl.models import unwrap_model_for_generation

        from ..train.llm.sampling import sample_completions

        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as policy:
            return sample_completions(policy, self._tokenizer, prompts, max_new_tokens=self.args.max_completion_length,
                                      temperature=self.args.temperature, top_p=self.args.top_p, seed=seed,
                                      device=self.accelerator.device)

    def _sample_seed(self, mode: str) -> int:
        """The own samples' seed of this micro-batch: (seed, step, micro-batch within the step,
        process) in training, advanced once per micro-batch whether it samples or not, so that a
        resumed run and every launcher draw the same; in an evaluation (seed, step, its batch)."""
        if mode == "train":
            step, calls = self._sample_calls
            calls = calls + 1 if step == self.state.global_step else 0
            self._sample_calls = (self.state.global_step, calls)
            key = (self.args.seed, self.state.global_step, calls, self.accelerator.process_index)
        else:
            self._eval_calls += 1
            key = (self.args.seed, -1, self.state.global_step, self._eval_calls, self.accelerator.process_index)
        return hash(key) & 0x7FFFFFFF  # ints only: a str's hash differs from process to process

    def train(self, *args, **kwargs):
        self._sample_calls = (-1, 0)  # a second train() (e.g. resuming) on this trainer starts the count anew
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._eval_calls = 0  # each evaluation draws the same samples for the same weights
        return super().evaluate(*args, **kwargs)

    def _sharded_generation(self) -> bool:
        """Whether a generation is a collective call (ZeRO-3 gathers the weights, FSDP too)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    def _forward(self, model, inputs):
        """-> (loss, the padded batch): own samples for the batch's demonstrations, then one aihf_loss."""
        mode = "train" if self.model.training else "eval"
        w_P = self.args.w_P
        if "is_demo" not in inputs:  # an evaluation set of pairs, tokenized by TRL: DPO's loss on them
            inputs = {**inputs, "is_demo": [False] * len(inputs["prompt_ids"])}
            w_P = 1.0
        demo = inputs["is_demo"]
        pairs = [i for i, d in enumerate(demo) if not d]
        demos = [i for i, d in enumerate(demo) if d]
        P, D = len(pairs), len(demos)
        rows = [dict(prompt_ids=inputs["prompt_ids"][i], chosen_ids=inputs["chosen_ids"][i],
                     rejected_ids=inputs["rejected_ids"][i]) for i in pairs + demos]
        seed = self._sample_seed(mode)
        sample = D > 0
        if self._sharded_generation():  # generation gathers the weights collectively: all processes or none
            sample = bool(self.accelerator.gather(torch.tensor([D], device=self.accelerator.device)).sum() > 0)
        if any(not r["prompt_ids"] for r in rows[P:]):
            raise ValueError("a demonstration has an empty tokenized prompt; the policy's own sample needs a prompt")
        if sample:
            # this process's demonstrations, or a throw-away prompt of one token
            tok = self._tokenizer
            prompts = [r["prompt_ids"] for r in rows[P:]] or [[tok.eos_token_id if tok.eos_token_id is not None
                                                               else tok.pad_token_id]]
            for r, own in zip(rows[P:], self._own_samples(prompts, seed)):
                r["rejected_ids"] = own
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in self._preference_collator(rows).items()}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        ref_chosen, ref_rejected = self.compute_ref_log_probs(
            self.ref_model if self.ref_model is not None else self.model, batch)
        n = P + D
        ar = torch.arange(n, device=device)
        nll = None
        if self.args.nll_weight and D:
            nll = torch.zeros(2 * n, device=device)
            nll[P:n] = self.args.nll_weight
        # comparison i: chosen row i > rejected row n + i; the pairs first (P of them), then the demonstrations
        first = 0 if w_P else P
        layout = BatchLayout(comparisons=(ar[first:], ar[first:] + n, torch.tensor(
                                 [w_P] * (P - first) + [self.args.w_D] * D, device=device, dtype=torch.float32)),
                             nll_weights=nll, num_sequences=2 * n, num_pair_comparisons=P - first)
        kw = dict(layout=layout, ref_seq_logps=torch.cat([ref_chosen, ref_rejected]).float(),
                  config=LossConfig(beta=self.beta, loss_type=self.loss_types[0], shift_labels=True,
                                    token_metrics=True))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    aihf_loss_kwargs=kw)
        self._log_aihf_metrics(mode, batch, out, ref_chosen, ref_rejected, P - first, P, D)
        return out["loss"], batch

    def _compute_loss(self, model, inputs, return_outputs):
        loss, batch = self._forward(model, inputs)
        if return_outputs:
            with torch.no_grad():
                return loss, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, batch = self._forward(model, inputs)
            if prediction_loss_only:
                return loss.detach(), None, None
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss.detach(), logits, batch["input_ids"]

    def _log_aihf_metrics(self, mode, batch, out, ref_chosen, ref_rejected, P_compared, P, D):
        """Means over every process's comparisons and tokens (each process holds its own P and D).
        Rows: chosen of the pairs (P), demonstrations (D), rejected of the pairs, own samples."""
        n = P + D
        logps = out["seq_logps"].detach()
        chosen, rejected = logps[:n], logps[n:]
        rc, rr = self.beta * (chosen - ref_chosen.float()), self.beta * (rejected - ref_rejected.float())
        margin = rc - rr
        f64 = torch.float32 if logps.device.type == "mps" else torch.float64  # token counts beyond 2^24
        shift_mask = batch["completion_mask"][:, 1:].to(f64)
        tokens = shift_mask.sum(1)
        m = out["metrics"]
        winner = torch.zeros(2 * n, dtype=torch.bool, device=logps.device)
        winner[P - P_compared:n] = True  # the sequences the loss prefers or imitates (mean_token_accuracy)
        sums = []
        for sl in (slice(0, P), slice(P, n)):
            sums += [rc[sl].sum(), rr[sl].sum(), margin[sl].sum(), (margin[sl] > 0).sum(), chosen[sl].sum(),
                     rejected[sl].sum(), torch.tensor(float(sl.stop - sl.start))]
        sums += [tokens[n + P:].sum(), torch.tensor(float(D)), batch["attention_mask"].sum(),
                 m["entropy"] * tokens.sum(), tokens.sum(),
                 m["mean_token_accuracy"] * tokens[winner].sum(), tokens[winner].sum(),
                 m.get("logits/chosen", torch.zeros(())) * tokens[:P].sum(), tokens[:P].sum(),
                 m.get("logits/rejected", torch.zeros(())) * tokens[n:n + P].sum(), tokens[n:n + P].sum()]
        sums = torch.stack([torch.as_tensor(v, device=logps.device).to(f64) for v in sums])
        tot = self.accelerator.gather(sums[None]).sum(0).tolist()
        log = self._metrics[mode]
        for prefix, off, names in (("rewards", 0, ("chosen", "rejected")), ("demo_rewards", 7, ("demo", "sample"))):
            cnt = tot[off + 6]
            if cnt == 0:
                continue
            log[f"{prefix}/{names[0]}"].append(tot[off] / cnt)
            log[f"{prefix}/{names[1]}"].append(tot[off + 1] / cnt)
            log[f"{prefix}/margins"].append(tot[off + 2] / cnt)
            log[f"{prefix}/accuracies"].append(tot[off + 3] / cnt)
            log["logps/chosen" if prefix == "rewards" else "logps/demo"].append(tot[off + 4] / cnt)
            log["logps/rejected" if prefix == "rewards" else "logps/own_sample"].append(tot[off + 5] / cnt)
        for name, i in (("samples/mean_length", 14), ("entropy", 17), ("mean_token_accuracy", 19),
                        ("logits/chosen", 21), ("logits/rejected", 23)):
            if tot[i + 1]:
                log[name].append(tot[i] / tot[i + 1])
        if mode == "train":
            self._total_train_tokens += int(tot[16]) // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]


def _unsupported_for_aihf(trainer) -> str | None:
    if trainer.aux_loss_enabled:
        return "a MoE auxiliary loss (set router_aux_loss_coef=0)"
    if trainer._is_vision_dataset:
        return "a vision dataset"
    return None


def _mix_datasets(preferences, demonstrations, w_P: float):
    """One dataset of prompt/chosen/rejected rows + is_demo: the pairs, then the demonstrations
    (chosen = the demonstration; its rejected side, the own sample, is drawn in the loss).
    ``tools`` and ``chat_template_kwargs`` columns are kept (TRL's tokenization reads them)."""
    from datasets import Dataset, concatenate_datasets
    from trl.data_utils import extract_prompt, is_conversational

    def check(ds, name, need):
        if not isinstance(ds, Dataset):
            raise TypeError(f"{name} must be a datasets.Dataset (map-style), got {type(ds).__name__}")
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise ValueError(f"{name} needs columns {list(need)} (TRL's format), missing {missing}; "
                             f"it has {ds.column_names}")
        vision = [c for c in ("image", "images") if c in ds.column_names]
        if vision:
            raise ValueError(f"{name} has {vision}: AIHFTrainer does not support vision datasets")

    check(demonstrations, "demonstrations", ("prompt", "completion"))
    datasets = {"demonstrations": demonstrations}
    if preferences is not None:
        if w_P == 0:
            raise ValueError("w_P = 0 gives the preference pairs no weight: pass train_dataset=None, or w_P > 0")
        check(preferences, "train_dataset", ("chosen", "rejected"))
        datasets["train_dataset"] = preferences if "prompt" in preferences.column_names else \
            preferences.map(extract_prompt)
    extra = {c for ds in datasets.values() for c in ("tools", "chat_template_kwargs") if c in ds.column_names}
    for c in sorted(extra):
        lacking = [name for name, ds in datasets.items() if c not in ds.column_names]
        if lacking:
            raise ValueError(f"{c!r} is a column of {sorted(set(datasets) - set(lacking))} but not of {lacking}: "
                             "give every dataset the column (the tokenization reads it)")
    keep = sorted(extra)
    demos = demonstrations.select_columns(["prompt", "completion", *keep]).map(
        lambda e: {"chosen": e["completion"], "rejected": e["completion"], "is_demo": True},
        remove_columns=["completion"])
    if preferences is None:
        return demos
    pairs = datasets["train_dataset"].select_columns(["prompt", "chosen", "rejected", *keep]).map(
        lambda e: {"is_demo": False})
    if is_conversational(pairs[0]) != is_conversational(demos[0]):
        raise ValueError("train_dataset and demonstrations must both be conversational or both standard (text)")
    try:
        demos = demos.select_columns(pairs.column_names).cast(pairs.features)
    except (TypeError, ValueError) as e:
        raise ValueError(f"train_dataset and demonstrations differ in the structure of a column ({pairs.features}); "
                         f"make them match: {str(e).splitlines()[0][:300]}") from e
    return concatenate_datasets([pairs, demos])
