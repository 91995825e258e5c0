"""Each method's loss on a fixed micro-batch equals its formula, written out here with plain
full-logit log-probs from the transformers model (policy perturbed away from the reference so
that every log-ratio is non-zero)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llm_helpers import make_task

pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

from aihf_fast.ops import NonFiniteError  # noqa: E402
from aihf_fast.train.llm import Diverged, LLMTrainConfig, Trainer  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(str(tmp_path_factory.mktemp("llm_methods")), num_demos=24, num_pairs=12)


def _trainer(task, tmp_path, **kw):
    cfg = dict(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
               preferences=task["preferences"], steps=10, pairs_per_batch=3, demos_per_batch=2, beta=0.5,
               max_new_tokens=9, max_length=24, gen_batch_size=8, output_dir=str(tmp_path / "out"), progress=False)
    cfg.update(kw)
    return Trainer(LLMTrainConfig(**cfg))


@torch.no_grad()
def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _logp(model, prompt, completion):
    """Summed log-prob of completion after prompt, from the full logits; and its token count."""
    ids = torch.tensor([list(prompt) + list(completion)])
    lp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(prompt)
    return sum(float(lp[t - 1, ids[0, t]]) for t in range(P, ids.shape[1])), len(completion)


def _initial_model(task):
    return transformers.AutoModelForCausalLM.from_pretrained(task["model"]).eval()


def _blocks(tr, step=0):
    pidx, didx = tr.micro_indices(step, 0)
    pairs = [(tr.prefs[i].prompt, tr.prefs[i].completions[0], tr.prefs[i].completions[1]) for i in pidx]
    demos = [(tr.demos[i].prompt, tr.demos[i].completions[0]) for i in didx]
    samples = [(tr.demos[i].prompt, tr.state["samples"].get(int(i))) for i in didx]
    return pairs, demos, samples


def _loss(tr, step=0):
    inputs, kw = tr.micro_batch(step, 0)
    return float(tr.policy(inputs, kw)["loss"].detach())


def _nll(pol, seqs):
    tot = [_logp(pol, p, c) for p, c in seqs]
    return -sum(x for x, _ in tot) / sum(n for _, n in tot)


def _rho(pol, ref, p, c):
    return _logp(pol, p, c)[0] - _logp(ref, p, c)[0]


def _sig(z):
    return -float(F.logsigmoid(torch.tensor(z, dtype=torch.float64)))


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "rpo", "spin", "aihf", "aihf_wD0"])
def test_method_loss_equals_formula(task, tmp_path, method):
    beta, alpha, wP, wD = 0.5, 0.3, 0.7, 1.4
    if method == "aihf_wD0":  # DPO on the pairs + alpha * NLL(demonstrations), no own samples
        method, wD = "aihf", 0.0
    tr = _trainer(task, tmp_path, method=method, nll_weight=alpha, w_P=wP, w_D=wD,
                  reference="moving" if method == "spin" else "fixed")
    tr.refresh(0)  # reference log-probs of the data (initial model) and own samples
    pol, ref = tr.policy.model, _initial_model(task)
    _perturb(pol, 1)
    pol.eval()
    pairs, demos, samples = _blocks(tr)
    h = [_rho(pol, ref, p, c) - _rho(pol, ref, p, r) for p, c, r in pairs]
    g = [_rho(pol, ref, p, d) - _rho(pol, ref, p, s) for (p, d), (_, s) in zip(demos, samples)] if method in ("spin", "aihf") and wD else []
    if method == "aihf" and not wD:
        assert tr.state["samples"] == {}  # no own samples drawn
    if method == "sft":
        want = _nll(pol, demos)
    elif method == "dpo":
        want = sum(_sig(beta * x) for x in h) / len(h)
    elif method == "ipo":
        want = sum((x - 1 / (2 * beta)) ** 2 for x in h) / len(h)
    elif method == "rpo":
        want = sum(_sig(beta * x) for x in h) / len(h) + alpha * _nll(pol, [(p, c) for p, c, _ in pairs])
    elif method == "spin":
        want = sum(_sig(beta * x) for x in g) / len(g)
    else:  # aihf
        want = (wP * sum(_sig(beta * x) for x in h) + wD * sum(_sig(beta * x) for x in g)) / (len(h) + len(g))
        want += alpha * _nll(pol, demos)
    assert len(demos) == (0 if method in ("dpo", "ipo", "rpo") else 2)
    assert len(pairs) == (3 if method in ("dpo", "ipo", "rpo", "aihf") else 0)
    assert _loss(tr) == pytest.approx(want, rel=2e-5, abs=2e-6)


def test_sft_then_dpo_reference_is_the_sft_model(task, tmp_path):
    beta = 0.5
    tr = _trainer(task, tmp_path, method="sft_then_dpo", sft_steps=4)
    pol = tr.policy.model
    _perturb(pol, 1)                     # "after SFT"
    sft_model = copy.deepcopy(pol).eval()
    assert tr.method_at(3) == "sft" and tr.method_at(4) == "dpo"
    tr.refresh(4)                        # the switch: reference = the SFT model
    _perturb(pol, 2)
    pol.eval()
    pairs, _, _ = _blocks(tr, step=4)
    h = [_rho(pol, sft_model, p, c) - _rho(pol, sft_model, p, r) for p, c, r in pairs]
    assert _loss(tr, step=4) == pytest.approx(sum(_sig(beta * x) for x in h) / len(h), rel=2e-5, abs=2e-6)


def test_packed_and_padded_batches_give_the_same_loss(task, tmp_path):
    tr = _trainer(task, tmp_path, method="aihf", nll_weight=0.2)
    tr.refresh(0)
    _perturb(tr.policy.model, 3)
    assert tr.packed  # the check at start-up found that this model's attention respects packing
    a = _loss(tr)
    tr.packed = False
    assert _loss(tr) == pytest.approx(a, rel=1e-5)


def test_moving_reference_follows_the_policy(task, tmp_path):
    tr = _trainer(task, tmp_path, method="aihf", reference="moving", refresh_every=2)
    tr.refresh(0)
    before = tr.state["ref_pairs"].clone()
    _perturb(tr.policy.model, 4)
    tr.refresh(1)                        # not a boundary: nothing changes
    assert torch.equal(tr.state["ref_pairs"], before)
    tr.refresh(2)                        # a boundary: the window's pairs are re-scored by the policy
    pidx, _ = tr.micro_indices(2, 0)
    pol = tr.policy.model.eval()
    for i in pidx:
        p = tr.prefs[i]
        assert float(tr.state["ref_pairs"][i, 0]) == pytest.approx(_logp(pol, p.prompt, p.completions[0])[0], abs=1e-4)


def test_aihf_replay_loss_equals_formula(task, tmp_path):
    """aihf with replay: at the second refresh the first window's (demo, own sample) pairs join the
    buffer; micro-batch 0 of step 1 adds replay_per_batch of them to its demonstration
    comparisons (their reference log-probs those of when they were made), without NLL on them:
    L = [w_P sum_pairs l(beta h) + w_D sum_(fresh + replayed) l(beta g)] / (P + D + R) + alpha NLL(fresh demos)."""
    beta, alpha, wP, wD = 0.5, 0.3, 0.7, 1.4
    tr = _trainer(task, tmp_path, method="aihf", nll_weight=alpha, w_P=wP, w_D=wD, refresh_every=1, replay_size=3,
                  replay_per_batch=2)
    tr.refresh(0)
    first = dict(tr.state["samples"])
    assert tr.state["replay"] == [] and tr.replayed(0, 0) == []
    tr.refresh(1)
    kept = [(i, y) for i, y, _, _ in tr.state["replay"]]  # 3 of the window's pairs, in a seeded shuffled order
    assert len(kept) == min(3, len(first)) and all(first[i] == y for i, y in kept) and len(dict(kept)) == len(kept)
    assert all(s == 0 for *_, s in tr.state["replay"])
    replay = tr.replayed(1, 0)
    assert len(replay) == 2 and replay == tr.replayed(1, 0)
    pol, ref = tr.policy.model, _initial_model(task)
    _perturb(pol, 1)
    pol.eval()
    pairs, demos, samples = _blocks(tr, step=1)
    h = [_rho(pol, ref, p, c) - _rho(pol, ref, p, r) for p, c, r in pairs]
    g = [_rho(pol, ref, p, d) - _rho(pol, ref, p, s) for (p, d), (_, s) in zip(demos, samples)]
    g += [_rho(pol, ref, tr.demos[i].prompt, tr.demos[i].completions[0]) - _rho(pol, ref, tr.demos[i].prompt, y)
          for i, y, _, _ in replay]
    want = (wP * sum(_sig(beta * x) for x in h) + wD * sum(_sig(beta * x) for x in g)) / (len(h) + len(g))
    want += alpha * _nll(pol, demos)
    assert len(g) == 4
    assert _loss(tr, step=1) == pytest.approx(want, rel=2e-5, abs=2e-6)


def test_models_that_scale_or_cap_their_logits_take_the_logits_path():
    """A head the fused ops would get wrong (Granite's logits_scaling, Gemma's soft-capping, a
    scale in a multimodal model's text config) is detected, so the model's own logits are used."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aihf_fast.train.llm.model import _fused_head_ok

    tiny = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=1, vocab_size=64)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **tiny))
    scaled = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", logits_scaling=8.0, **tiny))
    capped = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", final_logit_softcapping=30.0,
                                                                   head_dim=8, **tiny))
    assert _fused_head_ok(plain) and not _fused_head_ok(scaled) and not _fused_head_ok(capped)


