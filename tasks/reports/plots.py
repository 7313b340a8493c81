"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

- perplexity vs saved model size, every method and backend, with the Pareto front and the champion;
- a heatmap per bit map (modules x layers, colour = the rung);
- per-layer score profiles (kurtosis, sensitivity, LIM, ZD) with SensiBoost/KurtBoost outliers marked.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from tasks.bitmap import BitMap
from tasks.ladder import LADDER, MODULES, module_order, rung_index, split_key
from tasks.reports.comparison import BASELINE, is_baseline
from tasks.reports.pareto import pareto_mask
from tasks.reports.profiles import OUTLIER_RULES, profile_table, score_outliers

log = logging.getLogger(__name__)

PPL_TITLES = {
    "ppl_wikitext2": "WikiText-2 perplexity (sliding window 1024/512)",
    "ppl_c4": "C4 perplexity (sliding window 1024/512)",
    "ppl_wikitext2_gptq": "WikiText-2 perplexity (GPTQ protocol, 2048)",
    "ppl_c4_gptq": "C4 perplexity (GPTQ protocol, 2048)",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CHAMPION_COLOUR = "#b8860b"  # dark goldenrod: no tab10 method colour is close
SHORT = {m: m.split(".")[-1].replace("_proj", "") for m in MODULES}  # "self_attn.q_proj" -> "q"


def log_scale(ax) -> None:
    """Log y axis with plain numbers (30, 100, 300) rather than 3x10^1."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 100:  # label 2, 3, 5 between decades only when there are few decades
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write the PNG atomically: a half-written figure never looks like a finished one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --- perplexity vs size -----------------------------------------------------------------------------

class PlotPoint(NamedTuple):
    number: int  # the row's "#" in the results table (the baseline is 1)
    name: str  # the variant
    x: float  # saved MiB (or nominal bpp, see cost_axis)
    y: float  # the perplexity
    on_front: bool
    is_champion: bool


def cost_axis(frame: pd.DataFrame) -> tuple[str, str]:
    """The x column and its label: the whole saved model in MiB; nominal bpp only if no variant has a size."""
    quant = frame[~is_baseline(frame)]
    if "saved_mib" in quant.columns and pd.to_numeric(quant["saved_mib"], errors="coerce").notna().any():
        return "saved_mib", "saved model size (MiB, whole model as saved)"
    return "nominal_bpp", "nominal bits per parameter (quantized linears only; no saved size recorded)"


def row_numbers(frame: pd.DataFrame) -> list[int]:
    """The results table's "#": comparison_frame's "row" column, else the frame's own order."""
    if "row" in frame.columns:
        return [int(n) for n in frame["row"]]
    return list(range(1, len(frame) + 1))


def pareto_points(frame: pd.DataFrame, metric: str, champion: str | None = None) -> list[PlotPoint]:
    """The quantized variants with both a cost (cost_axis) and `metric`, as the plot draws them."""
    cost, _ = cost_axis(frame)
    numbers = row_numbers(frame)
    rows = [(n, row) for n, (_, row) in zip(numbers, frame.iterrows())
            if str(row["method"]).lower() != BASELINE and pd.notna(row[cost]) and pd.notna(row[metric])]
    front = pareto_mask([float(r[cost]) for _, r in rows], [float(r[metric]) for _, r in rows])
    return [PlotPoint(n, str(r["variant"]), float(r[cost]), float(r[metric]), bool(f),
                      champion is not None and str(r["variant"]) == champion) for (n, r), f in zip(rows, front)]


def plot_ppl_vs_size(frame: pd.DataFrame, path: str | Path, metrics=("ppl_wikitext2", "ppl_c4"),
                     champion: str | None = None) -> tuple[Path, list[str]] | None:
    """One panel per perplexity metric: quantized variants at their saved size, the baseline as a line.

    Colour = method, marker = backend, the number in the marker = the row's "#" in the results table
    (a long label beside each point collides with its neighbours); the legend maps numbers to variants.
    The Pareto front (no other variant is both smaller and lower in perplexity) is a dashed step line;
    the champion has a star outline. Returns the path and the legend's labels; None when nothing can be drawn.
    """
    base = is_baseline(frame)
    quant = frame[~base]
    cost, xlabel = cost_axis(frame)
    if cost == "nominal_bpp":
        log.warning("no saved size in the results: perplexity plotted against nominal bpp")
    metrics = [m for m in metrics if m in frame.columns and (quant[m].notna() & quant[cost].notna()).any()]
    if not metrics:
        log.warning("no perplexity with a %s in the results: perplexity-vs-size plot skipped", cost)
        return None
    methods = sorted(quant["method"].astype(str).unique())
    backends = sorted(quant["backend"].astype(str).unique())
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(backends)}
    numbers = row_numbers(frame)
    kind = dict(zip(numbers, zip(frame["method"].astype(str), frame["backend"].astype(str))))

    fig = new_figure(6.2 * len(metrics) + 3.2, 4.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    drawn: dict[int, PlotPoint] = {}
    panels = []
    for ax, metric in zip(axes, metrics):
        pts = pareto_points(frame, metric, champion)
        for p in pts:
            drawn.setdefault(p.number, p)
            method, backend = kind[p.number]
            ax.scatter(p.x, p.y, s=170, color=colours[method], marker=markers[backend], edgecolor="black",
                       linewidth=0.5, zorder=3)
            if p.is_champion:
                ax.scatter(p.x, p.y, s=650, marker="*", facecolor="none", edgecolor=CHAMPION_COLOUR, linewidth=1.6, zorder=5)
        front = sorted((p for p in pts if p.on_front), key=lambda p: p.x)
        if front:
            ax.step([p.x for p in front], [p.y for p in front], where="post", color="black", linestyle="--",
                    linewidth=1, zorder=2)
        if base.any() and pd.notna(frame.loc[base, metric].iloc[0]):
            ref = float(frame.loc[base, metric].iloc[0])
            ax.axhline(ref, color="grey", linestyle=":", linewidth=1.2)
            ax.annotate(f"#{numbers[int(np.flatnonzero(base)[0])]} unquantized {ref:.2f}", (0.01, ref),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")
        values = np.array([p.y for p in pts], dtype=float)
        if base.any():
            values = np.append(values, frame.loc[base, metric].to_numpy(dtype=float))
        values = values[np.isfinite(values) & (values > 0)]
        if values.size and values.max() / values.min() > 5:
            log_scale(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(PPL_TITLES.get(metric, metric))
        versus = " vs saved size" if cost == "saved_mib" else " vs bits per parameter"
        ax.set_title(PPL_TITLES.get(metric, metric).split(" (")[0] + versus)
        ax.grid(True, alpha=0.3)
        panels.append((ax, pts))
    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in methods]
    handles += [Line2D([], [], color="grey", marker=markers[b], linestyle="", markeredgecolor="black", label=f"backend {b}")
                for b in backends]
    handles += [Line2D([], [], color="black", linestyle="--", label="Pareto front")]
    if base.any():
        handles += [Line2D([], [], color="grey", linestyle=":", label="unquantized baseline")]
    if any(p.is_champion for p in drawn.values()):
        handles += [Line2D([], [], marker="*", markersize=13, markerfacecolor="none", markeredgecolor=CHAMPION_COLOUR,
                           linestyle="", label="champion")]
    # The key: number -> variant, in the results table's order (handle-less entries, monospace for alignment).
    key = [(n, str(v), " (baseline)" if b else "") for n, v, b in zip(numbers, frame["variant"], base)]
    key = [(n, v, tail or (" (champion)" if n in drawn and drawn[n].is_champion else "")) for n, v, tail in key
           if n in drawn or tail]
    handles += [Line2D([], [], linestyle="", label=f"{n:>2}  {v}{tail}") for n, v, tail in sorted(key)]
    legend = axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                             handlelength=1.5, ncol=1 if len(handles) <= 30 else 2, prop={"family": "monospace", "size": 7.5})
    fig.suptitle("Perplexity vs memory: lower left is better", fontsize=12)
    fig.draw_without_rendering()  # the layout fixes each panel's size: the numbers are spread in points
    for ax, pts in panels:
        _number_points(ax, pts, {p.number: colours[kind[p.number][0]] for p in pts})
    return save(fig, path), [t.get_text() for t in legend.get_texts()]


def spread_labels(xy, width, height: float = 8.0) -> np.ndarray:
    """Vertical positions for labels centred at `xy` (display points, `width` wide, `height` tall) such
    that no two overlap: each overlapping pair is pushed apart, half each, until none is left (100 rounds at most)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    width = np.asarray(width, dtype=float)
    y = xy[:, 1].copy()
    for _ in range(100):
        moved = False
        for i in range(len(y)):
            for j in range(i + 1, len(y)):
                gap = height - abs(y[i] - y[j])
                if gap > 0.01 and abs(xy[i, 0] - xy[j, 0]) < (width[i] + width[j]) / 2:
                    up = 1.0 if (y[i], i) > (y[j], j) else -1.0  # the higher one goes up; a tie by order
                    y[i] += up * gap / 2
                    y[j] -= up * gap / 2
                    moved = True
        if not moved:
            break
    return y


def _number_points(ax, pts: list[PlotPoint], colour: dict[int, str]) -> None:
    """Each point's number on its marker; numbers that would overlap are pushed apart vertically (with a
    leader line once off their marker) so that near-identical variants stay readable."""
    if not pts:
        return
    ax.set_xlim(ax.get_xlim())  # freeze the limits the positions are computed in
    ax.set_ylim(ax.get_ylim())
    xy = ax.transData.transform([(p.x, p.y) for p in pts]) * 72.0 / ax.figure.dpi  # display points
    y = spread_labels(xy, [4.5 * len(str(p.number)) + 2.0 for p in pts])
    for p, shift in zip(pts, y - xy[:, 1]):
        r, g, b = to_rgb(colour[p.number])
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        style = {}
        if abs(shift) > 4.0:  # off its marker: dark on a light box, tied to the marker by a line
            ink = "black"
            style = dict(bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85),
                         arrowprops=dict(arrowstyle="-", color="#444", linewidth=0.5, shrinkA=0, shrinkB=0))
        ax.annotate(str(p.number), (p.x, p.y), textcoords="offset points", xytext=(0, shift), ha="center",
                    va="center", fontsize=6.5, fontweight="bold", color=ink, zorder=6, **style)


# --- bit map heatmap ---------------------------------------------------------------------------------

def bitmap_matrix(bitmap: BitMap) -> tuple[np.ndarray, list[int], list[str]]:
    """Rung index per (module type, layer); NaN where a module is not in the map (left in 16 bits)."""
    layers = bitmap.layers()
    modules = sorted({split_key(k)[1] for k in bitmap.modules}, key=module_order)  # MoE: experts by number after attention
    grid = np.full((len(modules), len(layers)), np.nan)
    col = {layer: j for j, layer in enumerate(layers)}
    row = {m: i for i, m in enumerate(modules)}
    for key, rung in bitmap.modules.items():
        layer, module = split_key(key)
        grid[row[module], col[layer]] = rung_index(rung) if rung in LADDER else np.nan
    return grid, layers, modules


def plot_bitmap_heatmap(bitmap: BitMap, path: str | Path, name: str = "") -> Path:
    """Layers across, the 7 module types down; colour = the ladder rung, the cell text = weight bits."""
    grid, layers, modules = bitmap_matrix(bitmap)
    colours = [tuple(c) for c in _ladder_colours()]
    cmap = ListedColormap(colours).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(LADDER) + 1) - 0.5, cmap.N)
    fig = new_figure(max(6.0, 0.32 * len(layers) + 3.0), min(0.42 * len(modules), 40.0) + 2.0)  # MoE: hundreds of rows
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if len(layers) <= 64 and len(modules) <= 96:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    rung = LADDER[int(grid[i, j])]
                    r, g, b, _ = colours[int(grid[i, j])]
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, str(rung.bits), ha="center", va="center", fontsize=7, color=ink)
    step = max(1, len(layers) // 32)
    ax.set_xticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)], fontsize=7)
    rows = max(1, len(modules) // 96)
    ax.set_yticks(range(0, len(modules), rows), [m.replace("self_attn.", "attn.") for m in modules[::rows]], fontsize=8 if rows == 1 else 6)
    ax.set_xlabel("decoder layer")
    used = sorted({int(v) for v in grid[np.isfinite(grid)]})
    handles = [Patch(facecolor=colours[k], edgecolor="grey", label=f"{LADDER[k].name} ({LADDER[k].label} bpp)") for k in used]
    if np.isnan(grid).any():
        handles.append(Patch(facecolor="white", edgecolor="grey", label="not quantized (16-bit)"))
    ax.legend(handles=handles, title="rung", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    budget = f", budget {bitmap.budget:.2f} bpp" if bitmap.budget else ""
    extra = f" ({bitmap.extra_pct:+.2f}% over budget)" if bitmap.extra_pct is not None else ""
    label = f"{name}: " if name else ""
    ax.set_title(f"{label}{bitmap.method}{budget}, nominal {bitmap.nominal_bpp:.3f} bpp{extra}", fontsize=10)
    return save(fig, path)


def _ladder_colours() -> np.ndarray:
    """One colour per rung: a hue family per bit width, lighter for larger groups (cheaper)."""
    from matplotlib import colormaps

    families = {2: "Reds", 3: "Oranges", 4: "Blues", 8: "Greens"}
    shades = {128: 0.45, 64: 0.65, 32: 0.85}
    return np.array([colormaps[families.get(r.bits, "Greys")](shades.get(r.group_size, 0.6)) for r in LADDER])


# --- score profiles ----------------------------------------------------------------------------------

def plot_score_profiles(scores: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Kurtosis and sensitivity per module type over layers, LIM and ZD per layer; outliers circled.

    Outliers follow docs/methods.md §4 exactly (tasks.allocation's rule): jumps between consecutive layers
    (ratio for sensitivity, difference for kurtosis) more than 3 trimmed standard deviations away.
    """
    table = profile_table(scores)
    outliers = score_outliers(table)
    fig = new_figure(13, 8.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (
        ("kurtosis", "Pearson kurtosis of the weights", True),
        ("sensitivity", "activation sensitivity (MSE, HQQ b4g64)", True),
        ("lim", "LIM = -mean cos(h_in, h_out)", False),
        ("zd", "ZD = fraction of weights with z > 1", False),
    )
    for ax, (col, label, per_module) in zip(axes, panels):
        ax.set_title(col.upper() if col in ("lim", "zd") else col, fontsize=11)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        if col not in table.columns or table[col].isna().all():
            ax.text(0.5, 0.5, f"no '{col}' column in the scores table", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
            continue
        if per_module:
            boosted: list[str] = []
            _, setting, top_m = OUTLIER_RULES[col]
            for i, module in enumerate(m for m in MODULES if m in set(table["module"])):
                series = table[table["module"] == module].sort_values("layer")
                ax.plot(series["layer"], series[col], marker=".", markersize=3, linewidth=1, color=f"C{i}",
                        label=SHORT.get(module, module))
                hits = outliers.get(col, {}).get(module, [])
                marked = series[series["layer"].isin(hits)]
                ax.scatter(marked["layer"], marked[col], s=90, facecolor="none", edgecolor="red", linewidth=1.5, zorder=4)
                picked = series[series["layer"].isin(hits[:top_m] if top_m else hits)]
                ax.scatter(picked["layer"], picked[col], s=22, color="red", zorder=5)
                if hits:
                    boosted.append(f"{SHORT.get(module, module)}[{','.join(map(str, hits[:top_m] if top_m else hits))}]")
            # A one-entry legend, so that loc="best" keeps the listing off the curves.
            note = ax.legend([Line2D([], [], linestyle="")], [f"boosted by {setting}: " + (" ".join(boosted) or "none")],
                             loc="best", handlelength=0, handletextpad=0, prop={"family": "monospace", "size": 8})
            note.get_texts()[0].set_color("red")
            values = table[col].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if values.size and values.min() > 0 and values.max() / values.min() > 20:
                log_scale(ax)
        else:
            per_layer = table.groupby("layer", as_index=False)[col].first().sort_values("layer")
            ax.plot(per_layer["layer"], per_layer[col], marker="o", markersize=3, linewidth=1.2, color="C0")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="red", linestyle="", markersize=9))
    labels.append("outlier (z > 3)")
    handles.append(Line2D([], [], marker="o", color="red", linestyle="", markersize=5))
    labels.append("boosted (paper setting)")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    for ax in axes[2:]:
        ax.set_xlabel("decoder layer")
    rules = ", ".join(f"{rule} for {col}" for col, (rule, _, _) in OUTLIER_RULES.items())
    heading = f"{title}: per-layer scores" if title else "Per-layer scores"
    fig.suptitle(f"{heading} (b4g64 rows)\noutliers: z > 3 on the jump between consecutive layers "
                 f"({rules}; docs/methods.md §4)", fontsize=11)
    return save(fig, path)

