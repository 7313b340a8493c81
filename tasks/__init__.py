"""Layer-sensitive mixed-precision quantization pipeline: one package per stage (the README's *Layout*)."""
