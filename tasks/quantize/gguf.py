"""gguf backend: llama.cpp's own quantizer (`llama-quantize`, built once at set-up), one ggml type per
weight, for llama.cpp, Ollama and LM Studio.

The checkpoint becomes an F32 GGUF by llama.cpp's converter (tasks/quantize/gguf_files.py, cached per
model revision), then `llama-quantize --imatrix <the profile's imatrix> --tensor-type-file <one line per
linear>` writes `model.gguf`: every linear of the bit map at its type, and what the bit map does not name
(token embeddings, output head, norms) by llama.cpp's own conventions for the preset named by the bit
map's most common type (Q4_K -> Q4_K_M's rules), unless the bit map's options fix them (`token_embd`,
`output`: what a preset's equal-size comparison copies). The written types are read back from the file
and must be the bit map's (its rungs are already the types written: tasks/quantize/ggml_types.py).

Output directory: model.gguf (weights, tokenizer and metadata: all llama.cpp needs), imatrix.gguf (for
users' own llama.cpp runs), config.json and the tokenizer files (for this project's loader), bitmap.json.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import Counter
from pathlib import Path

from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import split_key
from tasks.quantize.base import Backend, Capabilities, OwnErrors, true_config
from tasks.quantize.ggml_types import NEEDS_IMATRIX
from tasks.quantize.gguf_files import tensors
from tasks.quantize.llama_cpp_runtime import check_loads

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
MODELFILE = "Modelfile"  # Ollama's
IMATRIX_FILE = "imatrix.gguf"
BITMAP_FILE = "bitmap.json"
EXTRAS = ("token_embd", "output")  # the non-linear tensors a bit map's options may fix (their types)
# The llama-quantize preset whose conventions (embeddings, output head) a bit map's most common type takes.
PRESET_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K"}
# llama.cpp's quantization presets (llama-quantize's type argument) the `preset` method can name.
PRESETS = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
           "Q8_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS")  # fmt: skip


def ollama_name(registered_name: str) -> str:
    return registered_name.lower().replace("_", "-")


def serving_lines(checkpoint_dir: str, registered_name: str) -> list[str]:
    """How to serve the registered file with llama.cpp's server, Ollama and llama-cpp-python (the model card)."""
    path = f"{checkpoint_dir}/{MODEL_FILE}"
    return [
        "## Serve it", "",
        "One file, `" + path + "`, with its tokenizer and metadata: llama.cpp, Ollama and LM Studio load it as it is.", "",
        "```sh",
        f"llama-server -m {path} --host 127.0.0.1 --port 8080   # OpenAI-compatible: POST /v1/completions",
        f"cd {checkpoint_dir} && ollama create {ollama_name(registered_name)} -f {MODELFILE} && ollama run {ollama_name(registered_name)}",
        "```", "",
        f"`{checkpoint_dir}/{IMATRIX_FILE}` is the importance matrix it was quantized with (llama.cpp's format: "
        f"`llama-quantize --imatrix {IMATRIX_FILE}` reuses it).", "",
    ]  # fmt: skip


def gguf_names(config, keys) -> dict[str, str]:
    """Module key ('3.self_attn.q_proj') -> llama.cpp's weight name ('blk.3.attn_q.weight')."""
    from tasks.quantize.imatrix import gguf_weight_name
    from tasks.quantize.llama_cpp import gguf_arch

    arch, layers = gguf_arch(config["model_type"]), int(config["num_hidden_layers"])
    return {k: gguf_weight_name(arch, f"model.layers.{split_key(k)[0]}.{split_key(k)[1]}", layers) for k in keys}


def quantize_gguf(base: Path, out: Path, preset: str, imatrix: Path | None, types: dict[str, str], extras: dict[str, str]) -> str:
    """llama-quantize `base` into `out` at `preset`, with `types` (weight name -> ggml type) and the extras'
    types overriding the preset's choices; its log."""
    from tasks.quantize import llama_cpp

    args = ["--imatrix", imatrix] if imatrix else []
    if extras.get("token_embd"):
        args += ["--token-embedding-type", extras["token_embd"].lower()]
    if extras.get("output"):
        args += ["--output-tensor-type", extras["output"].lower()]
    if types:
        listing = out.with_name(out.name + ".types")
        listing.write_text("".join(f"^{re.escape(name)}$={kind.lower()}\n" for name, kind in sorted(types.items())))
        args += ["--tensor-type-file", listing]
    try:
        return llama_cpp.run_tool("llama-quantize", [*args, base, out, preset, str(_threads())])
    finally:
        out.with_name(out.name + ".types").unlink(missing_ok=True)


