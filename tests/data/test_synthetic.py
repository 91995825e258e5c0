"""The synthetic LLM task: target, true reward, generators, Bradley-Terry labels, files, tokenizer."""
import json
import random

import numpy as np
import pytest

from aihf_fast.data import synthetic as s

P1 = [3, 7, 1, 9, 12, 0]  # T = reversed, max, min: 0 12 9 1 7 3 | 12 0
T1 = [0, 12, 9, 1, 7, 3, 12, 0]
P2 = [15, 2, 8, 4, 11, 6]  # x_0 is the max: T = 6 11 4 8 2 15 | 15 2 (T_5 = T_6, a repeat)
T2 = [6, 11, 4, 8, 2, 15, 15, 2]


def within(freq, p, n, k=4.0):
    """|freq - p| within k binomial standard errors."""
    se = np.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(freq - p) <= k * se


def viterbi_max_reward(prompts):
    """Best reward by dynamic programming over all 16^8 responses (independent of max_reward's formula)."""
    t = s.target(prompts)
    v = np.arange(16)
    score = (v[None, None, :] == t[:, :, None]) * 1.0 + (np.abs(v[None, None, :] - t[:, :, None]) == 1) * 0.3
    best = score[:, 0]
    same = np.eye(16, dtype=bool)
    for i in range(1, 8):
        trans = best[:, :, None] - 0.5 * same[None]  # [n, prev, cur]
        best = trans.max(axis=1) + score[:, i]
    return best.max(axis=1)


# ---------------------------------------------------------------------------------------------- target, reward


def test_target_by_hand():
    assert s.target(np.array(P1)).tolist() == T1
    assert s.target(np.array([P1, P2])).tolist() == [T1, T2]


def test_target_is_reversed_max_min():
    x = s.sample_prompts(500, np.random.default_rng(0))
    t = s.target(x)
    assert t.shape == (500, 8) and t.dtype == np.int64
    np.testing.assert_array_equal(t[:, :6], x[:, ::-1])
    np.testing.assert_array_equal(t[:, 6], x.max(1))
    np.testing.assert_array_equal(t[:, 7], x.min(1))


@pytest.mark.parametrize(
    "prompt, response, reward",
    [
        (P1, T1, 8.0),  # perfect, no repeat in T
        (P2, T2, 7.5),  # perfect, T_5 = T_6 is a repeat
        (P1, [1, 11, 9, 1, 7, 3, 12, 0], 6.6),  # two near misses (0->1, 12->11)
        (P1, [0, 0, 9, 9, 9, 3, 12, 0], 3.5),  # 5 exact, 3 repeats
        (P1, [0, 12, 9, 1, 7, 3, 12, -1], 7.0),  # missing last: no near-miss credit though T_7 = 0
        (P1, [-1, -1, 9, 1, 7, 3, 12, 0], 6.0),  # two unknowns are not a repeat
        (P1, [5, 5, 5, 5, 5, 5, 5, 5], -3.5),  # nothing right, 7 repeats
        (P2, [7, 10, 4, 8, 2, 15, 14, 2], 5.9),  # 5 exact, near misses at 0, 1, 6, no repeat
    ],
)
def test_reward_by_hand(prompt, response, reward):
    assert s.true_reward_tokens(np.array(prompt), np.array(response)) == pytest.approx(reward)
    assert s.true_reward_tokens(np.array([prompt]), np.array([response])).tolist() == pytest.approx([reward])


