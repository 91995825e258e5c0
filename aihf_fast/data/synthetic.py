"""A synthetic LLM alignment task with a known ground-truth reward, in text form.

The task of ``/work/shared/research/llm_synthetic.md`` (section 1), written as JSONL text that a generic
trainer (a ``transformers`` model, this module's in-memory tokenizer, TRL data formats) can use with no
downloads.

Task
----
* 16 content tokens ``0..15``, written as the words ``"t0".."t15"``.
* Prompt x: 6 distinct random tokens. Text: the 6 words joined by single spaces, then ``" ="``,
  e.g. ``"t3 t7 t1 t9 t12 t0 ="``.
* Response y: exactly 8 tokens. Text (a "completion"): ``" "`` + the 8 words joined by single spaces,
  e.g. ``" t0 t12 t9 t1 t7 t3 t12 t0"``. There is no EOS: with a fixed length it carries no information.
* Hidden target T(x) = the reversed prompt (6 tokens), then max(x), then min(x).
* True reward::

      r*(x, y) = sum_t 1[y_t = T_t] + 0.3 * sum_t 1[|y_t - T_t| = 1] - 0.5 * sum_{t>=1} 1[y_t = y_{t-1}]

  The best achievable reward is 8, less 0.5 when x_0 is the largest prompt token (then T_5 = T_6 and the
  exact answer has one repeat; any change to avoid it costs at least 0.7). See :func:`max_reward`.
* Unparseable completions still get a reward: positions are scored over the first 8 whitespace-separated
  words; a missing word (fewer than 8) or an unknown word (anything but ``"t0".."t15"``, e.g. ``"<eos>"``,
  ``"="`` or ``"t16"``) counts as wrong: 0 credit, never a near miss, and never a repeat of (or repeated by)
  anything, not even another unknown word. Words after the 8th are ignored. In token arrays such an entry
  is ``-1``. Decode model samples with ``skip_special_tokens=True``.

Data generators (all probabilities are parameters; these are the defaults)
--------------------------------------------------------------------------
* Mediocre ("base") responses: per position, T_t w.p. 0.3, a repeat of the previous response token
  w.p. 0.15 (at position 0, where there is none, a uniform token instead), else a uniform token.
* Expert responses: follow the rule R w.p. 0.75, a near miss R_t +- 1 w.p. 0.10 (sign by a fair coin, the
  other sign when it would leave 0..15), else a uniform token. Design ``"A"``: R = T on positions 0-5,
  but R_6, R_7 = x_2, x_3 (a systematic misconception only preferences can correct). Design ``"B"``: R = T.
* Preference pairs: two mediocre responses to a fresh prompt, labelled by a Bradley-Terry draw
  P(first preferred) = sigmoid((r*_1 - r*_2) / temperature), then flipped with probability ``label_noise``.

Each generator consumes its ``numpy.random.Generator`` with one call whose output is laid out row by row,
so the rows for the first m prompts are the same whatever n >= m is asked for (used for nested budgets).

Files: :func:`write_task` writes ``base.jsonl``, ``demos.jsonl``, ``prefs.jsonl``, ``eval_prompts.jsonl``,
``task.json`` and ``tokenizer/``. CLI: ``python -m aihf_fast.data.synthetic OUT_DIR [--seed ..] ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .preferences import bradley_terry_labels

CONTENT_TOKENS = 16
PROMPT_LEN = 6
RESPONSE_LEN = 8

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "="]
WORDS = [f"t{i}" for i in range(CONTENT_TOKENS)]
#: word -> id of the tokenizer: "<pad>"=0, "<bos>"=1, "<eos>"=2, "<unk>"=3, "="=4, "t0".."t15"=5..20.
VOCAB = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = (VOCAB[w] for w in SPECIAL_TOKENS)
#: content token k (0..15) is tokenizer id k + CONTENT_OFFSET
CONTENT_OFFSET = VOCAB["t0"]

#: A tiny Llama for this task: ``transformers.LlamaConfig(**DEFAULT_MODEL_CONFIG)``.
DEFAULT_MODEL_CONFIG = dict(
    model_type="llama",
    vocab_size=len(VOCAB),
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

EXACT_CREDIT = 1.0
NEAR_CREDIT = 0.3
REPEAT_PENALTY = 0.5

_WORD_ARRAY = np.array(WORDS)
_WORD_TO_TOKEN = {w: i for i, w in enumerate(WORDS)}


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def make_tokenizer():
    """The task's word-level tokenizer, built in memory (no downloads).

    Returns a ``transformers.PreTrainedTokenizerFast`` with the ids of :data:`VOCAB`; words are split on
    whitespace, ``add_special_tokens=True`` prepends ``<bos>`` (no ``<eos>`` is appended), decoding joins
    words with single spaces, and there is no chat template. Anything outside the vocabulary is ``<unk>``.
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder joins tokens with spaces (and only merges "##"-prefixed pieces, which we have none of)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=DEFAULT_MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Target and reward on token arrays


