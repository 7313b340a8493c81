"""Perplexity at equal memory: every allocator on SmolLM2 with HQQ (or GPTQ), in one process, on the same tokens.

Runs uniform at 3.13/3.25/3.51/4.13/4.25, SB30 and KB21 at the three 3-bit rungs, LIM, ZD and MXQ at the
memory SB30 reached, and the `optimal` allocator at exactly the nominal bpp SB30 and KB21 reached and at
each uniform rung. Prints for each: nominal bpp, WikiText-2 and C4 perplexity with standard errors, KLD
against the unquantized model, top-1 agreement, the measured NLL increase (dNLL) and the Fisher
estimate `optimal` minimizes (pred dNLL), and the predicted perplexity base * exp(c * pred dNLL) with c
calibrated on one measured row (--calibrate-on); then Spearman rank correlations (KLD vs perplexity,
prediction vs measurement, and with --full-wikitext2 against the whole WikiText-2 test) and the verdicts
of issue 7 (optimal vs SB30/KB21 at <= their bpp, and vs uniform at each rung).

    python benchmarks/allocator_frontier.py [--eval-tokens 16384] [--protocol paper] [--only 'uniform|optimal']
                                            [--full-wikitext2] [--samples 32] [--fisher-samples 16] [--backend gptq]
                                            [--uniform b3g128,b3g64,b3g32,b4g128,b4g64] [--methods optimal]

With --backend gptq every variant is quantized by GPTQ (q/k/v and gate/up tied, as the pipeline does for
it), `optimal` is priced by GPTQ's own rung errors (docs/methods.md §11), and the rows `optimal[hqq]`
are the same budgets priced by HQQ's errors: what the GPTQ pricing buys.
Stage outputs are cached under $QUANT_HOME/artifacts, so a rerun only evaluates what changed.
--write-docs stores the rows as docs/results/allocator-frontier[-gptq][-full-wikitext2].json and rewrites the
docs tables that read them (docs/allocators.md, docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.allocation.methods import BOOST_METHODS  # noqa: E402
from tasks.allocation.optimal import predicted_loss_increase  # noqa: E402
from tasks.evaluation.compare import spearman  # noqa: E402
from tasks.ladder import parse_rung  # noqa: E402
import _pipeline  # noqa: E402
from tasks.orchestration.config import PipelineConfig  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.allocation.plan import VariantSpec, allocate_variants, backend_options, plan_variants, rung_errors  # noqa: E402

UNIFORM = ["b3g128", "b3g64", "b3g32", "b4g128", "b4g64"]
BOOST_RUNGS = ["b3g128", "b3g64", "b3g32"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--protocol", default="paper", choices=["paper", "gptq"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--fisher-samples", type=int, default=None, help="samples of the profiler's backward pass (default: the pipeline's)")
    ap.add_argument("--methods", default="sensiboost,kurtboost,lim,zd,mxq,optimal")
    ap.add_argument("--only", default=None, help="regular expression: evaluate only the rows whose name matches")
    ap.add_argument("--full-wikitext2", action="store_true", help="also the whole WikiText-2 test (GPTQ protocol; ~11 min per variant on 2 idle cores)")
    ap.add_argument("--calibrate-on", default="optimal @uniform 4.25", help="the row whose measured dNLL scales the predicted perplexity")
    ap.add_argument("--backend", default="hqq", choices=["hqq", "gptq"])
    ap.add_argument("--uniform", default=",".join(UNIFORM), help="the uniform rungs, each also a budget of `optimal` (e.g. b4g32: 4.51 bpp)")
    ap.add_argument("--write-docs", action="store_true", help="store the rows (docs/results/) and rewrite the docs tables that read them")
    args = ap.parse_args()
    uniform = args.uniform.split(",")
    key = "" if args.protocol == "paper" else "_gptq"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tasks.allocation import read_scores
    from tasks.model_io import linear_param_counts, read_config

    methods = args.methods.split(",")
    # The pipeline's own plan: uniform rungs, SB30/KB21 at the 3-bit rungs, LIM/ZD/MXQ at SB30's memory.
    config = {
        "model": args.model, "uniform_budgets": uniform, "methods": [m for m in methods if m != "optimal"], "budgets": BOOST_RUNGS,
        "eval_tokens": args.eval_tokens, "protocols": [args.protocol], "calibration_samples": args.samples,
        "lm_eval_tasks": [],  # perplexity only: the comparison is at equal memory on the same tokens
        "backends": [args.backend],
    }
    if args.fisher_samples is not None:
        config["fisher_samples"] = args.fisher_samples
    started = time.time()
    ctx = StageContext.from_env()
    profiled = config["methods"] + (["optimal"] if "optimal" in methods else [])  # what the profile measures for
    prep, scores = _pipeline.prepare(ctx, {**config, "methods": profiled or ["sensiboost"]})
    params = linear_param_counts(read_config(prep.model.local(ctx.settings.cache_dir)))
    table = read_scores(scores)
    planned = allocate_variants(plan_variants(PipelineConfig.from_dict(config)), table, params)
    # ... plus `optimal` at exactly the bpp each boost method reached and at each uniform rung.
    if "optimal" in methods:
        targets = [("@" + p.spec.label, p.spec.budget.label, p.bitmap.nominal_bpp) for p in planned if p.spec.method in BOOST_METHODS]
        targets += [("@uniform", parse_rung(r).label, parse_rung(r).bpp) for r in uniform]
        pricings = [("optimal", backend_options("optimal", {}, args.backend, None, ("gptq",) if table.has("out_err_gptq") else ()))]
        if args.backend == "gptq":  # the same budgets priced by HQQ's errors, for comparison
            pricings.append(("optimal[hqq]", backend_options("optimal", {}, args.backend, None, ())))
        planned += [(f"{row} {who} {label}", p) for row, options in pricings for who, label, bpp in targets
                    for p in allocate_variants([VariantSpec.of("optimal", float(bpp), options)], table, params)]  # fmt: skip
    named = [item if isinstance(item, tuple) else (_name(item), item) for item in planned]
    out = Path(prep.calibration.uri).parent.parent / "benchmark-bitmaps" / args.backend  # one backend's maps never replace another's
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    base = _pipeline.baseline(ctx, prep)
    baseline = measure(ctx, base, args.full_wikitext2)
    rows.append(("unquantized", None, None, baseline))
    for name, p in named:
        if args.only and not re.search(args.only, name):
            continue
        path = out / f"{name.replace(' ', '_').replace('@', 'at-')}.json"
        p.bitmap.save(path)
        metrics = measure(ctx, _pipeline.variant(base, args.backend, path, p.bitmap), args.full_wikitext2)
        rows.append((name, p.bitmap.nominal_bpp, predicted_loss_increase(table, p.bitmap, rung_errors(args.backend, table.has("out_err_gptq"))), metrics))
        logging.info("%s: bpp %.4f wiki2 %.3f c4 %.3f KLD %.4f%s", name, p.bitmap.nominal_bpp, metrics["ppl_wikitext2" + key],
                     metrics["ppl_c4" + key], metrics.get("kld_wikitext2" + key, math.nan),
                     f" full wiki2 {metrics['full_ppl_wikitext2_gptq']:.3f}" if args.full_wikitext2 else "")  # fmt: skip
    reached = {(p.spec.label, p.spec.budget.label): p.bitmap.nominal_bpp for _, p in named if p.spec.method in BOOST_METHODS}

    print(f"\nSmolLM2 + {args.backend.upper()}, {args.protocol} protocol, first {args.eval_tokens} tokens of each set ({time.time() - started:.0f} s)\n")
    calibration = calibrate_prediction(rows, args.calibrate_on, key)
    full = " | full wiki2 ppl (gptq)" if args.full_wikitext2 else ""
    print(f"| {'variant':<24} | {'bpp':>6} | wiki2 ppl ± se  | c4 ppl ± se     | wiki2 KLD ± se    | c4 KLD   | top-1 | dNLL    | pred dNLL | pred ppl{full} |")
    print("|" + "---|" * (11 if full else 10))
    for name, bpp, pred, m in rows:
        predicted_ppl = baseline["ppl_wikitext2" + key] * math.exp(calibration * pred) if pred is not None and calibration else None
        cells = [
            f"{name:<24}", "-" if bpp is None else f"{bpp:.4f}",
            f"{m['ppl_wikitext2' + key]:8.3f} ±{m['ppl_wikitext2' + key + '_se']:.3f}", f"{m['ppl_c4' + key]:8.3f} ±{m['ppl_c4' + key + '_se']:.3f}",
            f"{m.get('kld_wikitext2' + key, 0):.4f} ±{m.get('kld_wikitext2' + key + '_se', 0):.4f}", f"{m.get('kld_c4' + key, 0):.4f}",
            f"{m.get('top1_wikitext2' + key, 1):.3f}", f"{m.get('dnll_wikitext2' + key, 0):.4f}",
            "-" if pred is None else f"{pred:.4f}", "-" if predicted_ppl is None else f"{predicted_ppl:.2f}",
        ]  # fmt: skip
        if full:
            cells.append(f"{m['full_ppl_wikitext2_gptq']:.3f}")
        print("| " + " | ".join(cells) + " |")

    quantized = rows[1:]
    kld = [m.get("kld_wikitext2" + key) for *_, m in quantized]
    ppl = [m["ppl_wikitext2" + key] for *_, m in quantized]
    print(f"\nrank correlations over {len(quantized)} quantized variants (Spearman):")
    print(f"  KLD (16k) vs perplexity ({args.eval_tokens} tokens): {spearman(kld, ppl)[0]:.3f}")
    print(f"  predicted dNLL vs measured dNLL: {spearman([r[2] for r in quantized], [m.get('dnll_wikitext2' + key) for *_, m in quantized])[0]:.3f}")
    if full:
        whole = [m["full_ppl_wikitext2_gptq"] for *_, m in quantized]
        print(f"  KLD (16k) vs full WikiText-2 perplexity: {spearman(kld, whole)[0]:.3f}")
        print(f"  perplexity ({args.eval_tokens} tokens) vs full WikiText-2 perplexity: {spearman(ppl, whole)[0]:.3f}")
        print(f"  predicted dNLL vs full WikiText-2 perplexity: {spearman([r[2] for r in quantized], whole)[0]:.3f}")
    if calibration:
        errors = [abs(baseline["ppl_wikitext2" + key] * math.exp(calibration * pred) / m["ppl_wikitext2" + key] - 1)
                  for name, _, pred, m in quantized if pred is not None and name.startswith("optimal")]  # fmt: skip
        print(f"  predicted perplexity of `optimal` (calibrated on {args.calibrate_on}, factor {calibration:.3f}): "
              f"median error {100 * float(np.median(errors)):.1f}%, max {100 * max(errors):.1f}% over {len(errors)} rows")  # fmt: skip

    ppl_of = {name: (bpp, m["ppl_wikitext2" + key]) for name, bpp, _, m in rows}
    print("\nverdicts (optimal must have lower WikiText-2 perplexity at the same or lower bpp):")
    wins = 0
    checks = []
    for (short, label), bpp in reached.items():
        checks.append((f"optimal @{short} {label}", f"{short} {label}"))
    for r in uniform:
        checks.append((f"optimal @uniform {parse_rung(r).label}", f"uniform {parse_rung(r).label}"))
    for ours, theirs in checks:
        if ours in ppl_of and theirs in ppl_of:
            ok = ppl_of[ours][1] < ppl_of[theirs][1] and ppl_of[ours][0] <= ppl_of[theirs][0] + 1e-9
            wins += ok
            print(f"  {'WIN ' if ok else 'LOSS'} {ours:<24} {ppl_of[ours][1]:8.3f} @ {ppl_of[ours][0]:.4f}  vs  {theirs:<12} {ppl_of[theirs][1]:8.3f} @ {ppl_of[theirs][0]:.4f}")
    print(f"  {wins}/{len(checks)} wins")
    if args.write_docs:
        from tasks.reports.docs_tables import write_benchmark_docs

        name = docs_name("allocator-frontier", args.backend, args.full_wikitext2, args.protocol)
        write_benchmark_docs(name, [docs_row(n, bpp, pred, m) for n, bpp, pred, m in rows], __file__)
    return 0


def docs_name(benchmark: str, backend: str, full_wikitext2: bool, protocol: str = "paper") -> str:
    """The stored result's name (docs/results/<name>.json) for --write-docs: one per backend, protocol and
    whole-test option, so that a run of one never replaces another's rows."""
    parts = [benchmark, *([backend] if backend != "hqq" else []), *([f"{protocol}-protocol"] if protocol != "paper" else []),
             *(["full-wikitext2"] if full_wikitext2 else [])]  # fmt: skip
    return "-".join(parts)


