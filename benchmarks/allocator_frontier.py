"""Perplexity at equal memory: every allocator on SmolLM2 with HQQ, in one process, on the same tokens.

Runs uniform at 3.13/3.25/3.51/4.13/4.25, SB30 and KB21 at the three 3-bit rungs, LIM, ZD and MXQ at the
memory SB30 reached, and the `optimal` allocator at exactly the nominal bpp SB30 and KB21 reached and at
each uniform rung; prints WikiText-2 and C4 perplexity and nominal bpp for each, then the verdicts of
issue 7 (optimal vs SB30/KB21 at <= their bpp, and vs uniform at each rung).

    python benchmarks/allocator_frontier.py [--eval-tokens 4096] [--protocol paper] [--samples 32] [--fisher-samples 16]
Stage outputs are cached under $QUANT_HOME/artifacts, so a rerun only evaluates what changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.allocation.methods import BOOST_METHODS  # noqa: E402
from tasks.ladder import parse_rung  # noqa: E402
from tasks.orchestration import steps  # noqa: E402
from tasks.orchestration.config import PipelineConfig  # noqa: E402
from tasks.orchestration.context import StepContext  # noqa: E402
from tasks.orchestration.planner import VariantSpec, allocate_variants, plan_variants  # noqa: E402

UNIFORM = ["b3g128", "b3g64", "b3g32", "b4g128", "b4g64"]
BOOST_RUNGS = ["b3g128", "b3g64", "b3g32"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--protocol", default="paper", choices=["paper", "gptq"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--fisher-samples", type=int, default=None, help="samples of the profiler's backward pass (default: the pipeline's)")
    ap.add_argument("--methods", default="sensiboost,kurtboost,lim,zd,mxq,optimal")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tasks.allocation import read_scores
    from tasks.model_io import linear_param_counts, read_config

    methods = args.methods.split(",")
    # The pipeline's own plan: uniform rungs, SB30/KB21 at the 3-bit rungs, LIM/ZD/MXQ at SB30's memory.
    config = {
        "model": args.model, "uniform_budgets": UNIFORM, "methods": [m for m in methods if m != "optimal"], "budgets": BOOST_RUNGS,
        "eval_tokens": args.eval_tokens, "protocols": [args.protocol], "calibration_samples": args.samples,
        "lm_eval_tasks": [],  # perplexity only: the comparison is at equal memory on the same tokens
    }
    if args.fisher_samples is not None:
        config["fisher_samples"] = args.fisher_samples
    started = time.time()
    ctx = StepContext.from_env()
    prep = steps.prepare(ctx, {**config, "methods": config["methods"] or ["sensiboost"]})
    scores = steps.profile(ctx, prep)
    params = linear_param_counts(read_config(prep["model"]["path"]))
    table = read_scores(scores)
    planned = allocate_variants(plan_variants(PipelineConfig.from_dict(config)), table, params)
    # ... plus `optimal` at exactly the bpp each boost method reached and at each uniform rung.
    if "optimal" in methods:
        targets = [("@" + p.spec.label, p.spec.budget.label, p.bitmap.nominal_bpp) for p in planned if p.spec.method in BOOST_METHODS]
        targets += [("@uniform", parse_rung(r).label, parse_rung(r).bpp) for r in UNIFORM]
        planned += [(f"optimal {who} {label}", p) for who, label, bpp in targets
                    for p in allocate_variants([VariantSpec.of("optimal", float(bpp))], table, params)]  # fmt: skip
    named = [item if isinstance(item, tuple) else (_name(item), item) for item in planned]
    out = Path(prep["calibration"]).parent.parent / "benchmark-bitmaps"
    out.mkdir(exist_ok=True)

    rows = []
    base = steps.allocate(ctx, {**prep, "config": {**prep["config"], "methods": [], "budgets": [], "uniform_budgets": []}}, None)[0]
    baseline = steps.evaluate(ctx, steps.quantize(ctx, base))["metrics"]
    rows.append(("unquantized", None, baseline))
    for name, p in named:
        path = out / f"{name.replace(' ', '_').replace('@', 'at-')}.json"
        p.bitmap.save(path)
        variant = {**base, "backend": "hqq", "method": p.spec.method, "bitmap": str(path), "nominal_bpp": p.bitmap.nominal_bpp, "extra_pct": p.bitmap.extra_pct}
        metrics = steps.evaluate(ctx, steps.quantize(ctx, variant))["metrics"]
        rows.append((name, p.bitmap.nominal_bpp, metrics))
        logging.info("%s: bpp %.4f wiki2 %.3f c4 %.3f", name, p.bitmap.nominal_bpp, metrics["ppl_wikitext2" if args.protocol == "paper" else "ppl_wikitext2_gptq"], metrics["ppl_c4" if args.protocol == "paper" else "ppl_c4_gptq"])
    reached = {(p.spec.label, p.spec.budget.label): p.bitmap.nominal_bpp for _, p in named if p.spec.method in BOOST_METHODS}

    key = "" if args.protocol == "paper" else "_gptq"
    print(f"\nSmolLM2 + HQQ, {args.protocol} protocol, first {args.eval_tokens} tokens of each set ({time.time() - started:.0f} s)\n")
    print(f"| {'variant':<24} | {'bpp':>6} | {'wiki2 ppl':>9} | {'c4 ppl':>8} |")
    print(f"|{'-' * 26}|{'-' * 7}:|{'-' * 10}:|{'-' * 9}:|")
    for name, bpp, m in rows:
        print(f"| {name:<24} | {bpp if bpp is None else f'{bpp:.4f}'!s:>6} | {m['ppl_wikitext2' + key]:>9.3f} | {m['ppl_c4' + key]:>8.3f} |")

    ppl = {name: (bpp, m["ppl_wikitext2" + key]) for name, bpp, m in rows}
    print("\nverdicts (optimal must have lower WikiText-2 perplexity at the same or lower bpp):")
    wins = 0
    checks = []
    for (short, label), bpp in reached.items():
        checks.append((f"optimal @{short} {label}", f"{short} {label}"))
    for r in UNIFORM:
        checks.append((f"optimal @uniform {parse_rung(r).label}", f"uniform {parse_rung(r).label}"))
    for ours, theirs in checks:
        if ours in ppl and theirs in ppl:
            ok = ppl[ours][1] < ppl[theirs][1] and ppl[ours][0] <= ppl[theirs][0] + 1e-9
            wins += ok
            print(f"  {'WIN ' if ok else 'LOSS'} {ours:<24} {ppl[ours][1]:8.3f} @ {ppl[ours][0]:.4f}  vs  {theirs:<12} {ppl[theirs][1]:8.3f} @ {ppl[theirs][0]:.4f}")
    print(f"  {wins}/{len(checks)} wins")
    return 0


def _name(p) -> str:
    """The benchmark's row names: 'uniform 3.25', 'SB30 3.25', 'mxq @SB30 3.25'."""
    if p.spec.method == "uniform" or p.spec.method in BOOST_METHODS:
        return f"{p.spec.label} {p.spec.budget_label}"
    return f"{p.spec.label} @SB30 {p.spec.budget_label}"


if __name__ == "__main__":
    sys.exit(main())
