"""Trainers: ``aihf_fast.train.llm`` (transformers + DeepSpeed ZeRO)."""
