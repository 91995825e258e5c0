"""Model, tokenizer and DeepSpeed set-up, and the module DeepSpeed wraps.

``PolicyWithLoss`` runs the causal LM's base model to its last hidden states and hands them,
with the LM-head weight, to the fused ops: the (tokens x vocab) logits are never built. Models
whose head is not a plain bias-free linear map (logit soft-capping, logit scaling, a bias) take
the logits path (``token_logprobs``, still without a log-softmax copy). Under ZeRO-3 the head
weight is registered as an external parameter of this module, so it is gathered for the loss.
"""
from __future__ import annotations

import copy
import functools
import os
import socket
import threading
from urllib.parse import urlparse

import torch

from ...ops import aihf_loss, linear_token_logprobs, token_logprobs
from ...ops.reference import segment_sum
from .config import ConfigError, LLMTrainConfig, load_mapping

# config attributes with which a model transforms hidden @ W^T before its logits (softcapping; a
# scale: Cohere, Muse, Falcon-H1, Granite / MiniCPM3 / HyperCLOVA X): the fused path would miss them
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "output_multiplier_scale",
                     "lm_head_multiplier", "logits_scaling")


def _fused_head_ok(model) -> bool:
    """Whether the logits are exactly ``hidden @ lm_head.weight.T`` (a bias-free linear head and
    no scaling or soft-capping in the text config), so the fused ops compute the model's own
    log-probs; else the logits path is used."""
    head = model.get_output_embeddings()
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and all(getattr(c, k, None) in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS))


class PolicyWithLoss(torch.nn.Module):
    """forward(inputs, loss_kwargs) -> {"loss", "metrics"} of ``aihf_loss`` (training) or, with loss_kwargs=None,
    per-sequence summed completion log-probs (S,) fp32 (scoring, e.g. reference log-probs), or with
    per_token=True the fp32 log-prob of each label, shaped like ``labels`` (0 where ignored), of
    softmax(logits / temperature).

    inputs: ``batches.build_inputs``'s dict (packed: input_ids/position_ids (1, N), labels (N,),
    cu_seqlens (S+1,); padded: input_ids/attention_mask (S, T), labels (S, T))."""

    def __init__(self, model, zero3: bool = False):
        super().__init__()
        self.model = model
        self.fused = _fused_head_ok(model)
        if zero3 and self.fused:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, model.get_output_embeddings().weight)

    def _run(self, inputs):
        kw = dict(input_ids=inputs["input_ids"], use_cache=False)
        if "position_ids" in inputs:
            kw["position_ids"] = inputs["position_ids"]
        else:
            kw["attention_mask"] = inputs["attention_mask"]
        if self.fused:
            h = self.model.base_model(**kw).last_hidden_state
            if "position_ids" in inputs:
                h = h[0]
            return dict(hidden=h, weight=self.model.get_output_embeddings().weight)
        logits = self.model(**kw).logits
        return dict(logits=logits[0] if "position_ids" in inputs else logits)

    def forward(self, inputs, loss_kwargs=None, per_token: bool = False, temperature: float = 1.0):
        pol = self._run(inputs)
        labels = inputs["labels"]
        if loss_kwargs is not None:
            layout = dict(cu_seqlens=inputs["cu_seqlens"]) if "cu_seqlens" in inputs else {}
            out = aihf_loss(labels, **pol, **layout, **loss_kwargs)
            # a dict, not the dataclass: ZeRO-3 hooks the tensors of tuples/lists/dicts only, and the
            # LM-head weight must be gathered again in backward
            return {"loss": out.loss, "metrics": out.metrics}
        if "hidden" in pol:
            tok = linear_token_logprobs(pol["hidden"], pol["weight"], labels, temperature=temperature)
        else:
            tok = token_logprobs(pol["logits"], labels, temperature=temperature)
        if per_token:  # (N,) packed / (S, T) padded, 0 where labels == -100
            return tok
        if "cu_seqlens" in inputs:
            cu = inputs["cu_seqlens"].long()
            seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=tok.device), cu[1:] - cu[:-1])
            return segment_sum(tok, seg, cu.numel() - 1)
        return tok.sum(-1)


