"""Instruction tuning data: instruction files, prompt templates, the demo set, SFT batches."""
