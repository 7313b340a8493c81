"""The one markdown table renderer: the results table printed at the end of a run (padded, readable
in a terminal) and the comparison report's table (tasks/reports/comparison.py) both go through here."""

from __future__ import annotations

import math

# (key, title, format) of the results table; a column with no value in any row is left out.
RESULT_COLUMNS = (
    ("variant", "variant", "{}"),
    ("nominal_bpp", "bpp", "{:.3f}"),
    ("extra_pct", "extra %", "{:+.2f}"),
    ("ppl_wikitext2", "wiki2 ppl", "{:.2f}"),
    ("ppl_c4", "c4 ppl", "{:.2f}"),
    ("ppl_wikitext2_gptq", "wiki2 ppl (gptq)", "{:.2f}"),
    ("ppl_c4_gptq", "c4 ppl (gptq)", "{:.2f}"),
    ("saved_mib", "saved MiB", "{:.1f}"),
    ("tokens_per_s", "eval tok/s", "{:.0f}"),
    ("version", "version", "{}"),
    ("load_check", "reload", "{}"),
)


def format_cell(value, fmt: str) -> str:
    """'-' for a missing value (None, '', NaN), else the formatted value (str() where fmt does not fit)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown(head: list[str], cells: list[list[str]], numeric: list[bool], *, pad: bool = False) -> str:
    """A markdown table; numeric columns right-aligned. pad=True aligns the cells for a terminal."""
    widths = [max(len(h), *(len(row[i]) for row in cells)) if pad else 0 for i, h in enumerate(head)]

    def line(parts):
        return "| " + " | ".join(p.rjust(w) if num else p.ljust(w) for p, w, num in zip(parts, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    if not pad:
        rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line(head), rule, *(line(row) for row in cells)])


def results_table(rows: list[dict]) -> str:
    rows = [{**r, "saved_mib": (r.get("saved_bytes") or 0) / 2**20 or None} for r in rows]
    downstream = sorted({k for r in rows for k in r if k.startswith("lmeval_") and k.endswith("_acc")})
    extra = [(k, k[len("lmeval_"):].replace("_", " "), "{:.3f}") for k in downstream]
    cols = [c for c in RESULT_COLUMNS[:-2] + tuple(extra) + RESULT_COLUMNS[-2:] if any(r.get(c[0]) not in (None, "") for r in rows)]
    cells = [[format_cell(r.get(key), fmt) for key, _, fmt in cols] for r in rows]
    return markdown([title for _, title, _ in cols], cells, [i > 0 for i in range(len(cols))], pad=True)
