"""Alignment quality on a task with a known reward: AIHF against SFT, DPO, RPO, DPO + NLL,
SFT -> DPO and SPIN, as the number of preference pairs grows. Every method is a run of
``aihf_fast.train.llm`` (no second implementation); the task is ``aihf_fast.data.synthetic``.

    python benchmarks/bench_alignment_llm.py --profile small      # 2-core CPU, ~40 min
    python benchmarks/bench_alignment_llm.py --profile full       # bigger model and budgets (GPU box)
    python benchmarks/bench_alignment_llm.py --protocol round2 --profile small   # round two (its own docstring:
                                                                  # benchmarks/bench_alignment_llm_round2.py)

Protocol (fixed before any result was seen; the profiles only change sizes)
--------------------------------------------------------------------------
Per seed: one task (``write_task``), one base model (a tiny Llama pretrained with ``sft`` on mediocre
answers), one pool of preference prompts, one evaluation sample seed. Designs A (expert wrong on the
last two positions) and B (unbiased noisy expert) share the base model and the base-sample pairs.

* Preference pairs: two samples of the **base model** per prompt, labelled by a Bradley-Terry draw on
  the true reward (``synthetic.label_pairs``, temperature 1). Budgets are nested prefixes of one pool.
  ``sft_then_dpo`` uses pairs sampled from **its SFT model** on the same prompts, labelled the same
  way (what a practitioner does).
* Demonstrations: ``num_demos`` expert answers (nested prefixes for the ratio sweep).
* Held out, never trained on: ``val_demos`` demonstrations and ``val_pairs`` base-sample pairs (for
  selection), ``eval_prompts`` prompts (true reward, KL).
* Every method runs ``steps`` optimiser steps of the same batch (``pairs_per_batch`` pairs and/or
  ``demos_per_batch`` demonstrations, each with an own sample where the method uses one), lr, beta.
  ``sft_then_dpo`` starts from the ``sft`` run, so it gets twice the steps (in its favour).
* Methods (trainer options):
    base          the base model (0 steps)
    sft           NLL on the demonstrations
    spin          demonstration vs own sample, moving reference
    dpo           DPO on the pairs, reference = base
    rpo           DPO + 1.0 * NLL on the chosen answers
    dpo_nll       DPO + 1.0 * NLL on the demonstrations (``aihf`` with w_D = 0: no own samples)
    sft_then_dpo  DPO on SFT-sample pairs from the SFT model, reference = the SFT model
    aihf          w_P sum_pairs + w_D sum_demos(demo vs own sample) + 0.1 * NLL(demos), fixed
                  reference; weights by the data-size rule below
    aihf_moving   the same with the moving (self-play) reference
  Weight rule (each datum counts once in the objective, as in a likelihood over all the data; a
  step holds as many pairs as demonstrations): w_P = 2|P| / (|P| + |D|), w_D = 2|D| / (|P| + |D|).
  Sweep (``sweep_seeds`` x ``sweep_designs``, reported separately): ``aihf_w1`` (w_P = w_D = 1, the
  paper's default), ``aihf_nonll`` (the rule without NLL), ``aihf_wD0.1`` (w_P = 1, w_D = 0.1).
  Ratio sweep: sft, dpo_nll, aihf with ``ratio_demos`` demonstrations at ``ratio_budget`` pairs.
  Post hoc (``--posthoc``; added after the main results showed AIHF's reward oscillating from one
  50-step sample window to the next, so NOT part of the pre-registered protocol or the verdict):
  ``aihf_r10``, the rule's AIHF with own samples refreshed every 10 steps, on ``sweep_seeds`` x
  both designs.
* Checkpoints every ``eval_every`` steps (and step 0). The reported checkpoint of a run is chosen
  without the true reward: methods trained on pairs take the highest held-out preference accuracy
  of the implicit reward log pi - log pi_base (ties: the earlier); the others the lowest held-out
  demonstration NLL. The last checkpoint (fixed compute) is reported too.
* Metrics per checkpoint: mean true reward of one sample (temperature 1) per held-out prompt, its
  KL to the base model (Monte-Carlo, nats per sequence), held-out preference accuracy and
  demonstration NLL. Wall-clock per run: the whole trainer call (model loading, training, own-sample
  generation and the evaluations), with ``workers`` runs sharing the machine; ``wall_pipeline`` adds
  the sft run to ``sft_then_dpo``, which starts from the sft run's last step (not its selected one).
* Statistics: mean over seeds, 95% t-intervals; differences between methods are paired by seed.
  Verdict (the issue's goal): ``aihf`` >= the best baseline within noise (upper end of the paired
  95% interval >= 0) at every budget and design, and > every baseline by >= 20% of the base->expert
  gap (expert = mean true reward of the demonstrations) at the smallest non-zero budget.

Outputs: ``benchmarks/results/bench_alignment_llm_<profile>.json`` (+ ``.png``), with device,
versions and commit. Runs are cached under ``--work`` (one record per run): rerunning continues.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))  # (else the installed package, with its built C++ extension)
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ci95, commit, device_name, run_jobs, versions  # noqa: E402

TINY_MODEL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
FULL_MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)

PROFILES = {
    "tiny": dict(seeds=[0], designs=["A"], budgets=[0, 8], num_demos=16, val_demos=8, val_pairs=8, num_base=64,
                 base_steps=4, base_batch=16, steps=4, eval_every=2, eval_prompts=8, pairs_per_batch=4,
                 demos_per_batch=4, refresh_every=2, lr=5e-4, base_lr=1e-3, beta=0.1, model=TINY_MODEL,
                 sweep_seeds=[0], sweep_designs=["A"], ratio_demos=[8], ratio_budget=8, workers=1),
    "small": dict(seeds=[0, 1, 2, 3, 4], designs=["A", "B"], budgets=[0, 25, 100, 400, 1600], num_demos=2000,
                  val_demos=200, val_pairs=200, num_base=20000, base_steps=400, base_batch=128, steps=150,
                  eval_every=50, eval_prompts=256, pairs_per_batch=16, demos_per_batch=16, refresh_every=50,
                  lr=5e-4, base_lr=1e-3, beta=0.1, model={}, sweep_seeds=[0, 1, 2], sweep_designs=["A"],
                  ratio_demos=[250, 500, 1000, 4000], ratio_budget=100, workers=2),
    "full": dict(seeds=[0, 1, 2, 3, 4], designs=["A", "B"], budgets=[0, 25, 100, 400, 1600, 6400], num_demos=2000,
                 val_demos=400, val_pairs=400, num_base=40000, base_steps=1000, base_batch=128, steps=300,
                 eval_every=50, eval_prompts=500, pairs_per_batch=32, demos_per_batch=32, refresh_every=50,
                 lr=3e-4, base_lr=1e-3, beta=0.1, model=FULL_MODEL, sweep_seeds=[0, 1, 2], sweep_designs=["A", "B"],
                 ratio_demos=[250, 500, 1000, 4000, 8000], ratio_budget=100, workers=8),
}
MAIN = ("base", "sft", "spin", "dpo", "rpo", "dpo_nll", "sft_then_dpo", "aihf", "aihf_moving")
SWEEP = ("aihf_w1", "aihf_nonll", "aihf_wD0.1")
RATIO = ("sft", "dpo_nll", "aihf")
POSTHOC = ("aihf_r10",)
BASELINES = ("base", "sft", "spin", "dpo", "rpo", "dpo_nll", "sft_then_dpo")
NEEDS_PAIRS = ("dpo", "rpo", "dpo_nll", "sft_then_dpo")       # not run at 0 pairs
NO_PAIRS = ("base", "sft", "spin")                            # the same run at every budget
COST = {"base": 1, "sft": 2, "dpo": 2, "rpo": 2, "dpo_nll": 2, "sft_then_dpo": 2, "spin": 5}  # for job order


# ---------------------------------------------------------------------------------------------- jobs
def rule_weights(num_pairs: int, num_demos: int) -> tuple[float, float]:
    """The pre-registered AIHF weights: each datum counts once, w_P + w_D = 2."""
    n = num_pairs + num_demos
    return 2.0 * num_pairs / n, 2.0 * num_demos / n


def method_options(method: str, num_pairs: int, num_demos: int) -> dict:
    """Trainer options of a benchmark method (beyond the shared ones)."""
    wP, wD = rule_weights(num_pairs, num_demos)
    aihf = dict(method="aihf", w_P=wP, w_D=wD, nll_weight=0.1, reference="fixed")
    return {
        "base": dict(method="sft", steps=0),
        "sft": dict(method="sft"),
        "spin": dict(method="spin", reference="moving"),
        "dpo": dict(method="dpo"),
        "rpo": dict(method="rpo", nll_weight=1.0),
        "dpo_nll": dict(method="aihf", w_P=1.0, w_D=0.0, nll_weight=1.0),
        "sft_then_dpo": dict(method="dpo"),
        "aihf": aihf,
        "aihf_moving": dict(aihf, reference="moving"),
        "aihf_w1": dict(aihf, w_P=1.0, w_D=1.0),
        "aihf_nonll": dict(aihf, nll_weight=0.0),
        "aihf_wD0.1": dict(aihf, w_P=1.0, w_D=0.1),
        "aihf_r10": dict(aihf, refresh_every=10),
    }[method]


def run_key(group, seed, design, method, budget, num_demos):
    return f"{group}-s{seed}-{design}-{method}-p{budget}-d{num_demos}"


def plan(prof: dict, posthoc: bool = False) -> list[dict]:
    """All jobs: per seed a 'prepare' job, per (seed, design) an 'sft' job (its run is also a result
    and makes the SFT-sample pairs), then one 'run' job per result."""
    jobs, seen = [], set()

    def add(job):
        if job["key"] not in seen:
            seen.add(job["key"])
            jobs.append(job)

    def add_run(group, seed, design, method, budget, num_demos):
        if method in NEEDS_PAIRS and budget == 0:
            return
        b = 0 if method in NO_PAIRS else budget
        dep = f"sft-s{seed}-{design}" if method == "sft_then_dpo" else f"prepare-s{seed}"
        if method == "sft" and num_demos == prof["num_demos"]:
            return  # the 'sft' job's own run
        key = run_key(group, seed, design, method, b, num_demos)
        cost = COST.get(method, 6) * (1 + num_demos / 4000)
        add(dict(kind="run", key=key, deps=[dep], group=group, seed=seed, design=design, method=method, budget=b,
                 num_demos=num_demos, cost=cost))

    for s in prof["seeds"]:
        add(dict(kind="prepare", key=f"prepare-s{s}", deps=[], seed=s, cost=20))
        for d in prof["designs"]:
            add(dict(kind="sft", key=f"sft-s{s}-{d}", deps=[f"prepare-s{s}"], seed=s, design=d, cost=10))
            for m in MAIN:
                for b in prof["budgets"]:
                    add_run("main", s, d, m, b, prof["num_demos"])
    for s in prof["sweep_seeds"]:
        for d in prof["sweep_designs"]:
            for m in SWEEP:
                for b in prof["budgets"]:
                    add_run("sweep", s, d, m, b, prof["num_demos"])
            for n in prof["ratio_demos"]:
                for m in RATIO:
                    add_run("ratio", s, d, m, prof["ratio_budget"], n)
    if posthoc:
        for s in prof["sweep_seeds"]:
            for d in prof["designs"]:
                for m in POSTHOC:
                    for b in prof["budgets"]:
                        add_run("posthoc", s, d, m, b, prof["num_demos"])
    return jobs


# ---------------------------------------------------------------------------------------------- worker
def _init_worker(threads: int):
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _paths(work: str, seed: int) -> dict:
    s = os.path.join(work, f"seed{seed}")
    return dict(dir=s, base=os.path.join(s, "base", "model"), tok=os.path.join(s, "task_A", "tokenizer"),
                eval_prompts=os.path.join(s, "task_A", "eval_prompts.jsonl"))


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _sample_pairs(model_dir, tok_dir, prompts, seed, rng_seed):
    """Two samples of the model per prompt, labelled by a Bradley-Terry draw on r* -> TRL rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aihf_fast.data import synthetic
    from aihf_fast.train.llm import sampling

    tok = AutoTokenizer.from_pretrained(tok_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev).eval()
    ids = [tok(p)["input_ids"] for p in prompts]
    kw = dict(max_new_tokens=synthetic.RESPONSE_LEN + 1, temperature=1.0, top_p=1.0, batch_size=512,
              max_length=24, synced=False, device=dev)
    y1 = tok.batch_decode(sampling.generate(model, tok, ids, seed=seed * 2 + 1, **kw), skip_special_tokens=True)
    y2 = tok.batch_decode(sampling.generate(model, tok, ids, seed=seed * 2 + 2, **kw), skip_special_tokens=True)
    chosen, rejected, _ = synthetic.label_pairs(prompts, y1, y2, np.random.default_rng(rng_seed))
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)]


