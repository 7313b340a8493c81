"""The report of one pipeline run (reports/<parent run id>/): results rows, the table with the champion
decision and the noise summary, results.json, and the figures (tasks/reports/__init__.py), with
reports/latest pointing at the newest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.artifacts import ensure_local, write_json_atomic, write_text_atomic

# The evaluation's quality metrics, with their standard errors, that the results table and JSON carry.
QUALITY_PREFIXES = ("ppl_", "kld_", "kld99_", "top1_", "dnll_", "lmeval_")


def quality_prefixes() -> tuple[str, ...]:
    """QUALITY_PREFIXES and the serving engines' own evaluations of them (llamacpp_ppl_, ...)."""
    from tasks.quantize.registry import runtimes

    return QUALITY_PREFIXES + tuple(f"{prefix}_{p}" for prefix, _ in runtimes() for p in QUALITY_PREFIXES)


def results_row(plan, metrics: dict, run_id: str | None, version: str | None, load_check: str | None) -> dict:
    """One variant's row of results.json and the table (`plan`: its VariantPlan)."""
    m = metrics
    return {
        "variant": plan.name, "backend": plan.backend, "method": plan.method, "label": plan.label, "budget": plan.budget_label,
        "nominal_bpp": m.get("nominal_bpp"), "extra_pct": m.get("extra_pct"),
        **{k: m.get(k) for k in ("saved_bytes", "peak_mem_bytes", "tokens_per_s", "quant_seconds", "predicted_dnll")},
        **{k: val for k, val in m.items() if k.startswith(quality_prefixes())},
        "run_id": run_id, "version": version, "load_check": load_check,
    }  # fmt: skip


def champion_line(decision: dict | None, champion: str | None) -> str:
    """The champion decision in one line, printed under the results table."""
    if not decision or not decision.get("champion"):
        return f"Champion: none ({decision['reason']})." if decision else "Champion: none (no quantized variant)."
    where = champion or "a version of an earlier run"
    return (f"Champion: {where} (version {decision['champion']}, {decision['action']}), by the rule \"{decision['rule']}\": "
            f"{decision['reason']}.")


def compare_variants(rows: list[dict], evaluations: list[str | None], predicted: list[float | None]) -> tuple[list[str], dict]:
    """Adds each row's 'within noise of' cell; returns the report's summary lines and the run's metrics."""
    from tasks.evaluation.compare import run_summary
    from tasks.evaluation.stage import load_tokens

    tokens = [load_tokens(e) if e else {} for e in evaluations]
    measured = [row.get("dnll_wikitext2") for row in rows]
    cells, metrics, lines = run_summary(tokens, measured, predicted)
    for row, cell in zip(rows, cells):
        row["ties"] = cell
    return lines, metrics


def write_run_report(out: Path, rows: list[dict], evaluations: list[str | None], predicted: list[float | None],
                     bitmap_files: list[str], scores: str | None, decision: dict | None) -> dict:  # fmt: skip
    """Mark the champion's row, write results.md/json, promotion.json and the figures into `out`; returns
    {"table", "champion" (its line), "summary" (lines), "metrics" (the run's)}."""
    import pandas as pd

    from tasks.bitmap import BitMap
    from tasks.reports import write_reports
    from tasks.reports.table import results_table

    if decision is not None:
        write_json_atomic(out / "promotion.json", decision)
    champion = next((r["variant"] for r in rows if decision and r.get("version") == decision.get("champion")), None)
    for row in rows:
        row["champion"] = row["variant"] == champion
    summary, metrics = compare_variants(rows, evaluations, predicted)
    table = results_table(rows)
    choice = champion_line(decision, champion)
    write_text_atomic(out / "results.md", table + "\n\n" + "\n\n".join([choice, *summary]) + "\n")
    write_json_atomic(out / "results.json", rows)
    # one heatmap per bit map (backends that share a map share its figure), named by its file: SB30-3.25-tied
    bitmaps = {Path(f).stem: BitMap.load(ensure_local(f)) for f in dict.fromkeys(bitmap_files)}
    write_reports(pd.DataFrame(rows), bitmaps, scores and ensure_local(scores), out, champion=champion)
    return {"table": table, "champion": choice, "summary": summary, "metrics": metrics}


def point_latest(reports: Path, out: Path) -> None:
    """reports/latest -> this run's directory, swapped atomically (a symlink replaced by rename)."""
    latest = reports / "latest"
    tmp = reports / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name, target_is_directory=True)
    if latest.is_dir() and not latest.is_symlink():  # a copy left by an older version
        shutil.rmtree(latest)
    os.replace(tmp, latest)
