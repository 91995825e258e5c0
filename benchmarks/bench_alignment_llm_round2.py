"""Alignment quality on the known-reward LLM task, round two: every method tuned the same way, the
reward-model + RL forms included (``python benchmarks/bench_alignment_llm.py --protocol round2``
runs this; round one's protocol and results are unchanged). Every run is ``aihf_fast.train.llm``;
the task, base model and base-sample pairs are made as in round one (``bench_alignment_llm``).

    python benchmarks/bench_alignment_llm_round2.py --profile small --stage tune    # a slice
    python benchmarks/bench_alignment_llm_round2.py --profile small --analyse-only  # tables from the records
    python benchmarks/bench_alignment_llm_round2.py --profile small --records-from \
        benchmarks/results/bench_alignment_llm_round2_small.json --stage tune       # go on, on another machine

Protocol (fixed before any result was seen; the profiles only change sizes)
--------------------------------------------------------------------------
Seeds: tuning 300, 301; final 20-24 (fresh: no round-one, tuning or exploration run used them),
paired (same task, base model, pairs, evaluation sample seed). Designs A and B, 2000
demonstrations; preference budgets {0, 25, 100, 400, 1600}, nested base-sample pairs labelled by a
Bradley-Terry draw on the true reward (temperature 1); a low-quality arm at {100, 400} pairs: the
same pairs with 20% of the labels flipped (one in each block of 5 consecutive pairs, drawn per
seed: exactly 20% of every budget, nested, the same positions for base and SFT-anchor pairs;
held-out pairs of that arm flipped the same way).
Held out, never trained on: 200 demonstrations, 200 pairs (selection), 256 evaluation prompts.
Methods (14), each ``steps`` optimiser steps of the policy from its start (pipelines that start
from the SFT anchor also had the anchor's steps; wall-clock of the whole pipeline is reported):
    base          the base model (0 steps)
    sft           NLL on the demonstrations
    dpo, ipo      on the pairs, reference = base
    rpo           DPO + 1.0 * NLL on the chosen answers
    dpo_nll       DPO + 1.0 * NLL on the demonstrations
    sft_then_dpo  DPO on pairs sampled from the SFT anchor (labelled the same way), from and
                  referenced to the SFT anchor
    spin          demonstration vs own sample, moving reference
    aihf          pairs + (demonstration vs own sample) + 0.1 NLL, fixed reference, samples
                  refreshed every 50 steps
    aihf_moving   the same, moving (self-play) reference
    aihf_fresh    the same, fresh own samples every step
    rlhf          a reward model on the pairs (the fixed recipe below), then RLOO from the SFT anchor
    aihf_rm       the paper's loop from the SFT anchor: per outer iteration own samples -> reward-model
                  steps on pairs + (demonstration > own sample) -> RLOO steps
    rm_once       ablation: a reward model fitted once on the pairs + (demonstration > SFT-anchor
                  sample) pairs (the fixed recipe), then RLOO from the SFT anchor
  At 0 pairs: base, sft, spin, the aihf forms, aihf_rm and rm_once (their demonstration terms
  alone); dpo, ipo, rpo, dpo_nll, sft_then_dpo and rlhf need pairs.
  SFT anchor: per seed and design, sft with its tuned configuration (its last step).
  Reward-model recipe (rlhf, rm_once; aihf_rm's reward steps use the same lr): ``rm_steps_once``
  steps, lr 3e-4, 16 pairs per step. RL: RLOO, 4 samples per prompt, ``prompts_per_batch``
  prompts per step; aihf_rm 20 reward steps per 20 RL steps.
Equal tuning: 6 configurations per method (``configs``), on the tuning seeds, design A, 100 pairs
(the methods without pairs at 0), clean labels:
    sft                           lr {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3}
    dpo ipo rpo dpo_nll sft_then_dpo spin
                                  lr {1e-5, 1e-4, 1e-3} x beta {0.1, 0.5}
    aihf aihf_moving aihf_fresh   lr {1e-5, 1e-4, 1e-3} x weights {data-size rule: w_P = 2|P|/(|P|+|D|),
                                  w_D = 2|D|/(|P|+|D|); the paper's w_P = w_D = 1}, beta 0.1
    rlhf aihf_rm rm_once          RL lr {1e-5, 1e-4, 1e-3} x kl_coef {0.05, 0.2}
  base has nothing to tune.
Selection (never reads the true reward; the same rule for every method of a kind), for the
checkpoint (every ``eval_every`` steps and step 0) and the configuration (the best mean over the
tuning seeds of the signal at each run's selected checkpoint, the signal with its tie-break,
compared in that order, means to 6 decimals; ties: the earlier configuration in the grid's order; a run whose numbers
become non-finite ranks last), used for every budget,
design and arm: runs trained on pairs take the highest held-out preference accuracy of the implicit reward
log pi - log pi_anchor (anchor: the model the method is regularised toward, base, or the SFT
anchor for sft_then_dpo, rlhf, aihf_rm, rm_once; ties: the lower held-out demonstration NLL, then
the earlier step); runs without pairs the lowest held-out demonstration NLL (ties: the earlier).
Metrics per checkpoint: mean true reward of 2 samples (temperature 1) per held-out prompt; KL to
the anchor (Monte-Carlo, nats per sequence); the learned reward's pair accuracy on those own
samples (implicit log pi - log pi_anchor, or the reward model), the paper's mechanism; held-out
preference accuracy and demonstration NLL; wall-clock of each run and of each pipeline.
Reported: the selected checkpoint (primary), the last and the best (oracle) checkpoints
(secondary, labelled), the reward-vs-KL frontier per method.
Verdict (the goal), primary on ``aihf`` and, the paper's headline form, on ``aihf_rm``: at every
budget and design, >= the best tuned baseline (the other 12 methods minus the AIHF forms; the
best chosen by its true reward, which favours the baselines) within paired noise (upper end of
the paired 95% t-interval >= 0), and at 25 pairs > every baseline by >= 20% of the base-to-expert
gap (expert: the mean true reward of the demonstrations). aihf_moving, aihf_fresh and rm_once are
reported as variants; the low-quality arm as a secondary table.
Outputs: benchmarks/results/bench_alignment_llm_round2_<profile>.json + .png (commit, device and
threads per record; versions per result). Runs are records under ``--work``: rerunning continues;
slices by ``--stage`` (``tune``: up to the tuning runs) and ``--designs``.
Compute (small profile): 156 tuning runs, 12 SFT anchors, 134 reward-model fits (200 steps; those
of rm_once also sample the SFT anchor), 740 final runs; round one's 150-step runs
took 16-36 s each on a 2-core CPU with 2 workers, so about 1 minute per 300-step run (the RL ones
longer): 8-15 hours on that machine, 1-2 hours on 16 cores, in slices.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("aihf_fast") is None:  # a source checkout that was not installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_alignment_llm as round1  # noqa: E402
from common import (  # noqa: E402
    _made_records,
    check_grid,
    ci95,
    commit,
    cpu_name,
    device_name,
    files_digest,
    grid_arguments,
    lock_records,
    mean_signal,
    read_records,
    remake_inputs_first,
    restore_records,
    run_jobs,
    save_grid_result,
    saved_records,
    versions,
)

PROFILES = {
    "tiny": dict(tune_seeds=[300], final_seeds=[20], designs=["A"], budgets=[0, 8], tune_budget=8, noisy_budgets=[8],
                 num_demos=16, val_demos=8, val_pairs=8, num_base=64, base_steps=4, base_batch=16, steps=2,
                 eval_every=1, eval_prompts=4, pairs_per_batch=4, demos_per_batch=4, prompts_per_batch=2,
                 rm_steps_once=2, aihf_rm_rm_steps=1, aihf_rm_rl_steps=1, configs=2, model=round1.TINY_MODEL,
                 base_lr=1e-3, workers=1),
    "small": dict(tune_seeds=[300, 301], final_seeds=[20, 21, 22, 23, 24], designs=["A", "B"],
                  budgets=[0, 25, 100, 400, 1600], tune_budget=100, noisy_budgets=[100, 400], num_demos=2000,
                  val_demos=200, val_pairs=200, num_base=20000, base_steps=400, base_batch=128, steps=300,
                  eval_every=50, eval_prompts=256, pairs_per_batch=16, demos_per_batch=16, prompts_per_batch=16,
                  rm_steps_once=200, aihf_rm_rm_steps=20, aihf_rm_rl_steps=20, configs=6, model={}, base_lr=1e-3,
                  workers=2),
}
METHODS = ("base", "sft", "dpo", "ipo", "rpo", "dpo_nll", "sft_then_dpo", "spin", "aihf", "aihf_moving", "aihf_fresh",
           "rlhf", "aihf_rm", "rm_once")
AIHF_FORMS = ("aihf", "aihf_moving", "aihf_fresh", "aihf_rm", "rm_once")
BASELINES = tuple(m for m in METHODS if m not in AIHF_FORMS)
NEEDS_PAIRS = ("dpo", "ipo", "rpo", "dpo_nll", "sft_then_dpo", "rlhf")
FROM_SFT = ("sft_then_dpo", "rlhf", "aihf_rm", "rm_once")  # start from, and are anchored to, the SFT anchor
RM_ONCE = ("rlhf", "rm_once")  # a reward model fitted before RL (one per seed, design, budget and arm)
RL = ("rlhf", "aihf_rm", "rm_once")
LABEL_NOISE = 0.2
BETA_LRS = [dict(lr=lr, beta=b) for lr in (1e-5, 1e-4, 1e-3) for b in (0.1, 0.5)]
GRIDS = {
    "sft": [dict(lr=lr) for lr in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)],
    **{m: BETA_LRS for m in ("dpo", "ipo", "rpo", "dpo_nll", "sft_then_dpo", "spin")},
    **{m: [dict(lr=lr, weights=w) for lr in (1e-5, 1e-4, 1e-3) for w in ("rule", "paper")]
       for m in ("aihf", "aihf_moving", "aihf_fresh")},
    **{m: [dict(lr=lr, kl_coef=k) for lr in (1e-5, 1e-4, 1e-3) for k in (0.05, 0.2)] for m in RL},
}


def grid(method: str, prof: dict) -> list[dict]:
    """The method's configurations (the profile may keep fewer, evenly spread, for a smoke test)."""
    g = GRIDS.get(method, [{}])
    if len(g) <= prof["configs"]:
        return g
    return [g[i] for i in np.linspace(0, len(g) - 1, prof["configs"]).round().astype(int)]


