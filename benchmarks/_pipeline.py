"""What the benchmarks share of the pipeline: its steps, run in this process on a config, and variants of
bit maps that the benchmarks allocate themselves (evaluated exactly as the pipeline evaluates its own)."""

from __future__ import annotations

from dataclasses import replace

from tasks.allocation.stage import VariantPlan
from tasks.orchestration import steps
from tasks.orchestration.steps import Prepared, VariantRecord
from tasks.profiling.stage import Profile


def prepare(ctx, config: dict) -> tuple[Prepared, str | None]:
    """(the prepared run, its scores table's path or None)."""
    prepared = steps.prepare(ctx, config)
    profile = steps.profile(ctx, prepared)
    return Prepared.from_json(prepared), profile and Profile.from_json(profile).scores


def baseline(ctx, prep: Prepared) -> VariantRecord:
    """The unquantized model's record, as the pipeline's allocate step makes it."""
    config = {**prep.config, "methods": [], "budgets": [], "uniform_budgets": [], "include_baseline": True}
    return VariantRecord.from_json(steps.allocate(ctx, replace(prep, config=config).to_json(), None)[0])


def variant(base: VariantRecord, backend: str, bitmap_file: str, bitmap, name: str | None = None) -> VariantRecord:
    """A record of `bitmap` (saved at `bitmap_file`) on `backend`, ready for quantize and evaluate."""
    return replace(base, plan=VariantPlan.of_bitmap(base.run.model, backend, str(bitmap_file), bitmap, name))


def evaluate(ctx, record: VariantRecord) -> VariantRecord:
    """Quantized (cached) and evaluated (cached) by the pipeline's own steps."""
    return VariantRecord.from_json(steps.evaluate(ctx, steps.quantize(ctx, record.to_json())))
