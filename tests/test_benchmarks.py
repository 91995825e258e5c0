"""The benchmarks run end to end on tiny grids (seconds) and write valid JSON and a plot."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


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
                              "--providers", "aihf_fast,torch_eager", "--no-fwd-diag", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4 * abs(rows[1]["loss"])
    assert report["device_type"] == "cpu"


def test_bench_train_tiny(tmp_path):
    pytest.importorskip("transformers")
    import bench_train

    out = tmp_path / "train.json"
    report = bench_train.main(["--vocab", "300", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "2",
                               "--inter", "32", "--seq", "12", "--prompt", "4", "--pairs", "2", "--demos", "1",
                               "--steps", "1", "--rounds", "1", "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["aihf_fast"]["status"] == "ok" and rows["full_logit"]["status"] == "ok"
    assert rows["aihf_fast"]["tokens"] == 6 * 12 and rows["aihf_fast"]["loss_tokens"] == 6 * 8
    assert abs(rows["aihf_fast"]["first_loss"] - rows["full_logit"]["first_loss"]) < 1e-4
    assert report["ratios"]["tokens_per_s"] > 0 and report["commit"] is not None
