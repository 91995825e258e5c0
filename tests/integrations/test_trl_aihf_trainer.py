"""AIHFTrainer (TRL): its loss is ``aihf_loss`` with ``method_config("aihf", ...)`` on the same
sequences (fused head and, for a soft-capped head, the logits path); evaluation on pairs is
TRL's DPO evaluation; a resumed run equals an uninterrupted one; configuration errors name the
field; end to end under ``accelerate launch`` with 2 CPU processes, DDP and DeepSpeed ZeRO-3
giving the same run."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from aihf_fast.integrations.trl import AIHFTrainer, DataCollatorForAIHF  # noqa: E402
from aihf_fast.ops import aihf_loss, method_config  # noqa: E402

JOB = Path(__file__).with_name("aihf_trl_job.py")
_spec = importlib.util.spec_from_file_location("aihf_trl_job", JOB)
job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(job)


def _trainer(tmp_path, model_type="llama", ref_noise=0.02, **cfg):
    model, tok = job.tiny_model(model_type)
    pairs, demos = job.tiny_data()
    train_dataset = cfg.pop("train_dataset", pairs)
    eval_dataset = cfg.pop("eval_dataset", None)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # another model than the policy: log-ratios are not all 0
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(ref_noise * torch.randn(p.shape, generator=g))
    return AIHFTrainer(model=model, ref_model=ref, args=job.config(str(tmp_path / "out"), **cfg),
                       train_dataset=train_dataset, demonstrations=demos, eval_dataset=eval_dataset,
                       processing_class=tok)


def _padded(seqs, pad):
    """TRL-style (input_ids, attention_mask, labels) of (prompt, completion) id lists."""
    T = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), T), pad)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), -100)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        att[i, :len(p) + len(c)] = 1
        lab[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, att, lab


@pytest.mark.parametrize("model_type", ["llama", "gemma2"], ids=["fused_head", "softcapped_logits_path"])
def test_loss_is_aihf_loss_of_method_config(tmp_path, model_type):
    tr = _trainer(tmp_path, model_type, w_P=0.7, w_D=1.3, nll_weight=0.4, loss_type=["sigmoid"], beta=0.2)
    ds = tr.train_dataset
    rows = [ds[i] for i in range(len(ds))]
    pairs = [r for r in rows if not r["is_demo"]][:3]
    demos = [r for r in rows if r["is_demo"]][:2]
    assert len(pairs) == 3 and len(demos) == 2
    samples = [[5, 6, 7, tr._tokenizer.eos_token_id], [8, 9, tr._tokenizer.eos_token_id]]
    tr._own_samples = lambda prompts, seed: [list(s) for s in samples][:len(prompts)]
    batch = DataCollatorForAIHF()([demos[0], pairs[0], pairs[1], demos[1], pairs[2]])
    tr.model.eval()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch).item()
    # the reference: [chosen P, rejected P, demo D, own sample D] laid out by method_config
    seqs = ([(r["prompt_ids"], r["chosen_ids"]) for r in pairs] + [(r["prompt_ids"], r["rejected_ids"]) for r in pairs]
            + [(r["prompt_ids"], r["chosen_ids"]) for r in demos]
            + [(r["prompt_ids"], s) for r, s in zip(demos, samples)])
    ids, att, lab = _padded(seqs, tr._tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tr.model(input_ids=ids, attention_mask=att).logits
        ref_logits = tr.ref_model(input_ids=ids, attention_mask=att).logits
    want = aihf_loss(lab, logits=logits, ref_logits=ref_logits, shift_labels=True, beta=0.2,
                     layout=method_config("aihf", 3, 2, w_P=0.7, w_D=1.3, nll_weight=0.4)).loss.item()
    assert got == pytest.approx(want, rel=1e-5)
    assert tr._metrics["eval"]["demo_rewards/accuracies"] and tr._metrics["eval"]["rewards/accuracies"]


@pytest.mark.parametrize("w_P", [1.0, 0.5, 0.0])
def test_evaluation_on_pairs_is_trl_dpo_evaluation(tmp_path, w_P):
    """Held-out pairs get DPO's loss and metrics whatever w_P is (w_P = 0: training on demonstrations
    alone), with compute_metrics too (the logits path of evaluation)."""
    from trl import DPOConfig, DPOTrainer

    pairs, _ = job.tiny_data()
    extra = dict(train_dataset=None) if w_P == 0 else {}
    tr = _trainer(tmp_path, eval_strategy="no", per_device_eval_batch_size=4, w_P=w_P, **extra)
    got = tr.evaluate(eval_dataset=pairs)
    model, tok = job.tiny_model()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                     bf16=False, seed=0)
    dpo = DPOTrainer(model=model, ref_model=copy.deepcopy(tr.ref_model), args=args, train_dataset=pairs,
                     processing_class=tok)
    want = dpo.evaluate(eval_dataset=pairs)
    for k in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies",
              "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen", "eval_logits/rejected",
              "eval_entropy", "eval_mean_token_accuracy"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (k, got[k], want[k])
    seen = []
    tr.compute_metrics = lambda pred: seen.append(pred.predictions.shape) or {"n": float(len(seen))}
    tr.args.prediction_loss_only = False
    assert tr.evaluate(eval_dataset=pairs)["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
    assert seen and seen[0][-1] == tr.model.config.vocab_size


def test_resumed_run_draws_the_same_samples(tmp_path):
    """From a checkpoint, with evaluations in between: the same own samples and losses."""
    pairs, _ = job.tiny_data()
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=1,
              per_device_eval_batch_size=4, eval_dataset=pairs)
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    part = _trainer(tmp_path / "part", **kw)
    part.args.output_dir = full.args.output_dir
    part.train(resume_from_checkpoint=os.path.join(full.args.output_dir, "checkpoint-2"))
    a = {r["step"]: r for r in full.state.log_history if "loss" in r}
    b = {r["step"]: r for r in part.state.log_history if "loss" in r}
    assert {3, 4} <= set(b)
    for s in (3, 4):
        assert b[s].keys() == a[s].keys()
        for k in ("loss", "samples/mean_length", "demo_rewards/margins", "logps/own_sample"):
            if k in a[s]:  # a batch of pairs only has no own samples
                assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-7), (s, k)


@pytest.mark.parametrize("kw,match", [
    (dict(w_D=0.0), "w_D must be > 0"),
    (dict(w_P=-1.0), "w_P must be a finite number >= 0"),
    (dict(nll_weight=float("nan")), "nll_weight must be"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_completion_length=0), "max_completion_length must be"),
    (dict(loss_type=["ipo"]), "loss_type must be 'sigmoid' or 'hinge'"),
    (dict(loss_type=["sigmoid", "sft"]), "loss_type must be"),
    (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(loss_weights=[2.0]), "loss_weights"),
])
def test_config_errors_name_the_field(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        job.config(str(tmp_path), **kw)


def test_dataset_errors(tmp_path):
    from datasets import Dataset

    model, tok = job.tiny_model()
    pairs, demos = job.tiny_data()
    args = job.config(str(tmp_path))
    with pytest.raises(ValueError, match="demonstrations is required"):
        AIHFTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=pairs, processing_class=tok)
    with pytest.raises(ValueError, match=r"demonstrations needs columns \['prompt', 'completion'\]"):
        AIHFTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=pairs,
                    demonstrations=Dataset.from_list([{"text": "a b"}]), processing_class=tok)
    with pytest.raises(ValueError, match="w_P = 0"):
        AIHFTrainer(model=model, ref_model=copy.deepcopy(model), args=job.config(str(tmp_path), w_P=0.0),
                    train_dataset=pairs, demonstrations=demos, processing_class=tok)
    with pytest.raises(TypeError, match="args must be an AIHFConfig"):
        AIHFTrainer(model=model, ref_model=copy.deepcopy(model), args=trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True,
                                                                                bf16=False),
                    train_dataset=pairs, demonstrations=demos, processing_class=tok)


def test_own_samples_ignore_the_models_generation_config(tmp_path):
    """A checkpoint's generation settings (repetition rules, suppressed tokens) do not reach the own
    samples: they are the policy's own distribution at AIHFConfig's temperature / top_p."""
    tr = _trainer(tmp_path)
    prompts = [r["prompt_ids"] for r in tr.train_dataset if r["is_demo"]][:8]
    plain = tr._own_samples(prompts, seed=7)
    gc = tr.model.generation_config
    gc.no_repeat_ngram_size, gc.suppress_tokens, gc.repetition_penalty = 1, [tr._tokenizer.eos_token_id], 3.0
    assert tr._own_samples(prompts, seed=7) == plain
    assert tr.model.generation_config is gc and gc.repetition_penalty == 3.0  # restored afterwards


def test_a_compiled_policy_keeps_its_generation_config(tmp_path):
    from aihf_fast.train.llm.sampling import sample_completions

    model, tok = job.tiny_model()
    gc = model.generation_config
    gc.repetition_penalty = 3.0
    compiled = torch.compile(model, backend="eager")
    got = sample_completions(compiled, tok, [[1, 5, 6]], max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0,
                             device="cpu")
    assert got == sample_completions(model, tok, [[1, 5, 6]], max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0,
                                     device="cpu")
    assert model.generation_config is gc and gc.repetition_penalty == 3.0


def test_training_again_and_evaluating_again_draw_the_same_samples(tmp_path):
    """train(resume_from_checkpoint) on the same trainer object repeats the uninterrupted run; two
    evaluations of the same weights draw the same samples."""
    _, demos = job.tiny_data()
    tr = _trainer(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                  save_strategy="steps", save_steps=1)
    tr.train()
    first = {r["step"]: r for r in tr.state.log_history if "loss" in r}
    tr.train(resume_from_checkpoint=os.path.join(tr.args.output_dir, "checkpoint-1"))
    again = {r["step"]: r for r in tr.state.log_history if "loss" in r}
    assert again[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)
    evals = [tr.evaluate(eval_dataset=tr.train_dataset) for _ in range(2)]
    assert evals[0]["eval_logps/own_sample"] == pytest.approx(evals[1]["eval_logps/own_sample"], rel=1e-6)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_own_samples_of_a_lora_policy_ignore_the_generation_config(tmp_path, task_type):
    """Under PEFT the base model's generation settings do not reach the samples either, and the base
    model keeps its generation config (PEFT's generate copies the wrapper's into it)."""
    peft = pytest.importorskip("peft")
    model, tok = job.tiny_model()
    pairs, demos = job.tiny_data()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type=task_type)
    tr = AIHFTrainer(model=model, args=job.config(str(tmp_path)), train_dataset=pairs, demonstrations=demos,
                     processing_class=tok, peft_config=lora)
    prompts = [r["prompt_ids"] for r in tr.train_dataset if r["is_demo"]][:8]
    plain = tr._own_samples(prompts, seed=7)
    inner = tr.model.get_base_model()
    gc = inner.generation_config
    gc.no_repeat_ngram_size, gc.suppress_tokens = 1, [tok.eos_token_id]
    assert tr._own_samples(prompts, seed=7) == plain
    assert inner.generation_config is gc and gc.eos_token_id is not None
    assert "generation_config" not in vars(tr.model)


def test_gradient_accumulation_draws_the_same_samples_on_every_launcher(tmp_path):
    """The seed of a micro-batch's own samples does not depend on whether an earlier micro-batch of
    the step sampled (DDP samples only where there are demonstrations, ZeRO-3 everywhere or nowhere)."""
    logs = []
    for sharded in (False, True):
        tr = _trainer(tmp_path / str(sharded), max_steps=3, gradient_accumulation_steps=2,
                      per_device_train_batch_size=2)
        tr._sharded_generation = lambda s=sharded: s  # one process: the collective decision is its own
        tr.train()
        logs.append([r for r in tr.state.log_history if "loss" in r])
    for a, b in zip(*logs):
        for k in ("loss", "logps/own_sample", "samples/mean_length"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6), (k, a[k], b[k])


def test_dataset_columns(tmp_path):
    """tools / chat_template_kwargs are kept for TRL's tokenization; vision data and empty prompts refused."""
    model, tok = job.tiny_model()
    pairs, demos = job.tiny_data()
    kw = dict(model=model, ref_model=copy.deepcopy(model), args=job.config(str(tmp_path)), processing_class=tok)
    ctk = [{"enable_thinking": False}] * 8
    tr = AIHFTrainer(train_dataset=pairs.add_column("chat_template_kwargs", ctk),
                     demonstrations=demos.add_column("chat_template_kwargs", ctk), **kw)
    assert "chat_template_kwargs" in tr.train_dataset.column_names
    with pytest.raises(ValueError, match="'chat_template_kwargs' is a column of"):
        AIHFTrainer(train_dataset=pairs, demonstrations=demos.add_column("chat_template_kwargs", ctk), **kw)
    with pytest.raises(ValueError, match="differ in the structure of a column"):
        AIHFTrainer(train_dataset=pairs.add_column("chat_template_kwargs", ctk),
                    demonstrations=demos.add_column("chat_template_kwargs", [{"x": 1}] * 8), **kw)
    with pytest.raises(ValueError, match="does not support vision datasets"):
        AIHFTrainer(train_dataset=pairs, demonstrations=demos.add_column("image", [None] * 8), **kw)
    with pytest.raises(ValueError, match="empty tokenized prompt"):
        tok_nobos = copy.deepcopy(tok)
        tok_nobos._tokenizer.post_processor = None
        AIHFTrainer(train_dataset=pairs, demonstrations=demos.map(lambda e, i: {"prompt": "" if i == 3 else
                                                                               e["prompt"]}, with_indices=True),
                    **{**kw, "processing_class": tok_nobos})


