"""Layer-sensitive mixed-precision quantization pipeline: one module per stage (see DESIGN.md)."""
