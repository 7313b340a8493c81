"""Quantization stage: (model, bit map, calibration) -> saved quantized model, cached by its inputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.artifacts import StageOutput, ensure_local, file_sha256, read_json, write_json_atomic
from tasks.bitmap import BitMap
from tasks.calibration import WINDOWS_FILE, Calibration
from tasks.contracts import Contract
from tasks.model_io import ResolvedModel
from tasks.quantize.registry import UNQUANTIZED, get_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeParams(Contract):
    model: ResolvedModel
    backend: str  # a backend of the table, or UNQUANTIZED (the base model stands for itself)
    bitmap: str | None  # the bit map's JSON file (None for the base model)
    calibration: Calibration
    options: dict = field(default_factory=dict)  # the backend's options (Param backend_options; {}: its defaults)
    imatrix: str | None = None  # the profile's importance matrix, for a backend that quantizes with one (Capabilities.imatrix)


@dataclass(frozen=True)
class QuantizedModel(Contract):
    uri: str  # the saved model's stage output (the base model's checkpoint for UNQUANTIZED)
    key: str  # its identity: the output's key, or the base model's revision
    started_ms: int  # when the variant's work began (its MLflow run's start)
    quant_seconds: float | None = None


def run(ctx, params: QuantizeParams) -> QuantizedModel:
    """The saved quantized model (built once per distinct input); the base model itself for UNQUANTIZED."""
    started = int(time.time() * 1000)
    if params.backend == UNQUANTIZED:
        return QuantizedModel(str(params.model.path), params.model.revision, started)
    uri = run_quantize(params.model.local(ctx.settings.cache_dir), params.model.revision, params.bitmap, params.backend,
                       ctx.settings.artifact_root, Path(params.calibration.uri) / WINDOWS_FILE, params.options, params.imatrix)  # fmt: skip
    facts = read_json(ensure_local(uri) / "manifest.json").get("facts", {})
    return QuantizedModel(uri, Path(uri).name, started, facts.get("quant_seconds"))


def run_quantize(
    model_path: str | Path,
    model_revision: str,
    bitmap_path: str | Path,
    backend: str,
    artifact_root: str | Path,
    calibration_path: str | Path | None = None,
    options: dict | None = None,
    imatrix: str | Path | None = None,
) -> str:
    """Return the artifact directory of the quantized model (built once per distinct input). `imatrix`:
    llama.cpp's importance matrix, for a backend that quantizes with one (Capabilities.imatrix)."""
    options = options or {}
    impl = get_backend(backend)
    bitmap_path = ensure_local(bitmap_path)
    bitmap = BitMap.load(bitmap_path)
    impl.check(bitmap)
    if calibration_path and impl.capabilities.needs_calibration:  # a fresh pod fetches it before hashing it
        calibration_path = ensure_local(calibration_path)
    inputs = {
        "model_revision": model_revision,
        "bitmap_sha256": file_sha256(bitmap_path),
        "backend": backend,
        "options": options,
        "calibration": file_sha256(calibration_path) if calibration_path and impl.capabilities.needs_calibration else None,
    }
    if imatrix and impl.capabilities.imatrix:  # (a key only where one is used: the other backends' keys stay as they were)
        imatrix = ensure_local(imatrix)
        inputs["imatrix"] = file_sha256(imatrix)
    else:
        imatrix = None
    out = StageOutput(artifact_root, f"quantized/{backend}", inputs)
    with out.exclusive():
        return _build_quantized(out, impl, model_path, bitmap, backend, calibration_path, options, imatrix)


def _build_quantized(out, impl, model_path, bitmap, backend: str, calibration_path, options: dict, imatrix=None) -> str:
    if out.is_complete():
        log.info("quantize %s/%s: cache hit %s", backend, bitmap.method, out.uri)
        return str(out.path)
    calibration = None
    if impl.capabilities.needs_calibration:
        from tasks.calibration import load_ids

        calibration = load_ids(calibration_path)
    log.info("quantize %s/%s at %.3f bpp: %s", backend, bitmap.method, bitmap.nominal_bpp, bitmap.rung_counts())
    with out.build() as tmp:
        extra = {"imatrix": Path(imatrix)} if imatrix else {}
        facts = impl.quantize(Path(model_path), bitmap, calibration, tmp, options, **extra)
        write_json_atomic(tmp / "manifest.json", {"backend": backend, "method": bitmap.method, "facts": facts})
    return str(out.path)
