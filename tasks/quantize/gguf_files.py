"""GGUF files of a checkpoint: the unquantized (F32) GGUF llama-quantize starts from, with the tokenizer
llama.cpp must use, and what a quantized file holds (per tensor, its type and bytes).

The tokenizer: a checkpoint that the pipeline converted from a GGUF (the embedded SmolLM2, a user's
`.gguf`) keeps that file's own tokenizer metadata in `tokenizer.gguf` (a vocabulary-only GGUF, like
llama.cpp's models/ggml-vocab-*.gguf), because llama.cpp's converter, reading the tokenizer transformers
wrote back, can pick another tokenizer model (a GPT-2 BPE vocabulary saved with byte fallback reads as
SentencePiece) and llama.cpp then cannot load the file. The base GGUF takes those keys instead of the
converter's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

VOCAB_FILE = "tokenizer.gguf"  # in a checkpoint converted from a GGUF: that GGUF's tokenizer metadata
TOKENIZER_PREFIX = "tokenizer."


def write_vocab_gguf(source: str | Path, out: str | Path) -> Path:
    """A vocabulary-only GGUF: the architecture and every tokenizer.* key of `source`, no tensors."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for name, field in reader.fields.items():
        if name.startswith(TOKENIZER_PREFIX):
            detail = _details(field, MetadataDetails)
            writer.add_key_value(name, detail.value, detail.type, sub_type=detail.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def _details(field, MetadataDetails):
    import gguf

    kind = field.types[0]
    return MetadataDetails(kind, field.contents(), sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)


def tokenizer_fields(path: str | Path) -> dict:
    """The tokenizer.* keys of a GGUF, as gguf-py's MetadataDetails."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    reader = gguf.GGUFReader(str(path))
    return {n: _details(f, MetadataDetails) for n, f in reader.fields.items() if n.startswith(TOKENIZER_PREFIX)}


def base_gguf(checkpoint: str | Path, out: str | Path) -> Path:
    """The checkpoint as one F32 GGUF by llama.cpp's converter, with the tokenizer of its `tokenizer.gguf`
    where it has one (the module docstring); written to a temporary name and renamed."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    from tasks.quantize.base import plain_checkpoint
    from tasks.quantize.llama_cpp import convert_to_gguf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    converted = out.with_name(f".{out.name}.{os.getpid()}.converted")
    with plain_checkpoint(Path(checkpoint)) as plain:
        convert_to_gguf(plain, converted, "f32")
    vocab = Path(checkpoint) / VOCAB_FILE
    if not vocab.is_file():
        os.replace(converted, out)
        return out
    try:
        reader = gguf.GGUFReader(str(converted))
        wanted = tokenizer_fields(vocab)
        dropped = [n for n in reader.fields if n.startswith(TOKENIZER_PREFIX) and n not in wanted]
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        copy_with_new_metadata(reader, writer, dict(wanted), dropped)
        os.replace(tmp, out)
    finally:
        converted.unlink(missing_ok=True)
    log.info("base GGUF %s: tokenizer from %s", out.name, vocab)
    return out


def cached_base_gguf(checkpoint: str | Path, cache_dir: str | Path, check=None) -> Path:
    """`base_gguf` of a checkpoint, built once per checkpoint content into `cache_dir` (several variants of
    one run, and later runs, share it); `check(checkpoint, path)` may refuse a new one before it is cached."""
    import hashlib
    import json

    from tasks.artifacts import file_sha256
    from tasks.quantize.llama_cpp import BUILD

    checkpoint = Path(checkpoint)
    digest = hashlib.sha256(json.dumps([BUILD, *((p.name, p.stat().st_size, file_sha256(p) if p.suffix == ".json" else p.stat().st_mtime_ns)
                                                  for p in sorted(checkpoint.iterdir()) if p.is_file())]).encode()).hexdigest()[:16]  # fmt: skip
    out = Path(cache_dir) / "gguf" / f"{checkpoint.name}-{digest}.f32.gguf"
    if not out.is_file():
        log.info("gguf: converting %s to an F32 GGUF with llama.cpp's converter (once)", checkpoint.name)
        staged = out.with_name(f".{out.name}.{os.getpid()}.unchecked")
        try:
            base_gguf(checkpoint, staged)
            if check is not None:
                check(checkpoint, staged)
            os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type: str  # ggml type name as written (Q4_K, F32, ...)
    shape: tuple[int, ...]  # rows first (as torch), e.g. (out, in)
    bytes: int


def tensors(path: str | Path) -> list[GgufTensor]:
    """What a GGUF file holds, tensor by tensor."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{path} is not a readable GGUF file: {exc}") from None
    return [GgufTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes)) for t in reader.tensors]
