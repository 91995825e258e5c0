"""Inputs for the LM-head ops as tests and benchmarks use them: hidden states, an LM head, a
reference model's hidden states and head, and labels, with logits either flat (``randn``) or
peaked like a trained language model's (``peaked``).

Why it matters: an op's speed can depend on the data. A method that skips vocabulary tiles of
negligible probability (Cut Cross-Entropy's gradient filtering) does far less work on flat logits
(largest probability ~1e-4 at V = 128k) than on a trained model's, where one token often holds
most of the mass and a few hundred share the rest.

``peaked``: every head row is a random direction plus a Zipf log-frequency prior along one shared
direction u (frequent tokens score higher everywhere); every hidden state is u plus 4 planted
tokens' head rows scaled to give them logits up to 10 nats above their prior, plus noise; the label
is drawn from those logits' distribution (calibrated: the top token is the label about as often as
its probability says).
The reference model is the policy slightly perturbed, as for DPO-style training.
``model``: hidden states of a real language model trained here (``benchmarks/head_model.py``: a
small Llama-style model and a byte-level BPE tokenizer, whose ids run roughly from frequent to
rare as in real tokenizers, trained on Python's standard-library sources, text every machine
has) on held-out text, with its own LM head; the reference is the same model's checkpoint from
half-way through its training. Its hidden and vocabulary sizes are the model's.
``logit_stats`` measures what the data looks like (``lm_head_inputs(...).stats()``)."""
from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_KINDS = ("randn", "peaked", "model")
HEAD_MODEL_ENV = "AIHF_FAST_HEAD_MODEL"  # the directory of ``benchmarks/head_model.py``'s model


@dataclass
class HeadInputs:
    """hidden / ref_hidden (S, T, H) and weight / ref_weight (V, H) in the requested dtype and
    device (no grad); labels (S, T) int64 with ``-100`` on prompt positions."""
    hidden: torch.Tensor
    weight: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    labels: torch.Tensor

    def stats(self, max_tokens: int = 4096) -> dict:
        return logit_stats(self.hidden, self.weight, self.labels, max_tokens=max_tokens)