def _as_2d(a, width, name):
    """``a`` as an int64 array of shape (n, width), and whether it was 1-D."""
    a = np.asarray(a, dtype=np.int64)
    single = a.ndim == 1
    a = np.atleast_2d(a)
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must have shape (n, {width}) or ({width},), got {np.shape(a)}")
    return a, single


def target(prompts):
    """Hidden target T(x): the reversed prompt, then max(x), then min(x).

    ``prompts``: int array (n, 6) of tokens 0..15 (or one prompt, shape (6,)).
    Returns int64 (n, 8) (or (8,)).
    """
    x, single = _as_2d(prompts, PROMPT_LEN, "prompts")
    t = np.concatenate([x[:, ::-1], x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)], axis=1)
    return t[0] if single else t


def true_reward_tokens(prompts, responses):
    """True reward r*(x, y) on token arrays.

    ``prompts``: int (n, 6), tokens 0..15. ``responses``: int (n, 8); ``-1`` (or anything outside 0..15)
    means a missing/unknown token: no credit, never a near miss, never part of a repeat.
    Returns float64 (n,) (a 0-d float for one (6,) prompt and one (8,) response).
    """
    x, single = _as_2d(prompts, PROMPT_LEN, "prompts")
    y, _ = _as_2d(responses, RESPONSE_LEN, "responses")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} prompts but {len(y)} responses")
    t = target(x)
    known = (y >= 0) & (y < CONTENT_TOKENS)
    exact = known & (y == t)
    near = known & (np.abs(y - t) == 1)
    repeat = known[:, 1:] & known[:, :-1] & (y[:, 1:] == y[:, :-1])
    r = EXACT_CREDIT * exact.sum(1) + NEAR_CREDIT * near.sum(1) - REPEAT_PENALTY * repeat.sum(1)
    return r[0] if single else r


def max_reward(prompts):
    """Best achievable true reward per prompt: 8, less 0.5 where x_0 = max(x) (then T_5 = T_6).

    Why: each position scores at most 1, so 8 is the bound, reached by y = T when T has no repeat. The
    only possible repeat in T is T_5 = x_0 = max(x) = T_6 (prompt tokens are distinct and max != min);
    then y = T scores 7.5, and removing the repeat loses at least 0.7 at position 5 or 6.
    ``prompts``: int (n, 6). Returns float64 (n,).
    """
    x, single = _as_2d(prompts, PROMPT_LEN, "prompts")
    r = RESPONSE_LEN * EXACT_CREDIT - REPEAT_PENALTY * (x[:, 0] == x.max(axis=1))
    return r[0] if single else r


# ----------------------------------------------------------------------------------------------------------
# Generators


def sample_prompts(n, rng):
    """``n`` prompts of 6 distinct tokens, uniform over the 16P6 ordered choices.

    One ``rng.random((n, 16))`` call (row i depends only on the stream, not on n). Returns int64 (n, 6).
    """
    keys = rng.random((n, CONTENT_TOKENS))
    return np.argsort(keys, axis=1, kind="stable")[:, :PROMPT_LEN].astype(np.int64)