def method_options(method: str, config: dict, num_pairs: int, num_demos: int, prof: dict) -> dict:
    """Trainer options of a method at a configuration (beyond the shared ones)."""
    c = dict(config)
    weights = c.pop("weights", None)
    if weights is not None:
        wP, wD = round1.rule_weights(num_pairs, num_demos) if weights == "rule" else (1.0, 1.0)
        c.update(w_P=wP, w_D=wD)
    aihf = dict(method="aihf", nll_weight=0.1, reference="fixed", beta=0.1)
    rl = dict(prompts_per_batch=prof["prompts_per_batch"], rloo_k=4)
    return {
        "base": dict(method="sft", steps=0),
        "sft": dict(method="sft"),
        "dpo": dict(method="dpo"),
        "ipo": dict(method="ipo"),
        "rpo": dict(method="rpo", nll_weight=1.0),
        "dpo_nll": dict(method="aihf", w_P=1.0, w_D=0.0, nll_weight=1.0),
        "sft_then_dpo": dict(method="dpo"),
        "spin": dict(method="spin", reference="moving"),
        "aihf": aihf,
        "aihf_moving": dict(aihf, reference="moving"),
        "aihf_fresh": dict(aihf, refresh_every=1),
        "rlhf": dict(rl, method="rlhf"),
        "aihf_rm": dict(rl, method="aihf_rm", rm_lr=3e-4, rm_steps=prof["aihf_rm_rm_steps"],
                        rl_steps=prof["aihf_rm_rl_steps"], w_P=1.0 if num_pairs else 0.0, w_D=1.0),
        "rm_once": dict(rl, method="rlhf"),
    }[method] | c


