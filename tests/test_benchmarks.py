"""The benchmarks run end to end on tiny grids (seconds) and write valid JSON and a plot."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.slow  # whole benchmark pipelines


def test_bench_rollout_tiny(tmp_path):
    import bench_rollout

    out = tmp_path / "rollout.json"
    bench_rollout.main(["--num-envs", "2", "--threads", "1", "--env-steps", "100", "--repeats", "1",
                        "--providers", "aihf_step,aihf_rollout_mlp,aihf_step_torch_mlp,gym_sync,physics_limit",
                        "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["provider"]: r for r in report["results"]}
    for name in ("aihf_step", "aihf_rollout_mlp", "aihf_step_torch_mlp", "gym_sync", "physics_limit"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["env_steps_per_s"] > 0
    assert report["versions"]["mujoco"] == "4.0.0"
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_loss_tiny(tmp_path):
    pytest.importorskip("matplotlib")
    import bench_loss

    out = tmp_path / "loss.json"
    report = bench_loss.main(["--tokens", "64", "--vocab", "300", "--hidden", "16", "--seq-len", "16", "--reps", "1",
                              "--providers", "aihf_fast,aihf_fast_two_pass,aihf_fast_cached_ref,torch_eager",
                              "--backend", "triton", "--no-fwd-diag", "--grad-skip-below", "0.01", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["ok"] * 5, rows
    for r in rows[:3] + rows[4:]:
        assert abs(r["loss"] - rows[3]["loss"]) < 1e-4 * abs(rows[3]["loss"])
    # one 2048-column decision tile at V = 300, holding labels: nothing left out, the gradients exact
    approx = rows[4]
    assert approx["provider"] == "aihf_fast_approx_0.01" and approx["skipped_fraction"] == 0.0
    assert approx["dhidden_rel_err"] == 0.0 and approx["dweight_max_err_rel"] == 0.0
    assert report["device_type"] == "cpu"
    assert report["config"]["data"] == "peaked" and report["data_stats"]["V=300"]["top1_prob"] > 0.3
    flat = bench_loss.main(["--tokens", "64", "--vocab", "300", "--hidden", "16", "--seq-len", "16", "--reps", "1",
                            "--providers", "torch_eager", "--fwd-diag", "--data", "randn", "--no-plot",
                            "--backend", "triton", "--out", str(tmp_path / "flat.json")])
    assert flat["config"]["data"] == "randn" and flat["data_stats"]["V=300"]["top1_prob"] < 0.1
    fwd = [r["provider"] for r in flat["results"] if r.get("mode") == "fwd"]  # TMA rows: GPUs with TMA only
    assert fwd == ["aihf_fast_logprobs_fwd", "cublas_logits+logsumexp_fwd"] and "AIHF_FAST_LINEAR_TMA" not in os.environ
    assert next(r for r in flat["results"] if r["provider"] == "aihf_fast_logprobs_fwd")["tma_schedules_tried"] is False


def test_bench_grad_skip_tiny(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("64-column decisions exist on the interpreter only (a GPU's d(logits) tile is 2048 columns here)")
    import bench_grad_skip

    import aihf_fast.ops.logprobs as logprobs

    tile = logprobs.GRAD_SKIP_TILE
    try:
        report = bench_grad_skip.main(["--vocab", "2000", "--hidden", "24", "--pairs", "1", "--seq-len", "16",
                                       "--prompt-frac", "0.75", "--eps", "0,0.1", "--skip-tile", "64",
                                       "--out", str(tmp_path / "gs.json")])
    finally:
        logprobs.GRAD_SKIP_TILE = tile
    exact, approx = report["results"]
    assert exact["skipped_fraction"] == 0.0 and exact["dweight_rel_err"] == 0.0  # eps = 0 is the exact path
    assert 0 < approx["skipped_fraction"] < 1 and approx["loss_equal"]
    assert 0 < approx["dhidden_rel_err"] < 1 and report["config"]["skip_tile"] == 64
    assert json.loads((tmp_path / "gs.json").read_text())["data_stats"]["tokens"] == 8


def test_head_model_and_model_data(tmp_path):
    """``benchmarks/head_model.py`` trains and saves a (tiny) model; ``data="model"`` reads its hidden
    states and head on held-out text; bench_loss runs on them and records which model."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import bench_loss
    import head_model

    from aihf_fast.ops.testing import lm_head_inputs, stdlib_sources

    model_dir = tmp_path / "hm"
    meta = head_model.main(["--out", str(model_dir), "--vocab", "400", "--hidden", "32", "--layers", "1", "--heads",
                            "2", "--seq", "32", "--batch", "4", "--steps", "4", "--max-files", "20"])
    assert meta["vocab_size"] == 400 and meta["steps"] == 4 and meta["heldout_loss"] > 0
    assert not set(stdlib_sources("train")) & set(stdlib_sources("heldout"))
    d = lm_head_inputs(3, 20, 32, 400, data="model", model_dir=str(model_dir), prompt_frac=0.25, seed=1)
    assert d.hidden.shape == d.ref_hidden.shape == (3, 20, 32) and d.weight.shape == (400, 32)
    assert bool((d.labels[:, :5] == -100).all()) and bool((d.labels[:, 5:] >= 0).all())
    assert not torch.equal(d.weight, d.ref_weight)  # the reference is the half-way checkpoint
    assert torch.equal(lm_head_inputs(3, 20, 32, 400, data="model", model_dir=str(model_dir), seed=1).hidden, d.hidden)
    with pytest.raises(ValueError, match="hidden_size, vocab_size"):
        lm_head_inputs(3, 20, 64, 400, data="model", model_dir=str(model_dir))
    with pytest.raises(ValueError, match="longer than the 32 tokens"):  # positions it never saw
        lm_head_inputs(3, 40, 32, 400, data="model", model_dir=str(model_dir))
    assert (model_dir / "heldout_ids.pt").is_file()
    with pytest.raises(ValueError, match="head_model.py"):
        lm_head_inputs(3, 20, 32, 400, data="model", model_dir=str(tmp_path / "none"))
    report = bench_loss.main(["--tokens", "64", "--vocab", "400", "--hidden", "32", "--seq-len", "16", "--reps", "1",
                              "--providers", "torch_eager", "--no-fwd-diag", "--no-plot", "--data", "model",
                              "--model-dir", str(model_dir), "--out", str(tmp_path / "m.json")])
    assert report["results"][0]["status"] == "ok" and report["head_model"]["steps"] == 4
    assert report["data_stats"]["V=400"]["tokens"] == 64


