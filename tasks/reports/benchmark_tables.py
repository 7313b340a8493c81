"""The benchmarks' tables in docs/: each written from a stored result, docs/results/<name>.json, never by hand.

A stored result is what one benchmark run measured:

    {"command": "python benchmarks/moe_solve_time.py",   the exact command line that measured it
     "commit": "<40 hex digits>",                         the commit it ran at
     "machine": "2 cores",                                where it ran
     "date": "2026-12-04",
     "rows": [{...}, ...]}                                the benchmark's rows, with the benchmark's own keys

(and optionally "dirty": true when the working tree had uncommitted changes, "notes": provenance in words).
A benchmark run with `--write-docs` stores its result (tasks.reports.docs_tables.write_benchmark_docs) and
rewrites the blocks that read it; `python -m tasks docs` rewrites every block. BLOCKS says which block,
in which file, reads which stored results and what renders it: a table and, under it, one `Measured by:`
line naming each result's command, commit and machine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from tasks.settings import REPO_ROOT

RESULTS = REPO_ROOT / "docs" / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _row_map(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["rows"]}


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _measured_by(sources: list[tuple[dict, str | None]]) -> str:
    """`Measured by: `cmd` at abc1234, machine.`; several results: each with what it measured, in brackets."""
    parts = []
    for result, what in sources:
        dirty = " with uncommitted changes" if result.get("dirty") else ""
        parts.append(f"`{result['command']}` at {result['commit'][:7]}{dirty}, {result['machine']}" + (f" ({what})" if what else ""))
    return "Measured by: " + "; ".join(parts) + "."


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- docs/allocators.md ---------------------------------------------------------------------------------

PROFILE_CALIBRATIONS = {"32 x 512": "the pipeline's default", "128 x 512": "the authors'"}


def profile_overhead(*results: dict) -> str:
    """benchmarks/profile_overhead.py: one row per run (its calibration size)."""
    head = ["calibration", "forward", "profiling", "time ratio", "without the Fisher pass", "peak / fp32 model"]
    lines = [_line(head), "|---|---:|---:|---:|---:|---:|"]
    sources = []
    for result in results:
        for r in result["rows"]:
            note = PROFILE_CALIBRATIONS.get(r["tokens"])
            lines.append(_line([r["tokens"] + (f" ({note})" if note else ""), f"{r['forward_s']:.1f} s", f"{r['profiling_s']:.1f} s",
                                f"{r['time_ratio']:.2f}", f"{r['time_ratio_without_fisher']:.2f}", f"{r['memory_ratio']:.2f}"]))  # fmt: skip
        sources.append((result, ", ".join(r["tokens"] for r in result["rows"]) if len(results) > 1 else None))
    return "\n".join(lines) + "\n\n" + _measured_by(sources)


def _rungs(rows: dict[str, dict]) -> list[str]:
    """The rung labels ('3.13', ...) of the rows named '<method> [@<memory>] <rung>', cheapest first."""
    return sorted({name.rsplit(" ", 1)[-1] for name in rows if re.fullmatch(r"\d+\.\d\d", name.rsplit(" ", 1)[-1])}, key=float)


def _bold_lower(a: float, b: float, digits: int) -> tuple[str, str]:
    """Both values formatted, the lower one in bold."""
    fa, fb = f"{a:.{digits}f}", f"{b:.{digits}f}"
    return (f"**{fa}**", fb) if a < b else (fa, f"**{fb}**") if b < a else (fa, fb)


def allocator_frontier(result: dict) -> str:
    """benchmarks/allocator_frontier.py (HQQ): each method next to `optimal` at exactly its memory."""
    rows = _row_map(result)
    lines = [_line(["base rung", "method at that memory", "bpp", "wiki2 ppl", "c4 ppl", "`optimal`, same bpp: wiki2", "c4"]),
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for rung in _rungs(rows):
        for method in ("uniform", "KB21", "SB30"):
            theirs, ours = rows.get(f"{method} {rung}"), rows.get(f"optimal @{method} {rung}")
            if theirs is None or ours is None:
                continue
            label = method
            others = [(short, rows.get(f"{key} @SB30 {rung}")) for short, key in (("LIM", "lim"), ("ZD", "zd"), ("MXQ", "mxq"))]
            if method == "SB30" and any(r for _, r in others):
                label += " (" + ", ".join(f"{short} {r['ppl_wikitext2']:.1f}" for short, r in others if r) + ")"
            wiki = _bold_lower(theirs["ppl_wikitext2"], ours["ppl_wikitext2"], 1)
            c4 = _bold_lower(theirs["ppl_c4"], ours["ppl_c4"], 1)
            lines.append(_line([rung, label, f"{theirs['bpp']:.3f}", wiki[0], c4[0], wiki[1], c4[1]]))
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


RIVAL_COLUMNS = [("uniform", "uniform"), ("optimal", "`optimal`"), ("taylor", "`taylor` (ModelOpt)"),
                 ("delta_loss", "`delta_loss` (AutoScheme)"), ("dkld_greedy", "`dkld_greedy` (ExLlamaV3)"), ("mxq", "`mxq`")]  # fmt: skip
RIVAL_SE = ("optimal", "taylor")  # the leaders (and every flavor of `optimal`): their KLD's standard error is shown


def _rival_columns(rows: dict[str, dict]) -> list[tuple[str, str]]:
    """RIVAL_COLUMNS with every flavor of `optimal` the rows hold ('optimal[per_token+refine] 3.25') after it."""
    flavors = sorted({m.group(1) for name in rows if (m := re.fullmatch(r"(optimal\[[^\]]+\]) \d+\.\d\d", name))})
    columns = []
    for method, title in RIVAL_COLUMNS:
        columns.append((method, title))
        if method == "optimal":
            columns += [(f, f"`{f}`") for f in flavors]
    return columns


def rival_allocators(result: dict) -> str:
    """benchmarks/rival_allocators.py (HQQ): WikiText-2 perplexity / KLD of every allocator at each rung's
    memory (each flavor of `optimal` measured a column of its own), and SB30 beside `optimal` at SB30's. In
    bold: the lowest KLD at the rung's memory where it is below the next by more than their combined
    standard error, and the best of SB30 and the `optimal` flavors at its memory."""
    rows = _row_map(result)
    columns = _rival_columns(rows)
    ours = [m for m, _ in columns if m.startswith("optimal")]
    head = ["bpp", *(title for _, title in columns), f"SB30 / {' / '.join(f'`{m}`' for m in ours)} at its memory"]
    lines = [_line(head), "|---|" + "---:|" * (len(head) - 1)]

    def cell(r: dict, rung: str) -> str:
        digits = 0 if r["ppl_wikitext2"] >= 1000 else 2 if float(rung) >= 4 else 1
        return f"{r['ppl_wikitext2']:.{digits}f} / {r['kld_wikitext2']:.3f}"

    for rung in _rungs(rows):
        present = [(m, rows[f"{m} {rung}"]) for m, _ in columns if f"{m} {rung}" in rows]
        exact = sorted(((m, r) for m, r in present if m != "uniform"), key=lambda mr: mr[1]["kld_wikitext2"])
        best = None
        if len(exact) >= 2:
            (m1, r1), (_, r2) = exact[0], exact[1]
            combined = math.hypot(r1.get("kld_wikitext2_se") or 0.0, r2.get("kld_wikitext2_se") or 0.0)
            best = m1 if r2["kld_wikitext2"] - r1["kld_wikitext2"] > combined else None
        cells = [rung]
        for method, _ in columns:
            r = rows.get(f"{method} {rung}")
            if r is None:
                cells.append("")
                continue
            text = f"**{cell(r, rung)}**" if method == best else cell(r, rung)
            se = r.get("kld_wikitext2_se")
            shown = method in RIVAL_SE or method.startswith("optimal")
            cells.append(text + (f" ±{_short(se)}" if shown and se is not None else ""))
        at_sb = [rows.get(f"SB30 {rung}"), *(rows.get(f"{m} @SB30 {rung}") for m in ours)]
        if at_sb[0] and any(at_sb[1:]):
            texts = [cell(r, rung) if r else "-" for r in at_sb]
            lowest = min((i for i, r in enumerate(at_sb) if r), key=lambda i: at_sb[i]["kld_wikitext2"])
            texts[lowest] = f"**{texts[lowest]}**"
            cells.append(" ; ".join(texts))
        else:
            cells.append("")
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


def _short(se: float) -> str:
    """A standard error as '.023' (3 decimals, no leading zero)."""
    text = f"{se:.3f}"
    return text[1:] if text.startswith("0.") else text


GPTQ_RUNG = "3.25"
# The rows of the GPTQ table, in order: (stored result, row name without the rung, label). At the rung's memory
# the rivals come from rival_allocators.py, the rest from allocator_frontier.py; at SB30's all from the frontier.
GPTQ_ROWS = {
    "rung": [("frontier", "uniform", "uniform {rung}"), ("frontier", "optimal[hqq] @uniform", "`optimal[hqq]`"),
             ("rivals", "taylor", "`taylor` (ModelOpt)"), ("rivals", "delta_loss", "`delta_loss` (AutoScheme)"),
             ("rivals", "mxq", "`mxq`"), ("rivals", "dkld_greedy", "`dkld_greedy` (ExLlamaV3)"),
             ("frontier", "optimal @uniform", "`optimal` (GPTQ errors)")],
    "SB30": [("frontier", "SB30", "SB30"), ("frontier", "mxq @SB30", "`mxq`"), ("frontier", "optimal[hqq] @SB30", "`optimal[hqq]`"),
             ("frontier", "taylor @SB30", "`taylor` (ModelOpt)"), ("frontier", "delta_loss @SB30", "`delta_loss` (AutoScheme)"),
             ("frontier", "optimal @SB30", "`optimal` (GPTQ errors)")],
}  # fmt: skip


def allocator_frontier_gptq(frontier: dict, rivals: dict) -> str:
    """benchmarks/allocator_frontier.py --backend gptq and rival_allocators.py --backend gptq at b3g64: every
    row quantized by GPTQ, at the rung's memory and at SB30's; in bold the lowest of each group's
    perplexities and KLD."""
    from tasks.ladder import parse_rung

    stored = {"frontier": _row_map(frontier), "rivals": _row_map(rivals)}
    lines = [_line(["variant (GPTQ)", "bpp", "WikiText-2 ppl", "C4 ppl", "WikiText-2 KLD", "top-1"]), "|---|---:|---:|---:|---:|---:|"]
    base = stored["frontier"].get("unquantized")
    if base:
        lines.append(_line(["unquantized", "-", f"{base['ppl_wikitext2']:.2f} ±{base['ppl_wikitext2_se']:.2f}",
                            f"{base['ppl_c4']:.2f} ±{base['ppl_c4_se']:.2f}", "0", "1"]))  # fmt: skip
    metrics = [("ppl_wikitext2", 2), ("ppl_c4", 2), ("kld_wikitext2", 3)]
    for group in GPTQ_ROWS.values():
        found = [(label, stored[src][f"{name} {GPTQ_RUNG}"]) for src, name, label in group if f"{name} {GPTQ_RUNG}" in stored[src]]
        lowest = {key: min(r[key] for _, r in found) for key, _ in metrics} if found else {}
        for label, r in found:
            cells = [label.format(rung=parse_rung(GPTQ_RUNG).name), f"{r['bpp']:.4f}"]
            for key, digits in metrics:
                value = f"{r[key]:.{digits}f}"
                cells.append((f"**{value}**" if r[key] == lowest[key] else value) + f" ±{r[key + '_se']:.{digits}f}")
            cells.append(f"{r['top1_wikitext2']:.3f}")
            lines.append(_line(cells))
    return "\n".join(lines) + "\n\n" + _measured_by([(frontier, "the other rows"), (rivals, "the rivals at the rung's memory")])


# --- docs/evaluation.md ---------------------------------------------------------------------------------

WHOLE_TEST_ROWS = [("uniform", "uniform"), ("SB30", "SB30 (its own memory)"), ("KB21", "KB21 (its own memory)"),
                   ("lim @SB30", "LIM at SB30's memory"), ("zd @SB30", "ZD at SB30's memory"), ("mxq @SB30", "MXQ at SB30's memory"),
                   ("optimal @uniform", "`optimal` at uniform's memory"), ("optimal @SB30", "`optimal` at SB30's memory"),
                   ("optimal @KB21", "`optimal` at KB21's memory")]  # fmt: skip


def allocator_frontier_full_wikitext2(result: dict) -> str:
    """benchmarks/allocator_frontier.py --full-wikitext2: the whole test's perplexity (GPTQ protocol) of
    each variant, by rung, with the variant's bpp."""
    rows = _row_map(result)
    rungs = _rungs(rows)
    lines = [_line(["variant (bpp at each rung)", *rungs]), "|---|" + "---:|" * len(rungs)]
    for key, label in WHOLE_TEST_ROWS:
        cells = [rows.get(f"{key} {rung}") for rung in rungs]
        if any(cells):
            lines.append(_line([label, *(f"{r['full_ppl_wikitext2_gptq']:.2f} ({r['bpp']:.2f})" if r else "" for r in cells)]))
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


