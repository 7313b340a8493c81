"""Each quantized model stored once: the registered version's MLflow model holds the same weight files
as the pipeline's quantized output, and where both stores are directories of one filesystem (the
embedded default: both under $QUANT_HOME) the MLflow copy is replaced by hard links to the stage
output's files. Both stay complete, independent directories (deleting either leaves the other whole),
and neither is ever written in place (every write here is a new file renamed into place), so sharing
the inode is safe. On object stores (S3) the two copies remain: see docs/operations.md (Storage)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from tasks.artifacts import file_sha256

MIN_BYTES = 1 << 16  # small files (configs, cards) are not worth a hash


def local_dir(uri: str) -> Path | None:
    """The directory behind an artifact URI when it is on this machine's filesystem, else None."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def link_duplicates(source: Path, copy: Path) -> tuple[int, int]:
    """Replace each file under `copy` that is byte-identical to a file under `source` by a hard link to
    it; return (bytes of `copy`, bytes now shared with `source`)."""
    by_size: dict[int, list[Path]] = {}
    for p in source.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size >= MIN_BYTES:
            by_size.setdefault(p.stat().st_size, []).append(p)
    total = shared = 0
    for q in sorted(copy.rglob("*")):
        if not q.is_file() or q.is_symlink():
            continue
        st = q.stat()
        total += st.st_size
        for p in by_size.get(st.st_size, []):
            ps = p.stat()
            if ps.st_ino == st.st_ino and ps.st_dev == st.st_dev:
                shared += st.st_size
                break
            if ps.st_dev != st.st_dev or file_sha256(p) != file_sha256(q):
                continue
            tmp = q.with_name(f".{q.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(p, tmp)
            os.replace(tmp, q)
            shared += st.st_size
            break
    return total, shared
