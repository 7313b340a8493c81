"""Evaluation stage: perplexity under both protocols of docs/methods.md §7, saved size, peak memory, speed."""