def lm_head_inputs(num_seqs: int, seq_len: int, hidden_size: int, vocab_size: int, *, data: str = "peaked",
                   prompt_frac: float = 0.0, dtype: torch.dtype = torch.float32, device="cpu",
                   seed: int = 0, model_dir: str | None = None) -> HeadInputs:
    """Deterministic (``seed``) inputs of an LM-head loss; drawn in float32 on the CPU, then cast
    and moved. ``data``: ``"randn"`` (hidden ~ N(0, 1/4), head ~ N(0, 1/H): logits ~ N(0, 0.5^2),
    flat), ``"peaked"`` or ``"model"`` (module docstring; ``model_dir``, default env
    ``AIHF_FAST_HEAD_MODEL``: hidden_size and vocab_size must be the model's). ``prompt_frac``: the
    leading fraction of every sequence labelled -100."""
    for name, v in (("num_seqs", num_seqs), ("seq_len", seq_len), ("hidden_size", hidden_size),
                    ("vocab_size", vocab_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    if not 0.0 <= prompt_frac < 1.0:
        raise ValueError(f"prompt_frac must be in [0, 1), got {prompt_frac}")
    S, T, H, V = num_seqs, seq_len, hidden_size, vocab_size
    if data == "model":
        return _model_inputs(model_dir, S, T, H, V, prompt_frac, dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (S, T), generator=g)
    if data == "randn":
        x = torch.randn(S, T, H, generator=g) / 2
        w = torch.randn(V, H, generator=g) / H**0.5
        rx = torch.randn(S, T, H, generator=g) / 2
        rw = torch.randn(V, H, generator=g) / H**0.5
    else:
        # a Zipf prior over a random token order, log-frequency -1.2 log(rank), shifted so that the
        # background's log-sum-exp is 0: a planted token at logit L > 0 outweighs the background
        rank = torch.randperm(V, generator=g).float() + 1
        prior = -1.2 * torch.log(rank)
        prior -= torch.logsumexp(prior, 0)
        u = torch.randn(H, generator=g)
        u /= u.norm()
        w = torch.randn(V, H, generator=g) / H**0.5
        w -= (w @ u)[:, None] * u  # head rows orthogonal to u, so u carries the prior alone
        w += prior[:, None] * u
        n = S * T
        x = u.expand(n, H).clone()
        # 4 tokens drawn by frequency, planted at decreasing logits (the first 0-10 nats above
        # its prior); the label is drawn from the resulting distribution (one of them, or the
        # background), so the data is calibrated as a trained model's is
        top = 10.0 * torch.rand(n, generator=g)
        toks, logits = [], []
        for k in range(4):
            tok = _zipf_tokens(n, prior, g)
            rows = w[tok] - prior[tok][:, None] * u  # the token's own direction (prior removed)
            x += (top * 0.6 ** k / rows.pow(2).sum(-1).clamp_min(1e-12))[:, None] * rows
            toks.append(tok)
            logits.append(prior[tok] + top * 0.6 ** k)
        which = torch.multinomial(torch.softmax(torch.stack([*logits, torch.zeros(n)], -1), -1), 1,
                                  generator=g).squeeze(-1)
        labels = torch.where(which < 4, torch.stack(toks, -1).gather(-1, which.clamp(max=3)[:, None]).squeeze(-1),
                             _zipf_tokens(n, prior, g)).view(S, T)
        x += 0.5 * torch.randn(n, H, generator=g) / H**0.5
        x = x.view(S, T, H)
        rx = x + 0.02 * torch.randn(S, T, H, generator=g)
        rw = w + 0.01 * torch.randn(V, H, generator=g) / H**0.5
    labels[:, : int(T * prompt_frac)] = -100
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return HeadInputs(cast(x), cast(w), cast(rx), cast(rw), labels.to(device))


def stdlib_sources(split: str) -> list[Path]:
    """Python's standard-library ``.py`` files (no site-packages), sorted: the text the head model
    learns from. split: ``"train"`` or ``"heldout"`` (1 file in 20, by a hash of its path)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if not files:
        raise ValueError(f"no standard-library .py files under {root} (a zipped standard library?): the head model "
                         "needs them as text")
    held = [zlib.crc32(p.relative_to(root).as_posix().encode()) % 20 == 0 for p in files]
    return [p for p, h in zip(files, held) if h == (split == "heldout")]


@torch.no_grad()
def _model_inputs(model_dir, S, T, H, V, prompt_frac, dtype, device, seed) -> HeadInputs:
    """``data="model"``: S windows of T + 1 tokens of held-out text at seeded positions; hidden
    states of the trained model (the last layer, after its final norm) and its head; the
    half-way checkpoint as the reference."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    model_dir = model_dir or os.environ.get(HEAD_MODEL_ENV)
    if not model_dir or not Path(model_dir, "meta.json").is_file():
        raise ValueError(f"data='model' needs a trained head model: run `python benchmarks/head_model.py --out DIR` "
                         f"and pass model_dir=DIR (or set {HEAD_MODEL_ENV}); got {model_dir!r}")
    meta = json.loads(Path(model_dir, "meta.json").read_text())
    if (H, V) != (meta["hidden_size"], meta["vocab_size"]):
        raise ValueError(f"hidden_size, vocab_size = {H}, {V} but the model in {model_dir} has "
                         f"{meta['hidden_size']}, {meta['vocab_size']}")
    if T > meta["seq"]:
        raise ValueError(f"seq_len {T} is longer than the {meta['seq']} tokens the model in {model_dir} was trained "
                         "on: its hidden states there would be extrapolated")
    held = Path(model_dir, "heldout_ids.pt")  # the held-out text's tokens, as the model's own machine read it
    if held.is_file():
        ids = torch.load(held)
    else:
        tok = Tokenizer.from_file(str(Path(model_dir, "tokenizer.json")))
        ids = torch.tensor([i for p in stdlib_sources("heldout")
                            for i in tok.encode(p.read_text(encoding="utf-8", errors="replace")).ids])
    slots = len(ids) // (T + 1)  # non-overlapping windows, S of them drawn
    if slots < S:
        raise ValueError(f"the held-out text has {len(ids)} tokens: fewer than num_seqs x (seq_len + 1)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(slots, generator=g)[:S] * (T + 1)
    windows = torch.stack([ids[s:s + T + 1] for s in starts.tolist()])
    out = []
    for name in ("policy", "reference"):
        model = LlamaForCausalLM.from_pretrained(Path(model_dir, name), dtype=torch.float32).eval()
        hidden = torch.cat([model.model(input_ids=windows[i:i + 16, :T]).last_hidden_state
                            for i in range(0, S, 16)])
        out += [hidden, model.lm_head.weight.detach().clone()]
    labels = windows[:, 1:].clone()
    labels[:, : int(T * prompt_frac)] = -100
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return HeadInputs(cast(out[0]), cast(out[1]), cast(out[2]), cast(out[3]), labels.to(device))


def _zipf_tokens(n: int, prior: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(prior, 0), n, replacement=True, generator=g)


@torch.no_grad()
def logit_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, max_tokens: int = 4096,
                chunk: int = 256) -> dict:
    """What the logits look like, over the first ``max_tokens`` labelled tokens (fp32, in chunks):
    mean largest probability, mean label log-probability, mean entropy (nats), the fraction of
    tokens whose label is the top token, and the mean number of tokens holding 90% of the mass."""
    y = labels.reshape(-1)
    keep = (y != -100).nonzero().squeeze(-1)[:max_tokens]  # no copy of the other hidden states
    h, y = hidden.reshape(-1, hidden.shape[-1])[keep], y[keep]
    if len(y) == 0:
        raise ValueError("labels: no labelled token (every label is -100)")
    w = weight.float()
    acc = dict(top1_prob=0.0, label_logprob=0.0, entropy=0.0, top1_is_label=0.0, tokens_for_90pct=0.0)
    for i in range(0, len(y), chunk):
        lp = torch.log_softmax(h[i:i + chunk].float() @ w.t(), -1)
        p = lp.exp()
        yy = y[i:i + chunk]
        acc["top1_prob"] += float(p.max(-1).values.sum())
        acc["label_logprob"] += float(lp.gather(-1, yy[:, None]).sum())
        acc["entropy"] += float(-(p * lp).sum())
        acc["top1_is_label"] += float((lp.argmax(-1) == yy).sum())
        srt = p.sort(-1, descending=True).values.cumsum(-1)
        acc["tokens_for_90pct"] += float(((srt < 0.9).sum(-1) + 1).sum())
    return {k: v / len(y) for k, v in acc.items()} | {"tokens": len(y)}
