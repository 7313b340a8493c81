"""`python -m tasks allocate`: scores table + method + budget -> bit-map JSON, and a one-line summary."""

from __future__ import annotations

import argparse

from tasks.allocation.registry import ALLOCATORS, run_allocation
from tasks.bitmap import BitMap


def configure_parser(parser: argparse.ArgumentParser) -> None:
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
    solver.add_argument("--objective", help="optimal: fisher (default), sensitivity or output")
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


def run_cli(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in OPTION_ARGS if getattr(args, name, None) is not None}
    bitmap = run_allocation(args.scores, args.method, args.budget, options, args.out)
    print(f"{summary(bitmap)} -> {args.out}")
    return 0
