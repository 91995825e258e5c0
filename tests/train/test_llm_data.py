"""TRL-format records, tokenisation with prompt masking, batch layout, data order, and the
trainer's early, named errors on bad configuration or data."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llm_helpers import make_task

pytest.importorskip("transformers")

from aihf_fast.data import synthetic  # noqa: E402
from aihf_fast.data.records import DataError, load_demonstrations, load_preferences  # noqa: E402
from aihf_fast.data.tokenize import tokenize_records  # noqa: E402
from aihf_fast.train.llm.batches import build_inputs, stream_indices  # noqa: E402
from aihf_fast.train.llm.cli import main  # noqa: E402


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_record_formats(tmp_path):
    d = load_demonstrations(_write(tmp_path / "d.jsonl", [
        {"prompt": "t1 t2 =", "completion": " t3"},
        {"messages": [{"role": "user", "content": "t1"}, {"role": "assistant", "content": "t2"}]},
        {"prompt": [{"role": "user", "content": "t1"}], "completion": [{"role": "assistant", "content": "t4"}]},
    ]))
    assert [r.conversational for r in d] == [False, True, True]
    assert d[1].prompt == [{"role": "user", "content": "t1"}] and d[1].completion[0]["content"] == "t2"
    p = load_preferences(_write(tmp_path / "p.jsonl", [
        {"prompt": "t1 =", "chosen": " t2", "rejected": " t3"},
        {"chosen": [{"role": "user", "content": "t1"}, {"role": "assistant", "content": "t2"}],
         "rejected": [{"role": "user", "content": "t1"}, {"role": "assistant", "content": "t3"}]},
    ]))
    assert p[1].prompt == [{"role": "user", "content": "t1"}]  # implicit prompt: the shared prefix
    assert p[1].chosen == [{"role": "assistant", "content": "t2"}]


@pytest.mark.parametrize("rows,msg", [
    (['{"prompt": "t1 =", "completion": " t2"}', '{"prompt": "t1 =", '], "d.jsonl:2: not valid JSON"),
    ([{"prompt": "t1 ="}, ], "d.jsonl:1: missing key 'completion'"),
    ([{"prompt": "t1 =", "completion": 3}], "d.jsonl:1: 'completion' must be a string"),
    ([{"prompt": [{"role": "user", "content": "t1"}], "completion": " t2"}], "is a string but the prompt is a list"),
    (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
    ([], "no demonstrations"),
])
def test_bad_demonstration_rows(tmp_path, rows, msg):
    with pytest.raises(DataError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        load_demonstrations(_write(tmp_path / "d.jsonl", rows))


def test_tokenisation_masks_the_prompt_and_checks_length(tmp_path):
    tok = synthetic.make_tokenizer()
    recs = load_demonstrations(_write(tmp_path / "d.jsonl", [{"prompt": "t1 t2 =", "completion": " t3 t4"}]))
    t = tokenize_records(tok, recs, max_length=16, kind="demonstrations")
    e = t.items[0]
    assert e.prompt == [1, 6, 7, 4] and e.completions == [[8, 9, 2]]  # <bos> t1 t2 = | t3 t4 <eos>
    b = build_inputs([(e.prompt, e.completions[0])], pad_id=0, packed=True, device="cpu")
    assert b["input_ids"].tolist() == [[1, 6, 7, 4, 8, 9, 2]]
    assert b["labels"].tolist() == [-100, -100, -100, 8, 9, 2, -100]  # position t predicts token t+1
    t = tokenize_records(tok, recs, max_length=5, kind="demonstrations")
    assert t.truncated == 1 and t.items[0].completions == [[8]]
    with pytest.raises(DataError, match=r"d.jsonl:1: the prompt has 4 tokens, max_length=4"):
        tokenize_records(tok, recs, max_length=4, kind="demonstrations")


def test_chat_template_records(tmp_path):
    tok = synthetic.make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}= {% endif %}")
    recs = load_demonstrations(_write(tmp_path / "d.jsonl", [
        {"prompt": [{"role": "user", "content": "t1 t2"}], "completion": [{"role": "assistant", "content": "= t5"}]}]))
    e = tokenize_records(tok, recs, max_length=16, kind="demonstrations").items[0]
    assert tok.decode(e.prompt) == "t1 t2 =" and tok.decode(e.completions[0]) == "t5"
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_records(tok, recs, max_length=16, kind="demonstrations")


def test_packed_and_padded_layouts_agree():
    seqs = [([1, 2], [3, 4, 5]), ([6], [7])]
    p = build_inputs(seqs, pad_id=0, packed=True, device="cpu")
    q = build_inputs(seqs, pad_id=0, packed=False, device="cpu")
    assert p["cu_seqlens"].tolist() == [0, 5, 7] and p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert q["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert q["labels"][q["attention_mask"].bool()].tolist() == p["labels"].tolist()


def test_data_order_is_a_pure_function_of_position():
    n = 7
    a = stream_indices(n, seed=3, stream=1, start=0, count=3 * n)
    for e in range(3):
        assert sorted(a[e * n:(e + 1) * n].tolist()) == list(range(n))  # each epoch a permutation
    assert not np.array_equal(a[:n], a[n:2 * n])
    b = np.concatenate([stream_indices(n, 3, 1, s, 4) for s in range(0, 20, 4)])
    assert np.array_equal(a[:20], b)  # slicing (micro-batches, resume) does not change the order
    assert not np.array_equal(a, stream_indices(n, 4, 1, 0, 3 * n))


# ----------------------------------------------------------------------------- bad config


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(str(tmp_path_factory.mktemp("llm_bad")), num_demos=8, num_pairs=4, num_eval=4)


def _run(task, tmp_path, capsys, **kw):
    args = dict(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
                preferences=task["preferences"], method="aihf", steps=1, output_dir=str(tmp_path / "o"),
                progress="false", max_length=24, max_new_tokens=9)
    args.update(kw)
    argv = []
    for k, v in args.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kw,msg", [
    (dict(method="ppo"), "method must be one of"),
    (dict(demonstrations="/nonexistent/d.jsonl"), "demonstrations: file not found"),
    (dict(method="dpo", preferences=None), "method 'dpo' needs preferences"),
    (dict(method="sft", demonstrations=None), "method 'sft' needs demonstrations"),
    (dict(w_D=-1), "w_D must be >= 0"),
    (dict(beta=0), "beta must be > 0"),
    (dict(max_length=5), "the prompt has 8 tokens, max_length=5"),
    (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (dict(method="sft_then_dpo", sft_steps=0), "sft_then_dpo needs 0 < sft_steps < steps"),
    (dict(model="/nonexistent/model"), "model: no such directory: '/nonexistent/model'"),
    (dict(tokenizer="./no/tokenizer"), "tokenizer: no such directory"),
    (dict(w_D=0, w_P=0), "aihf needs w_D > 0 or w_P > 0"),
    (dict(w_D=0, preferences=None), "aihf with w_D = 0"),
    (dict(sample_temperature=0), "sample_temperature must be > 0"),
    (dict(eval_reference="/some/model"), "eval_reference is used by eval_kl and eval_preferences"),
    (dict(eval_reward="aihf_fast.data.synthetic:true_reward"), "eval_reward and eval_prompts go together"),
    (dict(steps="abc"), "argument --steps: invalid int value"),
    (dict(method="dpo", lr_P=1e-4), "lr_P (a step size of its own for the preference terms) is an option"),
    (dict(lr_P=0), "lr_P must be > 0"),
    (dict(lr_P=1e-4, preferences=None), "lr_P is the preference terms' step size: it needs preferences"),
    (dict(lr_P=1e-4, w_D=0), "there are no demonstration terms"),
])
def test_bad_config_fails_early_with_a_clear_message(task, tmp_path, capsys, kw, msg):
    try:
        rc, err = _run(task, tmp_path, capsys, **kw)
    except SystemExit as e:  # argparse's own type errors
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and msg in err, err


def test_a_diverged_run_is_a_one_line_error(task, tmp_path, capsys, monkeypatch):
    """A step whose loss is not finite: exit 2, one line naming the step and what to change."""
    from aihf_fast.train.llm.trainer import Trainer

    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, i: {**step(self, i), "loss": float("inf")})
    rc, err = _run(task, tmp_path, capsys, steps=2)
    assert rc == 2 and "error: step 1: loss = inf: the run diverged; lower the learning rate" in err, err


def test_models_that_cannot_load_are_one_line_errors(task, tmp_path, capsys, monkeypatch):
    """A directory without a model, a truncated weights file, and a hub id that is not cached while
    the hub cannot be reached (refused at once here; an unreachable one waits HUB_TIMEOUT_S, not
    transformers' ~25 s of retries): exit 2, one line naming the option; --debug shows the traceback."""
    import shutil
    import time

    from aihf_fast.train.llm import model as model_mod

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
              "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    model_mod._hub_reachable.cache_clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(task["model"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [(dict(model=str(empty)), f"model: cannot load {str(empty)!r}: "),
             (dict(model=task["tokenizer"]), "model: cannot load"),
             (dict(model=str(broken)), "SafetensorError"),
             (dict(model="no-such-org/no-such-model"), "not a local directory, and not in the Hugging Face cache"),
             (dict(tokenizer="no-such-org/no-such-tokenizer"), "tokenizer: cannot load 'no-such-org/no-such-tokenizer'"),
             (dict(method="rlhf", reward_model=str(empty), prompts=task["demonstrations"]), "reward_model: cannot load"),
             (dict(method="dpo", eval_kl="true", eval_reference=str(empty), eval_prompts=task["eval_prompts"],
                   eval_reward="aihf_fast.data.synthetic:true_reward"),
              "eval_reference: cannot load")]
    for kw, msg in cases:
        t0 = time.time()
        rc, err = _run(task, tmp_path, capsys, **kw)
        last = err.rstrip("\n").split("\n")[-1]  # (a model loaded before the failing one draws a bar above)
        assert rc == 2 and last.startswith("error: ") and msg in last and "Traceback" not in err, (kw, err)
        assert time.time() - t0 < 60, kw
    from aihf_fast.train.llm.config import ConfigError

    with pytest.raises(ConfigError, match="model: cannot load"):
        main(["--model", str(empty), "--tokenizer", task["tokenizer"], "--demonstrations", task["demonstrations"],
              "--method", "sft", "--steps", "1", "--output-dir", str(tmp_path / "o"), "--debug"])
    model_mod._hub_reachable.cache_clear()


