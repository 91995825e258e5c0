"""Demonstration and preference records in TRL's formats, from JSONL files or HF datasets.

Demonstrations (one per row):
    {"prompt": str, "completion": str}                         standard prompt-completion
    {"prompt": [messages], "completion": [messages]}           conversational prompt-completion
    {"messages": [messages]}                                   conversational; the final
                                                               assistant turn is the completion
Preferences (one per row):
    {"prompt": str | [messages], "chosen": same, "rejected": same}
    {"chosen": [messages], "rejected": [messages]}             implicit prompt: the shared prefix

A source is a path to a ``.jsonl`` file, a directory written by ``datasets.save_to_disk``, or
``hf:NAME[:SPLIT]`` for ``datasets.load_dataset`` (default split "train"). Every row is checked
on load; a bad row raises ``DataError`` naming the file (or dataset) and the line (or row).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


class DataError(ValueError):
    """A data source that cannot be used, with the file and line (or dataset and row)."""


@dataclass
class Record:
    """One row after format checks. prompt / completion / chosen / rejected are either strings
    (standard format) or lists of {"role", "content"} messages (conversational format).
    where: "file.jsonl:LINE" or "dataset NAME row I", for error messages."""
    where: str
    prompt: str | list
    completion: str | list | None = None
    chosen: str | list | None = None
    rejected: str | list | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading hf:NAME or a saved dataset directory needs `pip install datasets`") from None
    return datasets


def _rows(source: str):
    """Yield (where, row) from a JSONL file, a saved dataset directory or hf:NAME[:SPLIT]."""
    if source.startswith("hf:"):
        datasets = _datasets()

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # noqa: BLE001 - report what datasets said, with the source
            raise DataError(f"cannot load dataset {source!r}: {e}") from e
        for i, row in enumerate(ds):
            yield f"dataset {name} row {i}", row
        return
    if os.path.isdir(source):
        datasets = _datasets()

        try:
            ds = datasets.load_from_disk(source)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot load dataset directory {source!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"dataset {source} row {i}", row
        return
    if not os.path.isfile(source):
        raise DataError(f"data file not found: {source!r}")
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _check_messages(where, key, msgs):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{j}] must be {{'role': str, 'content': str}}, got {m!r}")


def _check_field(where, row, key, conversational=None):
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing key {key!r} (has {sorted(row)})")
    v = row[key]
    if isinstance(v, str):
        if conversational:
            raise DataError(f"{where}: {key!r} is a string but the prompt is a list of messages")
        return v
    if isinstance(v, list):
        if conversational is False:
            raise DataError(f"{where}: {key!r} is a list of messages but the prompt is a string")
        _check_messages(where, key, v)
        return v
    raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {type(v).__name__}")


def _split_messages(where, key, msgs):
    _check_messages(where, key, msgs)
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise DataError(f"{where}: {key!r} must end with an assistant message after at least one other")
    return msgs[:-1], msgs[-1:]


def load_demonstrations(source: str) -> list[Record]:
    """Demonstration records (prompt, completion) from a source; raises DataError."""
    out = []
    for where, row in _rows(source):
        if "messages" in row and "prompt" not in row:
            prompt, completion = _split_messages(where, "messages", row["messages"])
        else:
            prompt = _check_field(where, row, "prompt")
            completion = _check_field(where, row, "completion", isinstance(prompt, list))
        out.append(Record(where, prompt, completion=completion))
    if not out:
        raise DataError(f"no demonstrations in {source!r}")
    return out


def load_preferences(source: str) -> list[Record]:
    """Preference records (prompt, chosen, rejected) from a source; raises DataError."""
    out = []
    for where, row in _rows(source):
        if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            ch, rj = row["chosen"], row["rejected"]
            _check_messages(where, "chosen", ch)
            _check_messages(where, "rejected", rj)
            k = 0
            while k < min(len(ch), len(rj)) - 1 and ch[k] == rj[k]:
                k += 1
            if k == 0:
                raise DataError(f"{where}: no 'prompt' and 'chosen'/'rejected' share no prefix to use as one")
            prompt, chosen, rejected = ch[:k], ch[k:], rj[k:]
        else:
            prompt = _check_field(where, row, "prompt")
            conv = isinstance(prompt, list)
            chosen = _check_field(where, row, "chosen", conv)
            rejected = _check_field(where, row, "rejected", conv)
        out.append(Record(where, prompt, chosen=chosen, rejected=rejected))
    if not out:
        raise DataError(f"no preference pairs in {source!r}")
    return out


def load_prompts(source: str) -> list[Record]:
    """Prompt-only records ({"prompt": ...}, e.g. evaluation prompts); raises DataError."""
    out = [Record(where, _check_field(where, row, "prompt")) for where, row in _rows(source)]
    if not out:
        raise DataError(f"no prompts in {source!r}")
    return out
