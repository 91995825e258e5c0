"""Records -> token ids, with the prompt kept apart so that its tokens can be masked out.

Standard (string) records: ``prompt_ids = tok(prompt)`` (with the tokenizer's special tokens,
e.g. BOS), ``completion_ids = tok(completion, add_special_tokens=False) + [eos]``.
Conversational records: the tokenizer's chat template; ``prompt_ids`` is the templated prompt
with the generation prompt, ``completion_ids`` the rest of the templated conversation.
A prompt that leaves no room for a completion within ``max_length`` is an error (with file and
line); a completion that does not fit is truncated and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .records import DataError, Record


@dataclass
class Encoded:
    """Token ids of one prompt and its completions (1 for a demonstration, 2 for a pair:
    chosen, rejected). All plain lists of int."""
    prompt: list
    completions: list
    where: str = ""


@dataclass
class Tokenized:
    """A tokenised data set and how many completions had to be truncated."""
    items: list = field(default_factory=list)
    truncated: int = 0


def _template(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_prompt(tokenizer, prompt, where: str = "") -> list:
    """Token ids of a prompt (string, or messages rendered with the chat template)."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: conversational record but the tokenizer has no chat template")
        return _template(tokenizer, prompt, True)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_completion(tokenizer, prompt, prompt_ids, completion, where: str = "", append_eos: bool = True) -> list:
    """Token ids of a completion that follows ``prompt`` (ids ``prompt_ids``)."""
    if isinstance(completion, list):
        full = _template(tokenizer, prompt + completion, False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{where}: the chat template renders the prompt differently with and without "
                            "the completion; cannot tell which tokens are the completion")
        return full[len(prompt_ids):]
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_records(tokenizer, records: list[Record], max_length: int, kind: str, append_eos: bool = True) -> Tokenized:
    """kind "demonstrations" (completion) or "preferences" (chosen, rejected) -> Tokenized."""
    keys = ("completion",) if kind == "demonstrations" else ("chosen", "rejected")
    out = Tokenized()
    for r in records:
        p = encode_prompt(tokenizer, r.prompt, r.where)
        if not p:
            raise DataError(f"{r.where}: the prompt is empty after tokenisation (the tokenizer adds no BOS); "
                            "a completion needs at least one token before it")
        if len(p) >= max_length:
            raise DataError(f"{r.where}: the prompt has {len(p)} tokens, max_length={max_length} leaves no "
                            "room for the completion (raise max_length or shorten the prompt)")
        comps = []
        for k in keys:
            c = encode_completion(tokenizer, r.prompt, p, getattr(r, k), r.where, append_eos)
            if not c:
                raise DataError(f"{r.where}: {k!r} is empty after tokenisation")
            room = max_length - len(p)
            if len(c) > room:
                c = c[:room]
                out.truncated += 1
            comps.append(c)
        out.items.append(Encoded(p, comps, r.where))
    return out