def test_reward_on_text_by_hand():
    p1, p2 = s.to_text_prompt(np.array(P1)), s.to_text_prompt(np.array(P2))
    assert p1 == "t3 t7 t1 t9 t12 t0 ="
    perfect = s.to_text_completion(np.array(T1))
    assert perfect == " t0 t12 t9 t1 t7 t3 t12 t0"
    cases = [
        (p1, perfect, 8.0),
        (p2, " t6 t11 t4 t8 t2 t15 t15 t2", 7.5),
        (p1, perfect + " t5 t5 t5", 8.0),  # extra words ignored
        (p1, " t0 t12 foo", 2.0),  # unknown and missing words count as wrong
        (p1, " t0 t0", 0.5),  # a repeat within the parsed words
        (p1, " foo foo t9 t1", 2.0),  # unknown words never repeat each other
        (p1, "", 0.0),
        (p1, "t0\tt12  t9\nt1 t7 t3 t12 t0", 8.0),  # any whitespace
        (p1, " t0 t12 t9 t1 t7 t3 t12 <eos>", 7.0),  # <eos> is an unknown word, no near miss for T_7 = 0
        (p1, " t0 t12 t9 t1 t7 t3 t12 t16", 7.0),  # out of range
        (p1, " t1 t12 t9 t1 t7 t3 t12 t00", 6.3),
    ]
    r = s.true_reward([c[0] for c in cases], [c[1] for c in cases])
    assert r.dtype == np.float64
    np.testing.assert_allclose(r, [c[2] for c in cases])


def test_parse():
    assert s.parse_completion(" t0 t12 x").tolist() == [0, 12, -1, -1, -1, -1, -1, -1]
    assert s.parse_completion(" t1 t2 t3 t4 t5 t6 t7 t8 t9").tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert s.parse_prompt("t3 t7 t1 t9 t12 t0 =").tolist() == P1
    assert s.parse_prompt("t3 t7 t1 t9 t12 t0 = t1 t2").tolist() == P1
    for bad in ["t3 t7 t1 t9 t12 =", "t3 t7 t1 t9 t12 t3 =", "t3 t7 t1 t9 t12 x =", "t3 t7 t1 t9 t12 t0 t4 ="]:
        with pytest.raises(ValueError):
            s.parse_prompt(bad)
    with pytest.raises(ValueError):
        s.true_reward(["t3 t7 t1 =", "t3 t7 t1 t9 t12 t0 ="], ["", ""])


def test_reward_text_equals_tokens():
    rng = np.random.default_rng(1)
    x = s.sample_prompts(400, rng)
    y = s.mediocre_responses(x, rng)
    prompts, completions = s.to_text_prompt(x), s.to_text_completion(y)
    np.testing.assert_array_equal(s.true_reward(prompts, completions), s.true_reward_tokens(x, y))
    # corrupt completions: drop words, insert unknown words, append extras; tokens mark them -1
    words = [c.split() for c in completions]
    for w in words:
        k = rng.integers(0, 4)
        if k == 1:
            del w[rng.integers(0, len(w)):]
        elif k == 2:
            w[rng.integers(0, len(w))] = rng.choice(["<eos>", "=", "t16", "hello", "<unk>"])
        elif k == 3:
            w.extend(["t1", "t1"])
    corrupted = [" " + " ".join(w) for w in words]
    y2 = np.stack([s.parse_completion(c) for c in corrupted])
    assert (y2 == -1).any()
    np.testing.assert_array_equal(s.true_reward(prompts, corrupted), s.true_reward_tokens(x, y2))


def test_max_reward():
    x = s.sample_prompts(300, np.random.default_rng(2))
    # move the max to position 0 in the first 30 prompts (T then has a repeat)
    top = x.argmax(1)[:30]
    x[np.arange(30), 0], x[np.arange(30), top] = x[np.arange(30), top], x[np.arange(30), 0]
    expected = viterbi_max_reward(x)
    np.testing.assert_allclose(s.max_reward(x), expected)
    assert (expected[:30] == 7.5).all()
    np.testing.assert_allclose(s.true_reward_tokens(x, s.target(x)), expected)  # T itself is optimal


# ---------------------------------------------------------------------------------------------- generators


def test_sample_prompts():
    x = s.sample_prompts(5000, np.random.default_rng(3))
    assert x.shape == (5000, 6) and x.dtype == np.int64
    assert x.min() >= 0 and x.max() < 16
    assert all(len(set(r)) == 6 for r in x.tolist())
    for j in range(6):  # each position uniform over the 16 tokens
        counts = np.bincount(x[:, j], minlength=16)
        assert all(within(c / 5000, 1 / 16, 5000, 4.5) for c in counts)
    np.testing.assert_array_equal(s.sample_prompts(100, np.random.default_rng(3)), x[:100])  # nested


