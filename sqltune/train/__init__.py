"""Supervised fine-tuning: data (tokenised records, length-grouped batches), model setup per finetuning type, and
the training recipe (sft.py)."""
