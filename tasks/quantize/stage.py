"""Quantization stage: (model, bit map, calibration) -> saved quantized model, cached by its inputs."""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.artifacts import StageOutput, ensure_local, file_sha256, write_json_atomic
from tasks.bitmap import BitMap
from tasks.quantize.registry import get_backend

log = logging.getLogger(__name__)


def run_quantize(
    model_path: str | Path,
    model_revision: str,
    bitmap_path: str | Path,
    backend: str,
    artifact_root: str | Path,
    calibration_path: str | Path | None = None,
    options: dict | None = None,
) -> str:
    """Return the artifact directory of the quantized model (built once per distinct input)."""
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
    out = StageOutput(artifact_root, f"quantized/{backend}", inputs)
    with out.exclusive():
        return _build_quantized(out, impl, model_path, bitmap, backend, calibration_path, options)


def _build_quantized(out, impl, model_path, bitmap, backend: str, calibration_path, options: dict) -> str:
    if out.is_complete():
        log.info("quantize %s/%s: cache hit %s", backend, bitmap.method, out.uri)
        return str(out.path)
    calibration = None
    if impl.capabilities.needs_calibration:
        from tasks.calibration import load_ids

        calibration = load_ids(calibration_path)
    log.info("quantize %s/%s at %.3f bpp: %s", backend, bitmap.method, bitmap.nominal_bpp, bitmap.rung_counts())
    with out.build() as tmp:
        facts = impl.quantize(Path(model_path), bitmap, calibration, tmp, options)
        write_json_atomic(tmp / "manifest.json", {"backend": backend, "method": bitmap.method, "facts": facts})
    return str(out.path)