def _common_options(prof, seed, design, work):
    p = _paths(work, seed)
    task = os.path.join(p["dir"], f"task_{design}")
    return dict(tokenizer=p["tok"], eval_prompts=p["eval_prompts"], eval_reward="aihf_fast.data.synthetic:true_reward",
                eval_kl=True, eval_demonstrations=os.path.join(task, "demos_val.jsonl"),
                eval_preferences=os.path.join(p["dir"], "prefs_base_val.jsonl"), eval_reference=p["base"],
                max_new_tokens=9, max_length=24, gen_batch_size=512, lr=prof["lr"], beta=prof["beta"],
                steps=prof["steps"], eval_every=prof["eval_every"], pairs_per_batch=prof["pairs_per_batch"],
                demos_per_batch=prof["demos_per_batch"], refresh_every=prof["refresh_every"], seed=seed,
                overwrite=True, progress=False, save_model=False, log_every=max(1, prof["steps"] // 10))


def _train(opts: dict) -> tuple[dict, float]:
    from aihf_fast.train.llm import LLMTrainConfig, train

    t0 = time.time()
    summary = train(LLMTrainConfig(**opts))
    return summary, time.time() - t0


def job_prepare(job, prof, work):
    """Task files for both designs, the base model, base-sample preference pairs."""
    from aihf_fast.data import synthetic

    seed, p = job["seed"], _paths(work, job["seed"])
    n_demo_pool = max([prof["num_demos"], *prof["ratio_demos"]])
    n_pairs = max(prof["budgets"])
    meta = {}
    for d in ("A", "B"):
        task = os.path.join(p["dir"], f"task_{d}")
        m = synthetic.write_task(task, seed=seed, design=d, num_base=prof["num_base"] if d == "A" else 0,
                                 num_demos=n_demo_pool + prof["val_demos"], num_pairs=n_pairs + prof["val_pairs"],
                                 num_eval_prompts=prof["eval_prompts"])
        demos = _read_jsonl(os.path.join(task, "demos.jsonl"))
        _write_jsonl(os.path.join(task, "demos_val.jsonl"), demos[n_demo_pool:])
        for n in {prof["num_demos"], *prof["ratio_demos"]}:
            _write_jsonl(os.path.join(task, f"demos_{n}.jsonl"), demos[:n])
        train_demos = demos[:prof["num_demos"]]
        expert = synthetic.true_reward([r["prompt"] for r in train_demos], [r["completion"] for r in train_demos])
        meta[d] = dict(expert_data_reward=float(np.mean(expert)), eval_max_reward=m["eval_max_reward"])
    base_dir = os.path.join(p["dir"], "base")
    if not (os.path.isfile(os.path.join(base_dir, "summary.json"))  # written after the model: a finished base
            and glob.glob(os.path.join(p["base"], "*.safetensors"))):
        from aihf_fast.data.synthetic import DEFAULT_MODEL_CONFIG

        _train(dict(model_config={**DEFAULT_MODEL_CONFIG, **prof["model"]}, tokenizer=p["tok"], method="sft",
                    demonstrations=os.path.join(p["dir"], "task_A", "base.jsonl"), steps=prof["base_steps"],
                    demos_per_batch=prof["base_batch"], lr=prof["base_lr"], max_new_tokens=9, max_length=24,
                    output_dir=base_dir, seed=seed, overwrite=True, progress=False, log_every=50))
        shutil.rmtree(os.path.join(base_dir, "checkpoints"), ignore_errors=True)
    prompts = [r["prompt"] for r in _read_jsonl(os.path.join(p["dir"], "task_A", "prefs.jsonl"))]
    rows = _sample_pairs(p["base"], p["tok"], prompts, seed, rng_seed=10_000 + seed)
    _write_jsonl(os.path.join(p["dir"], "prefs_base_val.jsonl"), rows[n_pairs:])
    for b in prof["budgets"]:
        if b:
            _write_jsonl(os.path.join(p["dir"], f"prefs_base_{b}.jsonl"), rows[:b])
    with open(os.path.join(p["dir"], "meta.json"), "w") as f:
        json.dump(meta, f)
    return dict(key=job["key"], kind="prepare", seed=seed, meta=meta)


def job_run(job, prof, work):
    """One trainer run -> its record (evaluations along training, wall-clock)."""
    seed, design, method, budget, nd = job["seed"], job["design"], job["method"], job["budget"], job["num_demos"]
    p = _paths(work, seed)
    task = os.path.join(p["dir"], f"task_{design}")
    out = os.path.join(work, "runs", job["key"])
    opts = _common_options(prof, seed, design, work)
    opts.update(method_options(method, budget, nd), output_dir=out, model=p["base"])
    opts["demonstrations"] = os.path.join(task, f"demos_{nd}.jsonl")
    if budget:
        opts["preferences"] = os.path.join(p["dir"], f"prefs_base_{budget}.jsonl")
    if method == "sft_then_dpo":
        opts.update(model=os.path.join(p["dir"], f"sft_{design}", "model"),
                    preferences=os.path.join(p["dir"], f"prefs_sft_{design}_{budget}.jsonl"))
    if job["kind"] == "sft":
        opts.update(output_dir=os.path.join(p["dir"], f"sft_{design}"), save_model=True)
    summary, wall = _train(opts)
    rec = dict(commit=job.get("commit"), key=run_key("main", seed, design, "sft", 0, nd) if job["kind"] == "sft" else job["key"],
               group=job.get("group", "main"), seed=seed, design=design, method=method, budget=budget,
               num_demos=nd, options={k: opts.get(k) for k in ("method", "w_P", "w_D", "nll_weight", "reference")},
               evals=summary["evals"], wall_seconds=wall, train_seconds=summary["train_seconds"],
               generation_seconds=summary["generation_seconds"], eval_seconds=summary.get("eval_seconds"))
    if job["kind"] == "sft":
        prompts = [r["prompt"] for r in _read_jsonl(os.path.join(p["dir"], "task_A", "prefs.jsonl"))]
        n_pairs = max(prof["budgets"])
        rows = _sample_pairs(os.path.join(p["dir"], f"sft_{design}", "model"), p["tok"], prompts[:n_pairs], seed + 500,
                             rng_seed=20_000 + seed)
        for b in prof["budgets"]:
            if b:
                _write_jsonl(os.path.join(p["dir"], f"prefs_sft_{design}_{b}.jsonl"), rows[:b])
        shutil.rmtree(os.path.join(p["dir"], f"sft_{design}", "checkpoints"), ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return rec


def run_job(job, prof, work):
    if job["kind"] == "prepare":
        return job_prepare(job, prof, work)
    if job["kind"] == "sft":
        job = dict(job, method="sft", budget=0, num_demos=prof["num_demos"])
    return job_run(job, prof, work)


# ---------------------------------------------------------------------------------------------- analysis
def select(evals: list, uses_pairs: bool) -> dict:
    """The reported checkpoint, chosen without r*: best held-out preference accuracy for runs
    trained on pairs (ties: the earlier), else lowest held-out demonstration NLL."""
    if uses_pairs:
        return max(evals, key=lambda e: (e["eval/pref_accuracy"], -e["step"]))
    return min(evals, key=lambda e: (e["eval/demo_nll"], e["step"]))


def _point(rec):
    sel = select(rec["evals"], rec["budget"] > 0 and rec["method"] not in NO_PAIRS)
    last = rec["evals"][-1]
    return dict(reward=sel["eval/reward"], kl=sel["eval/kl"], step=sel["step"], reward_last=last["eval/reward"],
                kl_last=last["eval/kl"], pref_accuracy=sel["eval/pref_accuracy"], demo_nll=sel["eval/demo_nll"],
                wall=rec["wall_seconds"], gen=rec["generation_seconds"])


def analyse(records: dict, prof: dict, meta: dict) -> dict:
    """Per (group, design, method, budget, demos): per-seed points and their means and intervals;
    paired comparisons of aihf against the best baseline; the verdict."""
    runs = [r for r in records.values() if "evals" in r]
    cells = {}
    for r in runs:
        budgets = prof["budgets"] if (r["method"] in NO_PAIRS and r["group"] == "main") else [r["budget"]]
        for b in budgets:
            k = (r["group"], r["design"], r["method"], b, r["num_demos"])
            cells.setdefault(k, {})[r["seed"]] = _point(r)
    # ratio sweep cells, all keyed at ratio_budget; the main grid's runs give its num_demos point
    for k in [k for k in cells if k[0] == "ratio"]:
        cells[("ratio", k[1], k[2], prof["ratio_budget"], k[4])] = cells.pop(k)
    for r in runs:
        if r["group"] == "main" and r["method"] in RATIO and r["seed"] in prof["sweep_seeds"] and \
                r["design"] in prof["sweep_designs"] and r["budget"] == (0 if r["method"] in NO_PAIRS else prof["ratio_budget"]):
            cells.setdefault(("ratio", r["design"], r["method"], prof["ratio_budget"], r["num_demos"]),
                             {})[r["seed"]] = _point(r)
    sft_wall = {(r["seed"], r["design"]): r["wall_seconds"] for r in runs
                if r["group"] == "main" and r["method"] == "sft"}
    for (_, d, m, _, _), per in cells.items():  # the whole pipeline's time: sft_then_dpo includes its sft run
        for seed, pt in per.items():
            pt["wall_pipeline"] = pt["wall"] + (sft_wall.get((seed, d), float("nan")) if m == "sft_then_dpo" else 0.0)
    table = []
    for (g, d, m, b, n), per in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][4], kv[0][3], kv[0][2])):
        seeds = sorted(per)
        row = dict(group=g, design=d, method=m, budget=b, num_demos=n, seeds=seeds, per_seed=[per[s] for s in seeds])
        for f in ("reward", "kl", "reward_last", "kl_last", "pref_accuracy", "demo_nll", "wall", "gen", "wall_pipeline"):
            v = [per[s][f] for s in seeds]
            row[f] = float(np.mean(v))
            row[f + "_ci95"] = ci95(v)
        table.append(row)
    verdict = _verdict(table, prof, meta, "reward")
    # secondary, also fixed in advance: the same comparison at the last checkpoint (fixed compute)
    verdict_last = _verdict(table, prof, meta, "reward_last")
    return dict(table=table, verdict=verdict, verdict_last_checkpoint=verdict_last)


