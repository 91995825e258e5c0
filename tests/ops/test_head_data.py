"""The LM-head input provider the tests and benchmarks share (``aihf_fast.ops.testing``):
deterministic, the requested shapes, dtypes and prompt masking, and ``peaked`` logits that look
like a trained LM's where ``randn`` ones are flat."""
import pytest
import torch

from aihf_fast.ops.testing import lm_head_inputs, logit_stats


@pytest.mark.parametrize("data", ["randn", "peaked"])
def test_shapes_dtypes_masking_and_determinism(data):
    d = lm_head_inputs(3, 20, 16, 300, data=data, prompt_frac=0.3, dtype=torch.bfloat16, seed=1)
    assert d.hidden.shape == d.ref_hidden.shape == (3, 20, 16) and d.weight.shape == d.ref_weight.shape == (300, 16)
    assert d.hidden.dtype == d.weight.dtype == torch.bfloat16 and d.labels.dtype == torch.int64
    assert bool((d.labels[:, :6] == -100).all()) and bool(((d.labels[:, 6:] >= 0) & (d.labels[:, 6:] < 300)).all())
    again = lm_head_inputs(3, 20, 16, 300, data=data, prompt_frac=0.3, dtype=torch.bfloat16, seed=1)
    other = lm_head_inputs(3, 20, 16, 300, data=data, prompt_frac=0.3, dtype=torch.bfloat16, seed=2)
    for a, b in zip(vars(d).values(), vars(again).values()):
        assert torch.equal(a, b)
    assert not torch.equal(d.hidden, other.hidden)
    assert not torch.equal(d.hidden, d.ref_hidden)  # a reference model, not the policy itself


def test_peaked_logits_look_like_a_trained_model_and_randn_ones_are_flat():
    flat = lm_head_inputs(4, 64, 128, 8000, data="randn").stats()
    peaked = lm_head_inputs(4, 64, 128, 8000, data="peaked").stats()
    assert flat["top1_prob"] < 0.01 and flat["entropy"] > 8 and flat["tokens_for_90pct"] > 5000
    assert 0.4 < peaked["top1_prob"] < 0.9 and 1 < peaked["entropy"] < 4 and peaked["tokens_for_90pct"] < 2000
    # calibrated, as a trained model is: the top token is the label about as often as its
    # probability says, and the label's mean log-probability is about minus the entropy
    assert abs(peaked["top1_is_label"] - peaked["top1_prob"]) < 0.1
    assert abs(peaked["label_logprob"] + peaked["entropy"]) < 0.6
    assert peaked["tokens"] == 256


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="data must be one of"):
        lm_head_inputs(2, 4, 8, 16, data="flat")
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        lm_head_inputs(2, 4, 8, 0)
    with pytest.raises(ValueError, match="prompt_frac must be in"):
        lm_head_inputs(2, 4, 8, 16, prompt_frac=1.0)
    d = lm_head_inputs(1, 4, 8, 16, prompt_frac=0.9)
    with pytest.raises(ValueError, match="no labelled token"):
        logit_stats(d.hidden, d.weight, torch.full((1, 4), -100))