def _threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)))


def written_types(path: Path) -> dict[str, str]:
    """Weight name -> the ggml type the file holds it in."""
    return {t.name: t.type for t in tensors(path)}


def file_facts(path: Path, linear_names: set[str]) -> dict:
    """Sizes of a GGUF file by part: the bit map's linears, token embeddings, output head, the rest."""
    parts: Counter = Counter()
    kinds = {}
    for t in tensors(path):
        part = "linear" if t.name in linear_names else t.name.split(".")[0] if t.name.split(".")[0] in EXTRAS else "other"
        parts[part] += t.bytes
        if part in EXTRAS:
            kinds[part] = t.type
    return {"file_bytes": path.stat().st_size, **{f"{p}_bytes": int(parts[p]) for p in ("linear", *EXTRAS, "other")},
            **{f"{p}_type": k for p, k in kinds.items()}}  # fmt: skip


class GGUFBackend(Backend):
    name = "gguf"
    capabilities = Capabilities(
        uniform_bits=(2, 3, 4, 5, 6, 8),
        group_sizes=(32, 256),
        bitmap="any",
        cpu=True,
        gpu=False,  # llama.cpp is built for the CPU here; its GPU builds read the same file
        needs_calibration=False,  # its importance matrix comes from the profile
        refused_families=(("qwen3_moe", "the profile's importance matrix is not written for stacked experts yet; use hqq"),
                          ("mixtral", "the profile's importance matrix is not written for stacked experts yet; use hqq")),  # fmt: skip
        own_errors=OwnErrors("gguf", "llama.cpp (ggml)", "one ggml quantization per module and type, with the importance matrix"),
        ladder="gguf",
        runtime=("llamacpp", "llama.cpp"),
        imatrix=True,
        serving="llama.cpp (llama-server), Ollama, LM Studio; mlflow pyfunc over llama.cpp",
        clients="llama.cpp and everything built on it (llama-server, Ollama, LM Studio, llama-cpp-python); transformers (gguf_file=, dequantized)",
        libraries=("llama-cpp-python",),
    )

    def quantize(self, model_path: Path, bitmap: BitMap, calibration, out_dir: Path, options: dict, imatrix: Path | None = None) -> dict:
        started = time.perf_counter()
        config = true_config(model_path)
        names = gguf_names(config, bitmap.modules)
        needs = sorted({r.name for r in bitmap.modules.values() if r.ggml in NEEDS_IMATRIX})
        if needs and imatrix is None:
            raise PipelineError(f"gguf: types {needs} need an importance matrix: run with a profile (it writes one)")
        types = {names[k]: r.ggml for k, r in bitmap.modules.items()}
        base_type = Counter({r.ggml: 0 for r in bitmap.modules.values()})
        for k, r in bitmap.modules.items():
            base_type[r.ggml] += bitmap.params.get(k, 1)
        preset = bitmap.options.get("preset") or PRESET_OF.get(base_type.most_common(1)[0][0], base_type.most_common(1)[0][0])
        extras = {p: bitmap.options[p] for p in EXTRAS if bitmap.options.get(p)}
        out = Path(out_dir) / MODEL_FILE
        quantize_gguf(checked_base_gguf(model_path), out, preset, imatrix, types, extras)
        check_loads(out)  # llama.cpp itself reads the file it is for (its vocabulary included)
        written = written_types(out)
        wrong = {n: (t, written.get(n)) for n, t in types.items() if written.get(n) != t}
        if wrong:
            first = next(iter(wrong.items()))
            raise PipelineError(f"gguf: llama-quantize wrote {len(wrong)} weight(s) at other types than the bit map's, e.g. {first[0]}: "
                                f"{first[1][1]} instead of {first[1][0]}")  # fmt: skip
        if imatrix:
            shutil.copyfile(imatrix, Path(out_dir) / IMATRIX_FILE)
        _copy_small_files(model_path, Path(out_dir))
        bitmap.save(Path(out_dir) / BITMAP_FILE)
        facts = {"quant_seconds": round(time.perf_counter() - started, 3), "preset_rules": preset, **file_facts(out, set(types))}
        log.info("gguf: %s written (%.1f MiB; linears %.1f MiB, embeddings %s, output %s) in %.1fs", out.name, facts["file_bytes"] / 2**20,
                 facts["linear_bytes"] / 2**20, facts.get("token_embd_type"), facts.get("output_type", "tied"), facts["quant_seconds"])  # fmt: skip
        return facts

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        """The saved file's weights, dequantized by transformers' GGUF reader into the model of config.json:
        this project's evaluator of exactly the values llama.cpp multiplies with (`runtime` is llama.cpp's)."""
        import torch
        from transformers import AutoModelForCausalLM

        out_dir = Path(out_dir)
        if not (out_dir / MODEL_FILE).is_file():
            raise PipelineError(f"{out_dir} has no {MODEL_FILE}: not a gguf backend output")
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=MODEL_FILE, dtype=torch.float32)
        model.hf_quantizer = None
        return model.to(device).eval()

    def runtime(self, out_dir: Path, context: int) -> nn.Module:
        """The saved file in llama.cpp's own runtime, as a causal LM the evaluator scores."""
        from tasks.quantize.llama_cpp_runtime import LlamaCppModel

        return LlamaCppModel(Path(out_dir) / MODEL_FILE, context)

    def transformers_runs(self, checkpoint: Path) -> bool:
        return False

    def generator(self, out_dir: Path):
        from tasks.quantize.llama_cpp_runtime import LlamaCppGenerator

        return LlamaCppGenerator(Path(out_dir) / MODEL_FILE)

    def serving_files(self, out_dir: Path, registered_name: str) -> None:
        """An Ollama Modelfile beside model.gguf."""
        (Path(out_dir) / MODELFILE).write_text(f"# ollama create {ollama_name(registered_name)} -f Modelfile\nFROM ./{MODEL_FILE}\n")

    def serving_card(self, checkpoint_dir: str, registered_name: str) -> list[str]:
        return serving_lines(checkpoint_dir, registered_name)

    def saved_bytes(self, out_dir: Path) -> int:
        """The one file llama.cpp loads (weights, tokenizer and metadata)."""
        return (Path(out_dir) / MODEL_FILE).stat().st_size


