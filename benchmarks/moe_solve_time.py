"""How long `optimal`'s exact MILP takes at the scale of a large mixture-of-experts model.

A synthetic scores table shaped like Qwen3-30B-A3B (48 layers, 4 attention linears and 128 experts x 3
projections per layer: 18,624 modules, 12 rungs each) with Fisher-like costs: each module's loss increase
halves-to-quarters per extra bit (c * 4^-bits, a little worse for larger groups) with a log-normal scale per
module, since per-expert scores spread over orders of magnitude. Prints, per budget, the solve time, the
solver's status and the budget reached, free and with tie_experts (every layer's experts on one rung).

    python benchmarks/moe_solve_time.py [--layers 48] [--experts 128] [--budgets 3.25,3.51,4.13] [--write-docs]

--write-docs stores the rows as docs/results/moe-solve-time.json and rewrites the table in docs/architectures.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from tasks.allocation.optimal import build_program
from tasks.allocation.scores import scores_from_frame
from tasks.ladder import LADDER, META_BITS, META_GROUP


def synthetic_table(layers: int, experts: int, hidden: int, moe_inter: int, q_width: int, kv_width: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shapes = {"self_attn.q_proj": q_width * hidden, "self_attn.k_proj": kv_width * hidden, "self_attn.v_proj": kv_width * hidden,
              "self_attn.o_proj": hidden * q_width}  # fmt: skip
    shapes.update({f"mlp.experts.{e}.{p}": hidden * moe_inter for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")})
    rows = []
    for layer in range(layers):
        scale = rng.lognormal(mean=-12, sigma=1.5, size=len(shapes))
        for (module, params), c in zip(shapes.items(), scale):
            for rung in LADDER:
                cost = c * 4.0 ** -rung.bits * (1 + 0.1 * np.log2(rung.group_size / 32))
                rows.append((layer, module, rung.bits, rung.group_size, META_BITS, META_GROUP, params, cost))
    return pd.DataFrame(rows, columns=["layer", "module", "nbit1", "gsize1", "nbit2", "gsize2", "params", "fisher_dloss"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--budgets", default="3.25,3.51,4.13")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="store the rows and rewrite the docs table (docs/architectures.md)")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]

    started = time.perf_counter()
    frame = synthetic_table(args.layers, args.experts, hidden=2048, moe_inter=768, q_width=4096, kv_width=512, seed=args.seed)
    scores = scores_from_frame(frame, source="synthetic Qwen3-30B-A3B shape")
    print(f"table: {len(scores.keys):,} modules x {len(scores.rungs)} rungs ({time.perf_counter() - started:.1f} s to build and read)")
    print(f"{'ties':<12} {'budget':>7} {'reached':>9} {'set-up s':>9} {'solve s':>8} {'core':>7} {'gap to LP bound':>16}  status")
    rows = []
    for ties in ({}, {"tie_experts": True}):
        t0 = time.perf_counter()
        program, facts = build_program(scores, "fisher", **ties)
        setup = time.perf_counter() - t0
        for budget in budgets:
            t1 = time.perf_counter()
            bitmap = program.allocate(budget, options=facts)
            solve = time.perf_counter() - t1
            solver = bitmap.options["solver"]
            print(f"{'tie_experts' if ties else 'free':<12} {budget:>7.2f} {bitmap.nominal_bpp:>9.4f} {setup:>9.1f} {solve:>8.1f} "
                  f"{solver.get('core', 0):>7} {solver.get('lp_gap', 0.0):>16.2e}  {solver.get('status', '')}")
            assert bitmap.nominal_bpp <= budget + 1e-12
            rows.append({"ties": "tie_experts" if ties else "free", "budget": budget, "reached": bitmap.nominal_bpp, "setup_s": setup,
                         "solve_s": solve, "core": solver.get("core", 0), "lp_gap": solver.get("lp_gap"), "status": solver.get("status", "")})  # fmt: skip
    if args.write_docs:
        from tasks.reports.docs_tables import write_benchmark_docs

        write_benchmark_docs("moe-solve-time", rows, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
