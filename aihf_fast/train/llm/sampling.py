"""The policy's own samples (``model.generate``) and sequence scoring, sharded over processes.

Work is cut into fixed chunks; chunk c runs on process ``c % world_size`` with its own seed
(``seed``, ``c``), and the results are gathered on every process, so the outcome does not depend
on the number of processes. Every process makes the same number of calls (a process without a
chunk repeats one and drops it), as ZeRO-3 needs all of them in every forward.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from .batches import build_inputs


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(local: dict) -> dict:
    rank, world = _world()
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    out = {}
    for p in parts:
        out.update(p)
    return out


def _sharded(n_chunks: int, fn) -> dict:
    """Run fn(c) for this process's chunks (padding with a dummy call) -> {c: result} of all."""
    rank, world = _world()
    calls = math.ceil(n_chunks / world) if n_chunks else 0
    local = {}
    for k in range(calls):
        c = rank + k * world
        res = fn(c if c < n_chunks else 0)
        if c < n_chunks:
            local[c] = res
    return _gather(local)


def stop_token_ids(model, tokenizer) -> list:
    """End-of-answer ids: the tokenizer's EOS and the model's generation_config EOS id(s)."""
    ids = []
    for e in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for t in (e if isinstance(e, (list, tuple)) else [e]):
            if t is not None and t not in ids:
                ids.append(int(t))
    return ids


@contextlib.contextmanager
def _bare_generation_config(model):
    """transformers fills every unset field of a passed GenerationConfig from the model's own
    (a checkpoint's repetition_penalty, no_repeat_ngram_size, suppress_tokens, ...): swap in a
    default one meanwhile, so that samples come from the policy's own distribution. A PEFT
    wrapper's base model is swapped too (its generate reads, and overwrites, the base's)."""
    from transformers import GenerationConfig

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper forwards attribute writes to it
    targets = [model]
    if hasattr(model, "get_base_model") and model.get_base_model() is not model:
        targets.append(getattr(model.get_base_model(), "_orig_mod", model.get_base_model()))
    saved = []
    for obj in targets:
        own = vars(obj).get("generation_config", _MISSING)  # a wrapper may only forward the attribute
        saved.append((obj, own))
        obj.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for obj, own in reversed(saved):
            if own is _MISSING:
                vars(obj).pop("generation_config", None)
            else:
                obj.generation_config = own


_MISSING = object()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, top_p: float,
                       seed: int, device, synced: bool | None = None, max_length: int | None = None) -> list:
    """One completion per prompt (non-empty token-id lists) from ``model`` in eval mode, seeded by
    ``seed``: softmax(logits / temperature) with nucleus ``top_p`` only (no top-k, no processors of
    the model's generation_config). Each completion is cut after its first stop token (kept: it is
    part of the answer; ``stop_token_ids``) and to fit ``max_length`` with its prompt. ``synced``:
    transformers' ``synced_gpus`` (None: its own choice, on under ZeRO-3 / FSDP)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer)
    gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                               max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops or None,
                               use_cache=True)
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding for decoder-only generation
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), \
                _bare_generation_config(model):
            torch.manual_seed(seed)
            kw = {} if synced is None else {"synced_gpus": synced}
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gen_cfg,
                                 **kw)
    finally:
        model.train(was_training)
    res = []
    for i, p in enumerate(prompts):
        comp = out[i, T:].tolist()
        cut = next((k for k, t in enumerate(comp) if t in stops), None)
        if cut is not None:
            comp = comp[: cut + 1]
        elif pad not in stops:
            while comp and comp[-1] == pad:
                comp.pop()
        if max_length is not None:
            comp = comp[: max(max_length - len(p), 1)]
        res.append(comp or [stops[0] if stops else pad])
    return res


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, top_p: float,
             batch_size: int, seed: int, max_length: int, synced: bool, device) -> list:
    """Sample one completion per prompt (prompts: list of token-id lists), in chunks of
    ``batch_size`` sharded over the processes (``sample_completions`` each). Returns completion
    token-id lists, each cut after its first EOS (kept) and to fit max_length with its prompt."""
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    was_training = model.training
    model.eval()

    def run(c):
        return sample_completions(model, tokenizer, chunks[c], max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=hash((seed, c)) & 0x7FFFFFFF, device=device, synced=synced,
                                  max_length=max_length)

    try:
        got = _sharded(len(chunks), run)
    finally:
        model.train(was_training)
    return [s for c in range(len(chunks)) for s in got[c]]


@torch.no_grad()
def score(module, seqs: list, *, batch_size: int, packed: bool, pad_id: int, device) -> torch.Tensor:
    """Summed completion log-probs (S,) fp32 on CPU of seqs (list of (prompt, completion) ids)
    under ``module`` (a ``PolicyWithLoss``)."""
    chunks = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    was_training = module.training
    module.eval()
    try:
        got = _sharded(len(chunks), lambda c: module(build_inputs(chunks[c], pad_id, packed, device)).float().cpu())
    finally:
        module.train(was_training)
    if not chunks:
        return torch.zeros(0)
    return torch.cat([got[c] for c in range(len(chunks))])


@torch.no_grad()
def score_tokens(module, seqs: list, *, batch_size: int, packed: bool, pad_id: int, device,
                 temperature: float = 1.0) -> list:
    """Per-token completion log-probs of seqs (list of (prompt, completion) ids) under ``module``
    (a ``PolicyWithLoss``) at ``temperature``: a list of fp32 CPU tensors, one (len(completion),)
    per sequence."""
    chunks = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]

    def run(c):
        inputs = build_inputs(chunks[c], pad_id, packed, device)
        tok = module(inputs, per_token=True, temperature=temperature)
        vals = tok[inputs["labels"] != -100].float().cpu()
        return list(torch.split(vals, [len(comp) for _, comp in chunks[c]]))

    was_training = module.training
    module.eval()
    try:
        got = _sharded(len(chunks), run)
    finally:
        module.train(was_training)
    return [t for c in range(len(chunks)) for t in got[c]]