def test_a_diverged_run_stops_with_a_floating_point_error(task, tmp_path):
    """A step whose loss is not finite stops the run naming the step; weights that are already
    non-finite stop the next forward pass with the same kind of error (never a silent NaN)."""
    tr = _trainer(task, tmp_path, method="aihf", steps=3)
    real_step = tr.train_step
    tr.train_step = lambda step: {**real_step(step), "loss": float("nan")} if step == 1 else real_step(step)
    with pytest.raises(Diverged, match=r"step 2: loss = nan: the run diverged; lower the learning rate \(lr = "):
        tr.train()
    tr = _trainer(task, tmp_path / "poisoned", method="sft", steps=3)
    with torch.no_grad():
        next(tr.policy.model.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match=r"step 1: .*non-finite values.*: the run diverged") as err:
        tr.train()
    assert isinstance(err.value.__cause__, NonFiniteError) and isinstance(err.value, FloatingPointError)
    tr = _trainer(task, tmp_path / "bad_sample", method="aihf", steps=3)  # sampling from non-finite probabilities
    with torch.no_grad():
        next(tr.policy.model.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match=r"step 1: probability tensor contains .*the run diverged"):
        tr.train()
    tr = _trainer(task, tmp_path / "last", method="sft", steps=2)  # the last update diverged: the final evaluation

    def evaluate(step):
        if step == 2:
            raise NonFiniteError("hidden has 3 non-finite values (NaN/inf); expected finite inputs")

    tr.evaluate = evaluate
    with pytest.raises(Diverged, match=r"step 2: hidden has 3 non-finite values .*: the run diverged"):
        tr.train()
    tr = _trainer(task, tmp_path / "other", method="sft", steps=3)  # any other error is not a divergence
    tr.train_step = lambda step: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory") as err:
        tr.train()
    assert not isinstance(err.value, Diverged)