# ---------------------------------------------------------------------------------------------- jobs
def run_key(stage, seed, design, method, budget, arm="clean", config=None):
    return f"{stage}-s{seed}-{design}-{method}-p{budget}-{arm}" + ("" if config is None else f"-c{config}")


def plan(prof: dict) -> list[dict]:
    """prepare (task, base model, pairs) per seed -> sft tuning -> SFT anchor per seed and design
    (and its sample pairs) -> the other methods' tuning -> the final runs."""
    jobs = []
    tune_keys = {}
    for s in [*prof["tune_seeds"], *prof["final_seeds"]]:
        jobs.append(dict(kind="prepare", key=f"prepare-s{s}", deps=[], seed=s, cost=20))
    for m in METHODS[1:]:  # base has nothing to tune
        b = tune_budget(m, prof)
        tune_keys[m] = [run_key("tune", s, "A", m, b, config=c) for c in range(len(grid(m, prof)))
                        for s in prof["tune_seeds"]]
    for s in [*prof["tune_seeds"], *prof["final_seeds"]]:
        for d in (["A"] if s in prof["tune_seeds"] else prof["designs"]):
            jobs.append(dict(kind="anchor", key=f"anchor-s{s}-{d}", deps=[f"prepare-s{s}", *tune_keys["sft"]], seed=s,
                             design=d, cost=10))
    rms = set()

    def rm_dep(m, s, d, b, arm):  # rlhf / rm_once: their reward model, fitted once for every configuration
        if m not in RM_ONCE:
            return []
        key = rm_key(m, s, d, b, arm)
        if key not in rms:
            rms.add(key)
            jobs.append(dict(kind="rm", stage="tune" if s in prof["tune_seeds"] else "final", key=key,
                             deps=[f"prepare-s{s}", f"anchor-s{s}-{d}"], seed=s, design=d, method=m, budget=b,
                             arm=arm, cost=8))
        return [key]

    for m in METHODS[1:]:
        b = tune_budget(m, prof)
        for c in range(len(grid(m, prof))):
            for s in prof["tune_seeds"]:
                deps = [f"prepare-s{s}"] + ([f"anchor-s{s}-A"] if m in FROM_SFT else []) + rm_dep(m, s, "A", b, "clean")
                jobs.append(dict(kind="run", stage="tune", key=run_key("tune", s, "A", m, b, config=c), deps=deps,
                                 seed=s, design="A", method=m, budget=b, arm="clean", config=c, cost=_cost(m)))
    for s in prof["final_seeds"]:
        for d in prof["designs"]:
            for m in METHODS:
                for b, arm in final_cells(m, prof):
                    deps = [f"prepare-s{s}", f"anchor-s{s}-{d}", *tune_keys.get(m, []), *rm_dep(m, s, d, b, arm)]
                    jobs.append(dict(kind="run", stage="final", key=run_key("final", s, d, m, b, arm), deps=deps,
                                     seed=s, design=d, method=m, budget=b, arm=arm, cost=_cost(m)))
    for j in jobs:  # the data of the final seeds belongs to the final stage (a --stage tune slice skips it)
        if j["kind"] in ("prepare", "anchor"):
            j["stage"] = "tune" if j["seed"] in prof["tune_seeds"] else "final"
    return jobs


def final_cells(method: str, prof: dict) -> list[tuple[int, str]]:
    """(budget, arm) of a method's final runs: no 0-pair run for the methods that need pairs, one
    0-pair run standing for every budget for those that use none."""
    cells = [(b, "clean") for b in prof["budgets"]] + [(b, "noisy") for b in prof["noisy_budgets"]]
    return [(b, arm) for b, arm in cells
            if not ((method in NEEDS_PAIRS and b == 0) or (method in ("base", "sft", "spin") and b > 0))]


def rm_key(method, seed, design, budget, arm):
    return f"rm-{method}-s{seed}-{design}-p{budget}-{arm}"


def tune_budget(method: str, prof: dict) -> int:
    """The budget a method is tuned at: the profile's, or 0 for the methods that use no pairs."""
    return 0 if method in ("sft", "spin") else prof["tune_budget"]


def _cost(m):
    return {"base": 1, "sft": 2}.get(m, 12 if m in RL else 5)


def _init_worker(threads: int):
    round1._init_worker(threads)


def _made_on() -> dict:
    """Where a record was made: the device, the CPU model and the threads of its process (each can
    change the last bits of a run, so paired runs from different machines can be told apart)."""
    import torch

    return dict(device=device_name(), cpu=cpu_name(), threads=torch.get_num_threads())


def _input_fingerprint(rec: dict) -> tuple:
    """What must match when an input (prepare, anchor, reward model) is remade: its statistics and
    the digest of its files."""
    return rec.get("meta"), rec.get("digest")