KLD_K = 64  # the evaluation's cache: top 64 and 64 tail samples (tasks.evaluation.reference)


def kld_topk_error(result: dict) -> str:
    """benchmarks/kld_topk_error.py: the cached KLD (top 64 + 64 tail samples) and the top-64 merged one
    against the exact KLD over the whole vocabulary."""

    def pct(value: float) -> str:
        return f"{value:+.1f}%".replace("-", "\u2212")

    lines = [_line(["variant", "exact KLD", f"top-{KLD_K} merged", f"top-{KLD_K} + {KLD_K} tail samples (the cache)"]), "|---|---:|---:|---:|"]
    for r in result["rows"]:
        if r["k"] == KLD_K:
            lines.append(_line([r["variant"], f"{r['exact_kld']:.4f}", f"{r['merged_kld']:.4f} ({pct(r['merged_error_pct'])})",
                                f"{r['tail_kld']:.4f} ({pct(r['tail_error_pct'])})"]))  # fmt: skip
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


# --- docs/architectures.md ------------------------------------------------------------------------------

SOLVER_STATUS = {"optimal": "optimal (proven)", "time_limit": "time limit: best feasible kept"}


def moe_solve_time(result: dict) -> str:
    """benchmarks/moe_solve_time.py: one line per solve that reports its distance to the LP bound; the
    others of one tie setting and status share a line."""

    def gap(value: float) -> str:
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.2g}")

    lines = [_line(["ties", "budget", "solve", "status", "distance to the LP bound"]), "|---|---:|---:|---|---:|"]
    groups: list[list[dict]] = []
    for r in result["rows"]:
        last = groups[-1][-1] if groups else None
        if last and r.get("lp_gap") is None and last.get("lp_gap") is None and (last["ties"], last["status"]) == (r["ties"], r["status"]):
            groups[-1].append(r)
        else:
            groups.append([r])
    for group in groups:
        first = group[0]
        ties = "`tie_experts`" if first["ties"] == "tie_experts" else first["ties"]
        lines.append(_line([ties, " / ".join(f"{r['budget']:.2f}" for r in group), " / ".join(f"{r['solve_s']:.1f}" for r in group) + " s",
                            SOLVER_STATUS.get(first["status"], first["status"]), "-" if first.get("lp_gap") is None else gap(first["lp_gap"])]))  # fmt: skip
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


