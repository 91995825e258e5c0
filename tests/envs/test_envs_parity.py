"""The C++ envs as a drop-in for gymnasium: constructor options, gymnasium's own
``check_environments_match`` (types included, nothing skipped), float16 actions, MjModel/MjData
access, rendering, and bad or concurrent use refused cleanly."""
import os
import subprocess
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.utils.env_match import check_environments_match

from aihf_fast.envs import MLPPolicy, make, make_vec

TASKS = ["Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5", "InvertedDoublePendulum-v5",
         "InvertedPendulum-v5", "Pusher-v5", "Reacher-v5", "Swimmer-v5", "Walker2d-v5"]
ASSETS = os.path.join(os.path.dirname(gym.__file__), "envs", "mujoco", "assets")

# Non-default values of every option of each task's v5 constructor (numpy-typed weights too:
# numpy's dtype rules make a np.float64 control-cost weight give a float64 reward_ctrl).
OPTIONS = {
    "Hopper-v5": dict(frame_skip=3, forward_reward_weight=2.0, ctrl_cost_weight=np.float64(0.01), healthy_reward=0.5,
                      terminate_when_unhealthy=False, healthy_state_range=(-50.0, 50.0), healthy_z_range=(0.9, 5.0),
                      healthy_angle_range=(-0.3, 0.3), reset_noise_scale=0.05,
                      exclude_current_positions_from_observation=False),
    "Walker2d-v5": dict(frame_skip=5, forward_reward_weight=0.5, ctrl_cost_weight=0.01, healthy_reward=2,
                        terminate_when_unhealthy=True, healthy_z_range=(1.0, 1.5), healthy_angle_range=(-0.5, 0.5),
                        reset_noise_scale=0.02, exclude_current_positions_from_observation=False),
    "HalfCheetah-v5": dict(frame_skip=4, forward_reward_weight=0.5, ctrl_cost_weight=np.float32(0.2),
                           reset_noise_scale=0.2, exclude_current_positions_from_observation=False),
    "Swimmer-v5": dict(frame_skip=3, forward_reward_weight=2.0, ctrl_cost_weight=1e-2, reset_noise_scale=0.2,
                       exclude_current_positions_from_observation=False),
    "InvertedPendulum-v5": dict(frame_skip=3, reset_noise_scale=0.05),
    "Reacher-v5": dict(frame_skip=3, reward_dist_weight=2.0, reward_control_weight=0.5),
    "Ant-v5": dict(frame_skip=4, forward_reward_weight=2.0, ctrl_cost_weight=0.1, contact_cost_weight=1e-3,
                   healthy_reward=2.0, main_body="torso", terminate_when_unhealthy=True, healthy_z_range=(0.3, 0.9),
                   contact_force_range=(-2.0, 0.5), reset_noise_scale=0.2,
                   exclude_current_positions_from_observation=False, include_cfrc_ext_in_observation=False),
    "Humanoid-v5": dict(frame_skip=4, forward_reward_weight=2.0, ctrl_cost_weight=np.float32(0.2),
                        contact_cost_weight=1e-6, contact_cost_range=(0.0, 1e-3), healthy_reward=2.0,
                        terminate_when_unhealthy=False, healthy_z_range=(0.8, 2.5), reset_noise_scale=0.05,
                        exclude_current_positions_from_observation=False, include_cinert_in_observation=False,
                        include_cvel_in_observation=False, include_qfrc_actuator_in_observation=True,
                        include_cfrc_ext_in_observation=False),
    "HumanoidStandup-v5": dict(frame_skip=4, uph_cost_weight=2.0, ctrl_cost_weight=0.2, impact_cost_weight=1e-6,
                               impact_cost_range=(0.0, 1e-4), reset_noise_scale=0.05,
                               exclude_current_positions_from_observation=False, include_cinert_in_observation=True,
                               include_cvel_in_observation=False, include_qfrc_actuator_in_observation=False,
                               include_cfrc_ext_in_observation=True),
    "InvertedDoublePendulum-v5": dict(frame_skip=4, healthy_reward=5.0, reset_noise_scale=0.2),
    "Pusher-v5": dict(frame_skip=4, reward_near_weight=1.0, reward_dist_weight=2.0, reward_control_weight=0.2),
}
CAMERA = {"trackbodyid": 1, "distance": 3.0}