def test_bench_train_tiny(tmp_path):
    pytest.importorskip("transformers")
    import bench_train

    out = tmp_path / "train.json"
    report = bench_train.main(["--vocab", "300", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "2",
                               "--inter", "32", "--seq", "12", "--prompt", "4", "--pairs", "2", "--demos", "1",
                               "--steps", "1", "--rounds", "1", "--max-batch", "--max-batch-limit", "2",
                               "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(rows) == ["aihf_fast", "aihf_fast_two_pass", "full_logit"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["aihf_fast"]["tokens"] == 6 * 12 and rows["aihf_fast"]["loss_tokens"] == 6 * 8
    for name in ("aihf_fast_two_pass", "full_logit"):
        assert abs(rows["aihf_fast"]["first_loss"] - rows[name]["first_loss"]) < 1e-4
    assert report["ratios"]["tokens_per_s"] > 0 and report["commit"] is not None
    for prov, found in report["max_batch"].items():  # nothing limits memory here: the limit is reached
        assert found["k"] == 2 and [t["k"] for t in found["attempts"]] == [1, 2], (prov, found)
    assert report["ratios"]["max_batch"] == 1.0


def test_largest_batch_search():
    import bench_train

    for cap in (0, 1, 3, 5, 8, 13, 100):
        for limit in (1, 7, 8, 50):
            tried = []

            def attempt(k, tried=tried, cap=cap):
                tried.append(k)
                return dict(status="ok" if k <= cap else "oom: CUDA out of memory", peak_transient_bytes=k)

            found = bench_train.largest_batch(attempt, None, limit)
            assert found["k"] == min(cap, limit) and len(set(tried)) == len(tried) <= 2 * limit.bit_length() + 1
            assert [t["k"] for t in found["attempts"]] == tried
    with pytest.raises(RuntimeError, match="another reason than memory"):  # a crash is not a small batch
        bench_train.largest_batch(lambda k: dict(status="ok" if k < 4 else "failed: ImportError"), None, 100)
    by_budget = bench_train.largest_batch(lambda k: dict(status="ok", peak_transient_bytes=10 * k), 55, 100)
    assert by_budget["k"] == 5
    assert {t["k"]: t["fits"] for t in by_budget["attempts"]} == {1: True, 2: True, 4: True, 8: False, 6: False,
                                                                  5: True}


def test_bench_train_rl_step_tiny(tmp_path):
    pytest.importorskip("transformers")
    import bench_train

    out = tmp_path / "train_rl.json"
    report = bench_train.main(["--step", "rl", "--vocab", "300", "--hidden", "16", "--layers", "1", "--heads", "2",
                               "--kv-heads", "2", "--inter", "32", "--seq", "12", "--prompt", "4", "--pairs", "2",
                               "--demos", "3", "--steps", "1", "--rounds", "1", "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    for r in rows.values():
        assert r["status"] == "ok" and r["tokens"] == 6 * 12 and r["new_tokens"] == 6 * 8
        assert r["generation_s"] > 0 and r["scoring_s"] > 0 and r["update_s"] > 0
    assert abs(rows["aihf_fast"]["first_loss"] - rows["full_logit"]["first_loss"]) < 1e-5
    assert report["ratios"]["logp_sum_rel_diff"] < 1e-5 and rows["aihf_fast"]["first_logp_sum"] < 0
    assert report["step"] == "rl" and report["ratios"]["update_tokens_per_s"] > 0


def test_bench_alignment_llm_tiny(tmp_path):
    """The alignment benchmark end to end on the tiny profile: every method runs through the
    trainer, the JSON holds the records, the analysis and the verdict, and a plot is written."""
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    import bench_alignment_llm as bench

    out = tmp_path / "align.json"
    res = bench.main(["--profile", "tiny", "--work", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "align.png").stat().st_size > 0
    assert data["commit"] and data["device"] and data["versions"]["torch"]
    main = {(r["method"], r["budget"]) for r in data["analysis"]["table"] if r["group"] == "main"}
    for m in bench.MAIN:
        assert (m, 8) in main, m
    assert ("dpo", 0) not in main and ("aihf", 0) in main
    for rec in data["records"]:
        steps = [e["step"] for e in rec["evals"]]
        assert steps == ([0] if rec["method"] == "base" else [0, 2, 4]), rec["key"]
        for e in rec["evals"]:
            assert {"eval/reward", "eval/kl", "eval/demo_nll", "eval/pref_accuracy"} <= set(e)
    sft_then_dpo = next(r for r in data["records"] if r["method"] == "sft_then_dpo")
    assert abs(sft_then_dpo["evals"][0]["eval/kl"]) > 0  # starts from SFT; KL is to the base model
    assert set(data["analysis"]["verdict"]["goal"]) == {"aihf", "aihf_moving"}
    # a second invocation reuses every cached run
    again = bench.main(["--profile", "tiny", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert again["wall_seconds_this_invocation"] < res["wall_seconds_this_invocation"]
    assert json.dumps(again["analysis"]["table"]) == json.dumps(res["analysis"]["table"])


def test_alignment_selection_rule():
    import bench_alignment_llm as bench

    ev = [{"step": 0, "eval/pref_accuracy": 0.5, "eval/demo_nll": 2.0},
          {"step": 50, "eval/pref_accuracy": 0.7, "eval/demo_nll": 1.5},
          {"step": 100, "eval/pref_accuracy": 0.7, "eval/demo_nll": 1.6}]
    assert bench.select(ev, uses_pairs=True)["step"] == 50    # best accuracy, earlier on ties
    assert bench.select(ev, uses_pairs=False)["step"] == 50   # lowest held-out NLL
    assert bench.rule_weights(25, 2000) == pytest.approx((50 / 2025, 4000 / 2025))
    assert bench.rule_weights(0, 2000) == (0.0, 2.0)
    assert bench.ci95([1.0, 3.0]) == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)


def test_bench_alignment_control_tiny(tmp_path):
    """The control alignment benchmark end to end on its tiny profile (expert, data, every method)."""
    pytest.importorskip("aihf_fast._C")
    import bench_alignment_control as bench

    out = tmp_path / "ctl.json"
    res = bench.main(["--profile", "tiny", "--posthoc", "--work", str(tmp_path / "w"), "--out", str(out),
                      "--threads", "1"])
    data = json.loads(out.read_text())
    assert (tmp_path / "ctl.png").stat().st_size > 0 and data["commit"] and data["device"]
    cells = {(r["method"], r["budget"]) for r in data["analysis"]["table"]}
    assert {("aihf", 0), ("aihf", 8), ("rlhf", 8), ("irl", 0), ("bc", 0), ("irl+bc", 0), ("rlhf+bc", 8),
            ("aihf+bc", 8)} <= cells and ("rlhf", 0) not in cells
    table = {(r["method"], r["budget"]): r for r in data["analysis"]["table"]}
    assert table[("aihf", 0)]["returns"] == table[("irl", 0)]["returns"]  # aihf at 0 pairs is irl's run
    assert [(v["budget"], v["variant"]) for v in data["analysis"]["verdict"]] == [(8, "main"), (8, "bc_init (post hoc)")]
    assert res["analysis"]["wall_clock"]["sim_seconds_per_100k"] > 0
    runs = [r for r in data["records"] if r.get("kind") == "run"]
    assert all(len(r["evals"]) >= 1 and np.isfinite(r["final"]) and r["reward_corr"] is not None for r in runs)
    assert any(len(r["reward_corr"]) > 0 for r in runs if r["method"] == "aihf")
    # --analyse-only runs nothing: the same analysis from the records, or a clear error when some are missing
    again = bench.main(["--profile", "tiny", "--posthoc", "--analyse-only", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "again.json")])
    key = lambda res: [(v["task"], v["budget"], v["variant"], v["aihf"], v["rlhf"]) for v in res["analysis"]["verdict"]]  # noqa: E731
    assert key(again) == key(res)
    with pytest.raises(SystemExit, match="records missing"):
        bench.main(["--profile", "tiny", "--seeds", "7", "--analyse-only", "--work", str(tmp_path / "w"),
                    "--out", str(tmp_path / "none.json")])
    # --reanalyse: the same analysis from the records kept in the result file alone (the work dir gone)
    shutil.rmtree(tmp_path / "w")
    re = bench.main(["--reanalyse", str(out), "--out", str(tmp_path / "re.json")])
    assert key(re) == key(res) and re["profile_config"] == data["profile_config"] and re["profile"] == "tiny"
    assert re["records_made_by"][0]["commit"] == data["commit"] and re["device"] == data["device"]
    for v in re["analysis"]["verdict"]:  # the 1.2x rule is only defined for a positive rlhf return
        assert ("aihf_ge_1.2x_rlhf" in v) == (v["budget"] == 8)
        assert v.get("aihf_ge_1.2x_rlhf") in (None, True, False)
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "bench_loss"}))
    with pytest.raises(SystemExit, match="not a bench_alignment_control result"):
        bench.main(["--reanalyse", str(tmp_path / "other.json")])


def test_bench_termination_tiny(tmp_path):
    """The termination benchmark end to end on its tiny profile: the expert, the data, every
    treatment of irl and rlhf and the true reward under horizon; the rule picks an admissible one."""
    pytest.importorskip("aihf_fast._C")
    import bench_termination as bench

    out = tmp_path / "term.json"
    res = bench.main(["--profile", "tiny", "--work", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "term.png").stat().st_size > 0 and data["commit"] and data["device"]
    cells = {(r["method"], r["treatment"]) for r in data["analysis"]["table"]}
    want = {("expert", "true+env"), ("expert", "true+horizon")}
    want |= {(m, t) for m, ts in bench.TREATMENTS.items() for t in ts}
    assert cells == want
    choice, ok = res["analysis"]["choice"], res["analysis"]["admissible"]
    assert choice["aihf"] == choice["irl"] and all(ok[choice[m].split("+")[1]] for m in choice)
    table = {(r["method"], r["treatment"]): r for r in res["analysis"]["table"]}
    assert choice["irl"] == max((t for t in bench.TREATMENTS["irl"] if ok[t.split("+")[1]]),
                                key=lambda t: table[("irl", t)]["mean_normalised"])
    assert table[("irl", bench.BASELINE)]["diff_vs_baseline"] == 0.0
    assert all(0 < length <= 1000 for r in table.values() for length in r["length"])
    again = bench.main(["--profile", "tiny", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "again.json")])
    same = json.dumps(again["analysis"]["table"]) == json.dumps(res["analysis"]["table"])
    assert same  # every record cached: nothing reruns (NaN intervals of one seed compare as text)


def test_bench_control_round2_tiny(tmp_path):
    """The round-two control benchmark end to end on its tiny profile: experts, clean and noisy
    data, 4 configurations per method on the tuning seed, the final runs with the selected ones."""
    pytest.importorskip("aihf_fast._C")
    import bench_control_round2 as bench

    out = tmp_path / "r2.json"
    tuned = bench.main(["--profile", "tiny", "--stage", "tune", "--work", str(tmp_path / "w"), "--out", str(out)])
    assert tuned["analysis"]["verdict"] == [] and tuned["analysis"]["missing"]  # the final runs wait
    final_seeds = bench.PROFILES["tiny"]["final_seeds"]
    assert not [r for r in tuned["records"] if r["seed"] in final_seeds]  # nor their experts and data
    tuning = tuned["analysis"]["tuning"]  # the tuning slice alone shows what the rule picks
    assert sorted(tuning) == [f"Hopper-v5/{m}" for m in ("aihf", "bc", "irl", "rlhf")]
    for t in tuning.values():
        best = max(range(4), key=lambda c: tuple(t["configs"][c]["signal"]))
        assert t["chosen"] == best and all(np.isfinite(c["true_return"]) for c in t["configs"])
    res = bench.main(["--profile", "tiny", "--work", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "r2.png").stat().st_size > 0 and data["commit"] and not res["analysis"]["missing"]
    recs = {r["key"]: r for r in data["records"] if r.get("kind") == "run"}
    prof = bench.PROFILES["tiny"]
    for m in ("bc", "irl", "rlhf", "aihf"):  # the final runs use the configuration the rule selects
        want = bench.select(recs, "Hopper-v5", m, prof)
        finals = [r for r in recs.values() if r["stage"] == "final" and r["method"] == m]
        assert finals and all(r["chosen"] == want for r in finals)
    # final runs that ran another configuration than the tuning records pick stop the analysis
    every = {r.get("key") or f"{r['kind']}-{r['task']}-s{r['seed']}": r for r in data["records"]}
    bench.analyse(every, prof)
    bc_finals = [k for k, r in every.items() if r.get("stage") == "final" and r["method"] == "bc"]
    for odd in (bc_finals[:1], bc_finals):  # one of them, or all of them
        moved = {k: dict(r, chosen=dict(r["chosen"], config=(r["chosen"]["config"] + 1) % 4)) if k in odd else r
                 for k, r in every.items()}
        with pytest.raises(SystemExit, match="final runs of Hopper-v5/bc ran configuration"):
            bench.analyse(moved, prof)
    sig = {c: bench.selection_signal(recs[f"tune-rlhf-c{c}-Hopper-v5-s200"]) for c in range(4)}
    assert bench.select(recs, "Hopper-v5", "rlhf", prof)["config"] == max(sig, key=sig.get)
    noisy = next(r for r in data["records"] if r.get("kind") == "data")["meta_noisy"]
    assert noisy["label_noise"] == bench.LABEL_NOISE
    arms = {(v["arm"], v["start"]) for v in res["analysis"]["verdict"]}
    assert arms == {("clean", "bc"), ("noisy", "bc"), ("clean", "scratch")}
    primary = [v for v in res["analysis"]["verdict"] if v["primary"]]
    assert len(primary) == 1 and "diff_vs_bc" in primary[0] and "diff_vs_irl" in primary[0]
    assert all(r["treatment"] == "raw+horizon" for r in recs.values() if r["method"] != "bc")
    with pytest.raises(SystemExit, match="not tasks of profile"):
        bench.main(["--profile", "tiny", "--tasks", "Ant-v5", "--work", str(tmp_path / "w")])
    assert res["analysis"]["goal"]["cells"] == 1  # the whole (tiny) primary grid
    # a partial grid (a slice, or runs still to come): analysed without the missing cells, no goal
    (tmp_path / "w" / "records" / "aihf-clean-bc-p8-Hopper-v5-s10.json").unlink()
    part = bench.main(["--profile", "tiny", "--analyse-only", "--work", str(tmp_path / "w"),
                       "--out", str(tmp_path / "part.json")])
    assert part["analysis"]["missing"] == ["aihf-clean-bc-p8-Hopper-v5-s10"] and "incomplete" in part["analysis"]["goal"]
    # a machine without the run directory: the saved result's records, analysed or continued
    whole = bench.main(["--profile", "tiny", "--analyse-only", "--records-from", str(out), "--work",
                        str(tmp_path / "w2"), "--out", str(tmp_path / "whole.json")])
    same = json.dumps(whole["analysis"], sort_keys=True) == json.dumps(data["analysis"], sort_keys=True)  # NaN-safe
    assert same and len(whole["records"]) == len(data["records"]) and not (tmp_path / "w2").exists()  # nothing written
    part3 = bench.main(["--profile", "tiny", "--analyse-only", "--records-from", str(tmp_path / "part.json"),
                        "--work", str(tmp_path / "w3"), "--out", str(tmp_path / "part3.json")])
    assert json.dumps(part3["analysis"], sort_keys=True) == json.dumps(part["analysis"], sort_keys=True)
    # continued there: the missing run's expert and data are remade (the same: seeded, and checked),
    # then the run; the tuning seed's expert and data are restored (nothing left needs their files)
    cont = bench.main(["--profile", "tiny", "--records-from", str(tmp_path / "part.json"), "--work",
                       str(tmp_path / "w3"), "--out", str(tmp_path / "cont.json")])
    assert not cont["analysis"]["missing"]

    def by_key(records):
        return {r.get("key") or f"{r['kind']}-{r['task']}-s{r['seed']}": r for r in records}

    again, before = by_key(cont["records"]), by_key(data["records"])
    inputs = {k for k in again if k.startswith(("expert-", "data-"))}
    assert {k for k in inputs if "restored_from" in again[k]} == {"expert-Hopper-v5-s200", "data-Hopper-v5-s200"}
    assert bench._input_fingerprint(again["data-Hopper-v5-s10"]) == bench._input_fingerprint(before["data-Hopper-v5-s10"])
    assert again["aihf-clean-bc-p8-Hopper-v5-s10"]["final"] == before["aihf-clean-bc-p8-Hopper-v5-s10"]["final"]
    # a run to redo there later: the restored inputs it needs (files never made there) are remade first
    (tmp_path / "w3" / "records" / "tune-bc-c0-Hopper-v5-s200.json").unlink()
    redo = bench.main(["--profile", "tiny", "--work", str(tmp_path / "w3"), "--out", str(tmp_path / "redo.json")])
    assert not redo["analysis"]["missing"] and "restored_from" not in by_key(redo["records"])["data-Hopper-v5-s200"]
    for bad, match in [(bench.TREATMENT_FILE, "is not a saved"), (ROOT / "benchmarks" / "results" /
                       "bench_control_round2_full.json", "another profile configuration"), (tmp_path, "cannot read")]:
        with pytest.raises(SystemExit, match=f"--records-from: .*{match}"):
            bench.main(["--profile", "tiny", "--analyse-only", "--records-from", str(bad), "--work", str(tmp_path / "w4")])
    # records made under another end-of-episode treatment are not mixed with new ones
    monkey = dict(bench.PROFILES["tiny"], treatments=dict(irl="raw+env", rlhf="raw+horizon"))
    bench.PROFILES["__t"] = monkey
    try:
        with pytest.raises(SystemExit, match=r"another grid .*\['profile_config'\]"):  # another profile: stops first
            bench.main(["--profile", "__t", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "x.json")])
        (tmp_path / "w" / "records" / "grid.json").unlink()  # (a --work from before grid.json)
        with pytest.raises(SystemExit, match="another end-of-episode treatment"):
            bench.main(["--profile", "__t", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "x.json")])
    finally:
        del bench.PROFILES["__t"]


def test_restored_inputs_are_remade_when_needed_and_must_match(tmp_path):
    """restore_records / remake_inputs_first on a toy grid: in -> data -> {run1, run2}; in2 -> run3.
    Inputs (files not saved) are restored only while nothing that needs them runs, remade first
    otherwise, and a remade input that a kept run was made from (directly or through another remade
    input) must equal the record it replaces,
    checked on every later run until it does (also when made by a slice without the kept runs)."""
    from common import remake_inputs_first, restore_records

    jobs = [dict(key="in", kind="input", deps=[]), dict(key="data", kind="input", deps=["in"]),
            dict(key="run1", kind="run", deps=["data"]), dict(key="run2", kind="run", deps=["data"]),
            dict(key="in2", kind="input", deps=[]), dict(key="run3", kind="run", deps=["in2"])]
    saved = {k: dict(key=k, v=1) for k in ("in", "data", "run1", "in2", "run3")}  # run2 still to make
    rec = tmp_path / "records"
    written, removed = restore_records(saved, jobs, str(rec), "saved.json")
    assert sorted(written) == ["in2", "run1", "run3"] and removed == []
    assert "restored_from" in json.loads((rec / "in2.json").read_text())
    ran = []

    def run(js, v=1):
        for j in js:
            if not (rec / f"{j['key']}.json").exists():
                ran.append(j["key"])
                (rec / f"{j['key']}.json").write_text(json.dumps(dict(key=j["key"], v=v)))

    def fp(r):
        return r["v"]

    assert remake_inputs_first(jobs, jobs, str(rec), run, fp) == ["data", "in"]
    assert ran == ["in", "data"] and not list((rec / "to_compare").iterdir())  # before run2; the same: settled
    # later, run3 is deleted to be redone: in2 (restored, its files never made) is remade first
    (rec / "run3.json").unlink()
    assert restore_records({}, jobs, str(rec)) == ([], ["in2"])
    assert remake_inputs_first(jobs, jobs, str(rec), lambda js: run(js, v=2), fp) == ["in2"]  # nothing made from it
    # on another machine: a slice with the inputs only remakes data differently: this stops the
    # grid, and every later run too, while run1 (made from the saved data) is kept
    rec2 = tmp_path / "records2"
    rec, ran[:] = rec2, []
    restore_records(saved, jobs, str(rec2), "saved.json")
    inputs = [j for j in jobs if j["kind"] == "input"]
    for _ in range(2):
        with pytest.raises(SystemExit, match=r"remade \['data', 'in'\] differ"):
            remake_inputs_first(inputs, jobs, str(rec2), lambda js: run(js, v=2), fp)
    assert ran == ["in", "data"]
    # an input made here that differs from the saved one: saved runs made from that one are not
    # written beside runs made here from this one
    rec3 = tmp_path / "records4"
    rec3.mkdir()
    for k in ("in", "data"):
        (rec3 / f"{k}.json").write_text(json.dumps(dict(key=k, v=2)))
    with pytest.raises(SystemExit, match=r"--records-from: data in .* differs from the one in saved.json, and 1 saved "
                                         r"records made from that one \(e.g. run1\)"):
        restore_records(saved, jobs, str(rec3), "saved.json", fingerprint=fp)
    assert not (rec3 / "run1.json").exists()
    restore_records({k: saved[k] for k in ("in", "data", "in2", "run3")}, jobs, str(rec3), "saved.json", fingerprint=fp)
    (rec2 / "run1.json").unlink()  # the run made from the old data goes: the new data is settled
    remake_inputs_first(inputs, jobs, str(rec2), lambda js: run(js, v=2), fp)
    assert not list((rec2 / "to_compare").iterdir())
    # an input that a kept run was made from through another remade input is compared too: here
    # the data comes out the same but the input it was made from does not
    rec = tmp_path / "records3"
    restore_records(saved, jobs, str(rec), "saved.json")
    with pytest.raises(SystemExit, match=r"remade \['in'\] differ"):
        remake_inputs_first(inputs, jobs, str(rec), lambda js: [run([j], v=2 if j["key"] == "in" else 1) for j in js], fp)


def test_bench_alignment_llm_round2_tiny(tmp_path):
    """The LLM round-two protocol end to end on its tiny profile (through bench_alignment_llm.py
    --protocol round2): the task, the SFT anchor from the tuned sft, every method's configurations
    on the tuning seed, the final runs with the selected ones, the noisy arm, the verdicts."""
    pytest.importorskip("deepspeed")
    import bench_alignment_llm as round1
    import bench_alignment_llm_round2 as bench

    out = tmp_path / "r2.json"
    tuned = round1.main(["--protocol", "round2", "--profile", "tiny", "--stage", "tune", "--work", str(tmp_path / "w"),
                         "--out", str(out)])
    assert not any(r.get("stage") == "final" for r in tuned["records"]) and tuned["analysis"]["missing"]
    res = bench.main(["--profile", "tiny", "--work", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "r2.png").stat().st_size > 0 and data["commit"] and not res["analysis"]["missing"]
    prof = bench.PROFILES["tiny"]
    recs = {r["key"]: r for r in data["records"]}
    runs = [r for r in recs.values() if r.get("kind") == "run"]
    for m in bench.METHODS[1:]:  # every final run uses the configuration the rule picks from the tuning runs
        tuning = {k: r for k, r in recs.items() if r.get("stage") == "tune" and r["method"] == m}
        assert len(tuning) == len(bench.grid(m, prof)) * len(prof["tune_seeds"])
        want = bench.choose(recs, m, prof)
        assert all(r["chosen"] == want for r in runs if r["stage"] == "final" and r["method"] == m)
    anchor = next(r for r in recs.values() if r.get("kind") == "anchor")
    assert anchor["chosen"] == bench.choose(recs, "sft", prof)
    finals = {(r["method"], r["budget"], r["arm"]) for r in runs if r["stage"] == "final"}
    assert ("dpo", 0, "clean") not in finals and ("rlhf", 0, "clean") not in finals and ("sft", 8, "clean") not in finals
    assert {("aihf_rm", 0, "clean"), ("rm_once", 0, "clean"), ("rlhf", 8, "noisy"), ("aihf", 8, "noisy")} <= finals
    rl = next(r for r in runs if r["stage"] == "final" and r["method"] == "rlhf")
    assert rl["reward_model_eval"]["eval/rm_accuracy"] is not None and rl["wall_seconds"] > rl["reward_model_seconds"] > 0
    for r in runs:  # the mechanism: the learned reward's accuracy on the policy's own samples, every checkpoint
        key = "eval/rm_pair_accuracy" if r["method"] in bench.RL else "eval/implicit_pair_accuracy"
        assert all(key in e or e["eval/reward_sem"] == 0 for e in r["evals"]), (r["key"], key)
    # the selection rule reads no true reward: shuffling it leaves every choice the same
    shuffled = {k: dict(r, evals=[dict(e, **{"eval/reward": -e["eval/reward"]}) for e in r["evals"]])
                if "evals" in r else r for k, r in recs.items()}
    assert all(bench.choose(shuffled, m, prof) == bench.choose(recs, m, prof) for m in bench.METHODS[1:])
    v = res["analysis"]["verdict"]
    assert {r["method"] for r in v["clean"]["rows"]} == {"aihf", "aihf_rm"} and v["noisy"]["rows"]
    assert set(res["analysis"]["verdict_best_checkpoint_oracle"]) == {"clean", "noisy"}
    # continued on a machine without the run directory: one final run's inputs (task, base model,
    # SFT anchor) are remade the same (seeded), then the run
    gone = bench.run_key("final", 20, "A", "sft", 0)
    part = tmp_path / "part.json"
    part.write_text(json.dumps(dict(data, records=[r for r in data["records"] if r["key"] != gone])))
    cont = bench.main(["--profile", "tiny", "--records-from", str(part), "--work", str(tmp_path / "w2"),
                       "--out", str(tmp_path / "cont.json")])
    assert not cont["analysis"]["missing"]
    again = {r["key"]: r for r in cont["records"]}
    remade = {k for k, r in again.items() if r["kind"] != "run" and "restored_from" not in r}
    assert remade == {"prepare-s20", "anchor-s20-A"}  # the reward models of s20 are not needed again
    assert all(again[k]["digest"] == recs[k]["digest"] for k in remade) and again[gone]["evals"] == recs[gone]["evals"]
    with pytest.raises(SystemExit, match="--records-from"):
        bench.main(["--profile", "tiny", "--analyse-only", "--records-from", str(tmp_path / "r2.png"),
                    "--work", str(tmp_path / "w3")])


def test_bench_alignment_llm_round2_goal_needs_the_whole_grid():
    """The verdict's goal is stated only when AIHF and every baseline of every cell have every
    final seed: with baselines missing it says incomplete, whatever AIHF's numbers."""
    import bench_alignment_llm_round2 as bench

    prof = dict(bench.PROFILES["tiny"], final_seeds=[20, 21])

    def run(m, b, seed, reward, arm="clean"):
        ev = [{"step": 0, "eval/reward": reward, "eval/kl": 0.0, "eval/pref_accuracy": 0.5, "eval/demo_nll": 1.0}]
        return dict(kind="run", stage="final", key=f"{m}{b}{arm}{seed}", seed=seed, design="A", method=m, budget=b,
                    arm=arm, uses_pairs=b > 0, evals=ev, wall_seconds=1.0, chosen={})

    recs = {f"prepare{s}": dict(kind="prepare", seed=s, meta={"A": {"expert_data_reward": 5.0}}) for s in (20, 21)}
    for s in (20, 21):
        for m in ("base", "aihf", "aihf_rm"):
            for b, arm in bench.final_cells(m, prof):
                r = run(m, b, s, 1.0 if m == "base" else 3.0 + 0.1 * s, arm)
                recs[r["key"]] = r
    only_base = bench.analyse(recs, prof)["verdict"]["clean"]
    assert all("incomplete" in g for g in only_base["goal"].values())
    assert all(not r["complete"] for r in only_base["rows"] if r["budget"] > 0)
    for s in (20, 21):  # every baseline now, each below AIHF
        for m in bench.BASELINES:
            for b, arm in bench.final_cells(m, prof):
                r = run(m, b, s, 2.0 + 0.05 * s, arm)
                recs.setdefault(r["key"], r)
    full = bench.analyse(recs, prof)["verdict"]["clean"]
    assert all(r["complete"] for r in full["rows"])
    assert full["goal"]["aihf"]["at_least_as_good_everywhere"] is True
    # a run that diverged is named in its row and in the verdict rows that compare with it
    k = next(k for k, r in recs.items() if r.get("method") == "dpo" and r["seed"] == 21 and r["arm"] == "clean")
    recs[k] = dict(recs[k], diverged=True)
    res = bench.analyse(recs, prof)
    assert next(r for r in res["table"] if r["method"] == "dpo" and r["arm"] == "clean")["diverged_seeds"] == [21]
    row = next(r for r in res["verdict"]["clean"]["rows"] if r["method"] == "aihf" and r["budget"] == recs[k]["budget"])
    assert row["diverged_seeds"] == {"dpo": [21]}
    recs[k] = dict(recs[k], chosen={"config": 1})  # final runs of one method from two tunings: an error
    with pytest.raises(SystemExit, match="final runs of dpo ran more than one configuration"):
        bench.analyse(recs, prof)
    # ... or one configuration, but not the one the tuning records pick (they changed since)
    for k, r in recs.items():
        if r.get("method") == "dpo":
            recs[k] = dict(r, chosen={"config": 1})
    b = bench.tune_budget("dpo", prof)
    for c, o in enumerate(bench.grid("dpo", prof)):
        for s in prof["tune_seeds"]:
            ev = [{"step": 0, "eval/pref_accuracy": 0.9 - 0.1 * c, "eval/demo_nll": 1.0}]
            recs[bench.run_key("tune", s, "A", "dpo", b, config=c)] = dict(
                kind="run", stage="tune", method="dpo", uses_pairs=True, evals=ev, chosen=dict(config=c, options=o))
    with pytest.raises(SystemExit, match=r"final runs \(or SFT anchors\) of dpo ran configuration\(s\) \[1\]"):
        bench.analyse(recs, prof)
    anchor = dict(kind="anchor", seed=20, design="A", wall_seconds=1.0, chosen={"config": 0})
    for k, r in recs.items():
        if r.get("method") == "dpo" and r["stage"] == "final":
            recs[k] = dict(r, chosen={"config": 0})
    bench.analyse(recs, prof)  # the tuning records' pick: fine
    sft_b = bench.tune_budget("sft", prof)
    for c, o in enumerate(bench.grid("sft", prof)):  # an SFT anchor from another sft pick than its records'
        for s in prof["tune_seeds"]:
            recs[bench.run_key("tune", s, "A", "sft", sft_b, config=c)] = dict(
                kind="run", stage="tune", method="sft", uses_pairs=False, chosen=dict(config=c, options=o),
                evals=[{"step": 0, "eval/demo_nll": 1.0 + c}])
    recs["anchor-20-A"] = dict(anchor, chosen={"config": 1})
    with pytest.raises(SystemExit, match=r"of sft ran configuration\(s\) \[1\]"):
        bench.analyse(recs, prof)


def test_bench_alignment_llm_round2_low_quality_arm_flips_exactly_one_in_five():
    """The low-quality arm: exactly 20% of every nested budget flipped, at positions that depend on
    the seed only (the same for every pair source of a seed)."""
    import bench_alignment_llm_round2 as bench

    rows = [dict(prompt=i, chosen=f"c{i}", rejected=f"r{i}") for i in range(400)]
    other = [dict(prompt=i, chosen=f"C{i}", rejected=f"R{i}") for i in range(400)]
    flipped = [r["chosen"].startswith("r") for r in bench._flip(rows, bench.LABEL_NOISE, 30_020)]
    for b in (25, 100, 400):
        assert sum(flipped[:b]) == b // 5
    assert flipped[:100] == [r["chosen"].startswith("r") for r in bench._flip(rows[:100], bench.LABEL_NOISE, 30_020)]
    assert flipped == [r["chosen"].startswith("R") for r in bench._flip(other, bench.LABEL_NOISE, 30_020)]
    assert flipped != [r["chosen"].startswith("r") for r in bench._flip(rows, bench.LABEL_NOISE, 30_021)]
    for bad in (0.0, 0.3, 1.0):
        with pytest.raises(ValueError, match="rate: expected 1/k"):
            bench._flip(rows, bad, 0)


def test_bench_alignment_llm_round2_tuning_records_must_match_the_grid(tmp_path):
    """The rule reads tuning records by configuration index: a record that ran another configuration
    than the grid's (the grid edited since) stops the choice instead of being read as this one."""
    import bench_alignment_llm_round2 as bench

    prof = bench.PROFILES["tiny"]
    b = bench.tune_budget("sft", prof)
    recs = {bench.run_key("tune", s, "A", "sft", b, config=c): dict(
        chosen=dict(config=c, options=o), uses_pairs=False, evals=[{"step": 0, "eval/demo_nll": 2.0 - c}])
        for c, o in enumerate(bench.grid("sft", prof)) for s in prof["tune_seeds"]}
    assert bench.choose(recs, "sft", prof)["config"] == len(bench.grid("sft", prof)) - 1  # the lowest NLL
    recs[bench.run_key("tune", prof["tune_seeds"][0], "A", "sft", b, config=0)]["chosen"]["options"] = dict(lr=1.0)
    with pytest.raises(SystemExit, match=r"sft configuration 0 ran \{'lr': 1.0\}.*the grid changed"):
        bench.choose(recs, "sft", prof)
    # such a record in a --work (from before grid.json) stops a run before any job, and no grid.json is written
    key = bench.run_key("tune", prof["tune_seeds"][0], "A", "sft", b, config=0)
    (tmp_path / "w" / "records").mkdir(parents=True)
    (tmp_path / "w" / "records" / f"{key}.json").write_text(json.dumps(dict(recs[key], key=key, method="sft")))
    with pytest.raises(SystemExit, match=f"1 tuning records ran another configuration than the grid's, e.g. {key}"):
        bench.main(["--profile", "tiny", "--stage", "tune", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert sorted(p.name for p in (tmp_path / "w" / "records").iterdir()) == [".lock", f"{key}.json"]


def test_grid_work_dirs_hold_one_grid_for_one_process_at_a_time(tmp_path):
    """A --work directory keeps the signature of its grid (another grid's records are never read as
    this one's), one process at a time runs its jobs, and a result is saved before its plot."""
    import fcntl

    from common import check_grid, run_jobs, save_grid_result

    rec = tmp_path / "records"
    check_grid(str(rec), dict(profile_config={"steps": 2}, grids={"sft": [{"lr": 1e-5}]}), write=False)
    assert not (rec / "grid.json").exists()  # an analysis writes nothing
    check_grid(str(rec), dict(profile_config={"steps": 2}, grids={"sft": [{"lr": 1e-5}]}), write=True)
    check_grid(str(rec), dict(profile_config={"steps": 2}, grids={"sft": [{"lr": 1e-5}]}), write=True)
    with pytest.raises(SystemExit, match=r"another grid .*differs in \['profile_config'\]\): use a new --work"):
        check_grid(str(rec), dict(profile_config={"steps": 300}, grids={"sft": [{"lr": 1e-5}]}), write=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".lock", "a") as other:  # another process's lock (flock: per open file)
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another process is running jobs of"):
            run_jobs([dict(key="a", deps=[])], dict, (), str(busy), 1)
    assert not (busy / "a.json").exists()

    # workers end with the process that runs the grid, however it ends (here: SIGKILL), whatever
    # the job does with SIGTERM
    script = tmp_path / "grid.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from common import run_jobs\n"
        "import signal\n"
        "def job(j, d):\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a trainer that checkpoints on SIGTERM goes on\n"
        "    with open(os.path.join(d, 'worker.pid'), 'w') as f:\n"
        "        f.write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    run_jobs([dict(key='slow', deps=[])], job, (sys.argv[1],), os.path.join(sys.argv[1], 'records'), 1)\n")
    grid = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    pid_file = tmp_path / "worker.pid"
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    grid.kill()
    grid.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    worker = int(pid_file.read_text())
    for _ in range(100):
        if not alive(worker):
            break
        time.sleep(0.1)
    assert not alive(worker)

    # a failure stops the queue, but the run beside it is kept when it finishes
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from common import run_jobs\n"
        "def job(j):\n"
        "    time.sleep(0.5 if j['key'] == 'bad' else 4)\n"
        "    if j['key'] == 'bad':\n"
        "        raise ValueError('bad input')\n"
        "    return dict(ok=j['key'])\n"
        "if __name__ == '__main__':\n"
        "    jobs = [dict(key=k, deps=[], cost=c) for k, c in (('long', 3), ('bad', 2), ('queued', 1))]\n"
        "    run_jobs(jobs, job, (), os.path.join(sys.argv[1], 'records2'), 2)\n")
    failed = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode != 0 and "1 job(s) failed, first bad: ValueError('bad input')" in failed.stderr
    kept = {p.name for p in (tmp_path / "records2").glob("*.json")}  # (a queued job may have started)
    assert "long.json" in kept and "bad.json" not in kept

    def broken_plot(result, png):
        raise RuntimeError("no display")

    with pytest.raises(RuntimeError, match="no display"):
        save_grid_result(dict(analysis=1), str(tmp_path / "r.json"), broken_plot)
    assert json.loads((tmp_path / "r.json").read_text()) == dict(analysis=1)


def test_bench_control_round2_keeps_a_diverged_run(tmp_path, monkeypatch):
    """The amendment: a run whose PPO update diverges is kept as a record marked ``diverged``, scored
    on the evaluations before it; the verdict row names the seed and gives the difference without it."""
    pytest.importorskip("aihf_fast._C")
    import bench_control_round2 as bench

    from aihf_fast.train.control import ppo

    work, out = tmp_path / "w", tmp_path / "r2.json"
    bench.main(["--profile", "tiny", "--work", str(work), "--out", str(out)])
    prof, key = bench.PROFILES["tiny"], "rlhf-clean-bc-p8-Hopper-v5-s10"
    job = next(j for j in bench.plan(prof) if j["key"] == key)
    update, calls = ppo.PPO.update, []

    def diverge_second(self, batch, rewards=None):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("the PPO update diverged: test")
        return update(self, batch, rewards)

    monkeypatch.setattr(ppo.PPO, "update", diverge_second)
    rec = bench.run_job(job, prof, str(work), bench.treatments(prof), "test")
    assert rec["diverged"]["message"] == "the PPO update diverged: test" and rec["diverged"]["iteration"] == 1
    assert [e["iter"] for e in rec["evals"]] == [0, 1] and rec["env_steps"] > 0
    assert rec["final"] == pytest.approx(np.mean([e["eval/return"] for e in rec["evals"]]))
    (work / "records" / f"{key}.json").write_text(json.dumps(rec))
    res = bench.main(["--profile", "tiny", "--analyse-only", "--work", str(work), "--out", str(tmp_path / "d.json")])
    row = next(v for v in res["analysis"]["verdict"] if v["primary"])
    assert row["diverged_seeds_vs_rlhf"] == [10] and row["diff_vs_rlhf_without_diverged"] is None  # no seed left
    assert "diverged_seeds_vs_irl" not in row and "diverged_seeds_vs_bc" not in row
    assert next(t for t in res["analysis"]["table"] if t["method"] == "rlhf" and t["arm"] == "clean"
                and t["start"] == "bc")["diverged_seeds"] == [10]
    assert not any(k.startswith("diverged_seeds") for v in res["analysis"]["verdict"] if not v["primary"] for k in v)
    # irl trains with PPO too: its divergence is named in the rows that compare with it
    irl = work / "records" / "irl-clean-bc-p0-Hopper-v5-s10.json"
    irl.write_text(json.dumps(dict(json.loads(irl.read_text()), diverged=rec["diverged"])))
    res = bench.main(["--profile", "tiny", "--analyse-only", "--work", str(work), "--out", str(tmp_path / "d.json")])
    row = next(v for v in res["analysis"]["verdict"] if v["primary"])
    assert row["diverged_seeds_vs_irl"] == [10] and row["diff_vs_irl_without_diverged"] is None
    # a diverged tuning run: its configuration gets the worst signal, so the rule picks another
    recs = {r["key"]: r for r in res["records"] if r.get("kind") == "run"}
    chosen = bench.select(recs, "Hopper-v5", "aihf", prof)["config"]
    key = f"tune-aihf-c{chosen}-Hopper-v5-s200"
    recs[key] = dict(recs[key], diverged=rec["diverged"])
    assert bench.selection_signal(recs[key]) == (-np.inf, -np.inf)
    assert bench.select(recs, "Hopper-v5", "aihf", prof)["config"] != chosen
    # a tuning record that ran another configuration than the grid's index (the grid edited since)
    recs[key] = dict(recs[key], chosen=dict(recs[key]["chosen"], options=dict(reward_lr=1.0, reward_steps=1)))
    with pytest.raises(SystemExit, match=f"Hopper-v5/aihf configuration {chosen} ran .*the grid changed"):
        bench.select(recs, "Hopper-v5", "aihf", prof)
    (work / "records" / f"{key}.json").write_text(json.dumps(recs[key]))
    (work / "records" / "grid.json").unlink()  # a --work from before grid.json: its records are checked instead
    with pytest.raises(SystemExit, match=f"1 tuning records in .* ran another configuration .*{key}"):
        bench.main(["--profile", "tiny", "--work", str(work), "--out", str(tmp_path / "d.json")])
    assert not (work / "records" / "grid.json").exists()


def test_bench_control_round2_select_ties_by_nll():
    """Equal held-out pair counts tie (float32 accuracies averaged over seeds differ in the last
    bits), so the held-out pair NLL decides; a diverged tuning seed makes its configuration the worst."""
    import bench_control_round2 as bench

    prof = dict(bench.PROFILES["full"], tune_seeds=[200, 201])
    acc = {0: (0.85, 0.85), 1: (0.84, 0.86), 2: (0.80, 0.80), 3: (0.86, 0.86)}
    nll = {0: 0.9, 1: 0.1, 2: 0.05, 3: 0.01}
    records = {}
    for c in range(4):
        for i, s in enumerate(prof["tune_seeds"]):
            ev = {"reward/heldout_accuracy": float(np.float32(acc[c][i])), "reward/heldout_nll": nll[c]}
            records[f"tune-rlhf-c{c}-Hopper-v5-s{s}"] = dict(
                method="rlhf", evals=[ev], chosen=dict(options=bench._grid("rlhf", prof)[c]))
    f32 = lambda x: float(np.float32(x))  # noqa: E731 (as the trainer's records hold them)
    assert np.mean([f32(0.84), f32(0.86)]) < np.mean([f32(0.85)] * 2)  # the trap
    records["tune-rlhf-c3-Hopper-v5-s201"]["diverged"] = True
    assert bench.select(records, "Hopper-v5", "rlhf", prof)["config"] == 1


def test_bench_alignment_llm_round2_an_input_that_diverges_stops_the_grid(monkeypatch):
    """An SFT anchor or reward model that diverges cannot be ranked like a run: it stops the grid,
    naming the input and that a rerun repeats it."""
    import bench_alignment_llm_round2 as bench

    from aihf_fast.train.llm import Diverged

    def diverge(opts):
        raise Diverged("loss is nan at step 7")

    monkeypatch.setattr(bench.round1, "_train", diverge)
    with pytest.raises(RuntimeError, match=r"the SFT anchor of seed 20, design A diverged \(loss is nan at step 7\)"
                                           r".*rerunning repeats it"):
        bench._train_input({}, "the SFT anchor of seed 20, design A")