# --- docs/backends.md -----------------------------------------------------------------------------------

BACKEND_LABELS = {"bnb": "`bnb` (nf4; boosted modules int8)"}


def pipeline_backends(result: dict) -> str:
    """The four backends from one pipeline run: uniform b4g64 and KB21 at b4g64, per backend."""

    def seconds(s: float) -> str:
        return f"{s:.1f} s" if s < 2 else f"{s:.0f} s"

    uniform = {r["backend"]: r for r in result["rows"] if r["method"] == "uniform"}
    boosted = {r["backend"]: r for r in result["rows"] if r["method"] == "KB21"}
    bpps = sorted({f"{r['bpp']:.3f}" for r in boosted.values()})
    head = f"KB21 at b4g64 ({'/'.join(bpps)} bpp): quantize, wiki2 / c4 ppl"
    lines = [_line(["backend", "quantize b4g64", "wiki2 / c4 ppl", "saved MiB", head]), "|---|---:|---:|---:|---:|"]
    for backend, r in uniform.items():
        kb = boosted.get(backend)
        kb_cell = f"{seconds(kb['quant_s'])}, {kb['ppl_wikitext2']:.2f} / {kb['ppl_c4']:.2f}" if kb else ""
        lines.append(_line([BACKEND_LABELS.get(backend, f"`{backend}`"), seconds(r["quant_s"]),
                            f"{r['ppl_wikitext2']:.2f} / {r['ppl_c4']:.2f}", f"{r['saved_mib']:.1f}", kb_cell]))  # fmt: skip
    return "\n".join(lines) + "\n\n" + _measured_by([(result, None)])


