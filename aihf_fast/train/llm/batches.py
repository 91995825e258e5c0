"""Which examples each micro-batch holds, and how a micro-batch becomes model inputs.

Data order is a pure function of (seed, stream, position): an endless sequence of per-epoch
permutations, so a resumed run, or a run on another number of processes, draws the same global
batches. Micro-batch ``j`` of optimiser step ``g`` is global micro-batch ``m = g * M + j``
(``M = world_size * grad_accum``); process ``r`` takes ``j = a * world_size + r`` for its
accumulation steps ``a = 0..grad_accum-1``.

A micro-batch is a list of sequences (prompt ids, completion ids) in ``method_config``'s layout
``[chosen(P), rejected(P), demo(D), own sample(D)]``. Labels are aligned with positions:
position t of a sequence predicts token t+1, and only completion tokens are predicted
(prompt positions and each sequence's last position are ``-100``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

PAIRS, DEMOS, PROMPTS, REPLAY = 1, 2, 3, 4  # stream ids


@lru_cache(maxsize=8)
def _epoch_perm(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def stream_indices(n: int, seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Positions start .. start+count-1 of the endless per-epoch permutations of range(n)."""
    pos = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(pos // n):
        sel = pos // n == e
        out[sel] = _epoch_perm(n, seed, stream, int(e))[pos[sel] % n]
    return out


def micro_batch_indices(step: int, j: int, micro_per_step: int, n: int, per_batch: int, seed: int, stream: int):
    """Example indices of micro-batch j of optimiser step `step` (0-based) from one stream."""
    m = step * micro_per_step + j
    return stream_indices(n, seed, stream, m * per_batch, per_batch)


def replay_push(buffer: list, entries: list, size: int, order_seed: tuple) -> list:
    """A replay buffer (a list, oldest first) after appending ``entries`` in an order shuffled by
    ``order_seed`` (so that a batch larger than the room left keeps a uniform subset of itself):
    the newest ``size`` kept."""
    if size <= 0:
        return []
    order = np.random.default_rng([*order_seed, REPLAY]).permutation(len(entries))
    return (list(buffer) + [entries[k] for k in order])[-size:]


def replay_draw(buffer: list, n: int, seed: int, step: int, j: int) -> list:
    """``n`` entries of ``buffer`` drawn uniformly with replacement for micro-batch j of ``step``:
    a function of (seed, step, j), so resumed runs and any number of processes draw the same."""
    if not buffer or n <= 0:
        return []
    pick = np.random.default_rng([seed, REPLAY, step, j]).integers(0, len(buffer), n)
    return [buffer[k] for k in pick]


def build_inputs(seqs: list, pad_id: int, packed: bool, device) -> dict:
    """seqs: list of (prompt_ids, completion_ids). Returns model inputs and the loss layout:

    packed: input_ids / position_ids (1, N) int64, labels (N,), cu_seqlens (S+1,) int32
    padded: input_ids / attention_mask (S, T), labels (S, T) (right padding)
    plus num_tokens (int, non-padding tokens) and num_sequences S.
    """
    ids = [list(p) + list(c) for p, c in seqs]
    labs = []
    for (p, _), s in zip(seqs, ids):
        lab = s[1:] + [-100]
        lab[: max(len(p) - 1, 0)] = [-100] * max(len(p) - 1, 0)
        labs.append(lab)
    lens = [len(s) for s in ids]
    if packed:
        flat = torch.tensor([t for s in ids for t in s], dtype=torch.long)
        pos = torch.cat([torch.arange(n) for n in lens])
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        return dict(input_ids=flat[None].to(device), position_ids=pos[None].to(device),
                    labels=torch.tensor([t for s in labs for t in s], dtype=torch.long, device=device),
                    cu_seqlens=cu.to(device), num_tokens=sum(lens), num_sequences=len(seqs))
    T = max(lens)
    inp = torch.full((len(ids), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(ids), T), dtype=torch.long)
    lab = torch.full((len(ids), T), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(ids, labs)):
        inp[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(lb)
    return dict(input_ids=inp.to(device), attention_mask=att.to(device), labels=lab.to(device),
                num_tokens=sum(lens), num_sequences=len(seqs))
