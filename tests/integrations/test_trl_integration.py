"""The TRL drop-in against TRL's own DPOTrainer on a tiny model: the same losses, metrics (entropy
and top-1 token accuracy included) and weights after a few SGD steps (fp32, one CPU process), for sigmoid, hinge and RPO (sigmoid +
sft); unsupported configurations fall back to TRL's loss, saying so."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from aihf_fast.integrations.trl import AIHFDPOTrainer, use_aihf_loss  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM

    from aihf_fast.data import synthetic

    tok = synthetic.make_tokenizer()
    mc = dict(synthetic.DEFAULT_MODEL_CONFIG)
    mc.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc))
    rng = torch.Generator().manual_seed(0)
    words = [f"t{i}" for i in range(16)]

    def text(n):
        return " " + " ".join(words[int(i)] for i in torch.randint(0, 16, (n,), generator=rng))

    rows = [dict(prompt=text(6).strip() + " =", chosen=text(int(torch.randint(3, 8, (1,), generator=rng))),
                 rejected=text(int(torch.randint(3, 8, (1,), generator=rng)))) for _ in range(16)]
    return model, tok, Dataset.from_list(rows)


def _train(cls, setup, tmp_path, name, patch=False, **cfg):
    from trl import DPOConfig

    model, tok, data = setup
    # SGD: weights then differ by lr x (gradient difference); Adam would magnify rounding in ~0 gradients
    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                     optim="sgd",
                     logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, bf16=False,
                     dataloader_num_workers=0, **cfg)
    ref = copy.deepcopy(model)  # another model than the policy: no exact ties in the first step's log-ratios
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    trainer = cls(model=copy.deepcopy(model), ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    if patch:
        use_aihf_loss(trainer)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("cfg", [dict(), dict(loss_type=["hinge"]),
                                 dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])],
                         ids=["sigmoid", "hinge", "rpo"])
def test_drop_in_matches_trl(setup, tmp_path, cfg):
    want, w_want = _train(trl.DPOTrainer, setup, tmp_path, "trl", **cfg)
    with warnings.catch_warnings():
        # a supported configuration takes the fused path: the fallback warning would be an error
        warnings.filterwarnings("error", message="aihf_fast: TRL's own loss", category=UserWarning)
        got, w_got = _train(AIHFDPOTrainer, setup, tmp_path, "aihf", **cfg)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "num_tokens", "entropy",
                  "mean_token_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], atol=1e-5, rtol=1e-4, msg=k)
    patched, _ = _train(trl.DPOTrainer, setup, tmp_path, "patched", patch=True, **cfg)
    assert [r["loss"] for r in patched] == pytest.approx([r["loss"] for r in got], rel=1e-6)


def test_unsupported_configuration_falls_back_to_trl(setup, tmp_path):
    with pytest.warns(UserWarning, match="TRL's own loss is used for loss_type \\['ipo'\\]"):
        got, _ = _train(AIHFDPOTrainer, setup, tmp_path, "ipo_aihf", loss_type=["ipo"])
    want, _ = _train(trl.DPOTrainer, setup, tmp_path, "ipo_trl", loss_type=["ipo"])
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)


@pytest.mark.slow
def test_drop_in_uses_less_memory_than_trl(tmp_path):
    """benchmarks/bench_trl.py at a small shape (V = 8000, 4 pairs x 128 tokens, CPU): the drop-in's
    peak memory per training step (RSS above the step's start) is below TRL's, same first loss."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trl.py"
    spec = importlib.util.spec_from_file_location("bench_trl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--device", "cpu", "--vocab", "8000", "--seq", "128", "--prompt", "16", "--steps", "2",
                         "--rounds", "1", "--out", str(tmp_path / "bench_trl.json")])
    assert all(r["status"] == "ok" for r in report["results"]), report["results"]
    assert report["ratios"]["first_loss_abs_diff"] < 1e-4
    assert report["ratios"]["peak_transient_memory"] < 0.8, report["ratios"]


def test_drop_in_with_a_lora_adapter_matches_trl(setup, tmp_path):
    """PEFT: a LoRA adapter on the policy, the reference its base model (TRL's ref adapter): the same
    losses and metrics as TRL's own trainer, and only the adapter moves."""
    peft = pytest.importorskip("peft")
    from trl import DPOConfig

    model, tok, data = setup
    runs = {}
    for name, cls in (("trl", trl.DPOTrainer), ("aihf", AIHFDPOTrainer)):
        args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=0.05, optim="sgd", logging_steps=1, report_to=[], save_strategy="no", seed=0,
                         use_cpu=True, bf16=False, dataloader_num_workers=0, gradient_checkpointing=False)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               init_lora_weights=False)  # a non-zero adapter: the reference differs at step 1
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="aihf_fast: TRL's own loss", category=UserWarning)
            trainer = cls(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok,
                          peft_config=lora)
        trainer.train()
        runs[name] = [r for r in trainer.state.log_history if "loss" in r]
        base = {k: v for k, v in trainer.model.state_dict().items() if "lora" not in k}
        orig = model.state_dict()
        assert all(torch.equal(v, orig[k.replace("base_model.model.", "").replace(".base_layer", "")])
                   for k, v in base.items())
    for a, b in zip(runs["aihf"], runs["trl"]):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "entropy", "mean_token_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    assert runs["aihf"][0]["rewards/margins"] != 0  # the adapter-free reference is another model
