"""Control data: Bradley-Terry label frequencies, segment sampling, nested budgets, files, and
trajectories cut from the C++ rollouts."""
from __future__ import annotations

import numpy as np
import pytest

from aihf_fast.data.preferences import bradley_terry_labels
from aihf_fast.train.control import ControlDataError, SegmentPairs, Trajectories, sample_segment_pairs


@pytest.mark.parametrize("temperature,noise", [(1.0, 0.0), (0.5, 0.0), (2.0, 0.2)])
def test_bradley_terry_label_frequencies(temperature, noise):
    """Each return difference's label frequency is within 4.5 binomial standard errors of
    (1 - noise) sigmoid(diff / T) + noise (1 - sigmoid(diff / T)) (fixed seed)."""
    rng = np.random.default_rng(123)
    diffs = np.array([-3.0, -1.0, -0.25, 0.0, 0.4, 1.5, 4.0])
    n = 20000
    r1 = np.repeat(diffs, n)
    first, p_first = bradley_terry_labels(r1, np.zeros_like(r1), rng, temperature, noise)
    s = 1 / (1 + np.exp(-diffs / temperature))
    want = (1 - noise) * s + noise * (1 - s)
    got = first.reshape(len(diffs), n).mean(1)
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(got - want) <= 4.5 * se + 1e-12), (got, want)
    assert np.allclose(p_first.reshape(len(diffs), n)[:, 0], want)


def test_bradley_terry_argmax_and_errors():
    first, p = bradley_terry_labels([2.0, 1.0], [1.0, 2.0], np.random.default_rng(0), temperature=0)
    assert first.tolist() == [True, False] and p.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="temperature >= 0"):
        bradley_terry_labels([1.0], [0.0], np.random.default_rng(0), temperature=-1)
    with pytest.raises(ValueError, match=r"must be \(n,\) each"):
        bradley_terry_labels([1.0, 2.0], [0.0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        bradley_terry_labels([np.nan], [0.0], np.random.default_rng(0))


def _pool(num_eps=6, seed=0, D=3, A=2):
    """Episodes of random lengths; obs[:, 0] holds each row's index, so segments can be traced."""
    g = np.random.default_rng(seed)
    lens = g.integers(3, 30, size=num_eps)
    M = int(lens.sum())
    obs = g.normal(size=(M, D)).astype(np.float32)
    obs[:, 0] = np.arange(M)
    ep = np.repeat(np.arange(num_eps), lens)
    return Trajectories(obs, g.normal(size=(M, A)), obs + 1, g.normal(size=M), ep, {"policy": f"p{seed}"})


def test_segments_come_from_one_episode_with_their_true_returns():
    pools = [_pool(seed=0), _pool(seed=1)]
    seg = sample_segment_pairs(pools, 300, 5, np.random.default_rng(0), temperature=1.0)
    assert seg.obs.shape == (300, 2, 5, 3) and seg.act.shape == (300, 2, 5, 2)
    for k in range(300):
        for j in range(2):
            pool = pools[seg.source[k, j]]
            rows = seg.obs[k, j, :, 0].astype(int)
            assert np.array_equal(rows, np.arange(rows[0], rows[0] + 5))             # contiguous
            assert len(set(pool.episode[rows].tolist())) == 1                        # one episode
            assert seg.true_returns[k, j] == pytest.approx(pool.rewards[rows].sum())
            assert np.array_equal(seg.act[k, j], pool.act[rows])
    assert set(np.unique(seg.source)) == {0, 1}
    # labels follow the stated probabilities
    z = (seg.first_preferred.mean() - seg.p_first.mean()) / np.sqrt(np.mean(seg.p_first * (1 - seg.p_first)) / 300)
    assert abs(z) < 4.5


def test_nested_budgets_and_round_trips(tmp_path):
    pools = [_pool(seed=0)]
    small = sample_segment_pairs(pools, 20, 4, np.random.default_rng(7), label_noise=0.1, meta={"task": "toy"})
    big = sample_segment_pairs(pools, 50, 4, np.random.default_rng(7), label_noise=0.1, meta={"task": "toy"})
    sub = big.subset(20)
    for name in ("obs", "act", "next_obs", "true_returns", "first_preferred", "p_first", "source"):
        assert np.array_equal(getattr(small, name), getattr(sub, name)), name
    big.save(tmp_path / "prefs.npz")
    back = SegmentPairs.load(str(tmp_path / "prefs.npz"))
    assert back.meta == {"task": "toy", "length": 4, "temperature": 1.0, "label_noise": 0.1}
    for name in ("obs", "act", "next_obs", "true_returns", "first_preferred", "p_first", "source"):
        assert np.array_equal(getattr(back, name), getattr(big, name)), name
    tr = pools[0]
    tr.save(tmp_path / "demos.npz")
    t2 = Trajectories.load(str(tmp_path / "demos.npz"))
    assert t2.meta == {"policy": "p0"} and np.array_equal(t2.obs, tr.obs) and np.array_equal(t2.episode, tr.episode)
    assert np.allclose(t2.episode_returns(), tr.episode_returns())


def test_bad_files_and_arrays(tmp_path):
    with pytest.raises(ControlDataError, match="nope.npz: no such file"):
        Trajectories.load(str(tmp_path / "nope.npz"))
    (tmp_path / "garbage.npz").write_bytes(b"\x80\x04not an archive at all")
    with pytest.raises(ControlDataError, match="garbage.npz: not an .npz archive") as e:
        Trajectories.load(str(tmp_path / "garbage.npz"))
    assert "pickle" not in str(e.value)
    np.savez(tmp_path / "partial.npz", obs=np.zeros((2, 3)))
    with pytest.raises(ControlDataError, match=r"partial.npz: missing arrays \['act'"):
        Trajectories.load(str(tmp_path / "partial.npz"))
    with pytest.raises(ControlDataError, match="rewards has 1 rows, obs has 2"):
        Trajectories(np.zeros((2, 3)), np.zeros((2, 1)), np.zeros((2, 3)), np.zeros(1), np.zeros(2))
    with pytest.raises(ValueError, match="no episode of at least 50 steps"):
        sample_segment_pairs([_pool()], 3, 50, np.random.default_rng(0))


def test_trajectories_from_the_batched_rollouts():
    envs_mod = pytest.importorskip("aihf_fast.envs")
    envs = envs_mod.make_vec("InvertedPendulum-v5", num_envs=3, num_threads=1)
    envs.reset(seed=0)
    T, A = 60, envs.single_action_space.shape[0]
    rng = np.random.default_rng(0)
    out = envs.rollout(actions=rng.uniform(-3, 3, size=(T, 3, A)).astype(np.float32), num_steps=T)
    envs.close()
    tr = Trajectories.from_rollout(out, {"task": "InvertedPendulum-v5"})
    done = out["terminated"] | out["truncated"]
    assert tr.num_episodes == int(done.sum()) > 0
    # every episode ends on a done step, and the rows are that env's steps in order
    total = sum(out["rewards"][: np.flatnonzero(done[:, n])[-1] + 1, n].sum() for n in range(3) if done[:, n].any())
    assert tr.episode_returns().sum() == pytest.approx(total)
    assert len(tr) == sum(np.flatnonzero(done[:, n])[-1] + 1 for n in range(3) if done[:, n].any())
    full = Trajectories.from_rollout(out, complete_only=False)
    assert len(full) == T * 3