def _flip(rows: list, rate: float, seed: int) -> list:
    """The low-quality arm: one label flipped in each block of 1/``rate`` consecutive pairs (which
    one: a fixed draw from ``seed``), so every nested budget that is a multiple of 1/rate has
    exactly ``rate`` of its labels flipped, at the same positions for every pair source of a seed."""
    k = round(1 / rate) if rate > 0 else 0
    if k < 2 or abs(k * rate - 1) > 1e-9:
        raise ValueError(f"rate: expected 1/k for an integer k >= 2, got {rate}")
    pick = np.random.default_rng(seed).integers(0, k, size=-(-len(rows) // k))
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i % k == pick[i // k] else r
            for i, r in enumerate(rows)]


def job_prepare(job, prof, work):
    """Round one's task files, base model and base-sample pairs (held-out and nested budgets), plus
    the low-quality arm's files; the SFT-anchor pairs are made by the anchor jobs."""
    p1 = dict(prof, budgets=sorted({*prof["budgets"], prof["tune_budget"]}), ratio_demos=[], seeds=[job["seed"]])
    rec = round1.job_prepare(job, p1, work)
    p = round1._paths(work, job["seed"])
    for name, seed in [("prefs_base_val", 31_000), *((f"prefs_base_{b}", 30_000) for b in prof["noisy_budgets"])]:
        rows = round1._read_jsonl(os.path.join(p["dir"], name + ".jsonl"))  # held out: its own draws
        round1._write_jsonl(os.path.join(p["dir"], name + "_noisy.jsonl"), _flip(rows, LABEL_NOISE, seed + job["seed"]))
    return dict(rec, digest=files_digest(p["dir"], ["task_*/*.jsonl", "prefs_base_*.jsonl", "base/model/*.safetensors"]))


def select(evals: list, uses_pairs: bool) -> dict:
    """The reported checkpoint (the protocol's rule, never the true reward)."""
    if uses_pairs:
        return max(evals, key=lambda e: (e["eval/pref_accuracy"], -e["eval/demo_nll"], -e["step"]))
    return min(evals, key=lambda e: (e["eval/demo_nll"], e["step"]))


def signal(rec: dict) -> tuple:
    """A run's selection signal at its selected checkpoint: larger is better (a run that diverged
    is the worst)."""
    if rec.get("diverged") or not rec["evals"]:
        return (-np.inf, -np.inf) if rec["uses_pairs"] else (-np.inf,)
    e = select(rec["evals"], rec["uses_pairs"])
    sig = (e["eval/pref_accuracy"], -e["eval/demo_nll"]) if rec["uses_pairs"] else (-e["eval/demo_nll"],)
    return tuple(float(v) if np.isfinite(v) else -np.inf for v in sig)  # a diverged run is the worst


def choose(records: dict, method: str, prof: dict) -> dict:
    """The tuned configuration of a method: the best mean signal over the tuning seeds."""
    b = tune_budget(method, prof)
    best = None
    for c, opts in enumerate(grid(method, prof)):
        recs = [records[run_key("tune", s, "A", method, b, config=c)] for s in prof["tune_seeds"]]
        ran = next((r["chosen"]["options"] for r in recs if r["chosen"]["options"] != opts), None)
        if ran is not None:
            raise SystemExit(f"tuning records of {method} configuration {c} ran {ran}, but the grid's configuration {c} "
                             f"is now {opts}: the grid changed since they were made; use a new --work")
        mean = mean_signal(map(signal, recs))
        if best is None or mean > best["signal"]:
            best = dict(config=c, options=opts, signal=mean)
    return dict(best, signal=list(best["signal"]))



def _tuning_records(work, method, prof):
    b = tune_budget(method, prof)
    return read_records(os.path.join(work, "records"), [run_key("tune", s, "A", method, b, config=c)
                                                    for c in range(len(grid(method, prof))) for s in prof["tune_seeds"]])


def job_anchor(job, prof, work, head):
    """The SFT anchor of (seed, design): sft with its tuned configuration, saved, and its own
    sample pairs for sft_then_dpo (labelled as the base-sample pairs, nested budgets)."""
    s, d = job["seed"], job["design"]
    p = round1._paths(work, s)
    chosen = choose(_tuning_records(work, "sft", prof), "sft", prof)
    out = os.path.join(p["dir"], f"anchor_{d}")
    opts = _options(prof, s, d, work, "sft", chosen["options"], 0, "clean")
    opts.update(output_dir=out, save_model=True, eval_every=0)
    summary, wall = _train_input(opts, f"the SFT anchor of seed {s}, design {d}")
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    prompts = [r["prompt"] for r in round1._read_jsonl(os.path.join(p["dir"], "task_A", "prefs.jsonl"))]
    n = max(prof["budgets"] + [prof["tune_budget"]])
    rows = round1._sample_pairs(os.path.join(out, "model"), p["tok"], prompts[:n], s + 500, rng_seed=20_000 + s)
    for b in {*prof["budgets"], prof["tune_budget"]} - {0}:
        round1._write_jsonl(os.path.join(p["dir"], f"prefs_anchor_{d}_{b}.jsonl"), rows[:b])
    for b in prof["noisy_budgets"]:
        round1._write_jsonl(os.path.join(p["dir"], f"prefs_anchor_{d}_{b}_noisy.jsonl"),
                            _flip(rows[:b], LABEL_NOISE, 30_000 + s))  # the base pairs' positions
    return dict(kind="anchor", key=job["key"], seed=s, design=d, chosen=chosen, wall_seconds=wall, commit=head,
                made_on=_made_on(),
                digest=files_digest(p["dir"], [f"anchor_{d}/model/*.safetensors", f"prefs_anchor_{d}_*.jsonl"]))


def _options(prof, seed, design, work, method, config, budget, arm):
    """All trainer options of one run of the protocol."""
    p = round1._paths(work, seed)
    task = os.path.join(p["dir"], f"task_{design}")
    anchor = os.path.join(p["dir"], f"anchor_{design}", "model")
    noisy = "_noisy" if arm == "noisy" else ""
    ref = anchor if method in FROM_SFT else p["base"]
    opts = dict(tokenizer=p["tok"], eval_prompts=p["eval_prompts"], eval_reward="aihf_fast.data.synthetic:true_reward",
                eval_kl=True, eval_samples_per_prompt=2, eval_demonstrations=os.path.join(task, "demos_val.jsonl"),
                eval_preferences=os.path.join(p["dir"], f"prefs_base_val{noisy}.jsonl"), eval_reference=ref,
                model=ref, demonstrations=os.path.join(task, f"demos_{prof['num_demos']}.jsonl"), max_new_tokens=9,
                max_length=24, gen_batch_size=512, steps=prof["steps"], eval_every=prof["eval_every"],
                pairs_per_batch=prof["pairs_per_batch"], demos_per_batch=prof["demos_per_batch"], refresh_every=50,
                seed=seed, overwrite=True, progress=False, save_model=False, log_every=max(1, prof["steps"] // 10))
    opts.update(method_options(method, config, budget, prof["num_demos"], prof))
    if budget:
        src = f"prefs_anchor_{design}" if method == "sft_then_dpo" else "prefs_base"
        opts["preferences"] = os.path.join(p["dir"], f"{src}_{budget}{noisy}.jsonl")
    return opts


def _train_input(opts, what):
    """``round1._train`` for an input other runs are made from (an SFT anchor, a reward model). The
    protocol has no rule for such an input diverging: it stops the grid, saying so (a rerun repeats
    it, seeded)."""
    from aihf_fast.train.llm import Diverged

    try:
        return round1._train(opts)
    except Diverged as e:
        raise RuntimeError(f"{what} diverged ({e}); the runs made from it cannot be made, and rerunning repeats it: "
                           "the protocol has no rule for this case, one must be added (post hoc) before going on") from e


def _fit_reward_model(opts, out, prof, sample_policy=None):
    """The fixed reward-model recipe -> the trained reward model's directory and its wall-clock."""
    rm = {k: opts[k] for k in ("tokenizer", "demonstrations", "preferences", "max_new_tokens", "max_length",
                               "gen_batch_size", "seed", "model") if opts.get(k) is not None}
    rm.update(method="rm", steps=prof["rm_steps_once"], lr=3e-4, pairs_per_batch=16, demos_per_batch=16,
              eval_preferences=opts["eval_preferences"], output_dir=out, overwrite=True, progress=False,
              save_model=True, eval_every=0)
    if sample_policy is None:
        rm.pop("demonstrations", None)
    else:
        rm.update(sample_policy=sample_policy, w_P=1.0 if rm.get("preferences") else 0.0, w_D=1.0)
    summary, wall = _train_input(rm, f"the reward model in {out}")
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return summary["model_dir"], wall, summary["evals"][-1]


def _rm_dir(work, m, s, d, b, arm):
    return os.path.join(round1._paths(work, s)["dir"], rm_key(m, s, d, b, arm))


def job_rm(job, prof, work, head):
    """The reward model of rlhf (pairs) or rm_once (pairs + demonstration > SFT-anchor sample),
    shared by every configuration of its seed, design, budget and arm."""
    s, d, m, b, arm = job["seed"], job["design"], job["method"], job["budget"], job["arm"]
    opts = _options(prof, s, d, work, m, {}, b, arm)
    model_dir, wall, ev = _fit_reward_model(opts, _rm_dir(work, m, s, d, b, arm), prof,
                                            opts["model"] if m == "rm_once" else None)
    return dict(kind="rm", key=job["key"], seed=s, design=d, method=m, budget=b, arm=arm, model_dir=model_dir,
                wall_seconds=wall, eval=ev, commit=head, made_on=_made_on(),
                digest=files_digest(model_dir, ["*.safetensors"]))


def _train_or_diverge(opts):
    """(summary, wall, diverged): a run whose numbers stop being finite during its steps stops with
    ``aihf_fast.train.llm.Diverged``; it is recorded with the evaluations it logged before (the
    selection ranks it last). Anything else (a start model that is not finite, say) is a failure
    to fix (and rerun)."""
    from aihf_fast.train.llm import Diverged

    t0 = time.time()
    try:
        summary, wall = round1._train(opts)
        return summary, wall, False
    except Diverged as e:
        log = os.path.join(opts["output_dir"], "log.jsonl")
        evals = [r for r in round1._read_jsonl(log) if "eval/reward" in r] if os.path.isfile(log) else []
        return dict(evals=evals, train_seconds=time.time() - t0, generation_seconds=None,
                    error=f"{type(e).__name__}: {str(e)[:200]}"), time.time() - t0, True


def job_run(job, prof, work, head):
    s, d, m, b, arm = job["seed"], job["design"], job["method"], job["budget"], job["arm"]
    if job["stage"] == "tune":
        chosen = dict(config=job["config"], options=grid(m, prof)[job["config"]])
    elif m == "base":
        chosen = dict(config=None, options={})
    else:
        chosen = choose(_tuning_records(work, m, prof), m, prof)
    opts = _options(prof, s, d, work, m, chosen["options"], b, arm)
    out = os.path.join(work, "runs", job["key"])
    opts["output_dir"] = out
    pre_wall, rm_eval = 0.0, None
    if m in RM_ONCE:  # the shared reward model (its fit counted in every run's pipeline time)
        rm = read_records(os.path.join(work, "records"), [rm_key(m, s, d, b, arm)])[rm_key(m, s, d, b, arm)]
        opts["reward_model"] = os.path.join(_rm_dir(work, m, s, d, b, arm), "model")  # in this --work, wherever it is
        if files_digest(opts["reward_model"], ["*.safetensors"]) != rm.get("digest"):
            raise SystemExit(f"the reward model in {opts['reward_model']} is not the one its record "
                             f"{rm['key']} describes: delete that record (it is refitted) and rerun")
        pre_wall, rm_eval = rm["wall_seconds"], rm["eval"]
    summary, wall, diverged = _train_or_diverge(opts)
    shutil.rmtree(out, ignore_errors=True)
    uses_pairs = b > 0
    return dict(kind="run", key=job["key"], stage=job["stage"], seed=s, design=d, method=m, budget=b, arm=arm,
                chosen=chosen, uses_pairs=uses_pairs, evals=summary["evals"], diverged=diverged,
                error=summary.get("error"), wall_seconds=wall + pre_wall,
                reward_model_seconds=pre_wall, reward_model_eval=rm_eval, train_seconds=summary["train_seconds"],
                generation_seconds=summary["generation_seconds"], commit=head, made_on=_made_on(),
                packed=summary.get("packed"),
                options={k: opts.get(k) for k in ("method", "lr", "beta", "w_P", "w_D", "nll_weight", "reference",
                                                  "kl_coef", "refresh_every")})


def run_job(job, prof, work, head):
    if job["kind"] == "prepare":
        return dict(job_prepare(job, prof, work), commit=head, made_on=_made_on())
    if job["kind"] == "anchor":
        return job_anchor(job, prof, work, head)
    if job["kind"] == "rm":
        return job_rm(job, prof, work, head)
    return job_run(job, prof, work, head)


# ---------------------------------------------------------------------------------------------- analysis
_OWN = ("eval/implicit_pair_accuracy", "eval/rm_pair_accuracy")


def _point(rec):
    sel, last = select(rec["evals"], rec["uses_pairs"]), rec["evals"][-1]
    best = max(rec["evals"], key=lambda e: e["eval/reward"])
    own = lambda e: next((e[k] for k in _OWN if k in e), None)  # noqa: E731
    return dict(reward=sel["eval/reward"], kl=sel["eval/kl"], step=sel["step"], own_accuracy=own(sel),
                diverged=bool(rec.get("diverged")),  # then "last" is its last evaluation before it diverged
                reward_last=last["eval/reward"], kl_last=last["eval/kl"], reward_best=best["eval/reward"],
                pref_accuracy=sel["eval/pref_accuracy"], demo_nll=sel["eval/demo_nll"], wall=rec["wall_seconds"],
                curve=[[e["step"], e["eval/reward"], e["eval/kl"], own(e)] for e in rec["evals"]])


def analyse(records: dict, prof: dict) -> dict:
    meta = {r["seed"]: r["meta"] for r in records.values() if r.get("kind") == "prepare"}
    anchors = {(r["seed"], r["design"]): r["wall_seconds"] for r in records.values() if r.get("kind") == "anchor"}
    # a final run that diverged before its first evaluation has no point: its cell stays incomplete
    runs = [r for r in records.values() if r.get("kind") == "run" and r["stage"] == "final" and r["evals"]]
    cells = {}
    for r in runs:
        budgets = prof["budgets"] if r["method"] in ("base", "sft", "spin") else [r["budget"]]
        for b in budgets:
            pt = _point(r)
            pt["wall_pipeline"] = pt["wall"] + (anchors.get((r["seed"], r["design"]), float("nan"))
                                                if r["method"] in FROM_SFT else 0.0)
            cells.setdefault((r["arm"], r["design"], r["method"], b), {})[r["seed"]] = pt
    table = []
    for (arm, d, m, b), per in sorted(cells.items()):
        seeds = sorted(per)
        row = dict(arm=arm, design=d, method=m, budget=b, seeds=seeds, per_seed=[per[s] for s in seeds],
                   diverged_seeds=[s for s in seeds if per[s]["diverged"]])
        for f in ("reward", "kl", "reward_last", "kl_last", "reward_best", "pref_accuracy", "demo_nll", "wall",
                  "wall_pipeline"):
            v = [per[s][f] for s in seeds]
            row[f], row[f + "_ci95"] = float(np.mean(v)), ci95(v)
        own = [per[s]["own_accuracy"] for s in seeds if per[s]["own_accuracy"] is not None]
        row["own_accuracy"] = float(np.mean(own)) if own else None
        table.append(row)
    chosen = {m: next((r["chosen"] for r in runs if r["method"] == m), None) for m in METHODS}
    odd = next((r for r in runs if r["chosen"] != chosen[r["method"]]), None)
    if odd is not None:  # every final run of a method runs its one tuned configuration
        raise SystemExit(f"final runs of {odd['method']} ran more than one configuration ({odd['chosen']} in "
                         f"{odd['key']}, {chosen[odd['method']]} elsewhere): their tuning records changed")
    ran = {m: {c["config"]} for m, c in chosen.items() if c and c.get("config") is not None}
    for r in records.values():  # the SFT anchors run sft's tuned configuration too
        if r.get("kind") == "anchor":
            ran.setdefault("sft", set()).add(r["chosen"].get("config"))
    for m, configs in sorted(ran.items()):  # ... the one its tuning records pick now
        keys = [run_key("tune", s, "A", m, tune_budget(m, prof), config=c) for c in range(len(grid(m, prof)))
                for s in prof["tune_seeds"]]
        if all(k in records for k in keys) and configs != {choose(records, m, prof)["config"]}:
            raise SystemExit(f"final runs (or SFT anchors) of {m} ran configuration(s) {sorted(configs)}, but its "
                             "tuning records pick another: the tuning records changed after those were made; redo them")
    out = dict(table=table, chosen=chosen)
    for field, name in (("reward", "verdict"), ("reward_last", "verdict_last_checkpoint"),
                        ("reward_best", "verdict_best_checkpoint_oracle")):
        out[name] = {arm: _verdict(table, prof, meta, field, arm) for arm in ("clean", "noisy")}
    return out


def _verdict(table, prof, meta, field, arm):
    main = {(r["design"], r["method"], r["budget"]): r for r in table if r["arm"] in (arm, "clean")
            and (r["arm"] == arm or r["method"] in ("base", "sft", "spin"))}
    budgets = prof["budgets"] if arm == "clean" else prof["noisy_budgets"]
    smallest = min([b for b in prof["budgets"] if b > 0], default=None)
    rows, missing = [], []
    for d in prof["designs"]:
        base = main.get((d, "base", budgets[0]))
        if base is None:
            continue
        gap = float(np.mean([meta[s][d]["expert_data_reward"] for s in base["seeds"]])) - base[field]
        for form in ("aihf", "aihf_rm"):
            for b in budgets:
                a = main.get((d, form, b))
                rivals = [main[(d, m, b)] for m in BASELINES if (d, m, b) in main]
                expected_rivals = [m for m in BASELINES if b > 0 or m not in NEEDS_PAIRS]
                if a is None or not rivals:
                    missing.append(f"{d}/{form}/{b}")
                    continue
                n = len(prof["final_seeds"])
                complete = len(a["seeds"]) == n and all(
                    (d, m, b) in main and len(set(main[(d, m, b)]["seeds"]) & set(a["seeds"])) == n for m in expected_rivals)
                diffs = {}
                for r in rivals:
                    common = [s for s in a["seeds"] if s in r["seeds"]]
                    x = [a["per_seed"][a["seeds"].index(s)][field] - r["per_seed"][r["seeds"].index(s)][field]
                         for s in common]
                    diffs[r["method"]] = (float(np.mean(x)), ci95(x))
                best = max(rivals, key=lambda r: r[field])
                dm, dc = diffs[best["method"]]
                row = dict(design=d, method=form, budget=b, best_baseline=best["method"], best_reward=best[field],
                           aihf_reward=a[field], diff=dm, diff_ci95=dc, gap=gap, diffs=diffs, seeds=len(a["seeds"]),
                           rivals=[r["method"] for r in rivals],
                           diverged_seeds={r["method"]: r["diverged_seeds"] for r in [a, *rivals] if r["diverged_seeds"]},
                           # every expected baseline there, each with every final seed, paired
                           complete=complete,
                           # the paired test needs an interval (>= 2 seeds)
                           at_least_as_good=bool(dm + dc >= 0) if np.isfinite(dc) else None)
                if b == smallest:
                    row["beats_all_by_20pct_gap"] = bool(all(v[0] >= 0.2 * gap for v in diffs.values()))
                rows.append(row)
    # the goal is stated only on the whole grid (every design and budget, every final seed)
    expected = len(prof["designs"]) * len(budgets)
    goal = {f: dict(at_least_as_good_everywhere=all(r["at_least_as_good"] for r in rows if r["method"] == f),
                    beats_all_by_20pct_at_smallest=all(r.get("beats_all_by_20pct_gap", True)
                                                       for r in rows if r["method"] == f))
            if sum(r["method"] == f and r["complete"] for r in rows) == expected
            else dict(incomplete=f"{sum(r['method'] == f and r['complete'] for r in rows)} of {expected} cells have "
                                 "it and every baseline at every final seed")
            for f in ("aihf", "aihf_rm")}
    return dict(rows=rows, goal=goal, missing_cells=missing)


def plot(result: dict, prof: dict, path: str):
    """Per design: true reward vs pairs at the selected checkpoint (mean +- 95% CI); the reward-vs-KL
    frontier (every checkpoint, mean over seeds) at the smallest non-zero budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = prof["designs"]
    fig, axes = plt.subplots(2, len(designs), figsize=(7 * len(designs), 9), squeeze=False)
    t = [r for r in result["analysis"]["table"] if r["arm"] == "clean"]
    smallest = min([b for b in prof["budgets"] if b > 0], default=0)
    for col, d in enumerate(designs):
        for m in METHODS:
            rows = sorted((r for r in t if r["design"] == d and r["method"] == m), key=lambda r: r["budget"])
            if rows:
                x = [prof["budgets"].index(r["budget"]) for r in rows]
                y = np.array([r["reward"] for r in rows])
                c = np.nan_to_num(np.array([r["reward_ci95"] for r in rows]))
                axes[0][col].plot(x, y, marker="o", label=m, lw=2.5 if m in ("aihf", "aihf_rm") else 1.0)
                axes[0][col].fill_between(x, y - c, y + c, alpha=0.1)
            cell = next((r for r in t if r["design"] == d and r["method"] == m and r["budget"] == smallest), None)
            if cell:
                n = min(len(p["curve"]) for p in cell["per_seed"])
                cur = np.mean([np.asarray(p["curve"][:n], float)[:, :3] for p in cell["per_seed"]], axis=0)
                axes[1][col].plot(cur[:, 2], cur[:, 1], marker=".", label=m)
        axes[0][col].set_xticks(range(len(prof["budgets"])), [str(b) for b in prof["budgets"]])
        axes[0][col].set_xlabel("preference pairs")
        axes[0][col].set_ylabel("true reward (selected checkpoint)")
        axes[0][col].set_title(f"design {d}")
        axes[1][col].set_xlabel("KL to the anchor (nats / sequence)")
        axes[1][col].set_ylabel(f"true reward ({smallest} pairs, every checkpoint)")
        for ax in axes[:, col]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{result['device']} commit {str(result['commit'])[:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = grid_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), PROFILES, "small")
    ap.add_argument("--stage", choices=("tune", "all"), default="all", help="tune: stop after the tuning runs")
    ap.add_argument("--designs", nargs="+", default=None, help="a slice: only these designs' final runs")
    ap.add_argument("--analyse-only", action="store_true", help="run nothing: analyse the records in --work")
    ap.add_argument("--records-from", default=None, metavar="JSON",
                    help="a saved result (e.g. on a machine without --work): its records join the analysis, and "
                         "go into --work where nothing has to be remade for them")
    a = ap.parse_args(argv)
    prof = dict(PROFILES[a.profile])
    work = a.work or str(ROOT / "runs" / f"bench_alignment_llm_round2_{a.profile}")
    out = a.out or str(ROOT / "benchmarks" / "results" / f"bench_alignment_llm_round2_{a.profile}.json")
    head, t0 = commit(), time.time()
    rec_dir = os.path.join(work, "records")
    jobs = plan(prof)
    if a.stage == "tune":
        jobs = [j for j in jobs if j.get("stage") != "final"]
    if a.designs:
        if not set(a.designs) <= set(prof["designs"]):
            raise SystemExit(f"--designs: {sorted(set(a.designs) - set(prof['designs']))} are not designs of profile "
                             f"{a.profile} ({prof['designs']})")
        jobs = [j for j in jobs if j.get("stage") != "final" or j.get("design", a.designs[0]) in a.designs]
    if not set(prof["noisy_budgets"]) <= set(prof["budgets"]) - {0}:
        raise SystemExit(f"profile {a.profile}: noisy_budgets {prof['noisy_budgets']} must be non-zero budgets")
    if not a.analyse_only:
        lock_records(rec_dir)
    signature = dict(benchmark="bench_alignment_llm_round2", profile_config=prof, label_noise=LABEL_NOISE,
                     grids={m: grid(m, prof) for m in METHODS[1:]})
    check_grid(rec_dir, signature, write=False)
    saved = {} if a.records_from is None else saved_records(a.records_from, "bench_alignment_llm_round2", prof)
    if not a.analyse_only:  # (an analysis reads the saved records without writing them anywhere)
        tune = {j["key"]: j for j in plan(prof) if j["kind"] == "run" and j["stage"] == "tune"}
        made = {k: r for k, r in {**saved, **_made_records(rec_dir, tune)}.items() if k in tune}
        odd = sorted(k for k, r in made.items()
                      if r["chosen"]["options"] != grid(tune[k]["method"], prof)[tune[k]["config"]])
        if odd:
            raise SystemExit(f"{len(odd)} tuning records ran another configuration than the grid's, e.g. {odd[0]}: "
                             "use a new --work" + (" without --records-from" if saved else ""))
        check_grid(rec_dir, signature, write=True)  # every check passed: this --work holds this grid
        written, removed = restore_records(saved, plan(prof), rec_dir, a.records_from or "", fingerprint=_input_fingerprint)
        if written or removed:
            print(f"[bench] {len(written)} records restored from {a.records_from}; {len(removed)} restored inputs "
                  "to remake (a job that needs their files runs)")

        def run(js):
            run_jobs(js, run_job, (prof, work, head), rec_dir, a.workers or prof["workers"], _init_worker, (a.threads,))

        remake_inputs_first(jobs, plan(prof), rec_dir, run, _input_fingerprint)
        run(jobs)
    # the analysis reads every record of the whole protocol made so far (by any slice; saved ones not remade yet)
    keys = [j["key"] for j in plan(prof)]
    made = {**saved, **read_records(rec_dir, keys, missing_ok=True)}
    records = {k: made[k] for k in keys if k in made}
    analysis = analyse(records, prof)
    analysis["missing"] = [j["key"] for j in plan(prof) if j["key"] not in records]
    result = dict(benchmark="bench_alignment_llm_round2", profile=a.profile, profile_config=prof, device=device_name(),
                  versions=versions("transformers", "deepspeed"), commit=head,
                  made_by_commits=sorted({str(r.get("commit")) for r in records.values()}),
                  wall_seconds_this_invocation=time.time() - t0,
                  command="python benchmarks/bench_alignment_llm_round2.py " + " ".join(argv if argv is not None
                                                                                        else sys.argv[1:]),
                  analysis=analysis, records=list(records.values()))
    save_grid_result(result, out, lambda r, png: plot(r, prof, png))
    for arm, v in analysis["verdict"].items():
        for r in v["rows"]:
            print(f"{arm:<5} {r['design']} {r['method']:<8} {r['budget']:>5} pairs: {r['aihf_reward']:.2f} vs "
                  f"{r['best_baseline']} {r['best_reward']:.2f} (diff {r['diff']:+.2f} +- {r['diff_ci95']:.2f}, "
                  f"{r['seeds']} seeds)")
    print(f"goal (clean, selected checkpoint): {analysis['verdict']['clean']['goal']}; "
          f"{len(analysis['missing'])} runs missing")
    print(f"[bench] wrote {out}")
    return result


if __name__ == "__main__":
    main()
