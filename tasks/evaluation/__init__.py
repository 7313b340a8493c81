"""Evaluation stage: perplexity under both protocols of SPEC section 7, saved size, peak memory, speed."""