class RewardModel(torch.nn.Module):
    """A scalar reward per sequence: a transformers sequence-classification model (num_labels=1)
    read where transformers reads it: at each sequence's last token that is not the pad token
    (the last completion token; the one before a final EOS when the tokenizer pads with EOS), in
    packed and padded batches alike, so a reward model trained here scores the same in
    transformers / TRL and the other way round.

    forward(inputs) -> rewards (S,) fp32; forward(inputs, loss_kwargs) -> {"loss", "metrics"} of
    ``rl.bradley_terry_loss(rewards, **loss_kwargs)`` on the ``[chosen, rejected, demo, sample]`` layout.
    ``save_pretrained`` output of ``.model`` loads with ``AutoModelForSequenceClassification``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._head = _score_head_name(model)  # a name, not a second reference: one owner per parameter

    def read_positions(self, inputs) -> torch.Tensor:
        """Index of the token each sequence's reward is read at: (S,) into the packed (N,) tokens,
        or (S,) columns of the padded (S, T) batch."""
        pad = getattr(self.model.config, "pad_token_id", None)
        ids = inputs["input_ids"]
        if "cu_seqlens" in inputs:
            ids, cu = ids[0], inputs["cu_seqlens"].long()
            n_seq = cu.numel() - 1
            if pad is None:
                return cu[1:] - 1
            seg = torch.repeat_interleave(torch.arange(n_seq, device=ids.device), cu[1:] - cu[:-1])
            pos = torch.where(ids != pad, torch.arange(ids.numel(), device=ids.device), -1)
            last = torch.full((n_seq,), -1, dtype=torch.long, device=ids.device).scatter_reduce(0, seg, pos, "amax")
            return torch.where(last >= 0, last, cu[:-1])  # all padding: the first token, as transformers
        att = inputs["attention_mask"].bool()
        valid = att if pad is None else att & (ids != pad)
        return (torch.arange(ids.shape[1], device=ids.device) * valid).argmax(1)

    def forward(self, inputs, loss_kwargs=None):
        kw = dict(input_ids=inputs["input_ids"], use_cache=False)
        where = self.read_positions(inputs)
        if "position_ids" in inputs:
            kw["position_ids"] = inputs["position_ids"]
            h = self.model.base_model(**kw).last_hidden_state[0][where]
        else:
            kw["attention_mask"] = inputs["attention_mask"]
            h = self.model.base_model(**kw).last_hidden_state
            h = h[torch.arange(h.shape[0], device=h.device), where]
        rewards = getattr(self.model, self._head)(h).squeeze(-1).float()
        if loss_kwargs is None:
            return rewards
        from .rl import bradley_terry_loss

        loss, metrics = bradley_terry_loss(rewards, **loss_kwargs)
        return {"loss": loss, "metrics": metrics}


def disable_dropout(model) -> None:
    """Dropout off everywhere in ``model`` (nn.Dropout modules and float ``*dropout*`` attributes
    that attention implementations read), as TRL's RL trainers do: the log-probs of a training
    forward then equal those of the scoring forward (importance ratio 1 on a fresh batch)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        for name, v in list(vars(mod).items()):
            if "dropout" in name and isinstance(v, float):
                setattr(mod, name, 0.0)


def _score_head_name(model) -> str:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) and head.out_features == 1:
            return name
    raise ConfigError(f"reward model {type(model).__name__}: no scalar head (a Linear named score/classifier "
                      "with one output); use a model type with a sequence-classification class")


HUB_TIMEOUT_S = 5.0  # how long a hub id waits for the hub before the local cache alone is used


@functools.cache
def _hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub opens within HUB_TIMEOUT_S (name lookup included)."""
    u = urlparse(endpoint)
    ok = []

    def probe():
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                     timeout=HUB_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # a name lookup ignores socket timeouts
    t.start()
    t.join(HUB_TIMEOUT_S)
    return bool(ok)


def from_pretrained(option: str, load, src: str, **kw):
    """``load(src, **kw)`` (a transformers ``from_pretrained``), or a one-line ConfigError naming
    ``option`` and the reason. A hub id (not a local directory) is read from the local cache alone
    when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set or, without a proxy configured, the hub
    cannot be reached within HUB_TIMEOUT_S, instead of transformers' retries (about 25 s)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    env = {k.lower(): v for k, v in os.environ.items()}
    offline_env = any(env.get(k, "0").lower() in ("1", "true", "yes", "on") for k in ("hf_hub_offline", "transformers_offline"))
    proxied = any(env.get(k) for k in ("https_proxy", "http_proxy", "all_proxy"))  # the probe cannot see past one
    offline = not os.path.isdir(src) and (offline_env or (not proxied and not _hub_reachable(endpoint)))
    if offline:
        kw["local_files_only"] = True
    try:
        return load(src, **kw)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - name the option, the source, and what went wrong in one line
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0] if lines else ''}"
        if offline and isinstance(e, OSError):  # a cache miss (transformers raises OSError for it)
            why = (f"not a local directory, and not in the Hugging Face cache ("
                   f"{'offline mode is set' if offline_env else endpoint + ' cannot be reached'}; {why})")
        raise ConfigError(f"{option}: cannot load {src!r}: {why}") from e


