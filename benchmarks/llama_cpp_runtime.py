"""llama.cpp's runtime settings for the evaluator's windows: tokens per second of one 1024-token window
with all logits, per micro-batch size and flash attention, as ratios to the old default (n_ubatch 512, no
flash attention); and the evaluator's own model (LlamaCppModel), which asks llama.cpp for the scored half's
logits only. Interleaved, minimum of --reps, so a ratio means the same on a busy machine.

    python benchmarks/llama_cpp_runtime.py [--model <file.gguf>] [--reps 5] [--window 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.model_io import _embedded_gguf  # noqa: E402
from tasks.quantize.llama_cpp_runtime import LlamaCppModel, llama_cpp_module  # noqa: E402

SETTINGS = {"ubatch 512": {"n_ubatch": 512}, "ubatch 512, flash attention": {"n_ubatch": 512, "flash_attn": True},
            "ubatch 1024": {"n_ubatch": 1024}, "ubatch 1024, flash attention": {"n_ubatch": 1024, "flash_attn": True}}  # fmt: skip
KEPT = "ubatch 1024, flash, scored half"  # the evaluator's LlamaCppModel: logits of the scored half only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--window", type=int, default=1024)
    args = ap.parse_args()
    llama_cpp = llama_cpp_module()
    path = args.model or str(_embedded_gguf())
    row = np.random.default_rng(0).integers(100, 10000, args.window).tolist()
    llms = {name: llama_cpp.Llama(path, n_ctx=args.window, n_batch=args.window, logits_all=True, n_threads=2, n_threads_batch=2, verbose=False, **kw)
            for name, kw in SETTINGS.items()}  # fmt: skip
    evaluator = LlamaCppModel(path, args.window)  # ubatch 1024, flash attention: the kept half's logits only
    best = dict.fromkeys([*SETTINGS, KEPT], float("inf"))
    for _ in range(args.reps):
        started = time.perf_counter()
        evaluator(torch.tensor([row]), logits_to_keep=args.window // 2)
        best[KEPT] = min(best[KEPT], time.perf_counter() - started)
        for name, llm in llms.items():
            llm.reset()
            started = time.perf_counter()
            llm.eval(row)
            np.array(llm.scores[: args.window], dtype=np.float32)  # the evaluator's copy of the logits
            best[name] = min(best[name], time.perf_counter() - started)
    base = best["ubatch 512"]
    for name, seconds in best.items():
        print(f"{name:30s} {args.window / seconds:7.0f} tok/s  time ratio {seconds / base:.2f}")
    for llm in [*llms.values(), evaluator]:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
