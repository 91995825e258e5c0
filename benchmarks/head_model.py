"""Train the small language model behind ``--data model`` (``aihf_fast.ops.testing``): real hidden
states and a real LM head for the loss benchmarks and the approximate-gradient checks, with no
download. A byte-level BPE tokenizer (ids from frequent to rare merges, as real tokenizers number
them) and a Llama-style causal LM, both trained here on Python's standard-library sources (text
every machine has; 1 file in 20 held out for evaluation and for the benchmark's inputs).

    python benchmarks/head_model.py --out ~/.cache/aihf_fast/head_model            # V = 8192, H = 256
    python benchmarks/bench_loss.py --data model --model-dir ~/.cache/aihf_fast/head_model --vocab 8192 --hidden 256 \
        --seq-len 256    # at most the length it was trained on

Saves in ``--out``: tokenizer.json, policy/ (the final model), reference/ (the checkpoint at half
the steps, the reference model of the DPO-style losses), heldout_ids.pt (the held-out text's first
200k tokens: the inputs of ``data="model"``), meta.json (sizes, steps, train and
held-out loss, seconds, versions, commit). Progress: a line every ``--log-every`` steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, versions  # noqa: E402

from aihf_fast.ops.testing import stdlib_sources  # noqa: E402


def train_tokenizer(files, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"--vocab {vocab_size}: the text gives only {tok.get_vocab_size()} tokens; use a smaller --vocab")
    return tok


def encode(tok, files, max_tokens: int) -> torch.Tensor:
    ids = []
    for f in files:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-train-tokens", type=int, default=20_000_000)
    ap.add_argument("--max-files", type=int, default=None, help="train on the first N files only (smoke tests)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name in ("vocab", "hidden", "layers", "heads", "seq", "batch", "steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.vocab < 257:
        raise SystemExit(f"--vocab must be >= 257 (the 256 byte tokens and <pad>), got {a.vocab}")
    if a.hidden % a.heads:
        raise SystemExit(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # written last: a run that stops leaves no usable model
    train_files = stdlib_sources("train")[: a.max_files]
    held_files = stdlib_sources("heldout")[: a.max_files]
    tok = train_tokenizer(train_files, a.vocab)
    tok.save(str(out / "tokenizer.json"))
    data = encode(tok, train_files, a.max_train_tokens)
    held = encode(tok, held_files, 200_000)
    torch.save(held, out / "heldout_ids.pt")  # the inputs of data="model", as read on this machine
    if len(data) <= a.seq + 1 or len(held) <= a.seq + 1:
        raise SystemExit(f"too little text for --seq {a.seq}: {len(data)} train / {len(held)} held-out tokens")
    print(f"[head_model] tokenizer V = {a.vocab}; {len(data)} train / {len(held)} held-out tokens "
          f"({time.time() - t0:.0f}s)", flush=True)
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, intermediate_size=a.hidden * 8 // 3, max_position_embeddings=a.seq,
                      tie_word_embeddings=False, use_cache=False, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    g = torch.Generator().manual_seed(a.seed)

    def batch(ids, n):
        starts = torch.randint(0, len(ids) - a.seq - 1, (n,), generator=g)
        return torch.stack([ids[s:s + a.seq + 1] for s in starts.tolist()])

    def loss_on(x):
        return model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), use_cache=False).loss  # HF shifts the labels

    train_loss = float("nan")
    for step in range(1, a.steps + 1):
        loss = loss_on(batch(data, a.batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_loss = float(loss.detach())
        if step % a.log_every == 0 or step == a.steps:
            print(f"[head_model] step {step}/{a.steps} loss {train_loss:.3f} ({time.time() - t0:.0f}s)", flush=True)
        if step == a.steps // 2 or (a.steps == 1 and step == 1):
            model.save_pretrained(out / "reference")
    model.save_pretrained(out / "policy")
    with torch.no_grad():
        model.eval()
        held_loss = float(torch.stack([loss_on(batch(held, a.batch)) for _ in range(8)]).mean())
    meta = dict(vocab_size=a.vocab, hidden_size=a.hidden, layers=a.layers, heads=a.heads, seq=a.seq, batch=a.batch,
                steps=a.steps, lr=a.lr, train_tokens=len(data), train_files=len(train_files),
                train_loss_last_batch=train_loss, heldout_loss=held_loss, seconds=time.time() - t0,
                versions=versions("tokenizers"), commit=commit(),
                command="python benchmarks/head_model.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"[head_model] held-out loss {held_loss:.3f} nats/token; wrote {out}", flush=True)
    return meta


if __name__ == "__main__":
    main()
