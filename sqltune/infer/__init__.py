"""Inference: merging adapters into plain models, batched resumable prediction, and SQL extraction."""