def _copy_small_files(model_path: Path, out_dir: Path) -> None:
    """config.json (its true model type) and the tokenizer files, beside the GGUF."""
    (out_dir / "config.json").write_text(json.dumps(true_config(model_path), indent=2))
    for item in Path(model_path).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")) and item.is_file():
            shutil.copyfile(item, out_dir / item.name)


def checked_base_gguf(checkpoint: Path) -> Path:
    """The checkpoint's F32 GGUF, llama-quantize's input (cached), its vocabulary checked on first build."""
    from tasks.model_io import default_cache_dir
    from tasks.quantize.gguf_files import cached_base_gguf

    return cached_base_gguf(checkpoint, default_cache_dir(), check_vocabulary)


def check_vocabulary(checkpoint: Path, path: Path) -> None:
    """Every gguf variant of a checkpoint is served with the vocabulary of its base GGUF, so llama.cpp must
    split text as the checkpoint's own tokenizer does (the one the pipeline calibrated and evaluated with):
    llama.cpp's converter can misread a tokenizer (a GPT-2 BPE vocabulary saved with byte fallback reads as
    SentencePiece, which llama.cpp then cannot even load). One error line, nothing cached."""
    from tasks.model_io import TOKENIZER_PROBE, load_tokenizer
    from tasks.quantize.llama_cpp_runtime import tokenizer_mismatch

    try:
        mismatch = tokenizer_mismatch(load_tokenizer(checkpoint), path, TOKENIZER_PROBE)
    except PipelineError as exc:
        code = str(exc).rsplit("(", 1)[-1].rstrip(")")
        raise PipelineError(f"{checkpoint.name}: llama.cpp cannot read the vocabulary its converter writes for it ({code}), so no gguf variant is built") from None
    if mismatch:
        raise PipelineError(f"{checkpoint.name}: the vocabulary llama.cpp's converter writes for it does not reproduce its tokenizer's {mismatch}; "
                            "its gguf variants would be served splitting text wrongly, so none is built")  # fmt: skip
