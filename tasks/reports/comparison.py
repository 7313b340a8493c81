"""The comparison table of a pipeline run: one row per variant, baseline first, with deltas.

Deltas are relative perplexity changes in percent: against the unquantized baseline, and against the
uniform variant of the same backend and budget (the comparison the SensiBoost/KurtBoost papers make:
e.g. SB30 vs HQQ b3g128 on Llama-3-8B, WikiText-2 9.31 -> 8.43 = -9.4%).
"""

from __future__ import annotations

import base64
import html
import math
import mimetypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import PipelineError
from tasks.reports.table import format_cell, markdown

BASELINE = "unquantized"
UNIFORM = "uniform"
REQUIRED = ("variant", "method")
NUMERIC = (
    "budget", "nominal_bpp", "extra_pct", "ppl_wikitext2", "ppl_c4", "ppl_wikitext2_gptq", "ppl_c4_gptq",
    "kld_wikitext2", "kld_c4", "top1_wikitext2", "saved_bytes", "tokens_per_s", "quant_seconds",
)
PPL = ("ppl_wikitext2", "ppl_c4", "ppl_wikitext2_gptq", "ppl_c4_gptq")

# (column, title, format); a column with no value in any row is left out.
DISPLAY = (
    ("row", "#", "{}"),
    ("variant", "variant", "{}"),
    ("backend", "backend", "{}"),
    ("method", "method", "{}"),
    ("budget", "budget", "{:g}"),
    ("nominal_bpp", "bpp", "{:.3f}"),
    ("extra_pct", "extra %", "{:+.2f}"),
    ("ppl_wikitext2", "wiki2 ppl", "{:.2f}"),
    ("d_base_ppl_wikitext2", "wiki2 Δ base %", "{:+.1f}"),
    ("d_uniform_ppl_wikitext2", "wiki2 Δ uniform %", "{:+.1f}"),
    ("ppl_c4", "c4 ppl", "{:.2f}"),
    ("d_base_ppl_c4", "c4 Δ base %", "{:+.1f}"),
    ("d_uniform_ppl_c4", "c4 Δ uniform %", "{:+.1f}"),
    ("kld_wikitext2", "wiki2 KLD", "{:.4f}"),
    ("kld_c4", "c4 KLD", "{:.4f}"),
    ("top1_wikitext2", "wiki2 top-1", "{:.3f}"),
    ("ppl_wikitext2_gptq", "wiki2 ppl (GPTQ)", "{:.2f}"),
    ("ppl_c4_gptq", "c4 ppl (GPTQ)", "{:.2f}"),
    ("saved_mib", "saved MiB", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("quant_seconds", "quant s", "{:.1f}"),
)
TEXT_COLUMNS = {"variant", "backend", "method"}

NOTES = (
    "#: the variant's row in the run's results table and its number on the perplexity-vs-size plot. "
    "ppl: paper protocol (sliding window 1024, stride 512); (GPTQ): non-overlapping 2048-token windows. "
    "KLD: mean KL divergence of the variant's next-token distribution from the unquantized model's; top-1: how "
    "often both predict the same token. "
    "Δ base: perplexity change vs the unquantized baseline; Δ uniform: vs the uniform variant with the same "
    "backend and budget. Lower is better; the best quantized value of each perplexity is in bold."
)


def check_results(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise PipelineError(f"results table lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise PipelineError("results table has no rows")


def is_baseline(df: pd.DataFrame) -> pd.Series:
    return df["method"].astype(str).str.lower().eq(BASELINE)


def _pct(value: float, ref: float) -> float:
    if not (math.isfinite(value) and math.isfinite(ref)) or ref == 0:
        return math.nan
    return 100.0 * (value - ref) / ref


def comparison_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Sorted copy of the results with numeric columns coerced and the delta columns added.

    Order: the baseline first, then by budget, backend, nominal bpp and method, so each budget's uniform
    and mixed variants sit together. "row" keeps the input order (1-based): the results table's "#".
    """
    check_results(results)
    df = results.copy().reset_index(drop=True)
    df["row"] = np.arange(1, len(df) + 1)
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    for col in ("backend",):
        if col not in df.columns:
            df[col] = ""
    df["saved_mib"] = df["saved_bytes"] / 2**20
    base = is_baseline(df)
    base_row = df[base].iloc[0] if base.any() else None
    uniform = df[df["method"].astype(str).str.lower().eq(UNIFORM)]
    for col in PPL:
        ref = float(base_row[col]) if base_row is not None else math.nan
        df[f"d_base_{col}"] = [math.nan if b else _pct(v, ref) for v, b in zip(df[col], base)]
        d_uniform = []
        for _, row in df.iterrows():
            match = uniform[(uniform["backend"] == row["backend"]) & np.isclose(uniform["budget"], row["budget"], atol=5e-3)]
            if str(row["method"]).lower() in (UNIFORM, BASELINE) or match.empty:
                d_uniform.append(math.nan)
            else:
                d_uniform.append(_pct(row[col], float(match.iloc[0][col])))
        df[f"d_uniform_{col}"] = d_uniform
    df["_base"] = ~base
    df = df.sort_values(["_base", "budget", "backend", "nominal_bpp", "method"], na_position="last", kind="stable")
    return df.drop(columns="_base").reset_index(drop=True)


def _columns(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    return [c for c in DISPLAY if c[0] in frame.columns and frame[c[0]].replace("", np.nan).notna().any()]


def _cells(frame: pd.DataFrame, champion: str | None = None) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, formatted cells and which cells to emphasise (the best quantized perplexity per column).

    The champion's variant cell reads "<variant> (champion)".
    """
    cols = _columns(frame)
    quantized = ~is_baseline(frame)
    best = {c: frame.loc[quantized, c].min() for c in PPL if c in frame.columns and frame.loc[quantized, c].notna().any()}
    cells, bold = [], []
    for i, row in frame.iterrows():
        mark = " (champion)" if champion is not None and str(row["variant"]) == champion else ""
        cells.append([format_cell(row[key], fmt) + (mark if key == "variant" else "") for key, _, fmt in cols])
        bold.append([bool(key in best and quantized[i] and row[key] == best[key]) for key, _, _ in cols])
    return [title for _, title, _ in cols], cells, bold


def to_markdown(frame: pd.DataFrame, champion: str | None = None) -> str:
    head, cells, bold = _cells(frame, champion)
    keys = [k for k, _, _ in _columns(frame)]
    rows = [[f"**{c}**" if b else c for c, b in zip(r, e)] for r, e in zip(cells, bold)]
    return markdown(head, rows, [k not in TEXT_COLUMNS for k in keys]) + "\n\n" + NOTES + "\n"


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline td { background: #f7f7e8; }
tr.champion td { background: #fdf3d0; }
td.best { font-weight: bold; background: #e6f4e6; }
p.notes { font-size: 0.85em; color: #555; max-width: 60em; }
img { max-width: 100%; margin: 1em 0; border: 1px solid #eee; }
"""


def to_html(frame: pd.DataFrame, title: str = "Quantization comparison", figures: Sequence[str | Path] = (),
            champion: str | None = None) -> str:
    """A self-contained HTML page: the table, its notes, and the figures (image files) below it.

    The figures are embedded as data: URIs: MLflow shows an HTML artifact in a sandboxed iframe where a
    relative link to a sibling file does not load.
    """
    head, cells, bold = _cells(frame, champion)
    keys = [k for k, _, _ in _columns(frame)]
    base = is_baseline(frame).tolist()
    champ = frame["variant"].astype(str).eq(champion).tolist() if champion is not None else [False] * len(frame)
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>", "<table>",
           "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row, em, b, c in zip(cells, bold, base, champ):
        tds = []
        for key, cell, e in zip(keys, row, em):
            cls = " ".join(filter(None, ["" if key in TEXT_COLUMNS else "num", "best" if e else ""]))
            tds.append(f"<td class='{cls}'>{html.escape(cell)}</td>" if cls else f"<td>{html.escape(cell)}</td>")
        cls = " class=baseline" if b else " class=champion" if c else ""
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    out += ["</tbody></table>", f"<p class='notes'>{html.escape(NOTES)}</p>"]
    for fig in map(Path, figures):
        mime = mimetypes.guess_type(fig.name)[0] or "image/png"
        data = base64.b64encode(fig.read_bytes()).decode("ascii")
        out.append(f"<figure><img src='data:{mime};base64,{data}' alt='{html.escape(fig.name)}'>"
                   f"<figcaption>{html.escape(fig.name)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