def load_tokenizer(cfg: LLMTrainConfig):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.model
    tok = from_pretrained("tokenizer" if cfg.tokenizer else "model (its tokenizer)", AutoTokenizer.from_pretrained, src)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"tokenizer {src!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def deepspeed_config(cfg: LLMTrainConfig) -> dict:
    """The generated DeepSpeed config, with ``cfg.deepspeed_config`` merged over it."""
    ds = {
        "train_micro_batch_size_per_gpu": 1,   # one micro-batch = one call (its size is set by the method layout)
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bool(cfg.bf16)},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    user = load_mapping("deepspeed_config", cfg.deepspeed_config)

    def merge(a, b):
        for k, v in (b or {}).items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    ds = merge(ds, user)
    ds.pop("train_batch_size", None)  # derived from the micro-batch count, never from a user number
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    cfg.zero_stage = int(ds["zero_optimization"].get("stage", 0))
    return ds


def build_reward_model(cfg: LLMTrainConfig, source: str | None, pad_token_id: int, trained: bool = False):
    """The reward model: ``AutoModelForSequenceClassification`` with one label, loaded from
    ``source`` (a reward model, or a causal LM whose backbone gets a new head initialised with
    seed cfg.seed), or, with ``source=None``, built like the policy (cfg.model / cfg.model_config).
    trained=True: ``source`` must be a reward model (a saved sequence-classification model with
    one label), never a backbone with a new random head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if trained:
        conf = from_pretrained("reward_model", AutoConfig.from_pretrained, source)
        arch = list(getattr(conf, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in arch) or getattr(conf, "num_labels", None) != 1:
            raise ConfigError(f"reward_model {source!r} is not a reward model (architectures {arch}, num_labels "
                              f"{getattr(conf, 'num_labels', None)}): its head would be random. Train one with "
                              "method 'rm', or give a sequence-classification model with one label")
    torch.manual_seed(cfg.seed)
    if source is None and cfg.model_config is not None:
        mc = copy.deepcopy(load_mapping("model_config", cfg.model_config))
        try:
            conf = AutoConfig.for_model(mc.pop("model_type"), **mc, num_labels=1, pad_token_id=pad_token_id)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model_config: {e}") from e
        model = AutoModelForSequenceClassification.from_config(conf, attn_implementation=cfg.attn_implementation,
                                                               dtype=dtype)
    else:
        option = "reward_model" if source is not None and source != cfg.model else "model (as a reward model)"
        model = from_pretrained(option, AutoModelForSequenceClassification.from_pretrained, source or cfg.model,
                                num_labels=1, attn_implementation=cfg.attn_implementation, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def build_model(cfg: LLMTrainConfig, zero3: bool, option: str = "model"):
    """The causal LM (fp32, or bf16 with cfg.bf16), randomly initialised from cfg.model_config
    with seed cfg.seed, or loaded from cfg.model (errors name ``option``). Under ZeRO-3 the caller holds an
    ``HfDeepSpeedConfig`` so that transformers partitions the weights while loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if cfg.model_config is not None:
        mc = copy.deepcopy(load_mapping("model_config", cfg.model_config))
        if "model_type" not in mc:
            raise ConfigError("model_config needs a 'model_type' (e.g. 'llama')")
        try:
            conf = AutoConfig.for_model(mc.pop("model_type"), **mc)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model_config: {e}") from e
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=cfg.attn_implementation, dtype=dtype)
    else:
        model = from_pretrained(option, AutoModelForCausalLM.from_pretrained, cfg.model,
                                attn_implementation=cfg.attn_implementation, dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model