def _verdict(table, prof, meta, field="reward"):
    main = {(r["design"], r["method"], r["budget"]): r for r in table if r["group"] == "main"}
    out, missing = [], []
    smallest = min([b for b in prof["budgets"] if b > 0], default=None)
    for d in prof["designs"]:
        base = main.get((d, "base", 0))
        if base is None:
            continue
        gap = float(np.mean([meta[s][d]["expert_data_reward"] for s in base["seeds"]])) - base[field]
        for aihf in ("aihf", "aihf_moving"):
            for b in prof["budgets"]:
                a = main.get((d, aihf, b))
                rivals = [main[(d, m, b)] for m in BASELINES if (d, m, b) in main]
                if a is None or not rivals:
                    missing.append(f"{d}/{aihf}/{b}")
                    continue
                best = max(rivals, key=lambda r: r[field])
                diffs = {}
                for r in rivals:
                    common = [s for s in a["seeds"] if s in r["seeds"]]
                    x = [a["per_seed"][a["seeds"].index(s)][field] - r["per_seed"][r["seeds"].index(s)][field] for s in common]
                    diffs[r["method"]] = (float(np.mean(x)), ci95(x))
                dm, dc = diffs[best["method"]]
                row = dict(design=d, method=aihf, budget=b, best_baseline=best["method"], best_reward=best[field],
                           aihf_reward=a[field], diff=dm, diff_ci95=dc, gap=gap,
                           at_least_as_good=bool(dm + (dc if np.isfinite(dc) else 0.0) >= 0),
                           diffs=diffs)
                if b == smallest:
                    row["beats_all_by_20pct_gap"] = bool(all(v[0] >= 0.2 * gap for v in diffs.values()))
                out.append(row)
    goal = {}
    for aihf in ("aihf", "aihf_moving"):
        rows = [r for r in out if r["method"] == aihf]
        if rows:
            goal[aihf] = dict(at_least_as_good_everywhere=all(r["at_least_as_good"] for r in rows),
                              beats_all_by_20pct_at_smallest=all(r.get("beats_all_by_20pct_gap", True) for r in rows))
    return dict(rows=out, goal=goal, missing_cells=missing)