def test_mediocre_branches():
    n = 20000
    x = s.sample_prompts(n, np.random.default_rng(4))
    t = s.target(x)
    y = s.mediocre_responses(x, np.random.default_rng(5), p_repeat=0.0)
    for j in range(8):
        assert within((y[:, j] == t[:, j]).mean(), 0.3 + 0.7 / 16, n), j
    y = s.mediocre_responses(x, np.random.default_rng(5), p_target=0.0, p_repeat=1.0)
    assert (y == y[:, :1]).all()  # always repeats; position 0 is uniform
    assert all(within(c / n, 1 / 16, n) for c in np.bincount(y[:, 0], minlength=16))
    y = s.mediocre_responses(x, np.random.default_rng(5), p_target=1.0, p_repeat=0.0)
    np.testing.assert_array_equal(y, t)


def _mediocre_reference(prompt, rnd, p_target=0.3, p_repeat=0.15):
    """Row-by-row reading of the design, for comparison with the vectorised generator."""
    t = s.target(np.array(prompt)).tolist()
    y = []
    for i in range(8):
        u = rnd.random()
        if u < p_target:
            y.append(t[i])
        elif u < p_target + p_repeat and i > 0:
            y.append(y[-1])
        else:
            y.append(rnd.randrange(16))
    return y


def test_mediocre_matches_reference():
    n = 20000
    x = s.sample_prompts(n, np.random.default_rng(6))
    t = s.target(x)
    y = s.mediocre_responses(x, np.random.default_rng(7))
    rnd = random.Random(0)
    ref = np.array([_mediocre_reference(p, rnd) for p in x.tolist()])
    for a, b in [(y == t, ref == t), (y[:, 1:] == y[:, :-1], ref[:, 1:] == ref[:, :-1])]:
        fa, fb = a.mean(0), b.mean(0)
        se = np.sqrt((fa * (1 - fa) + fb * (1 - fb)) / n)
        assert (np.abs(fa - fb) <= 4.5 * se).all(), (fa, fb)
    ra, rb = s.true_reward_tokens(x, y), s.true_reward_tokens(x, ref)
    assert abs(ra.mean() - rb.mean()) <= 4.5 * np.sqrt((ra.var() + rb.var()) / n)
    # t_0 and repeat frequency at t >= 1 by formula: repeat w.p. 0.15, else a coincidence
    assert within((y[:, 0] == t[:, 0]).mean(), 0.3 + 0.7 / 16, n)
    assert ((y[:, 1:] == y[:, :-1]).mean(0) > 0.15 + 0.02).all()


def test_expert_rule_design_a():
    x = s.sample_prompts(200, np.random.default_rng(8))
    ra, rb = s.expert_rule(x, "A"), s.expert_rule(x, "B")
    np.testing.assert_array_equal(rb, s.target(x))
    np.testing.assert_array_equal(ra[:, :6], s.target(x)[:, :6])
    np.testing.assert_array_equal(ra[:, 6], x[:, 2])
    np.testing.assert_array_equal(ra[:, 7], x[:, 3])
    np.testing.assert_array_equal(s.expert_responses(x, np.random.default_rng(0), "A", p_rule=1.0, p_near=0.0), ra)
    # same seed: designs differ only on positions 6-7
    ya = s.expert_responses(x, np.random.default_rng(9), "A")
    yb = s.expert_responses(x, np.random.default_rng(9), "B")
    np.testing.assert_array_equal(ya[:, :6], yb[:, :6])
    assert (ya[:, 6:] != yb[:, 6:]).any()
    with pytest.raises(ValueError):
        s.expert_rule(x, "C")