def test_demonstrations_alone(tmp_path):
    """No preference pairs (w_P = 0): the (demonstration > own sample) comparisons and the NLL only."""
    tr = _trainer(tmp_path, w_P=0.0, train_dataset=None, max_steps=2)
    tr.train()
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs) == 2 and all("demo_rewards/margins" in r and "rewards/margins" not in r for r in logs)


ZERO3 = ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false", "--zero3_save_16bit_model", "true"]


def _launch(out, flags, which):
    """The job under ``accelerate launch`` with 2 CPU processes -> each step's log record (rank 0's,
    checked equal to rank 1's)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(JOB), str(out), which]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("AIHF job done") == 1  # rank 0 only
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["world"] for g in logs] == [2, 2]
    steps = [r for r in logs[0]["log"] if "loss" in r]
    assert steps == [r for r in logs[1]["log"] if "loss" in r]  # metrics gathered over both processes
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the saved model loads
    return steps


@pytest.mark.distributed
def test_two_processes_under_accelerate_ddp_and_zero3(tmp_path):
    runs = {name: _launch(tmp_path / name, flags, "aihf") for name, flags in (("ddp", ["--multi_gpu"]),
                                                                              ("zero3", ZERO3))}
    for r in runs["ddp"]:
        assert {"demo_rewards/margins", "rewards/margins", "entropy", "mean_token_accuracy"} <= r.keys()
    evals = [json.loads((tmp_path / name / "rank0.json").read_text())["eval"] for name in ("ddp", "zero3")]
    assert evals[0] is not None and evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-5)
    for a, b in zip(runs["ddp"], runs["zero3"]):  # ZeRO-3 gathers the weights to sample: the same run as DDP
        for k in ("loss", "demo_rewards/margins", "logps/own_sample", "samples/mean_length", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])


@pytest.mark.distributed
def test_drop_in_under_zero3_matches_trl(tmp_path):
    """The DPO drop-in under ZeRO-3 (the LM head gathered for the fused loss) on 2 processes: the
    same losses and metrics as TRL's own DPOTrainer there."""
    want = _launch(tmp_path / "trl", ZERO3, "dpo")
    got = _launch(tmp_path / "aihf", ZERO3, "aihf_dpo")
    for a, b in zip(got, want):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected",
                  "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