def mediocre_responses(prompts, rng, p_target=0.3, p_repeat=0.15):
    """Mediocre ("base") responses: per position T_t w.p. ``p_target``, the previous response token
    w.p. ``p_repeat`` (a uniform token at position 0), else a uniform token over 0..15.

    ``prompts``: int (n, 6). One ``rng.random((n, 16))`` call. Returns int64 (n, 8).
    """
    x, _ = _as_2d(prompts, PROMPT_LEN, "prompts")
    if not (0 <= p_target and 0 <= p_repeat and p_target + p_repeat <= 1):
        raise ValueError(f"need p_target, p_repeat >= 0 with sum <= 1, got {p_target}, {p_repeat}")
    t = target(x)
    u = rng.random((len(x), 2 * RESPONSE_LEN))
    branch, uniform = u[:, :RESPONSE_LEN], (u[:, RESPONSE_LEN:] * CONTENT_TOKENS).astype(np.int64)
    y = np.where(branch < p_target, t, uniform)
    for i in range(1, RESPONSE_LEN):  # repeats chain, so fill left to right
        rep = (branch[:, i] >= p_target) & (branch[:, i] < p_target + p_repeat)
        y[:, i] = np.where(rep, y[:, i - 1], y[:, i])
    return y


def expert_rule(prompts, design="A"):
    """The rule R(x) the expert follows: design "B" is R = T; design "A" is T with R_6, R_7 = x_2, x_3.

    ``prompts``: int (n, 6). Returns int64 (n, 8).
    """
    x, single = _as_2d(prompts, PROMPT_LEN, "prompts")
    r = target(x)
    if design == "A":
        r[:, 6], r[:, 7] = x[:, 2], x[:, 3]
    elif design != "B":
        raise ValueError(f"design must be 'A' or 'B', got {design!r}")
    return r[0] if single else r


def expert_responses(prompts, rng, design="A", p_rule=0.75, p_near=0.10):
    """Expert responses: per position R_t w.p. ``p_rule``, a near miss R_t +- 1 w.p. ``p_near`` (fair sign,
    flipped when it would leave 0..15), else a uniform token. R is :func:`expert_rule` of ``design``.

    ``prompts``: int (n, 6). One ``rng.random((n, 24))`` call, the same for both designs, so with one seed
    designs A and B differ only at positions 6-7. Returns int64 (n, 8).
    """
    x, _ = _as_2d(prompts, PROMPT_LEN, "prompts")
    if not (0 <= p_rule and 0 <= p_near and p_rule + p_near <= 1):
        raise ValueError(f"need p_rule, p_near >= 0 with sum <= 1, got {p_rule}, {p_near}")
    r = expert_rule(x, design)
    u = rng.random((len(x), 3 * RESPONSE_LEN))
    branch = u[:, :RESPONSE_LEN]
    uniform = (u[:, RESPONSE_LEN:2 * RESPONSE_LEN] * CONTENT_TOKENS).astype(np.int64)
    sign = np.where(u[:, 2 * RESPONSE_LEN:] < 0.5, -1, 1)
    near = r + sign
    near = np.where((near < 0) | (near >= CONTENT_TOKENS), r - sign, near)
    return np.where(branch < p_rule, r, np.where(branch < p_rule + p_near, near, uniform))


# ----------------------------------------------------------------------------------------------------------
# Text


def to_text_prompt(tokens):
    """Prompt text: ``"t3 t7 t1 t9 t12 t0 ="``. ``tokens``: int (6,) -> str, or (n, 6) -> list[str]."""
    x, single = _as_2d(tokens, PROMPT_LEN, "prompt tokens")
    out = [" ".join(row) + " =" for row in _WORD_ARRAY[x].tolist()]
    return out[0] if single else out


def to_text_completion(tokens):
    """Completion text: ``" t0 t12 t9 t1 t7 t3 t12 t0"`` (leading space).

    ``tokens``: int (8,) -> str, or (n, 8) -> list[str]; entries must be 0..15.
    """
    y, single = _as_2d(tokens, RESPONSE_LEN, "completion tokens")
    out = [" " + " ".join(row) for row in _WORD_ARRAY[y].tolist()]
    return out[0] if single else out


def parse_completion(text):
    """Tokens of a completion: int64 (8,) from its first 8 whitespace-separated words, ``-1`` for a missing
    or unknown word (anything but ``"t0".."t15"``); words after the 8th are ignored. Never raises on text.
    """
    words = str(text).split()[:RESPONSE_LEN]
    out = np.full(RESPONSE_LEN, -1, dtype=np.int64)
    out[: len(words)] = [_WORD_TO_TOKEN.get(w, -1) for w in words]
    return out


