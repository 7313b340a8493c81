"""Closed-loop `optimal` (issue 18): does correcting the Fisher estimate by measured KL divergence buy quality?

The open-loop `optimal` prices each module alone (tasks/allocation/optimal.py). Here, for each budget:
solve; quantize the whole model at that bit map (HQQ, in memory); measure on a few calibration windows
the model's KLD against the unquantized model, and each layer group's share of it in context (the KLD
drop when that group alone is restored to full precision, the rest quantized); scale the estimate of
every rung of the group's modules by measured share / estimated share (the geometric mean over the
iterations, clipped to [1/8, 8], raised to --damping); re-solve at the same budget; stop when the calibration KLD stops
falling, and keep the best. Then both bit maps are quantized and evaluated by the pipeline (16k tokens of
WikiText-2 and C4 by default): perplexity and KLD with standard errors.

    python benchmarks/closed_loop.py [--budgets 3.25,3.51] [--windows 4] [--iterations 4] [--eval-tokens 16384]

Stage outputs are cached under $QUANT_HOME/artifacts, as in allocator_frontier.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.allocation.optimal import objective_costs  # noqa: E402
from tasks.allocation.program import RungProgram  # noqa: E402
from tasks.ladder import split_key  # noqa: E402
import _pipeline  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.profiling.dkld import assign_weights, forward_with_layer_inputs, group_of, layer_weights, output_kld, run_from  # noqa: E402

log = logging.getLogger("closed_loop")
CLIP = 8.0


class QuantizedModel:
    """The unquantized model with any bit map's weights swapped in; measures the output KLD against the
    unquantized model and each layer group's share of it (restore the group, re-run from its layer)."""

    def __init__(self, model_path: str, ids: torch.Tensor):
        import torch.nn.functional as F

        from tasks.experts import unstack_experts
        from tasks.families import layout_for
        from tasks.model_io import load_model

        self.model = load_model(model_path)
        unstack_experts(self.model)
        self.layout = layout_for(self.model.config)
        self.layers = self.model.model.layers
        self.ids = ids
        with torch.inference_mode():
            logits = self.model(ids, use_cache=False).logits.float()
        self.ref = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        self.originals = {(i, m): w.clone() for i, layer in enumerate(self.layers) for m, w in layer_weights(layer, self.layout).items()}
        self._quantized: dict = {}  # (layer, module, rung) -> dequantized weight

    def _weight(self, layer: int, module: str, rung):
        from tasks.profiling import hqq_fast

        key = (layer, module, rung)
        if key not in self._quantized:
            self._quantized[key] = hqq_fast.quant_dequant(self.originals[(layer, module)], rung)
        return self._quantized[key]

    @torch.inference_mode()
    def measure(self, modules: dict) -> tuple[float, dict]:
        """(KLD of the whole quantized model, {(layer, group): KLD drop when that group is restored})."""
        per_layer: dict[int, dict] = {}
        for key, rung in modules.items():
            layer, module = split_key(key)
            per_layer.setdefault(layer, {})[module] = rung
        for i, rungs in per_layer.items():
            assign_weights(self.layers[i], self.layout, {m: self._weight(i, m, r) for m, r in rungs.items()})
        logits, entry = forward_with_layer_inputs(self.model, self.ids)
        total = output_kld(logits, self.ref)
        del logits
        shares = {}
        for i, rungs in per_layer.items():
            for group in ("attn", "mlp"):
                members = [m for m in rungs if group_of(m) == group]
                assign_weights(self.layers[i], self.layout, {m: self.originals[(i, m)] for m in members})
                shares[(i, group)] = total - output_kld(run_from(self.model, i, entry), self.ref)
                assign_weights(self.layers[i], self.layout, {m: self._weight(i, m, rungs[m]) for m in members})
        return total, shares


