"""Profiling stage: model + calibration set -> scores table (docs/methods.md §3 and §5).

`run_profiling` streams the checkpoint one decoder layer at a time (driver.py); the numerics live in
small pure modules: weights.py (kurtosis, ZD, Frobenius error), activations.py (LIM sums, Gram
matrices, output errors), fisher.py (the streamed backward pass of the loss estimate), hqq_fast.py (HQQ quantize-dequantize); table.py writes the long-format CSV.
"""

from tasks.profiling.driver import load_calibration, run_profiling
from tasks.profiling.table import COLUMNS, SCORES_CSV, SCORES_FORMAT

__all__ = ["COLUMNS", "SCORES_CSV", "SCORES_FORMAT", "load_calibration", "run_profiling"]