def _random_policy_match(task, seed, num_steps=1100, **options):
    check_environments_match(gym.make(task, **options), make(task, **options), num_steps=num_steps, seed=seed)


@pytest.mark.parametrize("task", TASKS)
def test_check_env_and_check_environments_match_nothing_skipped(task):
    check_env(make(task), skip_render_check=True)  # gymnasium's API checker
    # gymnasium's own comparison: observations, rewards, terminations, truncations and infos equal
    # in value and Python type (data_equivalence), over 1100 steps through resets
    for seed in (0, 7):
        _random_policy_match(task, seed)


def test_norms_sum_the_squares_as_this_process_numpy_does():
    """np.linalg.norm (OpenBLAS's ddot) sums a short vector's squares as a plain multiply-add, an
    FMA chain or in two accumulators by the CPU kernel OpenBLAS picks; the C++ norms follow what is
    measured at first use, and another order breaks the match (Pusher's reward: 3 elements)."""
    from aihf_fast.envs.vector import NORM_ORDERS, _core, numpy_norm_order

    core, order = _core(), numpy_norm_order()
    assert NORM_ORDERS[core.norm_order()] == order
    with pytest.raises(ValueError, match="norm order"):
        core.set_norm_order(3)
    try:
        for other in set(NORM_ORDERS) - {order}:
            core.set_norm_order(NORM_ORDERS.index(other))
            with pytest.raises(AssertionError):
                _random_policy_match("Pusher-v5", 0, num_steps=300)
    finally:
        core.set_norm_order(NORM_ORDERS.index(order))
    _random_policy_match("Pusher-v5", 0, num_steps=300)


@pytest.mark.parametrize("task", TASKS)
def test_every_constructor_option_matches_gymnasium(task):
    opts = OPTIONS[task]
    _random_policy_match(task, 3, **opts, default_camera_config=CAMERA)
    ours, ref = make_vec(task, 3, num_threads=2, **opts), gym.make_vec(task, 3, vectorization_mode="sync", **opts)
    assert ours.single_observation_space == ref.single_observation_space
    assert ours.single_action_space == ref.single_action_space
    o1, _ = ours.reset(seed=5)
    o2, _ = ref.reset(seed=5)
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    for t in range(300):
        a = rng.uniform(-1, 1, ref.action_space.shape).astype(np.float32)
        r1, r2 = ours.step(a), ref.step(a)
        np.testing.assert_array_equal(r1[0], r2[0], err_msg=f"obs step {t}")
        for k in (1, 2, 3):
            np.testing.assert_array_equal(r1[k], r2[k], err_msg=f"output {k} step {t}")
        for key, v in r2[4].items():
            assert r1[4][key].dtype == v.dtype, (key, r1[4][key].dtype, v.dtype)
            np.testing.assert_array_equal(r1[4][key], v, err_msg=f"info {key} step {t}")
    assert ours.spec.kwargs["frame_skip"] == opts["frame_skip"]
    assert ours.dt == pytest.approx(ref.envs[0].unwrapped.dt)


def test_option_values_gymnasium_refuses_are_refused_the_same_way():
    for task, kwargs in [("Hopper-v5", dict(not_an_option=1)), ("Ant-v5", dict(frame_skip=0))]:
        with pytest.raises(Exception) as theirs:
            gym.make(task, **kwargs).reset(seed=0)
        with pytest.raises(type(theirs.value)):
            make(task, **kwargs)
    with pytest.raises(KeyError, match="main_body"):  # the error gymnasium's first step raises
        make("Ant-v5", main_body="no_such_body")
    with pytest.raises(ValueError, match="healthy_z_range must be a"):
        make("Hopper-v5", healthy_z_range=(1.0,))
    with pytest.raises(TypeError, match="ctrl_cost_weight"):
        make("HalfCheetah-v5", ctrl_cost_weight="big")
    with pytest.raises(OSError, match="does not exist"):
        make("Hopper-v5", xml_file="/no/such/file.xml")


