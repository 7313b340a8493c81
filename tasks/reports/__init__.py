"""Reports for a pipeline run: the comparison table (markdown, HTML) and the figures.

    write_reports(results_df, bitmaps, scores_path, out_dir, champion=None) -> [paths]
    python -m tasks report --results results.csv [--bitmaps DIR] [--scores scores.csv] [--champion VARIANT] --out DIR

Inputs: the results table (one row per variant: variant, backend, method, budget, nominal_bpp,
extra_pct, ppl_wikitext2, ppl_c4, ppl_wikitext2_gptq, ppl_c4_gptq, saved_bytes, tokens_per_s,
quant_seconds; the baseline's method is "unquantized"), the variants' bit maps, and optionally the
scores table of the profiling stage. Outputs in out_dir:

    comparison.md, comparison.html   the table, baseline first, with deltas and the champion marked (the HTML
                                     embeds the figures as data: URIs, so it renders in MLflow's artifact viewer)
    ppl_vs_size.png                  perplexity vs saved MiB, every method and backend, Pareto front, champion
    bitmap_<name>.png                one heatmap per bit map (modules x layers, colour = rung); the pipeline
                                     names it by its bit-map file, e.g. bitmap_SB30-3.25-tied.png
    score_profiles.png, outliers.json   per-layer kurtosis/sensitivity/LIM/ZD with the boost outliers
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from tasks.artifacts import write_json_atomic, write_text_atomic
from tasks.bitmap import BitMap
from tasks.errors import PipelineError

log = logging.getLogger(__name__)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "bitmap"


def named_bitmaps(bitmaps) -> dict[str, BitMap]:
    """Accept a list (or name -> item mapping) of BitMap objects or their JSON dicts; give each a name.

    A list item is named by its "variant" field if it has one, else "<method>-<budget>", made unique.
    """
    items = bitmaps.items() if isinstance(bitmaps, Mapping) else ((None, b) for b in (bitmaps or []))
    named: dict[str, BitMap] = {}
    for name, item in items:
        if isinstance(item, BitMap):
            bitmap, variant = item, None
        elif isinstance(item, Mapping):
            bitmap, variant = BitMap.from_json(dict(item)), item.get("variant")
        else:
            raise PipelineError(f"a bit map must be a BitMap or its JSON dict, got {type(item).__name__}")
        if name or variant:
            base = str(name or variant)
        else:
            base = f"{bitmap.method}-{bitmap.budget:g}" if bitmap.budget else bitmap.method
        unique, n = base, 2
        while unique in named:
            unique, n = f"{base}-{n}", n + 1
        named[unique] = bitmap
    return named


def load_bitmaps(directory: str | Path) -> dict[str, BitMap]:
    """Every bit-map JSON under a directory, named by its "variant" field or its path; other JSON is skipped."""
    root = Path(directory)
    if not root.is_dir():
        raise PipelineError(f"bit map directory not found: {directory}")
    found = {}
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "modules" not in data:
            log.debug("skipping %s: not a bit map", path)
            continue
        found[str(data.get("variant") or path.relative_to(root).with_suffix(""))] = BitMap.from_json(data)
    if not found:
        raise PipelineError(f"no bit map JSON (with a 'modules' field) under {directory}")
    return found


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{what} file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{what} file {path} is not a readable CSV: {str(exc).splitlines()[0]}") from None


def champion_variant(results_df: pd.DataFrame, champion: str | None) -> str | None:
    """`champion` if given, else the variant of a row whose "champion" cell is true (results.json rows carry one)."""
    if champion is None and "champion" in results_df.columns:
        marked = results_df.loc[results_df["champion"].astype(str).str.lower().isin(["true", "1", "1.0"]), "variant"]
        champion = str(marked.iloc[0]) if len(marked) else None
    if champion is not None and champion not in set(results_df["variant"].astype(str)):
        log.warning("champion %r is not a variant of this run: not marked in the report", champion)
    return champion


def write_reports(results_df: pd.DataFrame, bitmaps, scores_path, out_dir, *, title: str = "Quantization comparison",
                  champion: str | None = None) -> list[Path]:
    """Write the table and figures described in the module docstring; return the paths written.

    `scores_path` may be None, a CSV path or an already-loaded DataFrame. `champion` is the champion's
    variant name (the "variant" column), marked in the table and the plot; None marks none.
    """
    from tasks.reports.comparison import comparison_frame, to_html, to_markdown
    from tasks.reports.plots import plot_bitmap_heatmap, plot_ppl_vs_size, plot_score_profiles
    from tasks.reports.profiles import profile_table, score_outliers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = comparison_frame(results_df)
    champion = champion_variant(frame, champion)
    figures: list[Path] = []
    if (plotted := plot_ppl_vs_size(frame, out / "ppl_vs_size.png", champion=champion)) is not None:
        figures.append(plotted[0])
    for name, bitmap in named_bitmaps(bitmaps).items():
        figures.append(plot_bitmap_heatmap(bitmap, out / f"bitmap_{_slug(name)}.png", name=name))
    extra: list[Path] = []
    if scores_path is not None:
        scores = scores_path if isinstance(scores_path, pd.DataFrame) else read_table(scores_path, "scores")
        figures.append(plot_score_profiles(scores, out / "score_profiles.png"))
        extra.append(write_json_atomic(out / "outliers.json", score_outliers(profile_table(scores))))
    md = write_text_atomic(out / "comparison.md", f"# {title}\n\n" + to_markdown(frame, champion))
    page = write_text_atomic(out / "comparison.html", to_html(frame, title, figures, champion))
    paths = [md, page, *figures, *extra]
    log.info("report: %d files in %s", len(paths), out)
    return paths