@pytest.mark.parametrize("design", ["A", "B"])
def test_expert_frequencies(design):
    n = 20000
    x = s.sample_prompts(n, np.random.default_rng(10))
    r = s.expert_rule(x, design)
    y = s.expert_responses(x, np.random.default_rng(11), design)
    assert y.min() >= 0 and y.max() < 16
    exact = (y == r).mean(0)
    near = (np.abs(y - r) == 1)
    edge = (r == 0) | (r == 15)  # a uniform token is a near miss w.p. 1/16 at an edge, 2/16 inside
    near_p = 0.10 + 0.15 * np.where(edge, 1, 2).mean(0) / 16
    for j in range(8):
        assert within(exact[j], 0.75 + 0.15 / 16, n), (j, exact[j])
        assert within(near[:, j].mean(), near_p[j], n), (j, near[:, j].mean(), near_p[j])
    # near misses stay in range at the edges: rule 0 -> 1, rule 15 -> 14, each w.p. 0.10 + 0.15/16
    e = r == 0
    assert within((y[e] == 1).mean(), 0.10 + 0.15 / 16, e.sum())
    t = s.target(x)
    if design == "A":  # the misconception: positions 6-7 hit the true target only by near misses or chance
        assert ((y[:, 6:] == t[:, 6:]).mean(0) < 0.2).all()
    else:
        assert ((y == t).mean(0) > 0.7).all()


# ---------------------------------------------------------------------------------------------- labels


def _pairs(n, seed):
    rng = np.random.default_rng(seed)
    x = s.sample_prompts(n, rng)
    y1, y2 = s.mediocre_responses(x, rng), s.mediocre_responses(x, rng)
    keep = (y1 != y2).any(1)  # so that "first chosen" is observable from the output
    return x[keep], y1[keep], y2[keep]


def _first_chosen(chosen, y1):
    return (np.asarray(chosen) == y1).all(1)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_bradley_terry_frequency(temperature):
    x, y1, y2 = _pairs(40000, 12)
    n = len(x)
    chosen, rejected, p = s.label_pairs(x, y1, y2, np.random.default_rng(13), temperature=temperature)
    diff = s.true_reward_tokens(x, y1) - s.true_reward_tokens(x, y2)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-diff / temperature)))
    first = _first_chosen(chosen, y1)
    np.testing.assert_array_equal(np.where(first[:, None], y2, y1), rejected)
    se = np.sqrt((p * (1 - p)).sum()) / n
    assert abs(first.mean() - p.mean()) <= 4 * se
    bins = np.digitize(diff, [-3, -2, -1, -0.25, 0.25, 1, 2, 3])
    for b in np.unique(bins):
        m = bins == b
        if m.sum() < 200:
            continue
        se = np.sqrt((p[m] * (1 - p[m])).sum()) / m.sum()
        assert abs(first[m].mean() - p[m].mean()) <= 4 * max(se, 1e-3), (b, first[m].mean(), p[m].mean())
    # higher reward agrees with the label about 80% of the time at temperature 1 (the design's 81%)
    if temperature == 1.0:
        strict = diff != 0
        assert 0.75 < (first == (diff > 0))[strict].mean() < 0.85


def test_label_noise_flips():
    x, y1, y2 = _pairs(20000, 14)
    n = len(x)
    c0, _, p0 = s.label_pairs(x, y1, y2, np.random.default_rng(15))
    c1, _, p1 = s.label_pairs(x, y1, y2, np.random.default_rng(15), label_noise=0.2)
    f0, f1 = _first_chosen(c0, y1), _first_chosen(c1, y1)
    assert within((f0 != f1).mean(), 0.2, n)
    np.testing.assert_allclose(p1, 0.8 * p0 + 0.2 * (1 - p0))
    assert abs(f1.mean() - p1.mean()) <= 4 * np.sqrt((p1 * (1 - p1)).sum()) / n
    # deterministic oracle, always flipped: the chosen one is never better
    c, r, p = s.label_pairs(x, y1, y2, np.random.default_rng(16), temperature=0, label_noise=1.0)
    rc, rr = s.true_reward_tokens(x, c), s.true_reward_tokens(x, r)
    assert (rc <= rr).all() and (rc < rr).any()
    assert set(np.unique(p)) <= {0.0, 0.5, 1.0}