def markdown(result: dict, prof: dict, field: str = "reward") -> str:
    """The README tables: true reward (mean +- 95% CI) per method and budget at the selected
    checkpoint (field "reward") or the last one ("reward_last")."""
    lines = []
    t = result["analysis"]["table"]
    kl = {"reward": "kl", "reward_last": "kl_last"}[field]
    where = {"reward": "the selected checkpoint", "reward_last": "the last checkpoint"}[field]
    for d in prof["designs"]:
        lines.append(f"\nDesign {d}: true reward at {where}, mean +- 95% CI over seeds [KL to base]\n")
        lines.append("| method | " + " | ".join(f"{b} pairs" for b in prof["budgets"]) + " |")
        lines.append("|---|" + "---|" * len(prof["budgets"]))
        for g, methods in (("main", MAIN), ("sweep", SWEEP), ("posthoc", POSTHOC)):
            for m in methods:
                cells = []
                for b in prof["budgets"]:
                    r = next((r for r in t if r["group"] == g and r["design"] == d and r["method"] == m and r["budget"] == b
                              and r["num_demos"] == prof["num_demos"]), None)
                    cells.append("-" if r is None else f"{r[field]:.2f}+-{r[field + '_ci95']:.2f} [{r[kl]:.1f}]")
                if any(c != "-" for c in cells):
                    tag = {"main": "", "sweep": " (sweep)", "posthoc": " (post hoc)"}[g]
                    lines.append(f"| {m}{tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, prof: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["analysis"]["table"]
    designs = prof["designs"]
    fig, axes = plt.subplots(2, len(designs) + 1, figsize=(6 * (len(designs) + 1), 9), squeeze=False)
    xs = list(range(len(prof["budgets"])))
    colors = dict(zip(MAIN + POSTHOC, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for i, d in enumerate(designs):
        ax = axes[0][i]
        for g, m in [("main", m) for m in MAIN] + [("posthoc", m) for m in POSTHOC]:
            rows = {r["budget"]: r for r in t if r["group"] == g and r["design"] == d and r["method"] == m}
            pts = [(x, rows[b]) for x, b in zip(xs, prof["budgets"]) if b in rows]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = np.array([p[1]["reward"] for p in pts])
            c = np.nan_to_num(np.array([p[1]["reward_ci95"] for p in pts]))
            style = dict(lw=2.5) if m.startswith("aihf") else dict(lw=1.2, ls="--" if m in NO_PAIRS else "-")
            if g == "posthoc":
                style = dict(lw=1.5, ls=":")
            ax.plot(x, y, marker="o", label=m + (" (post hoc)" if g == "posthoc" else ""), color=colors[m], **style)
            ax.fill_between(x, y - c, y + c, alpha=0.15, color=colors[m])
        meta = result["meta"]
        expert = np.mean([meta[str(s)][d]["expert_data_reward"] for s in prof["seeds"] if str(s) in meta])
        ax.axhline(expert, color="k", ls=":", lw=1, label="expert data")
        ax.set_xticks(xs, [str(b) for b in prof["budgets"]])
        ax.set_xlabel("preference pairs")
        ax.set_ylabel("true reward (selected checkpoint)")
        ax.set_title(f"design {d}")
        ax.legend(fontsize=7)
        # reward vs KL over checkpoints at the ratio budget
        ax = axes[1][i]
        b = prof["ratio_budget"] if prof["ratio_budget"] in prof["budgets"] else max(prof["budgets"])
        for m in MAIN:
            rows = [r for r in t if r["group"] == "main" and r["design"] == d and r["method"] == m and r["budget"] == b]
            if not rows:
                continue
            recs = [rec for rec in result["records"] if rec["group"] == "main" and rec["design"] == d and
                    rec["method"] == m and rec["budget"] == (0 if m in NO_PAIRS else b)]
            steps = sorted({e["step"] for rec in recs for e in rec["evals"]})
            kl = [np.mean([e["eval/kl"] for rec in recs for e in rec["evals"] if e["step"] == s]) for s in steps]
            rw = [np.mean([e["eval/reward"] for rec in recs for e in rec["evals"] if e["step"] == s]) for s in steps]
            ax.plot(kl, rw, marker=".", label=m, color=colors[m], lw=2.5 if m.startswith("aihf") else 1.2)
        ax.set_xlabel("KL(pi || base) per sequence (nats)")
        ax.set_ylabel("true reward")
        ax.set_title(f"design {d}: checkpoints at {b} pairs (mean over seeds)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for m in RATIO:
        rows = sorted([r for r in t if r["group"] == "ratio" and r["method"] == m], key=lambda r: r["num_demos"])
        if rows:
            x = [r["num_demos"] for r in rows]
            y = np.array([r["reward"] for r in rows])
            c = np.nan_to_num(np.array([r["reward_ci95"] for r in rows]))
            ax.plot(x, y, marker="o", label=m, color=colors.get(m))
            ax.fill_between(x, y - c, y + c, alpha=0.15, color=colors.get(m))
    ax.set_xscale("log")
    ax.set_xlabel(f"demonstrations (at {prof['ratio_budget']} pairs, design {','.join(prof['sweep_designs'])})")
    ax.set_ylabel("true reward (selected checkpoint)")
    ax.set_title("ratio sweep")
    ax.legend(fontsize=7)
    axes[1][-1].axis("off")
    axes[1][-1].text(0, 0.5, f"{result['device']}\ncommit {result['commit']}\nprofile {result['profile']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = list(sys.argv[1:] if argv is None else argv)
    args = [x for a in args for x in (a.split("=", 1) if a.startswith("--protocol=") else [a])]
    if "--protocol" in args:  # round two lives in its own module; round one stays as it was run
        i = args.index("--protocol")
        proto = args[i + 1] if i + 1 < len(args) else None
        if proto not in ("round1", "round2"):
            raise SystemExit(f"--protocol must be round1 or round2, got {proto!r}")
        args = args[:i] + args[i + 2:]
        if proto == "round2":
            import bench_alignment_llm_round2

            return bench_alignment_llm_round2.main(args)
    argv = args
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="small")
    ap.add_argument("--work", default=None, help="run directory (cached records; default runs/bench_alignment_llm_<profile>)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_alignment_llm_<profile>.json)")
    ap.add_argument("--workers", type=int, default=None, help="parallel runs (default: the profile's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--seeds", type=int, default=None, help="use only the first N seeds of the profile")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory's cached records first")
    ap.add_argument("--posthoc", action="store_true", help="also run the post-hoc variants (see the docstring)")
    a = ap.parse_args(argv)
    prof = dict(PROFILES[a.profile])
    if a.seeds is not None:
        if a.seeds < 1:
            ap.error("--seeds must be >= 1")
        prof["seeds"] = prof["seeds"][:a.seeds]
        prof["sweep_seeds"] = [s for s in prof["sweep_seeds"] if s in prof["seeds"]]
    work = a.work or str(ROOT / "runs" / f"bench_alignment_llm_{a.profile}")
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_alignment_llm_{a.profile}.json")
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    workers = a.workers or prof["workers"]
    head = commit()
    jobs = [dict(j, commit=head) for j in plan(prof, a.posthoc)]
    t0 = time.time()
    records = run_jobs(jobs, run_job, (prof, work), os.path.join(work, "records"), workers, _init_worker, (a.threads,))
    wall = time.time() - t0
    meta = {str(r["seed"]): r["meta"] for r in records.values() if r.get("kind") == "prepare"}
    runs = [r for k, r in sorted(records.items()) if "evals" in r and k == r["key"]]
    analysis = analyse({r["key"]: r for r in runs}, prof, {int(k): v for k, v in meta.items()})
    result = dict(benchmark="bench_alignment_llm", profile=a.profile, profile_config=prof, device=device_name(),
                  versions=versions(), commit=head, run_commits=sorted({str(r.get("commit")) for r in runs}), workers=workers, threads_per_worker=a.threads,
                  wall_seconds_this_invocation=wall, meta=meta, analysis=analysis, records=runs,
                  command="python benchmarks/bench_alignment_llm.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, prof, out[:-5] + ".png" if out.endswith(".json") else out + ".png")
    for field, key in (("reward", "verdict"), ("reward_last", "verdict_last_checkpoint")):
        print(markdown(result, prof, field))
        print(f"\n{key} (aihf vs the best baseline, paired over seeds):")
        for v in analysis[key]["rows"]:
            extra = f", beats all by >= 20% gap: {v['beats_all_by_20pct_gap']}" if "beats_all_by_20pct_gap" in v else ""
            print(f"  design {v['design']} {v['budget']:>5} pairs {v['method']:<12} {v['aihf_reward']:.2f} vs "
                  f"{v['best_baseline']} {v['best_reward']:.2f}: diff {v['diff']:+.2f} +- {v['diff_ci95']:.2f}{extra}")
        print(f"goal: {json.dumps(analysis[key]['goal'])}")
    print(f"[bench] wrote {out} ({wall:.0f}s)")
    return result


if __name__ == "__main__":
    main()
