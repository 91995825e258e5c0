"""The control reward step on a toy problem with a known linear reward r*(s, a) = theta* . [s, a]:
each term moves a linear reward model toward theta*, and the methods are one loss with weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aihf_fast.train.control import METHOD_WEIGHTS, RewardModel, Trajectories, reward_step_loss, sample_segment_pairs

D, A = 5, 3


def _theta_star(seed=0):
    g = np.random.default_rng(seed)
    t = g.normal(size=D + A)
    return t / np.linalg.norm(t)


def _linear(init="zero", seed=1):
    m = RewardModel(D, A, hidden=(), clip=None)
    with torch.no_grad():
        if init == "zero":
            m.net[0].weight.zero_()
        else:
            torch.manual_seed(seed)
            m.net[0].weight.normal_()
        m.net[0].bias.zero_()
    return m


def _theta(m):
    return m.net[0].weight.detach().numpy().reshape(-1).astype(np.float64)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _toy_data(n=4000, pairs=2000, L=5, seed=0):
    """Demonstrations shifted along theta*, policy samples centred; segment pairs of N(0, I)
    state-actions labelled by a Bradley-Terry draw on r*."""
    g = np.random.default_rng(seed)
    ts = _theta_star()
    demo = g.normal(size=(n, D + A)) + ts
    samp = g.normal(size=(n, D + A))
    x = g.normal(size=(pairs * 2 * 40, D + A)).astype(np.float32)
    pool = Trajectories(x[:, :D], x[:, D:], x[:, :D], x @ ts, np.repeat(np.arange(len(x) // 40), 40))
    seg = sample_segment_pairs([pool], pairs, L, g)
    split = lambda z: (torch.tensor(z[:, :D], dtype=torch.float32), torch.tensor(z[:, D:], dtype=torch.float32))  # noqa: E731
    return split(demo), split(samp), seg, ts


def _step(model, lr=0.1, **kw):
    loss, _ = reward_step_loss(model, **kw)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return model


@pytest.mark.parametrize("term", ["demonstration", "preference", "both"])
def test_each_term_moves_theta_toward_the_true_reward(term):
    demo, samp, seg, ts = _toy_data()
    w_D, w_P = {"demonstration": (1, 0), "preference": (0, 1), "both": (1, 1)}[term]
    kw = dict(demo=demo, samples=samp, pairs=seg, w_D=w_D, w_P=w_P)
    # from theta = 0 the first step points along theta*
    step = _theta(_step(_linear("zero"), **kw))
    assert _cos(step, ts) > 0.9
    # from a random theta, steps reduce the angle to theta*
    m = _linear("random")
    before = _cos(_theta(m), ts)
    for _ in range(20):
        _step(m, lr=0.05, **kw)
    assert _cos(_theta(m), ts) > before + 0.1


def test_loss_is_the_formula_and_methods_are_weights():
    demo, samp, seg, _ = _toy_data(n=64, pairs=16)
    m = RewardModel(D, A, hidden=(8,), clip=3.0)
    m.fit_normalizer(torch.cat([demo[0], samp[0]]))
    w_D, w_P, l2 = 0.7, 1.3, 0.01
    loss, metrics = reward_step_loss(m, demo=demo, samples=samp, pairs=seg, w_D=w_D, w_P=w_P, l2=l2)
    # by hand
    def r(o, a):
        x = torch.cat([(torch.as_tensor(o, dtype=torch.float32) - m.obs_mean) / m.obs_std,
                       torch.as_tensor(a, dtype=torch.float32)], -1)
        return 3.0 * torch.tanh(m.net(x).squeeze(-1) / 3.0)
    rd, rs = r(*demo), r(*samp)
    R = r(seg.obs, seg.act).sum(-1)
    h = torch.where(torch.as_tensor(seg.first_preferred), R[:, 0] - R[:, 1], R[:, 1] - R[:, 0])
    r_seg = r(seg.obs, seg.act).reshape(-1)  # the l2 term covers the segments too, with a mean of its own
    want = (w_D * (rs.mean() - rd.mean()) + w_P * (-F.logsigmoid(h)).mean()
            + l2 * (torch.cat([rd, rs]).pow(2).mean() + r_seg.pow(2).mean()))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    params = list(m.parameters())  # gradients too, against autograd of the hand formula
    for got, ref in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(want, params)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert metrics["preference/accuracy"] == pytest.approx(float((h > 0).float().mean()))

    def grads(**kw):
        m.zero_grad()
        reward_step_loss(m, **kw)[0].backward()
        return [p.grad.clone() for p in m.parameters()]

    # aihf with w_D = 0 is rlhf's reward step; with w_P = 0 it is irl's
    rlhf = grads(pairs=seg, w_D=METHOD_WEIGHTS["rlhf"][0], w_P=METHOD_WEIGHTS["rlhf"][1])
    aihf_no_demos = grads(demo=demo, samples=samp, pairs=seg, w_D=0.0, w_P=1.0)
    irl = grads(demo=demo, samples=samp, w_D=METHOD_WEIGHTS["irl"][0], w_P=METHOD_WEIGHTS["irl"][1])
    aihf_no_prefs = grads(demo=demo, samples=samp, pairs=seg, w_D=1.0, w_P=0.0)
    both = grads(demo=demo, samples=samp, pairs=seg, w_D=1.0, w_P=1.0)
    for a, b, c, d, e in zip(rlhf, aihf_no_demos, irl, aihf_no_prefs, both):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, d)
        torch.testing.assert_close(e, a + c)


def test_clip_bounds_the_reward_and_normalizer():
    m = RewardModel(D, A, hidden=(16,), clip=2.0)
    x = torch.randn(100, D) * 1000
    m.fit_normalizer(x)
    assert torch.allclose(m.obs_mean, x.mean(0)) and torch.allclose(m.obs_std, x.std(0, unbiased=False))
    with torch.no_grad():
        m.net[-1].bias.fill_(1e4)
    r = m(x, torch.randn(100, A))
    assert r.abs().max() <= 2.0 and torch.isfinite(r).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(w_D=-1.0), "w_D, w_P and l2 must be >= 0"),
    (dict(w_D=1.0, demo=None), "w_D > 0 needs demo and samples"),
    (dict(w_P=1.0, pairs=None), "w_P > 0 needs preference pairs"),
    (dict(w_D=0.0, w_P=0.0), "nothing to fit"),
])
def test_bad_reward_step_input(kw, msg):
    demo, samp, seg, _ = _toy_data(n=8, pairs=4)
    args = dict(demo=demo, samples=samp, pairs=seg, w_D=1.0, w_P=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        reward_step_loss(_linear(), **args)


def test_bad_model_input():
    m = RewardModel(D, A, hidden=(4,))
    with pytest.raises(ValueError, match=r"obs must be \(\.\.\., 5\) and act \(\.\.\., 3\)"):
        m(torch.zeros(2, D), torch.zeros(3, A))
    with pytest.raises(ValueError, match="uses next_obs"):
        RewardModel(D, A, use_next_obs=True)(torch.zeros(2, D), torch.zeros(2, A))
    with pytest.raises(ValueError, match="clip must be > 0"):
        RewardModel(D, A, clip=0)


def test_absorbing_state_share_is_the_formula():
    """termination='absorbing': each term's mean is (1 - f) * mean over its real state-actions +
    f * r_abs, the l2 term counts r_abs for the same share (values and gradients against the
    formula); f = 0 is the plain loss; r_abs is the network's output at the absorbing flag, so it
    learns as fast as the other rewards: down when the policy's occupancy ends in the absorbing
    state more than the demonstrations', up in the other case."""
    demo, samp, seg, _ = _toy_data(n=64, pairs=16)
    torch.manual_seed(0)
    m = RewardModel(D, A, hidden=(8,), clip=3.0, absorbing=True)
    f_d, f_s, l2 = 0.1, 0.6, 0.01
    loss, metrics = reward_step_loss(m, demo=demo, samples=samp, pairs=seg, w_D=1.0, w_P=1.0, l2=l2,
                                     demo_absorbing=f_d, samples_absorbing=f_s)

    def r(o, a, flag=0.0):  # by hand: the flag is one more input
        o, a = torch.as_tensor(o, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32)
        x = torch.cat([(o - m.obs_mean) / m.obs_std, a, torch.full(o.shape[:-1] + (1,), flag)], -1)
        return 3.0 * torch.tanh(m.net(x).squeeze(-1) / 3.0)

    rd, rs = r(*demo), r(*samp)
    r_abs = r(torch.zeros(1, D), torch.zeros(1, A), 1.0)[0]
    R = r(seg.obs, seg.act).sum(-1)
    h = torch.where(torch.as_tensor(seg.first_preferred), R[:, 0] - R[:, 1], R[:, 1] - R[:, 0])
    sq = ((1 - f_d) * rd.pow(2).sum() + (1 - f_s) * rs.pow(2).sum() + (f_d + f_s) * 64 * r_abs.pow(2)) / 128
    want = ((1 - f_s) * rs.mean() + f_s * r_abs - (1 - f_d) * rd.mean() - f_d * r_abs + (-F.logsigmoid(h)).mean()
            + l2 * (sq + r(seg.obs, seg.act).pow(2).mean()))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    params = list(m.parameters())
    for got, ref in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(want, params)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert float(metrics["reward/absorbing"]) == pytest.approx(r_abs.item(), rel=1e-6)
    # no absorbing visits: the plain formula
    plain = (rs.mean() - rd.mean() + (-F.logsigmoid(h)).mean()
             + l2 * (torch.cat([rd, rs]).pow(2).mean() + r(seg.obs, seg.act).pow(2).mean()))
    kw = dict(demo=demo, samples=samp, pairs=seg, w_D=1.0, w_P=1.0, l2=l2)
    assert reward_step_loss(m, **kw)[0].item() == pytest.approx(plain.item(), rel=1e-6)
    # learning: 50 Adam steps at lr 1e-2 move r_abs by more than 1, in the direction of f_samples - f_demo
    for fd, fs, sign in ((0.0, 0.5, -1), (0.5, 0.0, 1)):
        torch.manual_seed(0)
        mm = RewardModel(D, A, hidden=(8,), clip=3.0, absorbing=True)
        opt = torch.optim.Adam(mm.parameters(), lr=1e-2)
        start = mm.absorbing_reward().item()
        for _ in range(50):
            opt.zero_grad()
            reward_step_loss(mm, demo=demo, samples=samp, w_D=1.0, w_P=0.0, demo_absorbing=fd,
                             samples_absorbing=fs)[0].backward()
            opt.step()
        assert (mm.absorbing_reward().item() - start) * sign > 1.0
    with pytest.raises(ValueError, match=r"samples_absorbing must be in \[0, 1\)"):
        reward_step_loss(m, demo=demo, samples=samp, w_D=1.0, w_P=0.0, samples_absorbing=1.0)
    other = RewardModel(D, A, hidden=(8,), clip=3.0)
    with pytest.raises(ValueError, match="absorbing=True"):
        reward_step_loss(other, demo=demo, samples=samp, w_D=1.0, w_P=0.0, demo_absorbing=0.2)
    with pytest.raises(ValueError, match="absorbing=True"):
        other.absorbing_reward()
