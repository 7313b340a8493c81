"""The allocation's commands.

`python -m tasks allocate`: scores table + method + budget -> bit-map JSON, and a one-line summary.

`python -m tasks frontier`: the `optimal` allocator over many budgets from one problem set-up.

    python -m tasks frontier --scores scores.csv --budgets 3.0:4.5:0.25 --out-dir frontier/

Writes one bit map per budget (`optimal-<bpp>.json`) and `frontier.csv`, and prints the curve: budget,
nominal bpp, the objective (with the loss objectives, the default per_token and fisher: the estimated
increase of the calibration loss in nats per token) and, for that objective, the estimated perplexity ratio
exp(c * objective) against the unquantized model. c = 1 unless `--calibrate BPP:RATIO` gives one measured
point (the perplexity ratio a quantized model at BPP showed): then c = ln(RATIO) / objective(BPP), which
absorbs the estimate's scale error (calibration text vs evaluation text, second-order truncation;
benchmarks/allocator_frontier.py reports the remaining error). Measure once, allocate many times: no
model is loaded.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tasks.allocation.registry import ALLOCATORS, run_allocation
from tasks.bitmap import BitMap
from tasks.errors import PipelineError


def configure_allocate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="scores table (CSV in the authors' format or the profiler's)")
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(ALLOCATORS)}")
    parser.add_argument("--budget", required=True, help="bits per parameter (4.25) or a rung (b4g64); a rung for uniform/boost methods")
    parser.add_argument("--out", required=True, help="where to write the bit-map JSON")
    parser.add_argument("--model", help="which model of a table that holds several")
    boost = parser.add_argument_group("sensiboost / kurtboost")
    boost.add_argument("--boost-stop", type=int, help="rungs to move outlier modules up (SB: 3, KB: 2)")
    boost.add_argument("--top-m", type=int, help="keep the m largest outliers per module type; 0 = all (SB: 0, KB: 1)")
    boost.add_argument("--ablation", action="store_true", default=None, help="random-layer control with as many boosts")
    boost.add_argument("--seed", type=int, help="seed of the ablation draw")
    layer = parser.add_argument_group("lim / zd")
    layer.add_argument("--low", help="rung of the least important layers (default: highest rung within the budget)")
    layer.add_argument("--high", help="rung of the other layers (default: next bit width, same group size)")
    layer.add_argument("--zd-direction", help="fewer-large-is-important (default) or more-large-is-important")
    solver = parser.add_argument_group("mxq / optimal")
    solver.add_argument("--tolerance", type=float, help="mxq: allowed memory overshoot as a fraction (0.01 = 1%%)")
    solver.add_argument("--rungs", help="candidate rungs, comma-separated (default: all in the table)")
    solver.add_argument("--objective", help="optimal: per_token (default), fisher, sensitivity or output")
    solver.add_argument("--time-limit", type=float, help="solver time limit in seconds (default 60)")
    solver.add_argument("--mip-gap", type=float, help="relative optimality gap (default 0: proven optimal)")
    parser.add_argument("--tie-fused", action="store_true", default=None,
                        help="sensiboost/kurtboost/mxq/optimal: q/k/v and gate/up of a layer on one rung (vLLM's fused kernels)")


OPTION_ARGS = ("boost_stop", "top_m", "ablation", "seed", "low", "high", "zd_direction", "tolerance", "rungs", "objective", "time_limit",
               "mip_gap", "tie_fused", "model")  # fmt: skip


def summary(bitmap: BitMap) -> str:
    extra = "" if bitmap.extra_pct is None else f" extra={round(bitmap.extra_pct, 2) + 0.0:+.2f}%"  # no "-0.00"
    counts = " ".join(f"{name}={n}" for name, n in bitmap.rung_counts().items())
    return f"{bitmap.method}: budget={bitmap.budget:.4f} nominal_bpp={bitmap.nominal_bpp:.4f}{extra} rungs[{counts}]"


def run_allocate(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in OPTION_ARGS if getattr(args, name, None) is not None}
    bitmap = run_allocation(args.scores, args.method, args.budget, options, args.out)
    print(f"{summary(bitmap)} -> {args.out}")
    return 0


# ---- frontier -------------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[float]:
    """'3.13,3.25,b4g64' or a range 'start:stop:step' (stop included)."""
    from tasks.allocation.budget import as_bpp

    text = text.strip()
    if text.count(":") == 2:
        try:
            start, stop, step = (float(p) for p in text.split(":"))
        except ValueError:
            raise PipelineError(f"--budgets range {text!r} is not start:stop:step in bits per parameter") from None
        if step <= 0 or stop < start:
            raise PipelineError(f"--budgets range {text!r} needs start <= stop and a positive step")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        return [round(start + i * step, 6) for i in range(count)]
    budgets = [as_bpp(p.strip()) for p in text.split(",") if p.strip()]
    if not budgets:
        raise PipelineError("--budgets is empty")
    return budgets


def parse_calibration(text: str) -> tuple[float, float]:
    """'BPP:RATIO', e.g. '4.25:1.08': a measured perplexity ratio (quantized / base) at a budget."""
    from tasks.allocation.budget import as_bpp

    try:
        bpp, ratio = text.split(":")
        point = (as_bpp(bpp.strip()), float(ratio))
    except ValueError:
        raise PipelineError(f"--calibrate {text!r} is not BPP:RATIO (e.g. 4.25:1.08)") from None
    if point[1] <= 1.0:
        raise PipelineError(f"--calibrate ratio must be above 1 (a quantized model's perplexity over the base model's), got {point[1]}")
    return point


def configure_frontier(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="scores table (the profiler's, or the authors' CSV)")
    parser.add_argument("--budgets", required=True, help="comma-separated bpp or rungs, or a range start:stop:step")
    parser.add_argument("--out-dir", required=True, help="where the bit maps and frontier.csv go")
    parser.add_argument("--objective", default=None, help="per_token (default), fisher, sensitivity or output")
    parser.add_argument("--rungs", default=None, help="candidate rungs, comma-separated (default: all in the table)")
    parser.add_argument("--model", default=None, help="which model of a table that holds several")
    parser.add_argument("--tie-fused", action="store_true", help="q/k/v and gate/up of a layer on one rung (vLLM's fused kernels)")
    parser.add_argument("--calibrate", default=None, metavar="BPP:RATIO", help="one measured point: the perplexity ratio vs the base model at BPP")


def run_frontier(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks.allocation.optimal import LOSS_OBJECTIVES, frontier
    from tasks.allocation.scores import read_scores

    budgets = parse_budgets(args.budgets)
    point = parse_calibration(args.calibrate) if args.calibrate else None
    options = {"objective": args.objective} if args.objective else {}
    maps = frontier(read_scores(args.scores, model=args.model), budgets + ([point[0]] if point else []), rungs=args.rungs,
                    tie_fused=args.tie_fused, **options)  # fmt: skip
    scale = 1.0
    if point:
        anchor = maps.pop()
        if anchor.options.get("objective_name") not in LOSS_OBJECTIVES or anchor.options["objective"] <= 0:
            raise PipelineError(f"--calibrate needs a loss objective ({', '.join(LOSS_OBJECTIVES)}) and a budget whose estimate is above zero")
        scale = math.log(point[1]) / anchor.options["objective"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget, bitmap in zip(budgets, maps):
        path = out / f"optimal-{budget:.4f}.json"
        bitmap.save(path)
        in_nats = bitmap.options.get("objective_name") in LOSS_OBJECTIVES
        rows.append({
            "budget": budget,
            "nominal_bpp": round(bitmap.nominal_bpp, 6),
            "objective": bitmap.options["objective"],
            "est_ppl_ratio": math.exp(scale * bitmap.options["objective"]) if in_nats else None,
            "rungs": " ".join(f"{name}={n}" for name, n in bitmap.rung_counts().items()),
            "bitmap": str(path),
        })
    pd.DataFrame(rows).to_csv(out / "frontier.csv.tmp", index=False)
    (out / "frontier.csv.tmp").replace(out / "frontier.csv")  # a reader never sees half a curve
    name = maps[0].options.get("objective_name", args.objective)
    print(f"optimal frontier ({name} objective), {len(rows)} budgets -> {out / 'frontier.csv'}"
          + (f"; estimates calibrated at {point[0]:g} bpp (factor {scale:.3f})" if point else ""))  # fmt: skip
    print(f"{'budget':>8} {'bpp':>8} {'objective':>11} {'est ppl x':>9}  rungs")
    for r in rows:
        ratio = "-" if r["est_ppl_ratio"] is None else f"{r['est_ppl_ratio']:.3f}"
        print(f"{r['budget']:>8.4f} {r['nominal_bpp']:>8.4f} {r['objective']:>11.5g} {ratio:>9}  {r['rungs']}")
    return 0
