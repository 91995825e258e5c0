"""The policy's own samples (``model.generate``) and sequence scoring, sharded over processes.

Work is cut into fixed chunks; chunk c runs on process ``c % world_size`` with its own seed
(``seed``, ``c``), and the results are gathered on every process, so the outcome does not depend
on the number of processes. Every process makes the same number of calls (a process without a
chunk repeats one and drops it), as ZeRO-3 needs all of them in every forward.
"""
from __future__ import annotations

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


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, top_p: float,
             batch_size: int, seed: int, max_length: int, synced: bool, device) -> list:
    """Sample one completion per prompt (prompts: list of token-id lists). Returns completion
    token-id lists, each cut after its first EOS (kept) and to fit max_length with its prompt."""
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = model.training
    model.eval()

    def run(c):
        chunk = chunks[c]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding for decoder-only generation
            ids[i, T - len(p):] = torch.tensor(p)
            att[i, T - len(p):] = 1
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(hash((seed, c)) & 0x7FFFFFFF)
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, synced_gpus=synced, use_cache=True)
        res = []
        for i, p in enumerate(chunk):
            comp = out[i, T:].tolist()
            if eos is not None and eos in comp:
                comp = comp[: comp.index(eos) + 1]
            elif pad != eos:
                while comp and comp[-1] == pad:
                    comp.pop()
            comp = comp[: max(max_length - len(p), 1)] or [eos if eos is not None else pad]
            res.append(comp)
        return res

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
