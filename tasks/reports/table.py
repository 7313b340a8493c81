"""The one markdown table renderer: the results table printed at the end of a run (padded, readable
in a terminal) and the comparison report's table (tasks/reports/comparison.py) both go through here."""

from __future__ import annotations

import math

# (key, title, format) of the results table; a column with no value in any row is left out. Keys in
# WITH_SE are followed by their standard error (key + "_se") in the same cell.
RESULT_COLUMNS = (
    ("row", "#", "{}"),
    ("variant", "variant", "{}"),
    ("nominal_bpp", "bpp", "{:.3f}"),
    ("extra_pct", "extra %", "{:+.2f}"),
    ("ppl_wikitext2", "wiki2 ppl", "{:.2f}"),
    ("ppl_c4", "c4 ppl", "{:.2f}"),
    ("kld_wikitext2", "wiki2 KLD", "{:.4f}"),
    ("kld_c4", "c4 KLD", "{:.4f}"),
    ("top1_wikitext2", "wiki2 top-1", "{:.3f}"),
    ("dnll_wikitext2", "wiki2 dNLL", "{:.4f}"),
    ("predicted_dnll", "pred dNLL", "{:.4f}"),
    ("ppl_wikitext2_gptq", "wiki2 ppl (gptq)", "{:.2f}"),
    ("ppl_c4_gptq", "c4 ppl (gptq)", "{:.2f}"),
    ("saved_mib", "saved MiB", "{:.1f}"),
    ("tokens_per_s", "eval tok/s", "{:.0f}"),
    ("version", "version", "{}"),
    ("load_check", "reload", "{}"),
    ("ties", "within noise of #", "{}"),
)
TRAILING = 3  # version, reload, ties: after the downstream columns
WITH_SE = {"ppl_wikitext2", "ppl_c4", "kld_wikitext2", "kld_c4", "ppl_wikitext2_gptq", "ppl_c4_gptq"}


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
    """The run's results, one row per variant; a row with "champion": True reads e.g. "3 (champion)" under version."""
    rows = [{**r, "row": i + 1, "saved_mib": (r.get("saved_bytes") or 0) / 2**20 or None, "version": _version(r)}
            for i, r in enumerate(rows)]
    downstream = sorted({k for r in rows for k in r if k.startswith("lmeval_") and k.endswith("_acc")})
    extra = [(k, k[len("lmeval_"):].replace("_", " "), "{:.3f}") for k in downstream]
    at = next(i for i, c in enumerate(RESULT_COLUMNS) if c[0] == "top1_wikitext2")
    ordered = RESULT_COLUMNS[:at] + runtime_columns(rows) + RESULT_COLUMNS[at:-TRAILING] + tuple(extra) + RESULT_COLUMNS[-TRAILING:]
    cols = [c for c in ordered if any(r.get(c[0]) not in (None, "") for r in rows)]
    cells = [[_cell(r, key, fmt) for key, _, fmt in cols] for r in rows]
    return markdown([title for _, title, _ in cols], cells, [key not in ("variant", "ties") for key, _, _ in cols], pad=True)


def runtime_columns(rows: list[dict]) -> tuple:
    """The serving engines' own evaluations (Capabilities.runtime: llamacpp_ppl_wikitext2, ...), beside ours."""
    from tasks.quantize.registry import runtimes

    out = []
    for prefix, name in runtimes():
        for key, title, fmt in (("ppl_wikitext2", "wiki2 ppl", "{:.2f}"), ("kld_wikitext2", "wiki2 KLD", "{:.4f}")):
            if any(r.get(f"{prefix}_{key}") is not None for r in rows):
                out.append((f"{prefix}_{key}", f"{name} {title}", fmt))
                WITH_SE.add(f"{prefix}_{key}")
    return tuple(out)


def _version(row: dict):
    version = row.get("version")
    if row.get("champion") not in (True, 1):  # NaN, None, False: not the champion
        return version
    text = format_cell(version, "{}")
    return "champion" if text == "-" else f"{text} (champion)"


def _cell(row: dict, key: str, fmt: str) -> str:
    text = format_cell(row.get(key), fmt)
    se = row.get(f"{key}_se")
    if key in WITH_SE and text != "-" and se is not None and not (isinstance(se, float) and math.isnan(se)):
        text += " ±" + format_cell(se, fmt)
    return text