def pipeline_backends_rows(results: list[dict]) -> list[dict]:
    """A pipeline run's results.json rows as the backends table's rows (uniform b4g64 and KB21 per backend)."""
    rows = []
    for r in results:
        if r.get("backend") in (None, "none") or r.get("label") not in ("uniform", "KB21"):
            continue
        rows.append({"backend": r["backend"], "method": r["label"], "bpp": r.get("nominal_bpp"), "quant_s": r.get("quant_seconds"),
                     "ppl_wikitext2": r.get("ppl_wikitext2"), "ppl_c4": r.get("ppl_c4"),
                     "saved_mib": (r.get("saved_bytes") or 0) / 2**20})  # fmt: skip
    return rows


# --- the registry ---------------------------------------------------------------------------------------

# block name -> (file, the stored results it reads, in the renderer's argument order, the renderer)
BLOCKS: dict[str, tuple[str, tuple[str, ...], Callable[..., str]]] = {
    "profile-overhead": ("docs/allocators.md", ("profile-overhead-32x512", "profile-overhead-128x512"), profile_overhead),
    "allocator-frontier": ("docs/allocators.md", ("allocator-frontier",), allocator_frontier),
    "rival-allocators": ("docs/allocators.md", ("rival-allocators",), rival_allocators),
    "allocator-frontier-gptq": ("docs/allocators.md", ("allocator-frontier-gptq", "rival-allocators-gptq"), allocator_frontier_gptq),
    "moe-solve-time": ("docs/architectures.md", ("moe-solve-time",), moe_solve_time),
    "allocator-frontier-full-wikitext2": ("docs/evaluation.md", ("allocator-frontier-full-wikitext2",), allocator_frontier_full_wikitext2),
    "kld-topk-error": ("docs/evaluation.md", ("kld-topk-error",), kld_topk_error),
    "pipeline-backends": ("docs/backends.md", ("pipeline-backends",), pipeline_backends),
}


def writer(block: str) -> Callable[[], str]:
    """The function that writes `block`'s body now, from its stored results."""
    _, names, render = BLOCKS[block]

    def write() -> str:
        return render(*(load(n) for n in names))

    write.__name__ = render.__name__
    return write


def blocks_reading(result: str) -> list[str]:
    return [block for block, (_, names, _) in BLOCKS.items() if result in names]


def result_path(name: str) -> Path:
    return RESULTS / f"{name}.json"
