"""The C++ batched MuJoCo envs against gymnasium 1.4, step for step."""
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

from aihf_fast.envs import MLPPolicy, make, make_vec, task_ids

ASSETS = os.path.join(os.path.dirname(gym.__file__), "envs", "mujoco", "assets")
TASKS = ["Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5", "InvertedDoublePendulum-v5",
         "InvertedPendulum-v5", "Pusher-v5", "Reacher-v5", "Swimmer-v5", "Walker2d-v5"]
TOL = dict(rtol=1e-12, atol=1e-12)  # cos/sin/norm may round differently from numpy's; physics is bitwise


def random_actions(space, n, steps, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(space.low, space.high, size=(steps, n, space.shape[0])).astype(np.float32)


def assert_same_info(i1, i2, where):
    """gymnasium's vector info: same keys, masks, dtypes and values."""
    assert set(i1) == set(i2), (where, sorted(set(i1) ^ set(i2)))
    for k in i2:
        if k == "final_obs":
            continue
        if k == "final_info":
            assert_same_info(i1[k], i2[k], where + " final_info")
            continue
        assert i1[k].dtype == i2[k].dtype, (where, k, i1[k].dtype, i2[k].dtype)
        if k.startswith("_"):
            assert np.array_equal(i1[k], i2[k]), (where, k)
        else:
            np.testing.assert_allclose(i1[k], i2[k], **TOL, err_msg=f"{where} info {k}")


def run_both(task, n, seed, steps, mode=AutoresetMode.NEXT_STEP, threads=2, dtype=np.float32):
    ours = make_vec(task, n, num_threads=threads, autoreset_mode=mode)
    ref = gym.make_vec(task, n, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode})
    o1, i1 = ours.reset(seed=seed)
    o2, i2 = ref.reset(seed=seed)
    np.testing.assert_allclose(o1, o2, **TOL)
    assert_same_info(i1, i2, f"{task} reset")
    acts = random_actions(ref.single_action_space, n, steps, seed + 100).astype(dtype)
    ends = 0
    for t in range(steps):
        r1, r2 = ours.step(acts[t]), ref.step(acts[t])
        assert_same_info(r1[4], r2[4], f"{task} step {t}")
        for k, name in enumerate(("obs", "reward")):
            np.testing.assert_allclose(r1[k], r2[k], **TOL, err_msg=f"{task} step {t} {name}")
        assert np.array_equal(r1[2], r2[2]) and np.array_equal(r1[3], r2[3]), f"{task} step {t} dones"
        assert r1[0].dtype == np.float64 and r1[1].dtype == np.float64 and r1[2].dtype == np.bool_
        if mode == AutoresetMode.SAME_STEP and (r2[2] | r2[3]).any():
            done = r2[2] | r2[3]
            assert np.array_equal(r1[4]["_final_obs"], done)
            for i in np.flatnonzero(done):
                np.testing.assert_allclose(r1[4]["final_obs"][i], r2[4]["final_obs"][i], **TOL)
        if mode == AutoresetMode.DISABLED and (r2[2] | r2[3]).any():
            mask = r2[2] | r2[3]
            np.testing.assert_allclose(ours.reset(options={"reset_mask": mask.copy()})[0],
                                       ref.reset(options={"reset_mask": mask.copy()})[0], **TOL)
        ends += int((r2[2] | r2[3]).sum())
    ours.close()
    ref.close()
    return ends


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n,seed", [(1, 0), pytest.param(3, 12345, marks=pytest.mark.slow)])
def test_matches_gymnasium_next_step(task, n, seed):
    ends = run_both(task, n, seed, steps=1100)
    assert ends >= n  # at least the time limit, so resets were exercised


