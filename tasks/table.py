"""The plain-text results table printed at the end of a run (markdown, readable in a terminal)."""

from __future__ import annotations

COLUMNS = (
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
)


def _cell(value, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict]) -> str:
    rows = [{**r, "saved_mib": (r.get("saved_bytes") or 0) / 2**20 or None} for r in rows]
    downstream = sorted({k for r in rows for k in r if k.startswith("lmeval_") and k.endswith("_acc")})
    extra = [(k, k[len("lmeval_"):].replace("_", " "), "{:.3f}") for k in downstream]
    cols = [c for c in COLUMNS[:-1] + tuple(extra) + COLUMNS[-1:] if any(r.get(c[0]) not in (None, "") for r in rows)]
    cells = [[_cell(r.get(key), fmt) for key, _, fmt in cols] for r in rows]
    heads = [title for _, title, _ in cols]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    line = lambda parts: "| " + " | ".join(p.ljust(w) if i == 0 else p.rjust(w) for i, (p, w) in enumerate(zip(parts, widths))) + " |"  # noqa: E731
    out = [line(heads), "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)