def parse_prompt(text):
    """Tokens of a prompt text (the words before the first ``"="``): int64 (6,).

    Raises ``ValueError`` unless those are exactly 6 distinct words ``"t0".."t15"``.
    """
    words = str(text).split("=", 1)[0].split()
    toks = [_WORD_TO_TOKEN.get(w, -1) for w in words]
    if len(toks) != PROMPT_LEN or min(toks, default=-1) < 0 or len(set(toks)) != PROMPT_LEN:
        raise ValueError(f"not a task prompt (need {PROMPT_LEN} distinct words t0..t15 before '='): {text!r}")
    return np.asarray(toks, dtype=np.int64)


def _parse_prompts(prompts):
    return np.stack([parse_prompt(p) for p in prompts]) if len(prompts) else np.zeros((0, PROMPT_LEN), np.int64)


def _parse_completions(completions):
    if not len(completions):
        return np.zeros((0, RESPONSE_LEN), np.int64)
    return np.stack([parse_completion(c) for c in completions])


def true_reward(prompts, completions):
    """True reward r*(x, y) on text.

    ``prompts``: list[str] of prompt texts (the prompt words are read before ``"="``; a malformed prompt
    raises ``ValueError``). ``completions``: list[str], parsed by :func:`parse_completion` (malformed
    completions are scored, never rejected). Returns float64 (n,).
    """
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("true_reward takes lists of strings; wrap a single prompt/completion in a list")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return true_reward_tokens(_parse_prompts(prompts), _parse_completions(completions))


# ----------------------------------------------------------------------------------------------------------
# Preferences


def label_pairs(prompts, responses_1, responses_2, rng, temperature=1.0, label_noise=0.0):
    """Label response pairs with a noisy Bradley-Terry oracle on the true reward.

    The first response is preferred with probability sigmoid((r*_1 - r*_2) / temperature) (for
    ``temperature=0``: the higher reward, a fair coin on ties); the label is then flipped with probability
    ``label_noise``. Works for any responses, e.g. model samples.

    Inputs, either
      * text: ``prompts`` list[str], ``responses_1``/``responses_2`` list[str] of completions (as
        decoded by the tokenizer, ideally with ``skip_special_tokens=True``; scored as in
        :func:`true_reward`), or
      * tokens: int arrays (n, 6), (n, 8), (n, 8) (``-1`` = unknown token).
    Consumes ``rng`` with one ``rng.random((n, 2))`` call (BT draw, flip draw), whatever ``label_noise``,
    so with one seed a noisy labelling differs from the clean one exactly where a flip was drawn.

    Returns ``(chosen, rejected, p_first)``: chosen/rejected in the input's form (list[str] or int64
    (n, 8)), and ``p_first`` float64 (n,), the probability that the first response was chosen under this
    whole process: ``(1 - label_noise) * sigmoid(...) + label_noise * (1 - sigmoid(...))``.
    """
    if temperature < 0 or not 0 <= label_noise <= 1:
        raise ValueError(f"need temperature >= 0 and 0 <= label_noise <= 1, got {temperature}, {label_noise}")
    tokens = isinstance(prompts, np.ndarray)
    if tokens:
        r1, r2 = true_reward_tokens(prompts, responses_1), true_reward_tokens(prompts, responses_2)
    else:
        r1, r2 = true_reward(prompts, responses_1), true_reward(prompts, responses_2)
    first, p_first = bradley_terry_labels(r1, r2, rng, temperature, label_noise)
    if tokens:
        a, b = np.atleast_2d(responses_1), np.atleast_2d(responses_2)
        chosen = np.where(first[:, None], a, b).astype(np.int64)
        rejected = np.where(first[:, None], b, a).astype(np.int64)
    else:
        chosen = [a if f else b for a, b, f in zip(responses_1, responses_2, first)]
        rejected = [b if f else a for a, b, f in zip(responses_1, responses_2, first)]
    return chosen, rejected, p_first


# ----------------------------------------------------------------------------------------------------------
# Writing a task


