"""llama.cpp's presets as bit maps: the type llama-quantize's own rules (llama-quant.cpp) give every linear
of this model for a preset such as Q4_K_M, read back from the file it writes with the run's importance
matrix, and the types of its token embeddings and output head. The preset's variant is that bit map; an
exact method given the preset as budget gets the same size for its linears and the same embeddings and
output head, so that the two files weigh the same.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import GGUF_PRESETS, ggml_rung

log = logging.getLogger(__name__)


def preset_bitmap(name: str, checkpoint: Path, imatrix: Path | None, params: dict[str, int]) -> BitMap:
    """The bit map of llama.cpp's preset `name` on the checkpoint's linears (module key -> its parameters)."""
    from tasks.quantize.base import true_config
    from tasks.quantize.gguf import checked_base_gguf, gguf_names, quantize_gguf
    from tasks.quantize.gguf_files import tensors

    if name not in GGUF_PRESETS:
        raise PipelineError(f"unknown llama.cpp preset {name!r}: one of {', '.join(GGUF_PRESETS)}")
    names = gguf_names(true_config(checkpoint), params)
    with tempfile.TemporaryDirectory(prefix="quant-preset-") as tmp:
        out = Path(tmp) / "preset.gguf"
        quantize_gguf(checked_base_gguf(checkpoint), out, name, imatrix, {}, {})
        written = {t.name: t.type for t in tensors(out)}
    missing = [n for n in names.values() if n not in written]
    if missing:
        raise PipelineError(f"llama.cpp's {name} file lacks weight(s) {missing[:3]}")
    modules = {key: ggml_rung(written[n]) for key, n in names.items()}
    extras = {part: written[f"{part}.weight"] for part in ("token_embd", "output") if f"{part}.weight" in written}
    bitmap = BitMap("preset", modules, dict(params), None, {"preset": name, **extras})
    log.info("preset %s: %.4f bpp over the linears (%s), embeddings %s, output %s", name, bitmap.nominal_bpp, bitmap.rung_counts(),
             extras.get("token_embd"), extras.get("output", "tied"))  # fmt: skip
    return bitmap