def test_bad_data_names_file_and_line(task, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "t1 =", "completion": " t2"}, "{oops"])
    rc, err = _run(task, tmp_path, capsys, demonstrations=bad)
    assert rc == 2 and "bad.jsonl:2: not valid JSON" in err
    empty = _write(tmp_path / "empty.jsonl", [])
    rc, err = _run(task, tmp_path, capsys, preferences=empty)
    assert rc == 2 and "no preference pairs" in err


def test_config_file_and_unknown_options(task, tmp_path, capsys):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("method: sft\nsteps: 1\nnot_an_option: 3\n")
    rc, err = _run(task, tmp_path, capsys, config=str(cfgf))
    assert rc == 2 and "unknown option(s) ['not_an_option']" in err


def test_yaml_config_with_flag_override_trains(task, tmp_path, capsys):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("method: sft\nsteps: 5\nlr: 0.01\ndemos_per_batch: 4\nsave_model: false\n")
    rc, err = _run(task, tmp_path, capsys, config=str(cfgf), steps=2, method=None)
    assert rc == 0, err
    log = [json.loads(x) for x in open(os.path.join(tmp_path, "o", "log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(r["method"] == "sft" for r in log if "loss" in r)


def test_config_file_values_are_typed_and_parse_errors_named(task, tmp_path, capsys):
    from aihf_fast.train.llm.config import ConfigError, from_dict

    assert from_dict({"lr": "1e-5", "steps": 3.0, "bf16": "true"}).lr == 1e-5  # YAML reads 1e-5 as a string
    with pytest.raises(ConfigError, match="steps must be of type int"):
        from_dict({"steps": 2.5})
    bad = tmp_path / "c.yaml"
    bad.write_text("method: [sft\n")
    rc, err = _run(task, tmp_path, capsys, config=str(bad))
    assert rc == 2 and "cannot parse" in err


def test_resume_checks_the_run_and_a_finished_run_is_left_alone(task, tmp_path, capsys):
    kw = dict(method="dpo", steps=2, save_every=1, eval_prompts=task["eval_prompts"],
              eval_reward="aihf_fast.data.synthetic:true_reward")
    rc, err = _run(task, tmp_path, capsys, **kw)
    assert rc == 0, err
    log = open(os.path.join(tmp_path, "o", "log.jsonl")).read()
    rc, err = _run(task, tmp_path, capsys, resume="true", **{**kw, "seed": 5})
    assert rc == 2 and "seed (checkpoint 0, now 5)" in err
    rc, err = _run(task, tmp_path, capsys, resume="true", **kw)
    assert rc == 0, err
    assert open(os.path.join(tmp_path, "o", "log.jsonl")).read() == log  # nothing appended or lost


def test_eval_reward_and_kl_to_the_initial_model(task, tmp_path, capsys):
    rc, err = _run(task, tmp_path, capsys, method="dpo", steps=3, lr=0.05, eval_kl="true", save_model="false",
                   eval_prompts=task["eval_prompts"], eval_reward="aihf_fast.data.synthetic:true_reward")
    assert rc == 0, err
    ev = [json.loads(x) for x in open(os.path.join(tmp_path, "o", "log.jsonl")) if "eval/kl" in x]
    assert [e["step"] for e in ev] == [0, 3] and ev[0]["eval/num_samples"] == 4
    assert abs(ev[0]["eval/kl"]) < 1e-5          # the policy is the initial model at step 0
    assert abs(ev[1]["eval/kl"]) > 1e-3          # and has moved after 3 steps
    samples = [json.loads(x) for x in open(os.path.join(tmp_path, "o", "eval_samples_step3.jsonl"))]
    from aihf_fast.data import synthetic

    assert [s["reward"] for s in samples] == pytest.approx(
        synthetic.true_reward([s["prompt"] for s in samples], [s["completion"] for s in samples]).tolist())


def test_held_out_demo_nll_and_preference_accuracy(task, tmp_path, capsys):
    """eval/demo_nll is the per-token NLL of the held-out demonstrations; eval/pref_accuracy ranks
    held-out pairs by log pi - log pi_ref (ties count 1/2); eval_reference changes that reference."""
    import transformers

    from aihf_fast.data.records import load_demonstrations, load_preferences
    from aihf_fast.data.tokenize import tokenize_records

    other = str(tmp_path / "other")  # a different model as the eval reference
    m = transformers.AutoModelForCausalLM.from_pretrained(task["model"])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.save_pretrained(other)
    rc, err = _run(task, tmp_path, capsys, method="dpo", steps=2, lr=0.05, eval_kl="true", save_model="false",
                   eval_demonstrations=task["demonstrations"], eval_preferences=task["preferences"],
                   eval_prompts=task["eval_prompts"], eval_reward="aihf_fast.data.synthetic:true_reward")
    assert rc == 0, err
    ev = [json.loads(x) for x in open(os.path.join(tmp_path, "o", "log.jsonl")) if "eval/demo_nll" in x]
    assert [e["step"] for e in ev] == [0, 2]
    assert ev[0]["eval/pref_accuracy"] == 0.5 and ev[0]["eval/pref_margin"] == 0.0  # policy == reference: ties
    assert ev[1]["eval/pref_accuracy"] > 0.5  # trained on these very pairs

    # demo NLL at step 0 by hand from the full logits of the initial model
    tok = transformers.AutoTokenizer.from_pretrained(task["tokenizer"])
    items = tokenize_records(tok, load_demonstrations(task["demonstrations"]), 24, "demonstrations", True).items
    model = transformers.AutoModelForCausalLM.from_pretrained(task["model"]).eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([list(it.prompt) + list(it.completions[0])])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            P = len(it.prompt)
            tot -= sum(float(lp[t - 1, ids[0, t]]) for t in range(P, ids.shape[1]))
            n += ids.shape[1] - P
    assert ev[0]["eval/demo_nll"] == pytest.approx(tot / n, rel=1e-4)

    rc, err = _run(task, tmp_path / "b", capsys, method="dpo", steps=1, eval_kl="true", save_model="false",
                   eval_preferences=task["preferences"], eval_reference=other,
                   eval_prompts=task["eval_prompts"], eval_reward="aihf_fast.data.synthetic:true_reward")
    assert rc == 0, err
    ev0 = json.loads(open(os.path.join(tmp_path, "b", "o", "log.jsonl")).readline())
    assert ev0["step"] == 0 and abs(ev0["eval/kl"]) > 1e-2 and ev0["eval/pref_margin"] != 0.0
    assert len(load_preferences(task["preferences"])) > 0
