"""The control trainer end to end on InvertedPendulum: an expert by PPO with snapshots, data drawn
from it, every method, exact --resume, bad configs, and a learning test (RL solver and aihf far
above a random policy)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("aihf_fast._C")

from aihf_fast.train.control.cli import main  # noqa: E402
from aihf_fast.train.control.config import ControlConfig  # noqa: E402
from aihf_fast.train.control.datagen import make_data  # noqa: E402
from aihf_fast.train.control.trainer import train  # noqa: E402
from aihf_fast.train.options import ConfigError  # noqa: E402

TASK = "InvertedPendulum-v5"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    """A PPO expert on the true reward (solves the task in ~20k steps), with snapshots."""
    out = str(tmp_path_factory.mktemp("ctl") / "expert")
    s = train(ControlConfig(task=TASK, method="expert", env_steps=16 * 128 * 16, eval_every=2, save_every=2,
                            output_dir=out, progress=False))
    return out, s


@pytest.fixture(scope="module")
def data(expert, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ctl_data"))
    meta = make_data(expert[0], out, num_demos=4, demo_quality=0.5, num_pairs=60, segment_len=10, pool_episodes=4)
    return out, meta


def test_expert_learns_and_keeps_snapshots(expert):
    out, s = expert
    rets = [e["eval/return"] for e in s["evals"]]
    assert rets[0] < 100 and s["final_return"] >= 900          # random-ish start, max is 1000
    snaps = sorted(os.listdir(os.path.join(out, "policies")))
    assert len(snaps) == 9 and s["sim_seconds"] > 0 and s["learn_seconds"] > 0


def test_data_files(data):
    out, meta = data
    from aihf_fast.train.control import SegmentPairs, Trajectories

    demos, prefs = Trajectories.load(os.path.join(out, "demos.npz")), SegmentPairs.load(os.path.join(out, "prefs.npz"))
    assert demos.num_episodes == 4 and len(prefs) == 60 and prefs.obs.shape[2] == 10
    assert meta["random_return"] < meta["demo_mean_return"] < meta["expert_best_return"]
    assert demos.meta["snapshot_iter"] == meta["demo_snapshot_iter"]
    # the demonstrations are imperfect: their return is near the chosen snapshot's, below the expert's
    assert meta["demo_mean_return"] < 0.9 * meta["expert_best_return"]


@pytest.mark.parametrize("method,kw", [("bc", {}), ("irl", {}), ("rlhf", {}), ("aihf", {}), ("aihf", dict(num_pairs=0)),
                                       ("aihf", dict(reward_next_obs=True, bc_init=True))])
def test_each_method_runs(data, tmp_path, method, kw):
    d = data[0]
    cfg = ControlConfig(task=TASK, method=method, demonstrations=os.path.join(d, "demos.npz"),
                        preferences=os.path.join(d, "prefs.npz"), env_steps=2 * 8 * 32, num_envs=8, rollout_steps=32,
                        rlhf_reward_steps=20, bc_steps=20, eval_episodes=2, eval_every=1, output_dir=str(tmp_path / "o"),
                        progress=False, **kw)
    s = train(cfg)
    assert len(s["evals"]) == (1 if method == "bc" else 3)
    assert os.path.isfile(tmp_path / "o" / "curves.png") and os.path.isfile(tmp_path / "o" / "summary.json")
    log = [json.loads(x) for x in open(tmp_path / "o" / "log.jsonl")]
    if method in ("irl", "rlhf", "aihf"):
        assert all(r["reward/corr_true"] is None or -1 <= r["reward/corr_true"] <= 1 for r in log if "ppo/pg_loss" in r)
    if method == "aihf" and not kw:
        assert any("reward_step/loss/preference" in r and "reward_step/loss/demo" in r for r in log)
    if kw.get("num_pairs") == 0:  # no pairs: the demonstration term alone
        assert not any("reward_step/loss/preference" in r for r in log)


def test_resume_is_exact(data, tmp_path):
    d = data[0]
    base = dict(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                preferences=os.path.join(d, "prefs.npz"), num_envs=4, rollout_steps=32, eval_every=2, save_every=2,
                eval_episodes=2, progress=False)
    full = train(ControlConfig(**base, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "full")))
    train(ControlConfig(**base, env_steps=2 * 4 * 32, output_dir=str(tmp_path / "part")))
    resumed = train(ControlConfig(**base, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "part"), resume=True))
    a = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "part" / "log.jsonl")]
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert full["final_return"] == resumed["final_return"]
    with pytest.raises(ConfigError, match="holds a checkpoint"):
        train(ControlConfig(**base, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "part")))
    with pytest.raises(ConfigError, match="options differ"):
        train(ControlConfig(**{**base, "w_P": 0.5}, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "part"), resume=True))


def _damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flip":  # same size, one byte changed
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "no_manifest":  # a save cut short before its manifest was written
        os.remove(str(path) + ".manifest.json")
    else:  # garbage in place of the checkpoint and a manifest that matches it
        from aihf_fast.train.checkpoints import write_file_manifest

        open(path, "wb").write(b"not a checkpoint")
        write_file_manifest(str(path))


def test_damaged_checkpoint_falls_back_to_the_previous_one(data, tmp_path, capsys):
    """checkpoint.pt damaged in each way: --resume names it, continues from checkpoint.prev.pt
    and equals the uninterrupted run; both damaged: a one-line error (exit 2 from the CLI)."""
    import shutil

    d = data[0]
    base = dict(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                preferences=os.path.join(d, "prefs.npz"), num_envs=4, rollout_steps=32, eval_every=2, save_every=2,
                eval_episodes=2, progress=False)
    n = 4 * 32
    train(ControlConfig(**base, env_steps=6 * n, output_dir=str(tmp_path / "full")))
    part = tmp_path / "part"
    train(ControlConfig(**base, env_steps=4 * n, output_dir=str(part)))
    assert torch.load(part / "checkpoint.prev.pt", weights_only=False)["it"] == 2
    assert torch.load(part / "checkpoint.pt", weights_only=False)["it"] == 4
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
    want = [strip(json.loads(x)) for x in open(tmp_path / "full" / "log.jsonl")]
    capsys.readouterr()
    for how in ("truncate", "flip", "no_manifest", "garbage"):
        out = tmp_path / how
        shutil.copytree(part, out)
        _damage(out / "checkpoint.pt", how)
        train(ControlConfig(**base, env_steps=6 * n, output_dir=str(out), resume=True))
        err = capsys.readouterr().err
        assert f"passing over a damaged checkpoint: {out / 'checkpoint.pt'}" in err, (how, err)
        assert "(iteration 2)" in err and (out / "checkpoint.damaged.pt").exists(), err
        assert [strip(json.loads(x)) for x in open(out / "log.jsonl")] == want, how
        assert torch.load(out / "checkpoint.prev.pt", weights_only=False)["it"] == 4  # saves at 4, 6 after it
    # a rotation cut short between its renames: checkpoint.pt already moved to checkpoint.prev.pt,
    # its manifest not yet: the file matches the other manifest and is resumed (iteration 4)
    cut = tmp_path / "rotation_cut"
    shutil.copytree(part, cut)
    os.replace(cut / "checkpoint.pt", cut / "checkpoint.prev.pt")
    train(ControlConfig(**base, env_steps=6 * n, output_dir=str(cut), resume=True))
    assert "damaged" not in capsys.readouterr().err
    assert [strip(json.loads(x)) for x in open(cut / "log.jsonl")] == want
    both = tmp_path / "both"
    shutil.copytree(part, both)
    _damage(both / "checkpoint.pt", "truncate")
    _damage(both / "checkpoint.prev.pt", "flip")
    with pytest.raises(ConfigError, match="no intact checkpoint") as e:
        train(ControlConfig(**base, env_steps=6 * n, output_dir=str(both), resume=True))
    assert "checkpoint.prev.pt: checksum differs" in str(e.value)
    flags = ["--task", TASK, "--method", "aihf", "--demonstrations", base["demonstrations"], "--preferences",
             base["preferences"], "--num-envs", "4", "--rollout-steps", "32", "--eval-every", "2", "--save-every", "2",
             "--eval-episodes", "2", "--env-steps", str(6 * n), "--progress", "false"]
    capsys.readouterr()
    assert main([*flags, "--output-dir", str(both), "--resume", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: no intact checkpoint") and err.count("\n") == 1, err
    # --overwrite starts clean: no checkpoint of the earlier run is left to fall back to
    assert main([*flags, "--output-dir", str(both), "--overwrite", "true", "--env-steps", str(2 * n)]) == 0
    assert not (both / "checkpoint.prev.pt").exists() and (both / "checkpoint.pt.manifest.json").exists()


def test_sim_threads_do_not_change_the_run(data, tmp_path):
    d = data[0]
    base = dict(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                preferences=os.path.join(d, "prefs.npz"), num_envs=4, rollout_steps=32, eval_every=2,
                eval_episodes=2, env_steps=2 * 4 * 32, progress=False)
    logs = []
    for threads in (1, 4):
        train(ControlConfig(**base, sim_threads=threads, output_dir=str(tmp_path / f"t{threads}")))
        strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
        logs.append([strip(json.loads(x)) for x in open(tmp_path / f"t{threads}" / "log.jsonl")])
    assert logs[0] == logs[1] and len(logs[0]) > 2


@pytest.mark.slow
def test_learning_beats_random_by_a_wide_margin(data, tmp_path):
    """aihf from imperfect demonstrations (about half the expert's return) and 60 pairs learns the
    task: far above the random policy (under a minute here)."""
    d, meta = data
    s = train(ControlConfig(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                            preferences=os.path.join(d, "prefs.npz"), env_steps=20 * 16 * 128, eval_every=5,
                            output_dir=str(tmp_path / "a"), progress=False))
    assert s["final_return"] >= max(500.0, 10 * meta["random_return"])


@pytest.mark.parametrize("flags,msg", [
    (["--task", "Nope-v5"], "task: unknown 'Nope-v5'"),
    (["--method", "gail"], "method must be one of"),
    (["--method", "irl"], "method 'irl' needs demonstrations"),
    (["--method", "rlhf", "--preferences", "/no/file.npz"], "preferences: file not found"),
    (["--method", "aihf", "--w-D", "-1"], "w_D must be >= 0"),
    (["--method", "bc", "--demonstrations", "DEMOS", "--num-envs", "0"], "num_envs must be >= 1"),
    (["--method", "rlhf", "--preferences", "PREFS", "--num-pairs", "0"], "rlhf needs at least one preference pair"),
    (["--method", "rlhf", "--preferences", "PREFS", "--num-pairs", "1000"], "num_pairs=1000 but"),
    (["--method", "bc", "--demonstrations", "DEMOS", "--sim-threads", "0"], "sim_threads must be >= 1"),
    (["--method", "irl", "--demonstrations", "DEMOS", "--reward-lr-P", "1e-4"], "reward_lr_P is an option of method 'aihf'"),
    (["--method", "aihf", "--demonstrations", "DEMOS", "--w-P", "0", "--reward-lr-P", "1e-4"], "it needs both terms"),
    (["--method", "rlhf", "--preferences", "PREFS", "--reward-replay", "100"], "reward_replay keeps policy samples"),
    (["--method", "rlhf", "--preferences", "PREFS", "--heldout-pairs", "-1"], "heldout_pairs must be >= 0"),
    (["--method", "rlhf", "--preferences", "PREFS", "--rlhf-patience", "0"], "rlhf_patience must be >= 1"),
    (["--method", "rlhf", "--preferences", "PREFS", "--heldout-pairs", "60"], "none would be left to train on"),
    (["--method", "rlhf", "--preferences", "PREFS", "--heldout-pairs", "20", "--num-pairs", "50"],
     "(20 more held out)"),
    (["--method", "irl", "--demonstrations", "DEMOS", "--termination", "end"], "termination must be one of"),
    (["--method", "rlhf", "--preferences", "PREFS", "--termination", "absorbing"],
     "methods irl and aihf (w_D > 0) only, got method 'rlhf'"),
    (["--method", "irl", "--demonstrations", "DEMOS", "--termination", "absorbing", "--reward-replay", "100"],
     "does not combine with reward_replay"),
    (["--method", "irl", "--demonstrations", "DEMOS", "--termination", "horizon"],
     "InvertedPendulum-v5 ends episodes without a terminate_when_unhealthy option"),
    (["--method", "bc", "--demonstrations", "DEMOS", "--termination", "horizon"], "method 'bc' has none"),
    (["--method", "irl", "--demonstrations", "DEMOS", "--termination", "absorbing"],
     "needs eval_every x rollout_steps >= the time limit"),
    (["--task", "HalfCheetah-v5", "--method", "irl", "--demonstrations", "DEMOS", "--termination", "absorbing"],
     "never ends an episode before the time limit"),
    (["--method", "bc", "--demonstrations", "DEMOS", "--heldout-demos", "4"], "none would be left to train on"),
    (["--method", "rlhf", "--preferences", "PREFS", "--heldout-demos", "1"], "give demonstrations"),
])
def test_bad_config_fails_early(data, tmp_path, capsys, flags, msg):
    d = data[0]
    flags = [f.replace("DEMOS", os.path.join(d, "demos.npz")).replace("PREFS", os.path.join(d, "prefs.npz")) for f in flags]
    rc = main([*flags, "--output-dir", str(tmp_path / "o"), "--progress", "false"])
    assert rc == 2 and msg in capsys.readouterr().err


def test_data_for_another_task_is_refused(data, tmp_path, capsys):
    d = data[0]
    rc = main(["--task", "Hopper-v5", "--method", "bc", "--demonstrations", os.path.join(d, "demos.npz"),
               "--output-dir", str(tmp_path / "o"), "--progress", "false"])
    assert rc == 2 and "do not match Hopper-v5" in capsys.readouterr().err


def test_cli_failures_are_one_line_errors_with_exit_code_2(data, tmp_path, capsys):
    d = data[0]
    demos, prefs = os.path.join(d, "demos.npz"), os.path.join(d, "prefs.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"junk")
    cases = [
        (["--method", "bc", "--demonstrations", str(garbage)], "not an .npz archive"),
        (["--method", "aihf", "--demonstrations", prefs, "--preferences", demos], "missing arrays"),  # swapped
        (["data", "--expert-dir", str(tmp_path / "no_expert"), "--out-dir", str(tmp_path / "d")], "no config.json"),
    ]
    import shutil

    bad_expert = tmp_path / "bad_expert"  # a truncated policy snapshot
    shutil.copytree(data[1]["expert_dir"], bad_expert)
    snap = sorted((bad_expert / "policies").iterdir())[0]
    snap.write_bytes(snap.read_bytes()[:100])
    cases.append((["data", "--expert-dir", str(bad_expert), "--out-dir", str(tmp_path / "d")],
                  f"snapshot {snap} cannot be read"))
    for flags, msg in cases:
        extra = [] if flags[0] == "data" else ["--output-dir", str(tmp_path / "o"), "--progress", "false"]
        rc = main([*flags, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match="no config.json"):  # --debug: the error itself, with its traceback
        main(["data", "--expert-dir", str(tmp_path / "no_expert"), "--out-dir", str(tmp_path / "d"), "--debug"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    out = " ".join(out.split())
    assert "Subcommand `data --expert-dir" in out and "expert run" in out


def test_curves_png_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys

    from aihf_fast.train.control import trainer

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    log = tmp_path / "log.jsonl"
    log.write_text("")
    trainer._plot(str(log), str(tmp_path / "curves.png"), "t")
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_two_reward_rates_and_replay(data, tmp_path):
    """aihf's reward step with reward_lr_P: two Adam updates (demonstration term at reward_lr,
    then the pairs at reward_lr_P, moments per term), against two torch Adam written out; the
    replay buffer holds the newest policy state-actions and is restored on --resume."""
    import copy

    from aihf_fast.train.control.reward import reward_step_loss
    from aihf_fast.train.control.trainer import Trainer

    d = data[0]
    base = dict(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                preferences=os.path.join(d, "prefs.npz"), num_envs=4, rollout_steps=32, eval_every=2, save_every=1,
                eval_episodes=2, progress=False, reward_lr=1e-3, reward_lr_P=2e-4, reward_replay=200, reward_steps=2)
    tr = Trainer(ControlConfig(**base, env_steps=4 * 32, output_dir=str(tmp_path / "unit")))
    tr.envs.reset(seed=0)
    batch = tr.agent.collect(tr.envs, seed=0)
    ref = copy.deepcopy(tr.reward)
    rng = copy.deepcopy(tr.rng)
    tr._reward_step(batch)
    # the same draws, the two updates by hand
    i = rng.integers(len(tr.demos), size=256)
    T, N = batch["rewards"].shape
    j = rng.integers(T * N, size=256)
    demo = (tr.demos.obs[i], tr.demos.act[i])
    samples = (batch["obs"].reshape(T * N, -1)[j], batch["actions"].reshape(T * N, -1)[j])
    pairs = tr.prefs.take(rng.integers(len(tr.prefs), size=min(64, len(tr.prefs))))
    for lr, kw in ((1e-3, dict(demo=demo, samples=samples, w_D=1.0, w_P=0.0, l2=1e-3)),
                   (2e-4, dict(pairs=pairs, w_D=0.0, w_P=1.0, l2=1e-3))):
        opt = torch.optim.Adam(ref.parameters(), lr=lr)
        loss, _ = reward_step_loss(ref, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(tr.reward.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    tr._remember_samples(batch)
    tr._remember_samples(batch)
    obs = torch.as_tensor(batch["obs"]).reshape(128, -1).float()
    assert tr.replay[0].shape[0] == 200 and tr.replay[0].dtype == torch.float32
    newest = tr.replay[0][-128:]  # the last batch, shuffled: all of its rows
    assert sorted(map(tuple, newest.tolist())) == sorted(map(tuple, obs.tolist()))
    # end to end: resumed = uninterrupted, with the buffer in the checkpoint
    full = train(ControlConfig(**base, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "full")))
    train(ControlConfig(**base, env_steps=2 * 4 * 32, output_dir=str(tmp_path / "part")))
    resumed = train(ControlConfig(**base, env_steps=4 * 4 * 32, output_dir=str(tmp_path / "part"), resume=True))
    assert full["final_return"] == resumed["final_return"]
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
    a = [strip(json.loads(x)) for x in open(tmp_path / "full" / "log.jsonl")]
    b = [strip(json.loads(x)) for x in open(tmp_path / "part" / "log.jsonl")]
    assert a == b and any("reward_step/loss/preference" in r for r in a)


def test_sigterm_checkpoints_and_resumes_exactly(data, tmp_path, monkeypatch, capsys):
    """SIGTERM after iteration 3: the run goes on to the next evaluation boundary (iteration 4,
    where the environments restart from a seeded reset; not a save_every iteration), writes a
    checkpoint, exits with 143 and a one-line message, and --resume equals the uninterrupted run."""
    d = data[0]
    flags = ["--task", TASK, "--method", "aihf", "--demonstrations", os.path.join(d, "demos.npz"), "--preferences",
             os.path.join(d, "prefs.npz"), "--num-envs", "4", "--rollout-steps", "32", "--eval-every", "2",
             "--save-every", "5", "--eval-episodes", "2", "--env-steps", str(6 * 4 * 32), "--progress", "false"]
    assert main([*flags, "--output-dir", str(tmp_path / "full")]) == 0
    monkeypatch.setenv("AIHF_FAST_SIGNAL_AFTER_STEP", "3")
    assert main([*flags, "--output-dir", str(tmp_path / "cut")]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM after step 4" in err and "Traceback" not in err
    assert "continuing to iteration 4 (the next evaluation boundary" in err
    monkeypatch.delenv("AIHF_FAST_SIGNAL_AFTER_STEP")
    assert main([*flags, "--output-dir", str(tmp_path / "cut"), "--resume", "true"]) == 0
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
    a = [strip(json.loads(x)) for x in open(tmp_path / "full" / "log.jsonl")]
    b = [strip(json.loads(x)) for x in open(tmp_path / "cut" / "log.jsonl")]
    assert a == b
    monkeypatch.setenv("AIHF_FAST_SIGNAL_AFTER_STEP", "0")  # during start-up: stop at once, nothing written
    assert main([*flags, "--output-dir", str(tmp_path / "early")]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM while a run was starting" in err and "Traceback" not in err
    assert not (tmp_path / "early" / "checkpoint.pt").exists()


def test_learn_threads_change_the_run_by_float_noise_only(data, tmp_path):
    """The learner's torch threads (1 by default) change reduction order only: returns and losses
    agree to float noise, and the thread count is restored afterwards."""
    d = data[0]
    base = dict(task=TASK, method="aihf", demonstrations=os.path.join(d, "demos.npz"),
                preferences=os.path.join(d, "prefs.npz"), num_envs=4, rollout_steps=32, eval_every=2,
                eval_episodes=2, env_steps=2 * 4 * 32, progress=False)
    before = torch.get_num_threads()
    logs = []
    for threads in (1, 2):
        train(ControlConfig(**base, learn_threads=threads, output_dir=str(tmp_path / f"t{threads}")))
        assert torch.get_num_threads() == before
        logs.append([json.loads(x) for x in open(tmp_path / f"t{threads}" / "log.jsonl")])
    assert len(logs[0]) == len(logs[1]) > 2
    for a, b in zip(*logs):
        for k, v in a.items():
            if isinstance(v, float) and not k.endswith("_s"):
                assert v == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, v, b[k])


def _ppo_batch(T=32, N=8, D=5, A=2, seed=0):
    rng = np.random.default_rng(seed)
    return dict(rewards=rng.normal(size=(T, N)), terminated=rng.random((T, N)) < 0.05,
                truncated=rng.random((T, N)) < 0.02, obs=rng.normal(size=(T, N, D)).astype(np.float32),
                next_obs=rng.normal(size=(T, N, D)).astype(np.float32),
                actions=rng.normal(size=(T, N, A)).astype(np.float32))


@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
@pytest.mark.parametrize("B", [256, 7, 2, 1])
def test_ppo_hand_written_gradients_equal_autograd(ent_coef, B):
    """PPO._loss_and_grads (by hand, into the flat gradient buffer) against ``PPO.loss`` by
    autograd: loss terms, ratios and every parameter's gradient, with ratios on both sides of the
    clip range, exactly 1 (every branch tied), and odd minibatch sizes."""
    from aihf_fast.train.control.ppo import PPO, PPOConfig

    D, A = 11, 3
    ag = PPO(D, A, -np.ones(A), np.ones(A), PPOConfig(ent_coef=ent_coef, hidden=(32, 16)), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ag.params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    obs, act = torch.randn(B, D, generator=g), torch.randn(B, A, generator=g)
    adv, ret = torch.randn(B, generator=g), torch.randn(B, generator=g)
    from aihf_fast.train.control.ppo import _forward, _linears

    with torch.no_grad():  # as the update computes it: the hand-written path's ratios are exactly 1
        logp = ag._gaussian(_forward(_linears(ag.actor), obs)[0], act)[0]
    for old_logp in (logp + 0.3 * torch.randn(B, generator=g), logp):  # clipped ratios; ratio == 1
        loss, pg, vl, ratio = ag.loss(obs, act, old_logp, adv, ret)
        for p in ag.params:
            p.grad = None
        loss.backward()
        pg2, vl2, ratio2 = ag._loss_and_grads(obs, act, old_logp, adv, ret)
        if old_logp is logp:
            assert bool((ratio2 == 1).all())
        torch.testing.assert_close(ratio2, ratio.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pg2, pg.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vl2, vl.detach(), rtol=1e-4, atol=1e-6)
        for p, h in zip(ag.params, ag._grads):  # float32 sums over B rows, in another order per
            # CPU's matmul kernel (AVX2 / AVX-512): absolute noise relative to the gradient's scale
            torch.testing.assert_close(h, p.grad, rtol=1e-4, atol=2e-5 * float(p.grad.abs().max()))
        assert ag.flat.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", [dict(), dict(ent_coef=0.01, minibatch_size=100, epochs=3)])
def test_ppo_update_equals_the_autograd_loop(cfg):
    """PPO.update against the plain loop it replaces (``PPO.loss`` by autograd, per-tensor Adam,
    clip_grad_norm_): the same parameters and statistics after two updates, within float noise
    (a partial last minibatch included)."""
    from aihf_fast.train.control.ppo import PPO, PPOConfig

    class AutogradPPO(PPO):
        def _minibatch_step(self, obs, act, old_logp, adv, ret):
            if not hasattr(self, "plain_opt"):
                self.plain_opt = torch.optim.Adam(self.params, lr=self.cfg.lr, eps=1e-5, foreach=False)
            loss, pg, vl, ratio = self.loss(obs, act, old_logp, adv, ret)
            self.plain_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.plain_opt.step()
            return pg.detach(), vl.detach(), ratio.detach()

    batch = _ppo_batch()
    agents, stats = [], []
    for cls in (PPO, AutogradPPO):
        ag = cls(5, 2, -np.ones(2), np.ones(2), PPOConfig(**cfg), seed=0)
        torch.manual_seed(1)
        stats.append([ag.update(batch) for _ in range(2)])
        agents.append(ag)
    for p, q in zip(agents[0].params, agents[1].params):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    for a, b in zip(*stats):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert agents[0].flat.data_ptr() == agents[0].params[0].data_ptr()  # the parameters view the flat one


def test_ppo_update_after_deepcopy_zero_grad_and_float64_actions():
    """What undoes the flat parameter's views (a deepcopy, ``opt.zero_grad()``) is repaired before
    the next update, with the same result; float64 actions update as float32 ones."""
    import copy

    from aihf_fast.train.control.ppo import PPO

    batch = _ppo_batch()
    ag = PPO(5, 2, -np.ones(2), np.ones(2), seed=0)
    ag.update(batch)
    twins = [copy.deepcopy(ag), copy.deepcopy(ag)]
    twins[1].opt.zero_grad()
    out = []
    for x in (ag, *twins):
        torch.manual_seed(5)
        out.append(x.update(dict(batch, actions=batch["actions"].astype(np.float64)) if x is ag else batch))
        assert all(p.data_ptr() == x.flat.data_ptr() + 4 * o for p, o in
                   zip(x.params, np.cumsum([0] + [q.numel() for q in x.params])))
    assert out[0] == out[1] == out[2]
    torch.testing.assert_close(twins[0].flat, ag.flat, rtol=0, atol=0)
    torch.testing.assert_close(twins[1].flat, ag.flat, rtol=0, atol=0)
    assert twins[0].flat.data_ptr() != ag.flat.data_ptr()


def test_ppo_loads_a_per_tensor_adam_checkpoint():
    """A checkpoint whose Adam state is per parameter tensor (written before the flat parameter)
    loads: the moments concatenated in order, the next update the same as from a flat one."""
    from aihf_fast.train.control.ppo import PPO

    batch = _ppo_batch()
    ag = PPO(5, 2, -np.ones(2), np.ones(2), seed=0)
    ag.update(batch)
    st = ag.state_dict()
    flat = st["opt"]
    old = {k: v for k, v in st.items()}
    sizes = [p.numel() for p in ag.params]
    moments = {k: torch.split(flat["state"][0][k], sizes) for k in ("exp_avg", "exp_avg_sq")}
    old["opt"] = dict(state={i: dict(step=flat["state"][0]["step"].clone(),
                                     **{k: m[i].reshape(p.shape).clone() for k, m in moments.items()})
                             for i, p in enumerate(ag.params)},
                      param_groups=[dict(flat["param_groups"][0], params=list(range(len(sizes))), fused=None,
                                         foreach=True)])
    a, b = PPO(5, 2, -np.ones(2), np.ones(2), seed=3), PPO(5, 2, -np.ones(2), np.ones(2), seed=4)
    a.load_state_dict(st)
    b.load_state_dict(old)
    assert b.opt.param_groups[0]["fused"] is True
    for x in (a, b):
        torch.manual_seed(2)
        x.update(batch)
    torch.testing.assert_close(a.flat, b.flat, rtol=0, atol=0)


def test_rlhf_reward_fit_stops_early_on_held_out_pairs(data, tmp_path):
    """heldout_pairs: the file's last pairs are never trained on, the same set for every budget;
    rlhf's fit stops after rlhf_patience checks without a better held-out likelihood and keeps the
    best parameters (the first evaluation, after the fit, reads the logged best likelihood); aihf
    logs them too."""
    d = data[0]
    base = dict(task=TASK, demonstrations=os.path.join(d, "demos.npz"), preferences=os.path.join(d, "prefs.npz"),
                num_envs=4, rollout_steps=32, eval_every=1, eval_episodes=2, env_steps=4 * 32, progress=False,
                heldout_pairs=15)
    train(ControlConfig(**base, method="rlhf", rlhf_reward_steps=3000, rlhf_patience=1, reward_lr=3e-3,
                        output_dir=str(tmp_path / "rlhf")))
    logs = [json.loads(x) for x in open(tmp_path / "rlhf" / "log.jsonl")]
    first = logs[0]
    assert 0 <= first["rlhf/best_step"] < first["rlhf/steps"] < 3000  # stopped early, the best kept
    assert first["rlhf/heldout_nll"] == pytest.approx(first["reward/heldout_nll"], rel=1e-6)
    assert 0 <= first["reward/heldout_accuracy"] <= 1
    train(ControlConfig(**base, method="aihf", output_dir=str(tmp_path / "aihf")))
    logs = [json.loads(x) for x in open(tmp_path / "aihf" / "log.jsonl")]
    assert all("reward/heldout_nll" in r for r in logs if "eval/return" in r)
    from aihf_fast.train.control.trainer import Trainer

    sets = [Trainer(ControlConfig(**base, method="rlhf", num_pairs=n, output_dir=str(tmp_path / f"n{n}"))).heldout
            for n in (10, 40)]
    assert np.array_equal(sets[0].obs, sets[1].obs) and len(sets[0]) == 15  # outside every budget


def test_absorbing_termination(data, tmp_path):
    """termination='absorbing' (irl): the demonstrations' and each batch's shares of absorbing
    visits enter the reward step, which learns r_abs; PPO gets r_theta - r_abs; resume is exact."""
    d = data[0]
    base = dict(task=TASK, method="irl", demonstrations=os.path.join(d, "demos.npz"), termination="absorbing",
                rl_reward="raw", num_envs=2, rollout_steps=128, eval_every=8, save_every=8, eval_episodes=2,
                progress=False)
    full = train(ControlConfig(**base, env_steps=16 * 2 * 128, output_dir=str(tmp_path / "full")))
    train(ControlConfig(**base, env_steps=8 * 2 * 128, output_dir=str(tmp_path / "part")))
    train(ControlConfig(**base, env_steps=16 * 2 * 128, output_dir=str(tmp_path / "part"), resume=True))
    a = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "part" / "log.jsonl")]
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - wall-clock differs
    assert [strip(r) for r in a] == [strip(r) for r in b]
    steps = [r for r in a if "reward_step/loss" in r]
    # an untrained policy ends its episodes within tens of steps, the demonstrations far later
    assert all(r["reward_step/samples_absorbing_share"] > 0.5 for r in steps)
    assert steps[-1]["reward_step/reward/absorbing"] < steps[0]["reward_step/reward/absorbing"] <= 0
    assert full["final_return"] > 0 and all("eval/length" in e for e in full["evals"])

    from aihf_fast.train.control.trainer import Trainer

    tr = Trainer(ControlConfig(**base, env_steps=4 * 64, output_dir=str(tmp_path / "t")))
    r_abs = tr.reward.absorbing_reward().item()
    learned = np.array([[0.5, -1.0]])
    np.testing.assert_allclose(tr._rl_rewards(learned), learned - r_abs, rtol=1e-6)
    tr.cfg.rl_reward = "sigmoid"
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(tr._rl_rewards(learned), sig(learned) - sig(r_abs), rtol=1e-6)
    # the demonstrations' share: episodes of t < H steps spend H - t absorbed
    lengths = np.array([b_ - a_ for a_, b_ in tr.demos.episode_bounds()])
    want = np.clip(1000 - lengths, 0, None).sum() / (1000 - lengths).clip(0).sum().__add__(lengths.sum())
    assert tr.demo_absorbing == pytest.approx(want)
    tr.envs.close()
    tr.eval_envs.close()


def _episodes_batches(lengths, num_envs, T, iters, reset_every, rng):
    """Rollout flags [t, env] of envs whose episodes last lengths() steps, restarted together every
    reset_every iterations (as the trainer's evaluations restart them)."""
    left = np.array([lengths(rng) for _ in range(num_envs)])
    for it in range(iters):
        term = np.zeros((T, num_envs), bool)
        for t in range(T):
            left -= 1
            term[t] = left == 0
            left[term[t]] = [lengths(rng) for _ in range(int(term[t].sum()))]
        yield it, dict(terminated=term, truncated=np.zeros((T, num_envs), bool))
        if (it + 1) % reset_every == 0:
            left = np.array([lengths(rng) for _ in range(num_envs)])


@pytest.mark.parametrize("mean_len,reset_every", [(300, 10), (800, 10), (800, 8), (60, 8)])
def test_policy_absorbing_share_matches_the_demonstrations_at_equal_lengths(data, tmp_path, mean_len, reset_every):
    """A policy whose episodes last as long as the demonstrations' gets the demonstrations' share
    (within 0.05), although the restarts at evaluations cut its long episodes and its envs start
    together (bunched terminations): the share comes from the termination hazard over the last
    iterations, not from the terminations of one batch."""
    from aihf_fast.train.control import Trajectories
    from aihf_fast.train.control.trainer import Trainer

    d = data[0]
    tr = Trainer(ControlConfig(task=TASK, method="irl", demonstrations=os.path.join(d, "demos.npz"),
                               termination="absorbing", num_envs=16, rollout_steps=128, eval_every=reset_every,
                               output_dir=str(tmp_path / "t"), progress=False))
    H = tr.max_steps
    lengths = lambda g: int(np.clip(g.integers(mean_len - 30, mean_len + 31), 1, H))  # noqa: E731
    g = np.random.default_rng(0)
    demo = Trajectories.concatenate([Trajectories(np.zeros((n, 4)), np.zeros((n, 1)), np.zeros((n, 4)), np.zeros(n),
                                                  np.zeros(n, np.int64)) for n in (lengths(g) for _ in range(200))])
    want = tr._absorbing_share(demo)
    shares = []
    for it, batch in _episodes_batches(lengths, 16, 128, 40, reset_every, np.random.default_rng(1)):
        shares.append(tr._policy_absorbing_share(batch))
        if (it + 1) % reset_every == 0:
            tr._reset_envs()
    assert abs(np.mean(shares[10:]) - want) < 0.05, (np.mean(shares[10:]), want)
    assert len(tr.hazard_counts) == 10
    # the first batch: episodes longer than it have not been seen to end, so the share is not known
    assert (shares[0] is None) == (mean_len > 128)
    tr.envs.close()
    tr.eval_envs.close()


def test_constant_positive_reward_rewards_survival_unless_measured_from_the_absorbing_state(data, tmp_path):
    """The termination bias: with a reward that is the same positive constant on every state-action,
    PPO under the task's terminations learns to prolong its episodes (and to end them with a negative
    constant); measured from an absorbing state worth the same constant (r - r_abs = 0), the episode
    length stays on the random policy's scale."""
    from aihf_fast.train.control.trainer import Trainer

    def lengths(c, termination):
        tr = Trainer(ControlConfig(task=TASK, method="irl", demonstrations=os.path.join(data[0], "demos.npz"),
                                   termination=termination, rl_reward="raw", num_envs=8, seed=1, eval_every=8,
                                   output_dir=str(tmp_path / f"{c}{termination}"), progress=False))
        with torch.no_grad():  # r_theta = c on every state-action and at the absorbing flag: r_abs = c
            tr.reward.net[-1].weight.zero_()
            tr.reward.net[-1].bias.fill_(float(np.arctanh(c / 10) * 10))
        tr._reset_envs()
        out = []
        for it in range(12):
            batch = tr.agent.collect(tr.envs, seed=it)
            out.append(batch["rewards"].size / max(int(batch["terminated"].sum()), 1))
            tr.agent.update(batch, tr._rl_rewards(tr._learned_rewards(batch)))
        tr.envs.close()
        tr.eval_envs.close()
        return out[0], float(np.mean(out[-3:]))

    first, up = lengths(1.0, "env")
    _, down = lengths(-1.0, "env")
    _, absorbed = lengths(1.0, "absorbing")
    assert up > 20 * first and down < 0.7 * first  # the bias, both ways
    assert first / 3 < absorbed < up / 8


def test_horizon_termination_trains_to_the_time_limit(tmp_path):
    """termination='horizon' (Hopper): the training envs never terminate (terminate_when_unhealthy
    off), the evaluation envs keep the task's terminations."""
    from aihf_fast.train.control.trainer import Trainer

    kw = dict(task="Hopper-v5", method="expert", num_envs=4, eval_episodes=4, progress=False)
    runs = {}
    for termination in ("env", "horizon"):
        tr = Trainer(ControlConfig(**kw, termination=termination, output_dir=str(tmp_path / termination)))
        tr._reset_envs()
        batch = tr.agent.collect(tr.envs, steps=300, seed=0)
        runs[termination] = (int(batch["terminated"].sum()), tr.evaluate()["eval/length"])
        tr.envs.close()
        tr.eval_envs.close()
    assert runs["env"][0] > 4 and runs["horizon"][0] == 0  # an untrained hopper falls within ~100 steps
    assert runs["horizon"][1] == runs["env"][1] < 300


def test_heldout_demonstrations(data, tmp_path):
    """heldout_demos: the file's last episodes are never trained on (bc's normaliser and fit use the
    others) and every evaluation logs the policy's NLL of their actions."""
    from aihf_fast.train.control import Trajectories
    from aihf_fast.train.control.trainer import Trainer

    d = os.path.join(data[0], "demos.npz")
    cfg = ControlConfig(task=TASK, method="bc", demonstrations=d, heldout_demos=1, bc_steps=50,
                        output_dir=str(tmp_path / "bc"), progress=False, eval_episodes=2)
    tr = Trainer(cfg)
    demos = Trajectories.load(d)
    a, _ = demos.episode_bounds()[-1]
    assert len(tr.demos) == a and np.array_equal(tr.heldout_demos.obs, demos.obs[a:])
    tr.train()
    ev = [json.loads(x) for x in open(tmp_path / "bc" / "log.jsonl")][-1]
    with torch.no_grad():
        want = -tr.agent.log_prob(tr.agent.normalize(demos.obs[a:]), torch.as_tensor(demos.act[a:])).mean().item()
    assert ev["eval/heldout_demo_nll"] == pytest.approx(want, rel=1e-6)
    # more BC steps fit the training episodes better; the held-out NLL is finite either way
    assert np.isfinite(ev["eval/heldout_demo_nll"]) and ev["bc/nll"] < 10


def test_ppo_update_that_diverges_says_so():
    """A PPO update that leaves non-finite parameters raises a FloatingPointError naming what to
    change, not a later error about the rollout policy."""
    from aihf_fast.train.control.ppo import PPO

    ag = PPO(5, 2, -np.ones(2), np.ones(2), seed=0)
    batch = _ppo_batch()
    with pytest.raises(FloatingPointError, match="non-finite rewards .*the reward given to PPO"):
        ag.update(dict(batch, rewards=np.full_like(batch["rewards"], np.nan)))
    with pytest.raises(FloatingPointError, match="non-finite observations .*the env"):
        ag.update(dict(batch, obs=np.full_like(batch["obs"], np.inf)))
    with torch.no_grad():
        ag.log_std.fill_(float("inf"))  # the policy itself blown up, as a diverged step leaves it
    with pytest.raises(FloatingPointError, match="diverged.*ppo_lr"):
        ag.update(batch)


def test_exported_rollout_policy_acts_as_trained_beyond_the_observation_clamp():
    """The C++ rollout policy is the trained one also where training clamps the normalised
    observation (|z| > OBS_CLIP, e.g. Ant's rare contact forces): otherwise the rollouts sample
    actions around another mean than the update's, and the probability ratio overflows."""
    from aihf_fast.train.control.ppo import OBS_CLIP, PPO

    ag = PPO(5, 2, -np.ones(2), np.ones(2), seed=0)
    rng = np.random.default_rng(0)
    ag.obs_rms.update(rng.standard_normal((512, 5)) * np.array([1.0, 2.0, 0.5, 1e-3, 3.0]))
    obs = rng.standard_normal((64, 5))
    obs[:, 3] = rng.choice([0.0, 0.5, -2.0], 64)  # a near-constant dimension: |z| up to ~2000
    m, s = ag._norm()
    assert (np.abs((obs - m) / s) > OBS_CLIP).any()
    for deterministic in (True, False):
        pol = ag.policy(deterministic=deterministic)
        x = np.clip(obs, pol.obs_low, pol.obs_high).astype(np.float32)
        for k, (w, b) in enumerate(zip(pol.weights, pol.biases)):
            x = x @ w.T + b
            if k + 1 < len(pol.weights):
                x = np.tanh(x)
        with torch.no_grad():
            want = ag.actor(ag.normalize(obs)).numpy()
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-5)