def test_xml_file_custom_model_and_a_model_that_does_not_fit(tmp_path):
    src = open(os.path.join(ASSETS, "hopper.xml")).read()
    heavy = src.replace('gear="200.0"', 'gear="120.0"', 1)
    assert heavy != src
    path = tmp_path / "hopper_weak_thigh.xml"
    path.write_text(heavy)
    _random_policy_match("Hopper-v5", 1, num_steps=300, xml_file=str(path))
    # a model without Reacher's fingertip/target bodies: a clear error naming what is missing
    with pytest.raises(ValueError, match="does not fit Reacher-v5.*fingertip"):
        make("Reacher-v5", xml_file=os.path.join(ASSETS, "hopper.xml"))


@pytest.mark.parametrize("task", ["Hopper-v5", "Ant-v5", "Reacher-v5", "Swimmer-v5"])
def test_float16_and_float64_actions_types_and_values(task):
    for dtype in (np.float16, np.float64):
        kw = dict(ctrl_cost_weight=np.float32(0.25)) if task == "Ant-v5" else {}
        g, o = gym.make(task, **kw), make(task, **kw)
        g.reset(seed=2)
        o.reset(seed=2)
        rng = np.random.default_rng(1)
        for t in range(60):
            a = rng.uniform(-1, 1, g.action_space.shape).astype(dtype)
            r1, r2 = g.step(a), o.step(a)
            assert type(r1[1]) is type(r2[1]) and r1[1] == r2[1], (dtype, t, r1[1], r2[1])
            assert r1[4].keys() == r2[4].keys()
            for k, v in r1[4].items():
                assert type(v) is type(r2[4][k]) and v == r2[4][k], (dtype, t, k, v, r2[4][k])


def test_model_data_dt_spec_unwrapped():
    import mujoco

    env = make("Hopper-v5", frame_skip=5)
    ref = gym.make("Hopper-v5", frame_skip=5)
    assert env.dt == ref.unwrapped.dt == 0.01
    assert env.unwrapped is env and env.spec.id == "Hopper-v5" and env.spec.kwargs["frame_skip"] == 5
    assert isinstance(env.model, mujoco.MjModel) and env.model.nq == 6
    env.reset(seed=0)
    ref.reset(seed=0)
    a = np.full(3, 0.5, np.float32)
    for _ in range(20):
        env.step(a)
        ref.step(a)
    data = env.data
    assert isinstance(data, mujoco.MjData)
    for field in ("qpos", "qvel", "qacc", "xpos", "cfrc_ext", "ctrl", "act"):
        np.testing.assert_array_equal(getattr(data, field), getattr(ref.unwrapped.data, field), err_msg=field)
    assert data.time == ref.unwrapped.data.time
    data.qpos[:] = 0  # a snapshot: the simulation is unchanged
    assert env.data.qpos[1] != 0
    vec = make_vec("Ant-v5", 3)
    vec.reset(seed=0)
    assert vec.get_data(2).qpos[2] == vec.get_data(2).qpos[2] and vec.model.nu == 8
    with pytest.raises(IndexError):
        vec.get_data(3)


_RENDER = """
import numpy as np, gymnasium as gym
from aihf_fast.envs import make, make_vec
for task in ["Hopper-v5", "Ant-v5"]:
    g = gym.make(task, render_mode="rgb_array", width=96, height=64)
    o = make(task, render_mode="rgb_array", width=96, height=64)
    g.reset(seed=0); o.reset(seed=0)
    for _ in range(10):
        a = g.action_space.sample(); g.step(a); o.step(a)
    f1, f2 = g.render(), o.render()
    assert f1.shape == (64, 96, 3) and f1.std() > 0 and np.array_equal(f1, f2), task
v = make_vec("Hopper-v5", 2, render_mode="rgb_array", width=32, height=32)
v.reset(seed=0)
frames = v.render()
assert len(frames) == 2 and frames[0].shape == (32, 32, 3)
print("rendered")
"""