def test_label_pairs_text_equals_tokens():
    x, y1, y2 = _pairs(300, 17)
    ct, rt, pt = s.label_pairs(x, y1, y2, np.random.default_rng(18), temperature=0.7, label_noise=0.1)
    px, c1, c2 = s.to_text_prompt(x), s.to_text_completion(y1), s.to_text_completion(y2)
    cs, rs, ps = s.label_pairs(px, c1, c2, np.random.default_rng(18), temperature=0.7, label_noise=0.1)
    assert isinstance(cs, list) and cs == s.to_text_completion(ct) and rs == s.to_text_completion(rt)
    np.testing.assert_array_equal(ps, pt)
    # works on malformed (model-sample-like) completions too
    cs, rs, ps = s.label_pairs(px[:2], [" t1 <eos>", ""], [" t0 t0 t0", " t3"], np.random.default_rng(0))
    assert len(cs) == len(rs) == 2 and ps.shape == (2,)


# ---------------------------------------------------------------------------------------------- files, CLI


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _write(tmp_path, name, **kw):
    args = dict(seed=3, num_base=300, num_demos=50, num_pairs=400, num_eval_prompts=200)
    args.update(kw)
    meta = s.write_task(tmp_path / name, **args)
    files = {k: _read(tmp_path / name / f"{k}.jsonl") for k in ["base", "demos", "prefs", "eval_prompts"]}
    return meta, files


def test_write_task_files(tmp_path):
    meta, f = _write(tmp_path, "big")
    assert [len(f[k]) for k in ["base", "demos", "prefs", "eval_prompts"]] == [300, 50, 400, 200]
    assert all(set(r) == {"prompt", "completion"} for r in f["base"] + f["demos"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in f["prefs"])
    assert all(set(r) == {"prompt"} for r in f["eval_prompts"])
    for r in f["base"] + f["demos"]:
        assert r["prompt"].endswith(" =") and len(s.parse_prompt(r["prompt"])) == 6
        assert r["completion"].startswith(" ") and (s.parse_completion(r["completion"]) >= 0).all()
    with open(tmp_path / "big" / "task.json") as fh:
        assert json.load(fh) == json.loads(json.dumps(meta))
    assert meta["design"] == "A" and meta["seed"] == 3 and meta["num_pairs"] == 400
    base_r = s.true_reward([r["prompt"] for r in f["base"]], [r["completion"] for r in f["base"]])
    demo_r = s.true_reward([r["prompt"] for r in f["demos"]], [r["completion"] for r in f["demos"]])
    assert meta["base_mean_reward"] == pytest.approx(base_r.mean())
    assert meta["demo_mean_reward"] == pytest.approx(demo_r.mean())
    ev = np.stack([s.parse_prompt(r["prompt"]) for r in f["eval_prompts"]])
    assert meta["eval_max_reward"] == pytest.approx(s.max_reward(ev).mean())
    eval_set = {r["prompt"] for r in f["eval_prompts"]}
    assert len(eval_set) == 200
    train = {r["prompt"] for k in ["base", "demos", "prefs"] for r in f[k]}
    assert not eval_set & train

    # nested budgets and separate streams
    meta2, g = _write(tmp_path, "small", num_pairs=100)
    assert g["prefs"] == f["prefs"][:100]
    for k in ["base", "demos", "eval_prompts"]:
        assert g[k] == f[k], k
    _, h = _write(tmp_path, "more_demos", num_demos=80, num_base=100)
    assert h["demos"][:50] == f["demos"] and h["base"] == f["base"][:100] and h["prefs"] == f["prefs"]
    # design B: same base, prefs and demo prompts; demos agree on positions 0-5
    _, b = _write(tmp_path, "design_b", design="B")
    assert b["base"] == f["base"] and b["prefs"] == f["prefs"]
    assert [r["prompt"] for r in b["demos"]] == [r["prompt"] for r in f["demos"]]
    assert [r["completion"].split()[:6] for r in b["demos"]] == [r["completion"].split()[:6] for r in f["demos"]]
    # another seed differs
    _, o = _write(tmp_path, "other", seed=4)
    assert o["demos"] != f["demos"]
    # the saved tokenizer loads
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "big" / "tokenizer")
    assert tok(f["prefs"][0]["prompt"]).input_ids[0] == s.BOS_ID