def closed_loop(table, costs, rungs, budget: float, qm: QuantizedModel, iterations: int, damping: float):
    """The open-loop bit map, the best closed-loop one, and the trace [(iteration, calibration KLD, estimate)]."""
    keys = table.keys
    group_index: dict[tuple[int, str], list[int]] = {}
    for j, key in enumerate(keys):
        layer, module = split_key(key)
        group_index.setdefault((layer, group_of(module)), []).append(j)
    log_ratios: dict = {g: [] for g in group_index}
    corrected = costs.copy()
    position = {r: c for c, r in enumerate(rungs)}
    open_loop = best = None
    best_kld = math.inf
    trace = []
    for it in range(iterations + 1):
        bitmap = RungProgram(table, corrected, rungs, "optimal", time_limit=60.0).allocate(budget)
        chosen = np.array([costs[j, position[bitmap.modules[k]]] for j, k in enumerate(keys)])
        started = time.perf_counter()
        kld, shares = qm.measure(bitmap.modules)
        trace.append((it, kld, float(chosen.sum()), bitmap.nominal_bpp))
        log.info("budget %.4f iteration %d: calibration KLD %.4f (Fisher estimate %.4f), %.4f bpp, measured in %.0f s",
                 budget, it, kld, chosen.sum(), bitmap.nominal_bpp, time.perf_counter() - started)  # fmt: skip
        if open_loop is None:
            open_loop = bitmap
        if kld < best_kld - 1e-6:
            best, best_kld = bitmap, kld
        elif it > 0:
            break  # the measured KLD stopped falling
        for g, members in group_index.items():
            estimate = float(chosen[members].sum())
            if estimate > 0:
                log_ratios[g].append(math.log(min(CLIP, max(1 / CLIP, shares[g] / estimate))))
            if log_ratios[g]:
                corrected[members] = costs[members] * math.exp(damping * float(np.mean(log_ratios[g])))
        ratios = np.array([math.exp(v[-1]) for v in log_ratios.values() if v])
        log.info("measured / estimated share per group: median %.3f, 10%% %.3f, 90%% %.3f; shares sum %.4f of %.4f",
                 np.median(ratios), np.quantile(ratios, 0.1), np.quantile(ratios, 0.9), sum(shares.values()), kld)  # fmt: skip
    return open_loop, best, trace


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--budgets", default="3.25,3.51")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows the loop measures KLD on")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--damping", type=float, default=0.5, help="exponent on the measured/estimated ratio (1: full correction)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tasks.allocation import read_scores
    from tasks.calibration import load_ids

    config = {"model": args.model, "uniform_budgets": [], "methods": ["optimal"], "budgets": ["b3g64"], "eval_tokens": args.eval_tokens,
              "protocols": ["paper"], "calibration_samples": args.samples, "lm_eval_tasks": [], "backends": ["hqq"]}  # fmt: skip
    ctx = StageContext.from_env()
    prep, scores = _pipeline.prepare(ctx, config)
    table = read_scores(scores)
    rungs = table.rungs
    costs, _ = objective_costs(table, "fisher", rungs)
    ids = load_ids(prep.calibration.windows())[-args.windows :]  # the windows profiled last
    qm = QuantizedModel(prep.model.local(ctx.settings.cache_dir), ids)
    base = _pipeline.baseline(ctx, prep)
    out = Path(prep.calibration.uri).parent.parent / "benchmark-bitmaps" / "closed-loop"
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        started = time.perf_counter()
        open_loop, closed, trace = closed_loop(table, costs, rungs, budget, qm, args.iterations, args.damping)
        loop_s = time.perf_counter() - started
        for name, bitmap in (("optimal", open_loop), ("optimal closed-loop", closed)):
            path = out / f"{name.replace(' ', '_')}-{budget:g}.json"
            bitmap.save(path)
            metrics = _pipeline.evaluate(ctx, _pipeline.variant(base, "hqq", path, bitmap)).metrics
            rows.append((budget, name, bitmap.nominal_bpp, metrics, trace if "closed" in name else None, loop_s))

    print(f"\nSmolLM2 + HQQ, closed loop on {args.windows} calibration windows, first {args.eval_tokens} tokens of each set\n")
    print("| budget | variant | bpp | wiki2 ppl ± se | c4 ppl ± se | wiki2 KLD ± se | c4 KLD ± se | loop |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for budget, name, bpp, m, trace, loop_s in rows:
        cells = [f"{budget:g}", name, f"{bpp:.4f}"] + [f"{m[k]:.3f} ±{m[k + '_se']:.3f}" for k in ("ppl_wikitext2", "ppl_c4")]
        cells += [f"{m[k]:.4f} ±{m[k + '_se']:.4f}" for k in ("kld_wikitext2", "kld_c4")]
        cells.append("" if trace is None else f"{len(trace)} solves, {loop_s:.0f} s; calibration KLD " + " -> ".join(f"{t[1]:.4f}" for t in trace))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
