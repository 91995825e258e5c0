"""A small TRL job on a tiny model (run by the tests; self-contained, so that it also runs under
a launcher): AIHFTrainer (``aihf``), or DPO with TRL's own DPOTrainer (``dpo``) or the drop-in
AIHFDPOTrainer (``aihf_dpo``):

    accelerate launch --multi_gpu --num_processes 2 tests/integrations/aihf_trl_job.py OUT [aihf|dpo|aihf_dpo]

Writes OUT/rank{r}.json (world size, log history) and the model (``save_model``)."""
from __future__ import annotations

import copy
import json
import os
import sys

import torch


def tiny_model(model_type: str = "llama"):
    """A 2-layer causal LM with the synthetic task's tokenizer; gemma2 has a soft-capped head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aihf_fast.data import synthetic

    tok = synthetic.make_tokenizer()
    mc = dict(synthetic.DEFAULT_MODEL_CONFIG)
    mc.pop("model_type")
    mc.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if model_type == "gemma2":
        mc.update(head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **mc)), tok


def tiny_data(n_pairs: int = 8, n_demos: int = 8):
    """Preference pairs and demonstrations (TRL's standard formats) over 16 words."""
    from datasets import Dataset

    rng = torch.Generator().manual_seed(0)
    words = [f"t{i}" for i in range(16)]

    def text(n):
        return " " + " ".join(words[int(i)] for i in torch.randint(0, 16, (n,), generator=rng))

    pairs = Dataset.from_list([dict(prompt=text(6).strip() + " =", chosen=text(4), rejected=text(5))
                               for _ in range(n_pairs)])
    demos = Dataset.from_list([dict(prompt=text(6).strip() + " =", completion=text(4)) for _ in range(n_demos)])
    return pairs, demos


def config(out: str, **kw):
    from aihf_fast.integrations.trl import AIHFConfig

    base = dict(output_dir=out, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, logging_steps=1,
                report_to=[], save_strategy="no", seed=0, use_cpu=True, bf16=False, max_completion_length=8,
                nll_weight=0.5, dataloader_num_workers=0, gradient_checkpointing=False)
    base.update(kw)
    return AIHFConfig(**base)


def main(out: str, which: str = "aihf") -> None:
    from trl import DPOConfig, DPOTrainer

    from aihf_fast.integrations.trl import AIHFDPOTrainer, AIHFTrainer
    from aihf_fast.train.llm.trainer import shutdown_distributed

    model, tok = tiny_model()
    pairs, demos = tiny_data()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # another model than the policy: log-ratios are not all 0
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    if which == "aihf":
        trainer = AIHFTrainer(model=model, ref_model=ref, args=config(out), train_dataset=pairs,
                              demonstrations=demos, processing_class=tok)
    else:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                         logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, bf16=False,
                         dataloader_num_workers=0, gradient_checkpointing=False)
        cls = {"dpo": DPOTrainer, "aihf_dpo": AIHFDPOTrainer}[which]
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=tok)
    trainer.train()
    evaluation = None
    if which == "aihf":  # an evaluation set holding demonstrations, unevenly split: some processes sample, some not
        trainer.args.per_device_eval_batch_size = 5
        evaluation = trainer.evaluate(eval_dataset=trainer.train_dataset)
    trainer.save_model(out)
    with open(f"{out}/rank{trainer.accelerator.process_index}.json", "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "log": trainer.state.log_history, "eval": evaluation},
                  f)
    if trainer.accelerator.is_main_process:
        print("AIHF job done")
    shutdown_distributed()  # DeepSpeed's CPU backend can abort at interpreter exit without it
    # ... and, rarely, even with it (a ZeRO-3 TRL job: once in about 15 launches); the outputs are
    # written, so leave without the interpreter's teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
