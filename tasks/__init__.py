"""Layer-sensitive mixed-precision quantization pipeline: one package per stage (docs/operations.md, *Layout*)."""
