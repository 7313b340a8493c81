"""Header checks of model files, run before anything loads them: a truncated download or a file of
another format becomes one line naming the file, not a loader's traceback minutes later. Reads headers
only (and GGUF's tensor index), no weights; no torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tasks.errors import PipelineError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def check_gguf(path: str | Path, full: bool = True) -> None:
    """Magic and version; with `full`, also the key-value and tensor index (parsed by the gguf library,
    seconds on a large file) and every tensor's data inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise PipelineError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    if len(head) < 24:
        raise PipelineError(f"{path} is a truncated GGUF file ({size} bytes, shorter than the GGUF header)")
    version, tensors, kvs = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise PipelineError(f"{path}: GGUF version {version} is not supported (versions {', '.join(map(str, GGUF_VERSIONS))})")
    if not full:
        return
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        ends = [t.data_offset + t.n_bytes for t in reader.tensors]
    except Exception as exc:  # noqa: BLE001 (any parse failure is the finding)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(f"{path} is a damaged or truncated GGUF file ({first})") from None
    if len(ends) != tensors:
        raise PipelineError(f"{path} is a damaged GGUF file: its header announces {tensors} tensors, {len(ends)} were read")
    if ends and max(ends) > size:
        raise PipelineError(f"{path} is truncated: its tensors need {max(ends)} bytes, the file has {size}")


def check_safetensors(path: str | Path) -> None:
    """The 8-byte header length, the JSON header, and every tensor's byte range inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise PipelineError(f"{path} is not a safetensors file ({size} bytes, shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise PipelineError(f"{path} is not a safetensors file, or is truncated (header length {length}, file {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PipelineError(f"{path} is a damaged safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise PipelineError(f"{path} is a damaged safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise PipelineError(f"{path} is a damaged safetensors file (tensor {name!r} has no data_offsets)") from None
        end = max(end, stop)
        if not 0 <= begin <= stop:
            raise PipelineError(f"{path} is a damaged safetensors file (tensor {name!r} has offsets {begin}..{stop})")
    if end > data:
        raise PipelineError(f"{path} is truncated: its tensors need {end} bytes of data, the file holds {data}")
