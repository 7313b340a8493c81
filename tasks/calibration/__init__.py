"""Calibration stage: text -> tokenized calibration windows and evaluation token streams.

Outputs, in one artifact directory:
  calibration.safetensors  input_ids int64 [samples, seq_len]: random windows (seeded) of the calibration text
  holdout.safetensors      input_ids int64 [n, seq_len]: consecutive windows of the calibration text that
                           overlap no calibration window (at most HOLDOUT_WINDOWS), for measurements that
                           must not see the tokens the scores came from (optimal's refine)
  wikitext2.safetensors    input_ids int64 [1, T]: the WikiText-2 test text, CRLF normalized
  c4.safetensors           input_ids int64 [1, T]: the first 1100 C4 validation documents joined by "\n\n"
  manifest.json            token counts, and `bos_token_id` when the tokenizer puts BOS before every text
The evaluation streams are stored whole; evaluation takes a documented prefix of them by default. With a
BOS, every calibration and evaluation window starts with it (its first token, only ever context, replaced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from tasks.artifacts import StageOutput, ensure_local, file_sha256, read_json, write_json_atomic
from tasks.contracts import Contract
from tasks.errors import PipelineError
from tasks.model_io import ResolvedModel
from tasks.settings import REPO_ROOT

log = logging.getLogger(__name__)

DATA_DIR = REPO_ROOT / "data"
C4_DOCUMENTS = 1100  # the papers' C4 evaluation set (docs/methods.md §7)
EVAL_SETS = ("wikitext2", "c4")
WINDOWS_FILE = "calibration.safetensors"  # the calibration windows in the stage output
HOLDOUT_FILE = "holdout.safetensors"
HOLDOUT_WINDOWS = 256  # 131,072 tokens at 512: EvoPress's largest selection stage


@dataclass(frozen=True)
class CalibrationParams(Contract):
    calibration_text: str = str(DATA_DIR / "wikitext-2-valid-tokenized.txt")
    wikitext2_text: str = str(DATA_DIR / "wikitext-2-raw-test.txt")
    c4_parquet: str = str(DATA_DIR / "c4-validation-2k.parquet")
    samples: int = 32
    seq_len: int = 512
    seed: int = 42
    model: ResolvedModel | None = None  # whose tokenizer (an input: run_calibration keys the output by its identity)

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}

    def cache_key(self) -> dict:
        """The settings and the sources' contents (run_calibration adds the tokenizer's identity)."""
        return {"params": self.settings(), "source_sha256": {name: file_sha256(src) for name, src in source_files(self).items()},
                "holdout": HOLDOUT_WINDOWS}  # fmt: skip


@dataclass(frozen=True)
class Calibration(Contract):
    """The calibration stage's manifest: its output directory (local path or s3:// URI)."""

    uri: str

    def local(self) -> Path:
        return ensure_local(self.uri)

    def windows(self) -> Path:
        """The calibration windows' file, fetched to this machine."""
        return self.local() / WINDOWS_FILE

    def holdout(self) -> Path:
        """The held-out windows' file (none of the calibration windows' tokens), fetched to this machine."""
        return self.local() / HOLDOUT_FILE


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"text file {path} is a directory" if path.is_dir() else f"text file not found: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise PipelineError(f"text file {path} holds NUL bytes: it is not a text file")
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"text file {path} is not UTF-8 text (byte {exc.start} of {len(raw)})") from None
    if not text.strip():
        raise PipelineError(f"text file {path} is empty")
    return text


