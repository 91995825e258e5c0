"""Data: JSONL/datasets loading, tokenisation, and a synthetic task with a known reward."""