@pytest.mark.parametrize("task", ["Humanoid-v5", "HumanoidStandup-v5", "InvertedDoublePendulum-v5", "Pusher-v5"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.slow
def test_new_tasks_match_gymnasium_for_other_thread_counts(task, threads):
    assert run_both(task, 3, 99, steps=1100, threads=threads) >= 3


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
@pytest.mark.parametrize("task", ["Hopper-v5", "Reacher-v5"])
def test_matches_gymnasium_other_autoreset_modes(task, mode):
    assert run_both(task, 4, 7, steps=400, mode=mode) > 0


def test_float64_actions_match_gymnasium():
    # numpy computes the control cost in the action's dtype; so does the C++ side
    assert run_both("Ant-v5", 2, 3, steps=200, dtype=np.float64) >= 0


def _trajectory(threads, task="Walker2d-v5", n=5, steps=300):
    env = make_vec(task, n, num_threads=threads)
    obs = [env.reset(seed=3)[0]]
    acts = random_actions(env.single_action_space, n, steps, 9)
    for t in range(steps):
        obs.append(env.step(acts[t])[0])
    return np.stack(obs)


def test_same_trajectory_for_any_thread_count_and_run():
    base = _trajectory(1)
    for threads in (2, 4, 1):
        assert np.array_equal(_trajectory(threads), base)


def test_spaces_match_gymnasium():
    for task in task_ids():
        ours, ref = make_vec(task, 2), gym.make_vec(task, 2, vectorization_mode="sync")
        assert ours.single_observation_space == ref.single_observation_space, task
        assert ours.single_action_space == ref.single_action_space, task
        assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space
        assert ours.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        ref.close()
    assert sorted(task_ids()) == sorted(TASKS)


def test_single_env_face_passes_gymnasium_env_checker():
    env = make("Hopper-v5")
    check_env(env, skip_render_check=True)
    ref = gym.make("Hopper-v5")
    o1, _ = env.reset(seed=1)
    o2, _ = ref.reset(seed=1)
    np.testing.assert_allclose(o1, o2, **TOL)
    for a in random_actions(env.action_space, 1, 50, 2)[:, 0]:
        s1, s2 = env.step(a), ref.step(a)
        np.testing.assert_allclose(s1[0], s2[0], **TOL)
        assert s1[1:4] == pytest.approx(s2[1:4], abs=1e-12)
        if s2[2]:
            break


def _actor(obs_dim, nu, out_mult=1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(obs_dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, nu * out_mult))


@pytest.mark.parametrize("task", ["Hopper-v5", "Reacher-v5", "Humanoid-v5", "HumanoidStandup-v5",
                                  "InvertedDoublePendulum-v5", "Pusher-v5"])
def test_mlp_rollout_equals_pytorch_mlp_stepping_the_envs(task):
    n, T = 4, 300
    env = make_vec(task, n, num_threads=2)
    obs_dim, nu = env.single_observation_space.shape[0], env.single_action_space.shape[0]
    net = _actor(obs_dim, nu)
    low, high = env.single_action_space.low, env.single_action_space.high
    env.reset(seed=11)
    out = env.rollout(MLPPolicy.from_torch(net, squash="tanh"), T)
    # the same MLP in PyTorch, stepping a fresh env one step at a time (SAME_STEP = the rollout's semantics)
    ref = make_vec(task, n, num_threads=1, autoreset_mode=AutoresetMode.SAME_STEP)
    obs, _ = ref.reset(seed=11)
    for t in range(T):
        with torch.no_grad():
            u = torch.tanh(net(torch.as_tensor(obs, dtype=torch.float32))).double().numpy()
        a = (low + (u + 1.0) * 0.5 * (high - low)).astype(np.float32)
        np.testing.assert_allclose(out["obs"][t], obs, **TOL, err_msg=f"obs t={t}")
        np.testing.assert_allclose(out["actions"][t], a, rtol=0, atol=2e-6)
        # continue from the C++ actions (float32 MLPs may differ by one rounding from torch's)
        obs, rew, term, trunc, info = ref.step(out["actions"][t])
        np.testing.assert_allclose(out["rewards"][t], rew, **TOL)
        assert np.array_equal(out["terminated"][t], term) and np.array_equal(out["truncated"][t], trunc)
        nxt = np.where((term | trunc)[:, None], np.stack([f if f is not None else o for f, o in
                                                           zip(info.get("final_obs", [None] * n), obs)]), obs)
        np.testing.assert_allclose(out["next_obs"][t], nxt, **TOL)
    assert (out["terminated"] | out["truncated"]).any() or task in ("Reacher-v5", "HumanoidStandup-v5", "Pusher-v5")


def test_open_loop_rollout_replays_recorded_actions_and_states():
    env = make_vec("Hopper-v5", 3, num_threads=2)
    net = _actor(11, 3, out_mult=2)
    env.reset(seed=5)
    out = env.rollout(MLPPolicy.from_torch(net, gaussian=True), 200, seed=1, record_state=True)
    env.reset(seed=5)
    replay = env.rollout(actions=out["actions"], num_steps=200, record_state=True)
    for k in ("obs", "rewards", "terminated", "truncated", "next_obs", "qpos", "qvel"):
        assert np.array_equal(replay[k], out[k]), k


def test_gaussian_policy_noise_is_seeded_per_env():
    def run(seed, threads):
        env = make_vec("HalfCheetah-v5", 4, num_threads=threads)
        env.reset(seed=0)
        return env.rollout(MLPPolicy.from_torch(_actor(17, 6), gaussian=True, log_std=np.full(6, -0.5)), 50,
                           seed=seed)["actions"]
    a = run(1, 1)
    assert np.array_equal(a, run(1, 4))
    assert not np.array_equal(a, run(2, 1))
    assert not np.array_equal(a[:, 0], a[:, 1])  # independent streams per env


def test_mlp_rollout_clips_observations_to_the_policy_bounds():
    """obs_low/obs_high clip each observation before the first layer (PPO's clamp of the normalised
    observation): the actions are the PyTorch MLP's on the clipped observations, not on the raw."""
    env = make_vec("Hopper-v5", 3, num_threads=2)
    net = _actor(11, 3)
    lo, hi = np.full(11, -0.05), np.full(11, 0.05)
    lo[0], hi[0] = 1.0, 1.1  # the torso height (~1.25) is above this range: the clip binds every step
    env.reset(seed=3)
    out = env.rollout(MLPPolicy.from_torch(net, squash="none", obs_low=lo, obs_high=hi), 40)
    env.reset(seed=3)
    raw = env.rollout(MLPPolicy.from_torch(net, squash="none"), 1)
    with torch.no_grad():
        clipped = net(torch.as_tensor(np.clip(out["obs"], lo, hi), dtype=torch.float32)).numpy()
        unclipped = net(torch.as_tensor(raw["obs"], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out["actions"], clipped, rtol=0, atol=2e-6)
    np.testing.assert_allclose(raw["actions"], unclipped, rtol=0, atol=2e-6)
    assert np.abs(out["actions"][0] - raw["actions"][0]).max() > 1e-3  # the same start, another action
    for kw, msg in [(dict(obs_low=lo), "given together"), (dict(obs_low=lo[:5], obs_high=hi[:5]), r"shape \(11,\)"),
                    (dict(obs_low=hi, obs_high=lo), "obs_low must be <= obs_high"),
                    (dict(obs_low=np.where(np.arange(11) == 2, np.nan, lo), obs_high=hi), "must not be NaN")]:
        with pytest.raises(ValueError, match=msg):
            MLPPolicy.from_torch(net, **kw)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown task 'Hopper-v9'"):
        make_vec("Hopper-v9", 2)
    with pytest.raises(ValueError, match="num_envs must be an int in"):
        make_vec("Hopper-v5", 0)
    with pytest.raises(ValueError, match="num_threads"):
        make_vec("Hopper-v5", 2, num_threads=0)
    env = make_vec("Hopper-v5", 2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3\)"):
        env.step(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3\)"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32/float64"):
        env.step(np.array([["a", "b", "c"]] * 2))
    nan = np.zeros((2, 3), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"actions must be finite; actions\[1, 2\]"):
        env.step(nan)
    with pytest.raises(ValueError, match="exactly one of policy"):
        env.rollout(None, 10)
    with pytest.raises(ValueError, match="policy input size 5 != observation size 11"):
        env.rollout(MLPPolicy([np.zeros((3, 5))], [np.zeros(3)]), 10)
    with pytest.raises(ValueError, match="policy output size 4 != 3"):
        env.rollout(MLPPolicy([np.zeros((4, 11))], [np.zeros(4)]), 10)
    with pytest.raises(ValueError, match=r"actions must have shape \(10, 2, 3\)"):
        env.rollout(actions=np.zeros((10, 2, 2)), num_steps=10)
    with pytest.raises(ValueError, match="qpos and qvel must be finite"):
        env.set_state(0, np.full(6, np.nan), np.zeros(6))
    with pytest.raises(TypeError, match="reset_mask"):  # gymnasium's error type for a wrong dtype
        env.reset(options={"reset_mask": np.array([1, 0])})
    disabled = make_vec("Hopper-v5", 2, autoreset_mode=AutoresetMode.DISABLED)
    with pytest.raises(gym.error.ResetNeeded, match="never reset"):
        disabled.step(np.zeros((2, 3), np.float32))
    with pytest.raises(gym.error.ResetNeeded, match="never reset"):
        disabled.rollout(actions=np.zeros((5, 2, 3)), num_steps=5)
    disabled.reset(seed=0)
    disabled.set_state(1, np.array([0.0, 0.1, 0, 0, 0, 0]), np.zeros(6))  # fallen: terminates
    _, _, term, _, _ = disabled.step(np.zeros((2, 3), np.float32))
    assert term.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"envs \[1\] ended"):
        disabled.step(np.zeros((2, 3), np.float32))
    out = disabled.rollout(actions=np.zeros((3, 2, 3)), num_steps=3)  # the rollout resets env 1 itself
    assert not out["terminated"][0, 1]
    disabled.step(np.zeros((2, 3), np.float32))  # and leaves no stale flags behind
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(np.zeros((2, 3), np.float32))


def test_core_rejects_what_could_crash_it():
    import threading

    from aihf_fast import _C

    xml = f"{ASSETS}/hopper.xml"
    with pytest.raises(ValueError, match="num_threads"):
        _C.BatchEnv("Hopper-v5", xml, {}, 2, 0, 0, 1000, 4)
    with pytest.raises(ValueError, match="does not fit the task"):
        _C.BatchEnv("Ant-v5", f"{ASSETS}/inverted_pendulum.xml", {}, 2, 1, 0, 1000, 4)
    with pytest.raises(ValueError, match="unknown option bogus"):
        _C.BatchEnv("Hopper-v5", xml, {"bogus": 1.0}, 2, 1, 0, 1000, 4)
    env = make_vec("Hopper-v5", 4, num_threads=2)
    env.reset(seed=0)
    core, T = env._core, 5
    acts = np.zeros((T, 4, 3), np.float32)
    bufs = dict(obs=None, actions=np.empty((T, 4, 3), np.float32), rewards=None, terminated=None, truncated=None,
                next_obs=None, diverged=None, qpos=None, qvel=None)
    with pytest.raises(IndexError, match="progress"):
        core.rollout(None, acts, T, np.array([0, -3, 0, 0], np.int32), **bufs)
    with pytest.raises(TypeError):  # an int64 progress would be converted to a copy and lost
        core.rollout(None, acts, T, np.zeros(4, np.int64), **bufs)
    with pytest.raises(TypeError):
        core.rollout(None, acts, T, np.zeros(4, np.int32), **{**bufs, "rewards": np.empty((T, 4), np.float32)})
    core.queue_head[0] = 10**8
    with pytest.raises(IndexError, match="reset queue of env 0 is corrupt"):
        env.step(np.zeros((4, 3), np.float32))
    core.queue_head[0] = 0
    # two Python threads on one env: one of them gets a clear error, nothing crashes
    big = make_vec("Hopper-v5", 64, num_threads=2)
    big.reset(seed=0)
    errors = []

    def work():
        try:
            for _ in range(20):
                big.rollout(actions=np.zeros((50, 64, 3), np.float32), num_steps=50)
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("busy" in e for e in errors)


def test_diverging_simulation_is_flagged_and_reset_by_mujoco():
    env = make_vec("Hopper-v5", 2, num_threads=1)
    env.reset(seed=0)
    qpos = np.array([0.0, 1.25, 0, 0, 0, 0])
    env.set_state(1, qpos, np.full(6, 1e12))  # far past mjMAXVAL: MuJoCo's own check resets the data
    obs, rew, term, trunc, info = env.step(np.zeros((2, 3), np.float32))
    assert env.diverged.tolist() == [False, True] and "diverged" not in info  # info stays gymnasium's
    assert np.isfinite(obs).all() and np.isfinite(rew).all()
    env.step(np.zeros((2, 3), np.float32))
    assert env.diverged.tolist() == [False, False]


def test_copy_false_gives_live_views_that_torch_shares():
    env = make_vec("Swimmer-v5", 2, copy=False)
    obs, _ = env.reset(seed=0)
    t = torch.from_numpy(obs)  # no copy: the C++ buffer
    before = t.clone()
    obs2, rew, term, trunc, _ = env.step(np.ones((2, 2), np.float32))
    assert obs2 is not None and np.shares_memory(obs, obs2)
    assert not torch.equal(t, before)  # the tensor sees the new step
    assert torch.equal(t, torch.from_numpy(obs2))
