"""`optimal` against the allocators users pick today, on the same quantizer, rungs and exact budget accounting.

At each budget (bits per parameter: 3.13 / 3.25 / 3.51 / 4.13 / 4.25 by default, the uniform rungs'
costs) every budget-exact allocator gets exactly that memory: `optimal` in each flavor of --optimal (an
objective: per_token, ModelOpt's token-by-token product priced by the backend's own rung errors, or fisher,
the per-feature means; '+refine' for the measured refinement), `taylor` (NVIDIA ModelOpt auto_quantize's
gradient score), `delta_loss` (Intel AutoRound AutoScheme's score), `dkld_greedy` (ExLlamaV3's measured
KLD per layer group, spent greedily) and MXQ, next to uniform at that rung; SB30 runs at each 3-bit rung
(it spends extra memory, so every `optimal` flavor is also run at exactly the memory SB30 reached: at b3g64
that is the embedded run's `optimal`). Prints, per variant: nominal bpp, WikiText-2 and C4 perplexity with
standard errors, KLD against the base model with its standard error, top-1 agreement, measured dNLL, both
estimates' predictions, the solve's and the refinement's cost; then issue 32's targets as MET/MISS for each
flavor (no rival better outside the paired noise at any budget, strictly better than all at >= 3 of 5, the
embedded row no worse than the fisher objective's) and the estimates' Spearman against the measured dNLL.

    python benchmarks/rival_allocators.py [--backend hqq|gptq] [--budgets b3g64,b4g64] [--eval-tokens 16384]
                                          [--methods optimal,taylor,delta_loss,dkld_greedy,mxq,sensiboost]
                                          [--optimal per_token,fisher,per_token+refine] [--refine '{"generations": 8}']

The profile is one pass with rival_scores (the per-token products cost an extra share of the backward
pass, printed as the phase `rivals`); stage outputs, refinements included, are cached under
$QUANT_HOME/artifacts, and every measured row is also stored in the repository (benchmarks/rows/
rival-allocators/, see benchmarks/_rows.py; commit them), so a rerun continues where it stopped, on this
machine or another (the profile is measured again there: a few minutes). With --backend gptq every row is what the
pipeline would build for gptq: q/k/v and gate/up tied, `optimal` priced by GPTQ's own rung errors (profile
phase `gptq`), the rivals by plain rounding as their tools price them. Maps that coincide (on HQQ, optimal
per_token's is taylor's) are measured once. --write-docs stores the rows as
docs/results/rival-allocators[-gptq][-full-wikitext2].json and rewrites the docs tables that read them
(docs/allocators.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator_frontier import measure  # noqa: E402

from tasks.allocation.optimal import predicted_loss_increase  # noqa: E402
from tasks.evaluation.stats import NOISE_Z, paired_difference  # noqa: E402
from tasks.ladder import parse_rung  # noqa: E402
import _pipeline  # noqa: E402
import _rows  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.allocation.methods import METHODS  # noqa: E402
from tasks.allocation.plan import VariantSpec, allocate_variants, backend_options, rung_errors  # noqa: E402
from tasks.orchestration.steps import Prepared  # noqa: E402
from tasks.quantize.registry import own_error_names  # noqa: E402

EXACT = ("optimal", "taylor", "delta_loss", "dkld_greedy", "mxq")
RUNGS = "b3g128,b3g64,b3g32,b4g128,b4g64"
PAIRED = ("kld/wikitext2", "nll/wikitext2")  # the per-token values the verdicts pair (kept with each stored row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--backend", default="hqq", choices=["hqq", "gptq"])
    ap.add_argument("--budgets", default=RUNGS, help="ladder rungs: every exact allocator gets each one's bpp")
    ap.add_argument("--methods", default="optimal,taylor,delta_loss,dkld_greedy,mxq,sensiboost")
    ap.add_argument("--optimal", default="per_token,fisher",
                    help="optimal's flavors, each an objective, '+refine' for the refinement (per_token+refine); the first is judged by the targets")
    ap.add_argument("--refine", default="{}", help="the +refine flavors' settings (JSON, method_options.optimal.refine)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--full-wikitext2", action="store_true", help="also the whole WikiText-2 test (GPTQ protocol; slow on CPU)")
    ap.add_argument("--fresh-rows", action="store_true", help="measure every row again, ignoring the rows stored in benchmarks/rows/")
    ap.add_argument("--write-docs", action="store_true", help="store the rows (docs/results/) and rewrite the docs tables that read them")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tasks.allocation import read_scores
    from tasks.allocation.stage import AllocationParams, refiner
    from tasks.model_io import linear_param_counts, read_config
    from tasks.orchestration import steps
    from tasks.profiling.stage import Profile

    methods = args.methods.split(",")
    flavors = [Flavor.parse(f, json.loads(args.refine)) for f in args.optimal.split(",")] if "optimal" in methods else []
    rungs = [parse_rung(b) for b in args.budgets.split(",")]
    # The profile measures what the methods asked for need: the rivals' gradient scores (the per-token
    # objective reads them too), ExLlamaV3's dKLD.
    needs = [m for m in methods if m in ("taylor", "delta_loss", "dkld_greedy")] + ["optimal"]
    config = {"model": args.model, "backends": [args.backend], "uniform_budgets": [], "methods": needs, "budgets": ["3.2"],
              "method_options": {"optimal": {"objective": "per_token"}} if any(f.objective == "per_token" for f in flavors) else {},
              "eval_tokens": args.eval_tokens, "protocols": ["paper"], "calibration_samples": args.samples, "lm_eval_tasks": []}  # fmt: skip
    started = time.time()
    ctx = StageContext.from_env()
    prepared = steps.prepare(ctx, config)
    profiled = steps.profile(ctx, prepared)
    prep, scores = Prepared.from_json(prepared), Profile.from_json(profiled).scores
    profile = json.loads((Path(scores).parent / "profiling.json").read_text())
    table = read_scores(scores)
    params = linear_param_counts(read_config(prep.model.local(ctx.settings.cache_dir)))
    profiled_errors = tuple(e for e in own_error_names() if table.has(f"out_err_{e}"))
    refine = refiner(ctx, AllocationParams.settings_of(prep.params, model=prep.model, profile=Profile.from_json(profiled),
                                                       calibration=prep.calibration), table)  # fmt: skip

    def spec(method: str, budget, options: dict | None = None) -> VariantSpec:  # what the pipeline builds for this backend (ties, pricing)
        options = options or {}
        return VariantSpec.of(method, budget, {**options, **backend_options(method, options, args.backend, None, profiled_errors)})

    plan: list[tuple[str, object, float]] = []  # (row name, planned variant, allocation seconds)
    for rung in rungs:
        plan.append((f"uniform {rung.label}", *_allocate(spec("uniform", rung), table, params)))
        for method in (m for m in methods if m in EXACT and m != "optimal"):
            plan.append((f"{method} {rung.label}", *_allocate(spec(method, float(rung.bpp)), table, params)))
        for flavor in flavors:
            plan.append((f"{flavor.name} {rung.label}", *_allocate(spec("optimal", float(rung.bpp), flavor.options), table, params, refine)))
        if "sensiboost" in methods and rung.bits == 3:
            sb, seconds = _allocate(spec("sensiboost", rung), table, params)
            plan.append((f"SB30 {rung.label}", sb, seconds))
            for flavor in flavors:
                plan.append((f"{flavor.name} @SB30 {rung.label}", *_allocate(spec("optimal", sb.bitmap.nominal_bpp, flavor.options), table, params, refine)))

    out = Path(prep.calibration.uri).parent.parent / "benchmark-bitmaps"
    out.mkdir(exist_ok=True)
    base = _pipeline.baseline(ctx, prep)
    def kept(bitmap, name: str) -> dict:  # a row measured here or stored by an earlier run (benchmarks/_rows.py)
        def measured() -> tuple[dict, str]:
            variant = base
            if bitmap is not None:
                path = out / f"rival-{args.backend}-{name.replace(' ', '_').replace('@', 'at-').replace('[', '-').replace(']', '').replace('+', '-')}.json"
                bitmap.save(path)
                variant = _pipeline.variant(base, args.backend, path, bitmap)
            metrics = measure(ctx, variant, args.full_wikitext2)
            return metrics, metrics["evaluation_dir"]

        who = _rows.identity(prep.model, args.backend, bitmap, eval_tokens=args.eval_tokens, samples=args.samples, full_wikitext2=args.full_wikitext2)
        return _rows.kept("rival-allocators", who, measured, PAIRED, args.fresh_rows)

    rows = [("unquantized", None, None, None, kept(None, "unquantized"))]
    measured: dict[tuple, dict] = {}  # one measurement per distinct map (on HQQ, optimal per_token's map is taylor's)
    errors = rung_errors(args.backend, profiled_errors)
    for name, p, seconds in plan:
        same = (tuple(sorted((k, r.name) for k, r in p.bitmap.modules.items())),)
        if same not in measured:
            measured[same] = kept(p.bitmap, name)
        metrics = {**measured[same], **_costs(p.bitmap, seconds)}
        predicted = {o: predicted_loss_increase(table, p.bitmap, errors, o) for o in ("fisher", "per_token")}
        rows.append((name, p.bitmap.nominal_bpp, predicted, seconds, metrics))
        logging.info("%s: bpp %.4f wiki2 %.3f kld %.4f", name, p.bitmap.nominal_bpp, metrics["ppl_wikitext2"], metrics.get("kld_wikitext2", 0))

    phases = profile.get("phase_seconds", {})
    print(f"\nSmolLM2 + {args.backend}, paper protocol, first {args.eval_tokens} tokens of each set ({time.time() - started:.0f} s)")
    print(f"profile: {profile['seconds']:.0f} s in all; of it the backward pass {phases.get('backward', 0):.0f} s (optimal, taylor, "
          f"delta_loss), the per-token and rivals' scores {phases.get('rivals', 0):.0f} s (optimal per_token, taylor, delta_loss), "
          f"ExLlamaV3's dKLD {phases.get('dkld', 0):.0f} s, GPTQ's rung errors {phases.get('gptq', 0):.0f} s (optimal on gptq)\n")  # fmt: skip
    full = " | full wiki2 (gptq)" if args.full_wikitext2 else ""
    print(f"| variant | bpp | wiki2 ppl ± se | c4 ppl ± se | wiki2 KLD ± se | c4 KLD ± se | top-1 | dNLL | pred fisher | pred per-token | solve s | refine s{full} |")
    print("|" + "---|" * (13 if full else 12))
    for name, bpp, pred, seconds, m in rows:
        pred = pred or {}
        cells = [name, "-" if bpp is None else f"{bpp:.4f}", f"{m['ppl_wikitext2']:.3f} ±{m['ppl_wikitext2_se']:.3f}",
                 f"{m['ppl_c4']:.3f} ±{m['ppl_c4_se']:.3f}", f"{m.get('kld_wikitext2', 0):.4f} ±{m.get('kld_wikitext2_se', 0):.4f}",
                 f"{m.get('kld_c4', 0):.4f} ±{m.get('kld_c4_se', 0):.4f}", f"{m.get('top1_wikitext2', 1):.3f}",
                 f"{m.get('dnll_wikitext2', 0):.4f}", *(_num(pred.get(o)) for o in ("fisher", "per_token")),
                 "-" if seconds is None else f"{seconds:.2f}", _num(m.get("refine_s"), "{:.0f}")]  # fmt: skip
        if full:
            cells.append(f"{m['full_ppl_wikitext2_gptq']:.3f}")
        print("| " + " | ".join(cells) + " |")
    by_name = {name: m for name, *_, m in rows}
    for flavor in flavors:
        print(f"\nverdicts of {flavor.name} (KLD on WikiText-2; 'better' = lower by more than {NOISE_Z:g} standard errors of the paired per-token difference):")
        for rung in rungs:
            for rival, (mine, theirs) in rival_pairs(by_name, rung, flavor.name).items():
                print(f"  {rung.label}: {flavor.name} vs {rival:<16} {_verdict(mine, theirs)}")
    print(f"\nissue 32's targets ({args.backend}):")
    for line in target_verdicts(by_name, rungs, [f.name for f in flavors], rows):
        print("  " + line)
    if args.write_docs:
        from allocator_frontier import docs_name, docs_row

        from tasks.reports.docs_tables import write_benchmark_docs

        stored = [docs_row(name, bpp, (pred or {}).get("fisher"), m, solve_s=seconds, pred_dnll_per_token=(pred or {}).get("per_token"))
                  for name, bpp, pred, seconds, m in rows]  # fmt: skip
        write_benchmark_docs(docs_name("rival-allocators", args.backend, args.full_wikitext2), stored, __file__)
    return 0


@dataclass(frozen=True)
class Flavor:
    """One of optimal's settings compared: its objective, refined or not ('optimal' alone: the pipeline's default)."""

    objective: str
    refine: dict | None = None

    @classmethod
    def parse(cls, text: str, refine: dict) -> "Flavor":
        objective, _, extra = text.partition("+")
        if extra not in ("", "refine"):
            raise SystemExit(f"--optimal: {text!r} is not an objective with an optional '+refine'")
        return cls(objective, (refine or True) if extra else None)

    @property
    def name(self) -> str:
        default = self.objective == METHODS["optimal"].default("objective") and not self.refine
        return "optimal" if default else f"optimal[{self.objective}{'+refine' if self.refine else ''}]"

    @property
    def options(self) -> dict:
        return {"objective": self.objective, **({"refine": self.refine} if self.refine else {})}


def _costs(bitmap, seconds) -> dict:
    """The allocation's own cost: the solve, and the refinement's search where there was one."""
    search = bitmap.options.get("refine") or {}
    return {"solve_s": seconds, **({"refine_s": search["search_seconds"], "refine_accepted": search["accepted"],
                                     "holdout_kld_start": search["holdout_kld_start"], "holdout_kld": search["holdout_kld"]} if search else {})}  # fmt: skip


def _num(value, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _compare(ours: dict, theirs: dict, metric: str = "kld_wikitext2") -> int:
    """-1 better, 0 within noise, +1 worse: `ours` against `theirs` on `metric`, by the pipeline's rule
    (a difference is noise below NOISE_Z standard errors of the paired per-token differences, when both
    rows have their per-token values; else of the two standard errors combined)."""
    a, b, noise = ours.get(metric, 0.0), theirs.get(metric, 0.0), NOISE_Z * _noise(ours, theirs, metric)
    return -1 if a < b - noise else 1 if a > b + noise else 0


def _noise(ours: dict, theirs: dict, metric: str = "kld_wikitext2") -> float:
    """The standard error of the difference of `metric` (perplexity: of the mean NLL, scaled to ours)."""
    kind, _, dataset = metric.partition("_")
    key = f"{'nll' if kind == 'ppl' else kind}/{dataset}"
    pair = [row.get("tokens", {}).get(key) for row in (ours, theirs)]
    if all(p is not None and p.shape == pair[0].shape for p in pair):
        se = paired_difference(*pair)[1]
        return se * ours[metric] if kind == "ppl" else se  # delta method: se(ppl) = ppl * se(mean NLL)
    return (ours.get(metric + "_se", 0.0) ** 2 + theirs.get(metric + "_se", 0.0) ** 2) ** 0.5


def rival_pairs(by_name: dict[str, dict], rung, ours: str = "optimal") -> dict[str, tuple[dict, dict]]:
    """At one budget: rival row name -> (the row of `ours` (an optimal flavor) it is judged against, the
    rival's row), for the measured rivals: uniform and the other exact allocators against `ours` at the
    rung's memory, SB30 against `ours` at SB30's. Empty when `ours` was not measured there."""
    mine = by_name.get(f"{ours} {rung.label}")
    if mine is None:
        return {}
    pairs = {f"{m} {rung.label}": (mine, by_name[f"{m} {rung.label}"]) for m in ("uniform", *EXACT)
             if m != "optimal" and f"{m} {rung.label}" in by_name}  # fmt: skip
    if f"SB30 {rung.label}" in by_name and f"{ours} @SB30 {rung.label}" in by_name:
        pairs[f"SB30 {rung.label}"] = (by_name[f"{ours} @SB30 {rung.label}"], by_name[f"SB30 {rung.label}"])
    return pairs


def target_verdicts(by_name: dict[str, dict], rungs, flavors: list[str], rows) -> list[str]:
    """Issue 32's targets on the measured rows (KLD on WikiText-2), for each optimal flavor: no rival lower
    outside the noise at any budget; strictly better than every rival at >= 3 of 5 budgets; the embedded
    run's row (at SB30's memory at b3g64) no worse than today's (optimal with the fisher objective there).
    Then the estimate's ranking: Spearman of predicted against measured dNLL over every quantized row, for
    each objective's estimate. A target whose rows were not measured says so."""
    from scipy.stats import spearmanr

    lines = []
    for ours in flavors:
        strict, worse, budgets = 0, [], 0
        for rung in rungs:
            pairs = rival_pairs(by_name, rung, ours)
            if not pairs:
                continue
            budgets += 1
            verdicts = {name: _compare(mine, theirs) for name, (mine, theirs) in pairs.items()}
            strict += all(v < 0 for v in verdicts.values())
            worse += [name for name, v in verdicts.items() if v > 0]
        if not budgets:
            lines.append(f"n/a  {ours}: not measured")
            continue
        lines.append(f"{'MET ' if not worse else 'MISS'} {ours} no worse than every rival: " + ("at every budget" if not worse else f"worse than {', '.join(worse)}"))
        state = "MET " if strict >= 3 else "MISS" if strict + 5 - budgets < 3 else "n/a "  # n/a: unmeasured budgets could still make it
        lines.append(f"{state} {ours} better than every rival outside the noise at {strict} of {budgets} budget(s) measured (target >= 3 of 5)")
        now, before = by_name.get(f"{ours} @SB30 3.25"), by_name.get("optimal[fisher] @SB30 3.25") or by_name.get("optimal @SB30 3.25")
        if now and before and now is not before:
            verdict = _compare(now, before)
            lines.append(f"{'MET ' if verdict <= 0 else 'MISS'} {ours} at the embedded run's memory (b3g64 SB30's) no worse than the fisher objective's: "
                         f"KLD {now.get('kld_wikitext2', 0):.4f} vs {before.get('kld_wikitext2', 0):.4f}")  # fmt: skip
    quantized = [(pred, m["dnll_wikitext2"]) for name, bpp, pred, _, m in rows if bpp is not None and "dnll_wikitext2" in m]
    for objective in ("fisher", "per_token"):
        pairs = [(p[objective], d) for p, d in quantized if p and p.get(objective) is not None]
        if len(pairs) >= 3:
            rho = spearmanr(*zip(*pairs)).statistic
            lines.append(f"{'MET ' if rho >= 0.95 else 'MISS'} predicted ({objective} estimate) vs measured dNLL: Spearman {rho:.3f} over {len(pairs)} variants (target >= 0.95)")
    return lines


def _allocate(spec, table, params, refine=None):
    started = time.perf_counter()
    (planned,) = allocate_variants([spec], table, params, match_boost_memory=False, refiner=refine)
    return planned, time.perf_counter() - started


def _verdict(ours: dict, theirs: dict) -> str:
    word = {-1: "better", 0: "within noise", 1: "worse"}[_compare(ours, theirs)]
    a, b = ours.get("kld_wikitext2", 0.0), theirs.get("kld_wikitext2", 0.0)
    return f"{word:<13} KLD {a:.4f} vs {b:.4f} (se of the difference {_noise(ours, theirs):.4f}); ppl {ours['ppl_wikitext2']:.3f} vs {theirs['ppl_wikitext2']:.3f}"


if __name__ == "__main__":
    sys.exit(main())