def test_write_task_default_sizes(tmp_path):
    """Full-size task: numbers near the design's (base data ~2.2, expert A ~5.0, labels ~81% agree)."""
    meta = s.write_task(tmp_path / "t")
    sizes = [meta[k] for k in ["num_base", "num_demos", "num_pairs", "num_eval_prompts"]]
    assert sizes == [20000, 2000, 1600, 500]
    assert 2.1 < meta["base_mean_reward"] < 2.35
    assert 4.85 < meta["demo_mean_reward"] < 5.15
    assert 0.76 < meta["prefs_label_agreement"] < 0.84
    assert 7.85 < meta["eval_max_reward"] < 7.97
    assert meta["prefs_mean_reward_chosen"] > meta["prefs_mean_reward_rejected"]


def test_cli(tmp_path, capsys):
    rc = s.main([str(tmp_path / "c"), "--seed", "1", "--design", "B", "--num-demos", "10", "--num-pairs", "20",
                 "--num-base", "30", "--num-eval-prompts", "5", "--temperature", "0.5", "--label-noise", "0.1"])
    assert rc == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["design"] == "B" and meta["num_pairs"] == 20 and meta["temperature"] == 0.5
    assert meta["label_noise"] == 0.1 and meta["seed"] == 1
    assert len(_read(tmp_path / "c" / "prefs.jsonl")) == 20


# ---------------------------------------------------------------------------------------------- tokenizer, model


TEXTS = ["t3 t7 t1 t9 t12 t0 =", " t0 t12 t9 t1 t7 t3 t12 t0", "t3 t7 t1 t9 t12 t0 = t0 t12 t9", "t15 hello = t16"]


def _check_tokenizer(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("=") == 4
    assert tok.convert_tokens_to_ids([f"t{i}" for i in range(16)]) == list(range(5, 21))
    assert len(tok) == len(s.VOCAB) == 21
    assert tok.get_vocab() == s.VOCAB
    assert not getattr(tok, "chat_template", None)
    p = TEXTS[0]
    assert tok(p).input_ids == [1, 8, 12, 6, 14, 17, 5, 4]
    assert tok(p, add_special_tokens=False).input_ids == [8, 12, 6, 14, 17, 5, 4]
    assert tok(TEXTS[1], add_special_tokens=False).input_ids == [5, 17, 14, 6, 12, 8, 17, 5]
    assert tok(TEXTS[3], add_special_tokens=False).input_ids == [20, 3, 4, 3]
    for t in TEXTS[:3]:
        assert tok.decode(tok(t, add_special_tokens=False).input_ids) == " ".join(t.split())
        assert tok.decode(tok(t).input_ids, skip_special_tokens=True) == " ".join(t.split())
    assert tok.decode(tok(p).input_ids) == "<bos> " + p
    batch = tok(["t1 t2 =", p], padding=True)
    assert batch.input_ids[0] == [1, 6, 7, 4, 0, 0, 0, 0] and batch.attention_mask[0] == [1] * 4 + [0] * 4


def test_tokenizer_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = s.make_tokenizer()
    _check_tokenizer(tok)
    tok.save_pretrained(tmp_path / "tok")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    _check_tokenizer(tok2)
    for t in TEXTS:
        assert tok(t).input_ids == tok2(t).input_ids
        assert tok.decode(tok(t).input_ids) == tok2.decode(tok2(t).input_ids)


def test_default_model_config():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**s.DEFAULT_MODEL_CONFIG)
    tok = s.make_tokenizer()
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                     tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([tok(TEXTS[0] + TEXTS[1]).input_ids])
    assert ids.shape == (1, 16)
    assert model(ids).logits.shape == (1, 16, 21)