def docs_row(name: str, bpp, pred, metrics: dict, **extra) -> dict:
    """A row of the stored result: the benchmark's row name, nominal bpp, predicted dNLL and every numeric metric."""
    return {"name": name, "bpp": bpp, "pred_dnll": pred, **extra,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}  # fmt: skip


def measure(ctx, variant, full_wikitext2: bool) -> dict:
    """The pipeline's evaluation of a variant (KLD against the base model included; `evaluation_dir`:
    its output, which holds the per-token values for paired comparisons) and, optionally, its perplexity
    on the whole WikiText-2 test under the GPTQ protocol (every token scored once)."""
    from tasks.evaluation.stage import EvalParams, run_evaluation

    evaluated = _pipeline.evaluate(ctx, variant)
    metrics = {**evaluated.metrics, "evaluation_dir": evaluated.evaluation.uri}
    if full_wikitext2:
        whole, _ = run_evaluation(evaluated.quantized.uri, evaluated.plan.backend, evaluated.run.calibration.uri,
                                  EvalParams(eval_tokens=0, protocols=("gptq",), datasets=("wikitext2",)),
                                  ctx.settings.artifact_root, evaluated.quantized.key, device=ctx.device)  # fmt: skip
        metrics["full_ppl_wikitext2_gptq"] = whole["ppl_wikitext2_gptq"]
    return metrics


def calibrate_prediction(rows, calibrate_on: str, key: str) -> float | None:
    """The factor c with measured dNLL = c * predicted dNLL on one row (the Fisher estimate's scale error,
    e.g. from the calibration set differing from the evaluation set); the predicted perplexity of every
    row is then base * exp(c * predicted dNLL)."""
    for name, _, pred, m in rows:
        if name == calibrate_on and pred:
            return m["dnll_wikitext2" + key] / pred
    return None
def _name(p) -> str:
    """The benchmark's row names: 'uniform 3.25', 'SB30 3.25', 'mxq @SB30 3.25'."""
    if p.spec.method == "uniform" or p.spec.method in BOOST_METHODS:
        return f"{p.spec.label} {p.spec.budget_label}"
    return f"{p.spec.label} @SB30 {p.spec.budget_label}"


if __name__ == "__main__":
    sys.exit(main())