def _render_in_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` where offscreen GL is set up (MUJOCO_GL, egl by default); skip the test,
    with the reason, where gymnasium itself cannot render."""
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), PYTHONSAFEPATH="1")
    probe = subprocess.run([sys.executable, "-c", "import gymnasium as gym; e = gym.make('Hopper-v5', "
                            "render_mode='rgb_array', width=8, height=8); e.reset(seed=0); e.render()"],
                           env=env, capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"gymnasium itself cannot render offscreen here (MUJOCO_GL={env['MUJOCO_GL']}): "
                    + (probe.stderr.strip().splitlines() or ["?"])[-1])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_render_rgb_array_equals_gymnasium():
    out = _render_in_subprocess(_RENDER)
    assert out.returncode == 0 and "rendered" in out.stdout, out.stderr[-3000:]


def test_render_without_gl_names_the_fix():
    code = ("from aihf_fast.envs import make\ne = make('Hopper-v5', render_mode='rgb_array')\ne.reset(seed=0)\n"
            "try:\n    e.render()\nexcept RuntimeError as x:\n    print('ERR', x)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MUJOCO_GL="no_such_backend", PYTHONSAFEPATH="1"))
    # mujoco refuses an unknown MUJOCO_GL at import, or our render() names MUJOCO_GL in its error
    assert "MUJOCO_GL" in out.stdout + out.stderr


# ---------------------------------------------------------------------- bad or concurrent use


def test_second_thread_gets_busy_error_never_corruption():
    env = make_vec("Hopper-v5", 16, num_threads=2, autoreset_mode="SameStep")
    env.reset(seed=0)
    errors, other = [], []
    stop = threading.Event()

    def hammer(fn):
        while not stop.is_set():
            try:
                fn()
            except RuntimeError as e:
                errors.append(str(e))
            except Exception as e:  # noqa: BLE001
                other.append(repr(e))

    acts = np.zeros((16, 3), np.float32)
    threads = [threading.Thread(target=hammer, args=(f,)) for f in
               (lambda: env.step(acts), lambda: env.reset(), lambda: env.rollout(actions=np.zeros((5, 16, 3)),
                                                                                   num_steps=5))]
    for t in threads:
        t.start()
    threading.Event().wait(3.0)
    stop.set()
    for t in threads:
        t.join()
    assert not other, other[:3]
    assert errors and all("busy" in e for e in errors), set(errors)
    # the reset queues are intact: every env's next reset state is the next draw of its generator
    count = env._buf.queue_count
    assert ((count >= 0) & (count <= env._core.reset_queue)).all()
    env.step(acts)


def test_close_while_another_thread_steps_and_after():
    env = make_vec("Hopper-v5", 64, num_threads=2)
    env.reset(seed=0)
    results = []

    def run():
        try:
            for _ in range(100):
                env.rollout(actions=np.zeros((20, 64, 3), np.float32), num_steps=20)
        except RuntimeError as e:
            results.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    closed = False
    while not closed:
        try:
            env.close()
            closed = True
        except RuntimeError as e:
            assert "busy" in str(e)
            time.sleep(0.002)
    t.join()
    assert all("closed" in r or "busy" in r for r in results), results
    assert env.num_threads == 2
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(seed=0)
    env.close()  # twice is fine


def test_junk_inputs_are_refused_with_named_errors():
    env = make_vec("Hopper-v5", 2)
    env.reset(seed=0)
    obs0 = env._buf.obs.copy()
    for bad in (np.zeros((2, 3), np.complex128), np.zeros((2, 3), np.longdouble), np.zeros((2, 3), np.uint64),
                np.zeros((2, 3), bool)):
        with pytest.raises(TypeError, match="actions must be"):
            env.step(bad)
    with pytest.raises(ValueError, match="finite in float32"):
        env.rollout(actions=np.full((4, 2, 3), 1e39), num_steps=4)
    with pytest.raises(TypeError, match="env must be an int"):
        env.set_state(True, np.zeros(6), np.zeros(6))
    with pytest.raises(TypeError, match="env must be an int"):
        env.set_state(0.7, np.zeros(6), np.zeros(6))
    np.testing.assert_array_equal(env._buf.obs, obs0)  # nothing changed
    with pytest.raises(gym.error.Error, match="Seed must be"):
        env.reset(seed=[0.5, 1])
    with pytest.raises(TypeError, match="options must be a dict"):
        env.reset(seed=0, options="junk")
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_vec("Hopper-v5", 2, max_episode_steps=-5)
    with pytest.raises(ValueError, match="log_std_min"):
        MLPPolicy(weights=[np.zeros((3, 11), np.float32)], biases=[np.zeros(3, np.float32)],
                  log_std_min=1.0, log_std_max=-1.0)
    # integer actions, as gymnasium: control cost as numpy computes it (float64)
    g, o = gym.make("Hopper-v5"), make("Hopper-v5")
    g.reset(seed=0)
    o.reset(seed=0)
    a = np.array([1, -1, 0], np.int64)
    r1, r2 = g.step(a), o.step(a)
    assert r1[1] == r2[1] and type(r1[4]["reward_ctrl"]) is type(r2[4]["reward_ctrl"])


# ---------------------------------------------------------------------- edges found in review


def _model_with(tmp_path, task_xml, name, old, new):
    src = open(os.path.join(ASSETS, task_xml)).read()
    assert old in src
    path = tmp_path / name
    path.write_text(src.replace(old, new, 1))
    return str(path)


def test_mujoco_error_raises_fatal_error_and_the_process_survives(tmp_path):
    import mujoco

    # too small a stack/arena for the model: MuJoCo's mju_error, which would exit() the process
    xml = _model_with(tmp_path, "hopper.xml", "small.xml", "<mujoco model=\"hopper\">",
                      "<mujoco model=\"hopper\"><size memory=\"4K\"/>")
    for threads in (1, 2):
        env = make_vec("Hopper-v5", 2, num_threads=threads, xml_file=xml)
        with pytest.raises(mujoco.FatalError, match="MuJoCo error in env"):
            env.reset(seed=0)
            for _ in range(300):
                env.step(env.action_space.sample())
        with pytest.raises(gym.error.ResetNeeded):  # the failed envs must be reset first
            env.step(np.zeros((2, 3), np.float32))
    ok = make_vec("Hopper-v5", 2)  # the process and other envs carry on
    ok.reset(seed=0)
    ok.step(np.zeros((2, 3), np.float32))


def test_repeated_divergence_is_flagged_every_step(tmp_path):
    xml = _model_with(tmp_path, "hopper.xml", "strong.xml", 'gear="200.0"', 'gear="1e12"')
    env = make("Hopper-v5", xml_file=xml)
    env.reset(seed=0)
    flags = []
    for _ in range(5):
        env.step(np.full(3, 0.5, np.float32))
        flags.append(env.diverged)
    assert flags == [True] * 5
    check_environments_match(gym.make("Hopper-v5", xml_file=xml), make("Hopper-v5", xml_file=xml), num_steps=30)


_WARNINGS = """
import sys, numpy as np, gymnasium as gym, mujoco
from aihf_fast.envs import make
kinds = [mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL, mujoco.mjtWarning.mjWARN_BADQACC]
env = gym.make("Hopper-v5", xml_file=sys.argv[1]) if sys.argv[2] == "gym" else make("Hopper-v5", xml_file=sys.argv[1])
env.reset(seed=0)
counts = []
for _ in range(4):
    env.step(np.full(3, 0.5, np.float32))
    data = env.unwrapped.data if sys.argv[2] == "gym" else env.data
    counts.append([int(data.warning[k].number) for k in kinds])
print("COUNTS", counts)
"""


@pytest.mark.parametrize("autoreset", [True, False])
@pytest.mark.slow
def test_warnings_printed_and_counted_as_under_gymnasium(tmp_path, autoreset):
    head = "<mujoco model=\"hopper\">"
    xml = _model_with(tmp_path, "hopper.xml", "strong.xml", 'gear="200.0"', 'gear="1e12"')
    if not autoreset:  # MuJoCo then keeps counting instead of resetting the data
        path = tmp_path / "strong_noreset.xml"
        path.write_text(open(xml).read().replace(head, head + '<option><flag autoreset="disable"/></option>', 1))
        xml = str(path)
    runs = {}
    for who in ("gym", "ours"):
        out = subprocess.run([sys.executable, "-c", _WARNINGS, xml, who], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=dict(os.environ, PYTHONSAFEPATH="1"))
        assert out.returncode == 0, out.stderr[-2000:]
        counts = next(line for line in out.stdout.splitlines() if line.startswith("COUNTS"))
        runs[who] = (counts, out.stderr.count("WARNING: Nan, Inf or huge value"))
    assert runs["gym"] == runs["ours"] and runs["gym"][1] >= 1, runs


def test_a_mujoco_error_in_one_env_needs_a_reset_of_all(tmp_path):
    import mujoco

    xml = _model_with(tmp_path, "hopper.xml", "small.xml", "<mujoco model=\"hopper\">",
                      "<mujoco model=\"hopper\"><size memory=\"4K\"/>")
    env = make_vec("Hopper-v5", 3, num_threads=2, autoreset_mode="Disabled", xml_file=xml)
    with pytest.raises(mujoco.FatalError, match="reset\\(\\) the envs"):
        env.reset(seed=0)
        for _ in range(300):
            env.step(env.action_space.sample())
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros((3, 3), np.float32))


def test_more_than_64_actuators_and_errors_name_the_model(tmp_path):
    motors = "".join(f'<motor joint="bthigh" gear="1" ctrlrange="-1 1" name="m{k}"/>' for k in range(65))
    xml = _model_with(tmp_path, "half_cheetah.xml", "many.xml", "<actuator>", "<actuator>" + motors)
    _random_policy_match("HalfCheetah-v5", 0, num_steps=50, xml_file=xml)
    with pytest.raises(ValueError, match="inverted_pendulum.xml.*does not fit"):
        make("Hopper-v5", xml_file=os.path.join(ASSETS, "inverted_pendulum.xml"))


@pytest.mark.slow
def test_vector_render_keeps_a_camera_per_sub_env():
    code = """
import numpy as np, gymnasium as gym
from aihf_fast.envs import make_vec
for task in ["Ant-v5", "Reacher-v5"]:
    g = gym.make_vec(task, 3, vectorization_mode="sync", render_mode="rgb_array", width=48, height=32)
    o = make_vec(task, 3, render_mode="rgb_array", width=48, height=32)
    g.reset(seed=1); o.reset(seed=1)
    for k in (2, 0, 1, 2):
        assert np.array_equal(g.envs[k].render(), o.render(k)), (task, k)
    a = g.action_space.sample(); g.step(a); o.step(a)
    assert all(np.array_equal(x, y) for x, y in zip(g.render(), o.render())), task
print("cameras ok")
"""
    out = _render_in_subprocess(code)
    assert out.returncode == 0 and "cameras ok" in out.stdout, out.stderr[-3000:]


def test_render_before_reset_and_human_mode_are_refused():
    with pytest.raises(gym.error.ResetNeeded):
        make("Hopper-v5", render_mode="rgb_array").render()
    with pytest.raises(ValueError, match="human"):
        make("Hopper-v5", render_mode="human")


def test_non_native_byte_order_and_integer_actions():
    for dtype in (np.dtype(">f4"), np.dtype(">f2"), np.dtype(">f8")):
        g, o = gym.make("Ant-v5"), make("Ant-v5")
        g.reset(seed=0)
        o.reset(seed=0)
        a = np.linspace(-1, 1, 8).astype(dtype)
        r1, r2 = g.step(a), o.step(a)
        assert r1[1] == r2[1] and r1[4] == r2[4] and type(r1[4]["reward_ctrl"]) is type(r2[4]["reward_ctrl"])
    env = make("Hopper-v5")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="overflow"):
        env.step(np.array([12, 0, 0], np.int8))  # numpy's int8 square wraps around
    env.step(np.array([11, -1, 0], np.int8))


def test_writing_into_a_copy_false_observation_does_not_reach_the_simulation():
    env = make_vec("Hopper-v5", 2, copy=False)
    obs, _ = env.reset(seed=0)
    clean = obs.copy()
    obs[:] = 1000.0
    pol = MLPPolicy([np.eye(3, 11, dtype=np.float32)], [np.zeros(3, np.float32)], squash="none")
    out = env.rollout(pol, 1)
    np.testing.assert_array_equal(out["obs"][0], clean)


def test_mjcb_time_of_other_threads_is_left_alone():
    import ctypes
    import glob

    import mujoco

    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(mujoco.__file__), "libmujoco.so.*"))[0])
    env = make_vec("Hopper-v5", 4, num_threads=2)
    env.reset(seed=0)
    model = mujoco.MjModel.from_xml_path(os.path.join(ASSETS, "hopper.xml"))
    data = mujoco.MjData(model)
    stop = threading.Event()

    def other():  # plain mujoco in another thread, while the C++ envs step
        while not stop.is_set():
            mujoco.mj_step(model, data)

    t = threading.Thread(target=other)
    t.start()
    for _ in range(200):
        env.step(np.zeros((4, 3), np.float32))
    stop.set()
    t.join()
    per_step = data.timer[mujoco.mjtTimer.mjTIMER_STEP]
    assert per_step.number > 0 and 0 < per_step.duration / per_step.number < 0.1  # seconds, not clock values
    assert ctypes.c_void_p.in_dll(lib, "mjcb_time").value is not None


def test_odd_option_types_as_gymnasium_takes_them():
    for kw in (dict(ctrl_cost_weight=True), dict(frame_skip=True), dict(healthy_reward=np.array(2.0)),
               dict(healthy_z_range=(np.array(0.5), 3)), dict(ctrl_cost_weight=np.float16(0.01))):
        _random_policy_match("Hopper-v5", 0, num_steps=100, **kw)
    with pytest.raises(TypeError, match="longdouble|float128"):
        make("Hopper-v5", ctrl_cost_weight=np.longdouble(0.001))
    with pytest.raises(TypeError, match="terminate_when_unhealthy must be a bool"):
        make("Hopper-v5", terminate_when_unhealthy=2)
    with pytest.raises(KeyError, match="main_body"):
        make("Ant-v5", main_body="nope")
    with pytest.raises(IndexError, match="main_body"):
        make("Ant-v5", main_body=99)
    env = make_vec("Hopper-v5", 2)
    with pytest.raises(TypeError, match="reset_mask"):
        env.reset(options={"reset_mask": np.ones(2, np.int64)})
    for bad in (dict(num_envs=2**31), dict(max_episode_steps=2**31), dict(reset_queue=2**31)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_vec("Hopper-v5", **{"num_envs": 2, **bad})
    env.reset(seed=0)
    pol = MLPPolicy([np.zeros((3, 11), np.float32)], [np.zeros(3, np.float32)], gaussian=True,
                    log_std=np.zeros(3, np.float32))
    for seed in (-1, 2**70, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            env.rollout(pol, 2, seed=seed)
    with pytest.raises(ValueError, match="log_std must be finite"):
        MLPPolicy([np.zeros((3, 11), np.float32)], [np.zeros(3, np.float32)], gaussian=True,
                  log_std=np.array([0, np.nan, 0], np.float32))
    with pytest.raises(TypeError, match="qpos must be a real array"):
        env.set_state(0, np.zeros(6, complex), np.zeros(6))


def test_seeds_and_np_random_like_gymnasium():
    env = make_vec("Hopper-v5", 2)
    env.reset(seed=4)
    assert env.np_random_seed == (4, 5)
    single = make("Hopper-v5")
    single.reset(seed=3)
    assert single.np_random_seed == 3 and single.np_random is single._vec._rngs[0]