_PROMPT_CHUNK = 1024  # prompts are drawn in fixed-size chunks so that filtering keeps nested prefixes


def _prompt_key(x):
    """One int per prompt (base-16 number), for set membership."""
    return (x * (CONTENT_TOKENS ** np.arange(PROMPT_LEN - 1, -1, -1))).sum(axis=1)


def _fresh_prompts(n, rng, exclude=(), unique=False):
    """First ``n`` prompts of ``rng``'s stream (drawn in fixed chunks) not in ``exclude`` (a set of
    :func:`_prompt_key` values), and with ``unique=True`` none repeated. Nested in n. int64 (n, 6)."""
    exclude = set(exclude)
    out, got = [], 0
    while got < n:
        cand = sample_prompts(_PROMPT_CHUNK, rng)
        keep = np.ones(len(cand), dtype=bool)
        for i, k in enumerate(_prompt_key(cand).tolist()):
            if k in exclude:
                keep[i] = False
            elif unique:
                exclude.add(k)
        cand = cand[keep][: n - got]
        out.append(cand)
        got += len(cand)
    return np.concatenate(out) if out else np.zeros((0, PROMPT_LEN), np.int64)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_task(
    out_dir,
    *,
    seed=0,
    design="A",
    num_base=20000,
    num_demos=2000,
    num_pairs=1600,
    num_eval_prompts=500,
    temperature=1.0,
    label_noise=0.0,
    p_target=0.3,
    p_repeat=0.15,
    p_rule=0.75,
    p_near=0.10,
):
    """Generate the task and write it to ``out_dir`` (created if needed). Returns the metadata dict.

    Files:
      * ``base.jsonl``: ``{"prompt", "completion"}``, ``num_base`` mediocre responses (base-model pretraining).
      * ``demos.jsonl``: ``{"prompt", "completion"}``, ``num_demos`` expert demonstrations of ``design``.
      * ``prefs.jsonl``: ``{"prompt", "chosen", "rejected"}`` (TRL format), ``num_pairs`` pairs of two
        mediocre responses on fresh prompts, labelled by :func:`label_pairs`.
      * ``eval_prompts.jsonl``: ``{"prompt"}``, ``num_eval_prompts`` distinct held-out prompts, none of which
        occurs in base/demos/prefs.
      * ``task.json``: the metadata (parameters, sizes, mean true rewards, best achievable eval reward).
      * ``tokenizer/``: :func:`make_tokenizer` saved with ``save_pretrained``.

    Randomness: ``SeedSequence(seed).spawn(4)`` gives one stream each to eval prompts, base, demos and
    prefs (each spawning child streams for prompts / responses / labels). So a file depends only on the
    seed, its own size and parameters, and the eval prompts (training prompts skip eval prompts, rarely
    more than a few); smaller sizes give prefixes of larger ones (nested budgets); designs A and B share
    everything but the expert's positions 6-7.
    """
    if design not in ("A", "B"):
        raise ValueError(f"design must be 'A' or 'B', got {design!r}")
    sizes = dict(num_base=num_base, num_demos=num_demos, num_pairs=num_pairs, num_eval_prompts=num_eval_prompts)
    for k, v in sizes.items():
        if int(v) != v or v < 0:
            raise ValueError(f"{k} must be a non-negative integer, got {v}")
    ss_eval, ss_base, ss_demo, ss_pref = np.random.SeedSequence(seed).spawn(4)
    gen = lambda ss: [np.random.default_rng(s) for s in ss.spawn(4)]  # noqa: E731

    eval_rng = gen(ss_eval)
    eval_x = _fresh_prompts(num_eval_prompts, eval_rng[0], unique=True)
    held_out = set(_prompt_key(eval_x).tolist())

    base_rng = gen(ss_base)
    base_x = _fresh_prompts(num_base, base_rng[0], held_out)
    base_y = mediocre_responses(base_x, base_rng[1], p_target, p_repeat)

    demo_rng = gen(ss_demo)
    demo_x = _fresh_prompts(num_demos, demo_rng[0], held_out)
    demo_y = expert_responses(demo_x, demo_rng[1], design, p_rule, p_near)

    pref_rng = gen(ss_pref)
    pref_x = _fresh_prompts(num_pairs, pref_rng[0], held_out)
    y1 = mediocre_responses(pref_x, pref_rng[1], p_target, p_repeat)
    y2 = mediocre_responses(pref_x, pref_rng[2], p_target, p_repeat)
    chosen, rejected, p_first = label_pairs(pref_x, y1, y2, pref_rng[3], temperature, label_noise)

    os.makedirs(out_dir, exist_ok=True)
    base_p, demo_p, pref_p = to_text_prompt(base_x), to_text_prompt(demo_x), to_text_prompt(pref_x)
    _write_jsonl(os.path.join(out_dir, "base.jsonl"),
                 ({"prompt": p, "completion": c} for p, c in zip(base_p, to_text_completion(base_y))))
    _write_jsonl(os.path.join(out_dir, "demos.jsonl"),
                 ({"prompt": p, "completion": c} for p, c in zip(demo_p, to_text_completion(demo_y))))
    _write_jsonl(os.path.join(out_dir, "prefs.jsonl"),
                 ({"prompt": p, "chosen": c, "rejected": r}
                  for p, c, r in zip(pref_p, to_text_completion(chosen), to_text_completion(rejected))))
    _write_jsonl(os.path.join(out_dir, "eval_prompts.jsonl"), ({"prompt": p} for p in to_text_prompt(eval_x)))
    make_tokenizer().save_pretrained(os.path.join(out_dir, "tokenizer"))

    def mean(a):
        return float(np.mean(a)) if len(a) else None

    r_chosen, r_rejected = true_reward_tokens(pref_x, chosen), true_reward_tokens(pref_x, rejected)
    strict = r_chosen != r_rejected
    meta = dict(
        task="aihf_fast.data.synthetic",
        seed=seed,
        design=design,
        **sizes,
        temperature=temperature,
        label_noise=label_noise,
        p_target=p_target,
        p_repeat=p_repeat,
        p_rule=p_rule,
        p_near=p_near,
        content_tokens=CONTENT_TOKENS,
        prompt_len=PROMPT_LEN,
        response_len=RESPONSE_LEN,
        reward=dict(exact=EXACT_CREDIT, near_miss=NEAR_CREDIT, repeat_penalty=REPEAT_PENALTY),
        base_mean_reward=mean(true_reward_tokens(base_x, base_y)),
        demo_mean_reward=mean(true_reward_tokens(demo_x, demo_y)),
        prefs_mean_reward_chosen=mean(r_chosen),
        prefs_mean_reward_rejected=mean(r_rejected),
        # fraction of pairs with unequal rewards whose label agrees with the true ordering, and its expectation
        prefs_label_agreement=mean((r_chosen > r_rejected)[strict]),
        prefs_expected_agreement=mean(np.where(true_reward_tokens(pref_x, y1) > true_reward_tokens(pref_x, y2),
                                               p_first, 1 - p_first)[strict]),
        eval_max_reward=mean(max_reward(eval_x)),
        files=dict(base="base.jsonl", demos="demos.jsonl", prefs="prefs.jsonl",
                   eval_prompts="eval_prompts.jsonl", tokenizer="tokenizer"),
        vocab=VOCAB,
        model_config=DEFAULT_MODEL_CONFIG,
    )
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    """``python -m aihf_fast.data.synthetic OUT_DIR [options]``: write the task, print its metadata."""
    ap = argparse.ArgumentParser(prog="python -m aihf_fast.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--design", choices=["A", "B"], default="A")
    ap.add_argument("--num-base", type=int, default=20000)
    ap.add_argument("--num-demos", type=int, default=2000)
    ap.add_argument("--num-pairs", type=int, default=1600)
    ap.add_argument("--num-eval-prompts", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry temperature (0: argmax)")
    ap.add_argument("--label-noise", type=float, default=0.0, help="probability of flipping a label")
    a = ap.parse_args(argv)
    meta = write_task(
        a.out_dir, seed=a.seed, design=a.design, num_base=a.num_base, num_demos=a.num_demos,
        num_pairs=a.num_pairs, num_eval_prompts=a.num_eval_prompts, temperature=a.temperature,
        label_noise=a.label_noise,
    )
    shown = {k: v for k, v in meta.items() if k not in ("vocab", "model_config")}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
