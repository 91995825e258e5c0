"""Checkpoint integrity: a manifest of every file's size and SHA-256, written after the files;
``latest`` written after the manifest (each by a temporary file and a rename).

A checkpoint directory is intact when its manifest exists and every file it lists has that size
and checksum. ``--resume`` takes the newest intact checkpoint and says which damaged ones it
passed over and why (the file, what is wrong with it). A single-file checkpoint (the control
trainer's) has its manifest beside it: ``checkpoint.pt`` + ``checkpoint.pt.manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(path: str) -> list:
    out = []
    for root, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), path)
            if rel != MANIFEST and not n.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _mismatch(path: str, want: dict) -> str | None:
    """What is wrong with the file ``path`` against its manifest entry, or None."""
    if not os.path.isfile(path):
        return f"{path}: missing"
    size = os.path.getsize(path)
    if size != want["size"]:
        return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or rewritten)"
    if _sha256(path) != want["sha256"]:
        return f"{path}: checksum differs from the manifest (corrupted)"
    return None


def write_manifest(path: str) -> None:
    """Record size and SHA-256 of every file under the checkpoint directory ``path``."""
    files = {rel: _entry(os.path.join(path, rel)) for rel in _files(path)}
    _write_atomic(os.path.join(path, MANIFEST), json.dumps({"files": files}, indent=1))


def damage(path: str) -> str | None:
    """None when the checkpoint directory ``path`` is intact; else what is wrong, naming the file."""
    if not os.path.isdir(path):
        return f"{path}: no such directory"
    man = os.path.join(path, MANIFEST)
    try:
        with open(man, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{man}: missing or unreadable (the checkpoint was not completed)"
    for rel, want in files.items():
        why = _mismatch(os.path.join(path, rel), want)
        if why:
            return why
    return None


def file_manifest(path: str) -> str:
    """The manifest path of the single-file checkpoint ``path``."""
    return path + ".manifest.json"


def write_file_manifest(path: str) -> None:
    """Record size and SHA-256 of the single-file checkpoint ``path`` beside it."""
    _write_atomic(file_manifest(path), json.dumps(_entry(path)))


def file_damage(path: str, other_manifests: tuple = ()) -> str | None:
    """None when the single-file checkpoint ``path`` matches its manifest (or, a rotation cut short
    between its renames, one of ``other_manifests``); else what is wrong with it."""
    why = None
    for i, man in enumerate((file_manifest(path), *other_manifests)):
        try:
            with open(man, encoding="utf-8") as f:
                want = json.load(f)
            want["size"], want["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            if i == 0:
                why = f"{man}: missing or unreadable (the checkpoint was not completed)"
            continue
        bad = _mismatch(path, want)
        if bad is None:
            return None
        if i == 0:
            why = bad
    return why


def write_latest(ckpt_dir: str, tag: str) -> None:
    _write_atomic(os.path.join(ckpt_dir, "latest"), tag)


def step_tags(ckpt_dir: str) -> list:
    """Checkpoint tags ``stepN`` in ``ckpt_dir``, newest (largest N) first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [d for d in os.listdir(ckpt_dir) if re.fullmatch(r"step\d+", d) and os.path.isdir(os.path.join(ckpt_dir, d))]
    return sorted(tags, key=lambda t: -int(t[4:]))