def read_c4(path: str | Path, documents: int = C4_DOCUMENTS) -> str:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"C4 parquet not found: {path}")
    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as exc:  # noqa: BLE001 (pyarrow raises ArrowInvalid, KeyError, OSError... for a file that is not C4 parquet)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"C4 parquet {path} is not a parquet file with a 'text' column: {first[:200]}") from None
    import pyarrow as pa

    kind = table.schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PipelineError(f"C4 parquet {path}: its 'text' column holds {kind}, not strings")
    docs = [t for t in table.column("text").to_pylist()[:documents] if t and t.strip()]
    if not docs:
        raise PipelineError(f"C4 parquet {path} has no non-empty documents")
    return "\n\n".join(docs)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids
    return ids.to(torch.int64)


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS token a tokenizer puts before every text (Gemma's, Llama's: llama.cpp's add_bos_token), or None
    (SmolLM2's puts none)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and ids and ids[0] == bos else None


def window_bos(calibration_dir: str | Path) -> int | None:
    """The token every calibration and evaluation window starts with (each window's first token replaced, as
    llama.cpp's perplexity does), recorded by the calibration stage; None: windows are plain text."""
    manifest = ensure_local(calibration_dir) / "manifest.json"
    return read_json(manifest).get("bos_token_id") if manifest.is_file() else None


def window_starts(total: int, samples: int, seq_len: int, seed: int) -> list[int]:
    """Where `sample_windows` cuts its windows in a text of `total` tokens."""
    if total <= seq_len:
        raise PipelineError(f"calibration text has {total} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, total - seq_len, (samples,), generator=gen).tolist()


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens (GPTQ-style calibration), reproducible by seed; with
    `bos`, each window's first token is BOS (the context the model always sees first)."""
    flat = ids.reshape(-1)
    windows = torch.stack([flat[s : s + seq_len] for s in window_starts(flat.numel(), samples, seq_len, seed)])
    if bos is not None:
        windows[:, 0] = bos
    return windows


def holdout_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, bos: int | None = None,
                    limit: int = HOLDOUT_WINDOWS) -> torch.Tensor:  # fmt: skip
    """Consecutive `seq_len` windows of the calibration text, in text order, that overlap none of
    `sample_windows`' (at most `limit`; [0, seq_len] when the calibration windows cover the text)."""
    flat = ids.reshape(-1)
    used = torch.zeros(flat.numel() + 1, dtype=torch.int32)
    for s in window_starts(flat.numel(), samples, seq_len, seed):
        used[s] += 1
        used[s + seq_len] -= 1
    covered = used.cumsum(0)[:-1] > 0
    windows, start = [], 0
    while start + seq_len <= flat.numel() and len(windows) < limit:
        hit = covered[start : start + seq_len].nonzero()
        if len(hit):
            start += int(hit[-1]) + 1  # past the last covered token of this span
            continue
        windows.append(flat[start : start + seq_len])
        start += seq_len
    out = torch.stack(windows) if windows else flat.new_zeros((0, seq_len))
    if bos is not None and len(out):
        out[:, 0] = bos
    return out


def save_ids(path: Path, ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"input_ids": ids.contiguous()}, str(path))


def load_ids(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"token file not found: {path}")
    return load_file(str(path))["input_ids"]


def source_files(params: CalibrationParams) -> dict[str, str]:
    """name -> path of the three text sources, each checked to exist."""
    sources = {"calibration": params.calibration_text, "wikitext2": params.wikitext2_text, "c4": params.c4_parquet}
    for name, src in sources.items():
        if not Path(src).is_file():
            raise PipelineError(f"{name} source not found: {src}")
    return sources


def token_counts(tokenizer, params: CalibrationParams) -> dict[str, int]:
    """Each source's tokens with the model's tokenizer (the pre-flight's relations between Params and texts)."""
    return {name: int(tokenize(tokenizer, text).shape[-1]) for name, text in read_sources(params).items()}


def window_notes(params: CalibrationParams, tokens: int) -> list[str]:
    """Whether the calibration text gives the windows asked for: fewer tokens than one window is an error
    naming calibration_text; more windows than the text holds (they overlap) a note."""
    if tokens <= params.seq_len:
        raise PipelineError(f"Param calibration_text: {tokens} tokens, fewer than one window of calibration_seq_len {params.seq_len}")
    if params.samples * params.seq_len > tokens:
        return [f"calibration_samples x calibration_seq_len = {params.samples * params.seq_len:,} tokens from a text of {tokens:,}:"
                f" the random windows overlap ({params.samples * params.seq_len / tokens:.1f}x the text)"]
    return []


def read_sources(params: CalibrationParams) -> dict[str, str]:
    """The three texts, each checked (present, not empty): one PipelineError line naming the bad one."""
    sources = source_files(params)
    return {"calibration": read_text(sources["calibration"]), "wikitext2": read_text(sources["wikitext2"]), "c4": read_c4(sources["c4"])}


def run(ctx, params: CalibrationParams) -> Calibration:
    """Tokenize with the model's tokenizer (cached by the settings, the sources' contents and the model)."""
    model = params.model
    return Calibration(run_calibration(model.local(ctx.settings.cache_dir), params, ctx.settings.artifact_root, model.revision))


def run_calibration(model_path: str | Path, params: CalibrationParams, artifact_root: str | Path, model_revision: str = "") -> str:
    """Tokenize with the model's tokenizer; return the artifact directory (cached by inputs)."""
    if params.samples < 1 or params.seq_len < 8:
        raise PipelineError(f"calibration needs samples >= 1 and seq_len >= 8 (got {params.samples}, {params.seq_len})")
    out = StageOutput(artifact_root, "calibration", {**params.cache_key(), "tokenizer": model_revision or str(model_path)})
    with out.exclusive():
        return _build_calibration(out, model_path, params)


def _build_calibration(out, model_path, params) -> str:
    from tasks.model_io import load_tokenizer

    if out.is_complete():
        log.info("calibration: cache hit %s", out.uri)
        return str(out.path)
    tokenizer = load_tokenizer(model_path)
    texts = read_sources(params)
    with out.build() as tmp:
        bos = tokenizer_bos(tokenizer)
        text = tokenize(tokenizer, texts["calibration"])
        calib = sample_windows(text, params.samples, params.seq_len, params.seed, bos)
        save_ids(tmp / WINDOWS_FILE, calib)
        holdout = holdout_windows(text, params.samples, params.seq_len, params.seed, bos)
        save_ids(tmp / HOLDOUT_FILE, holdout)
        counts = {"calibration": list(calib.shape), "holdout": list(holdout.shape)}
        for name in EVAL_SETS:
            ids = tokenize(tokenizer, texts[name])
            if ids.shape[-1] < 2:
                raise PipelineError(f"evaluation text {name} has fewer than 2 tokens")
            save_ids(tmp / f"{name}.safetensors", ids)
            counts[name] = int(ids.shape[-1])
        write_json_atomic(tmp / "manifest.json", {"outputs": counts, **({"bos_token_id": bos} if bos is not None else {})})
        log.info("calibration: %s windows of %s tokens; evaluation tokens %s", *counts["calibration"], {k: counts[k] for k in EVAL_SETS})
    return str(out.path)
