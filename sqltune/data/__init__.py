"""Data: dataset sources, schema styles, prompts, the dataset registry, and the embedded demo data."""
