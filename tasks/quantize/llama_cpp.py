"""Where this machine's llama.cpp is: the tools and shared libraries that `make setup` builds once from the
pinned llama.cpp (scripts/build-llama-cpp.sh) and caches, outside the repository, per llama.cpp build.

QUANT_LLAMA_CPP_DIR  the cache directory (default ~/.cache/quantpipe/llama.cpp/<build>), holding bin/ and lib/
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

from tasks.errors import PipelineError

BUILD = "b11312"  # llama.cpp's build number: the tree llama-cpp-python 0.3.36 vendors (scripts/build-llama-cpp.sh)
ENV = "QUANT_LLAMA_CPP_DIR"


def home() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "quantpipe" / "llama.cpp" / BUILD)


def available() -> bool:
    return (home() / ".complete").is_file() and (home() / "bin" / "llama-quantize").is_file()


def tool(name: str) -> Path:
    """The path of a llama.cpp tool (llama-quantize, llama-imatrix, llama-perplexity, llama-server)."""
    path = home() / "bin" / name
    if not path.is_file():
        raise PipelineError(f"llama.cpp's {name} is not built at {home()}: run `make setup` (it builds llama.cpp {BUILD} once; needs cmake)")
    return path


@lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    """ggml's base library, for its type traits (ggml_blck_size, ggml_type_size, ggml_type_name)."""
    candidates = sorted((home() / "lib").glob("libggml-base.so*"))
    if not candidates:
        raise PipelineError(f"llama.cpp's libggml-base is not built at {home()}: run `make setup`")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_name.restype = ctypes.c_char_p
    return lib


def run_tool(name: str, args: list[str], timeout_s: float = 3600) -> str:
    """Run a llama.cpp tool to completion; its output, or one PipelineError line with its last words."""
    import subprocess

    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(home() / "lib"), os.environ.get("LD_LIBRARY_PATH")]))}
    try:
        done = subprocess.run([str(tool(name)), *map(str, args)], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"llama.cpp's {name} did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise PipelineError(f"llama.cpp's {name} failed (exit {done.returncode}): {last[0][:300]}")
    return done.stdout + done.stderr


def convert_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """A Hugging Face checkpoint as one GGUF file (tokenizer and metadata included) by llama.cpp's own
    converter of the same build, with that build's gguf-py; the input of llama-quantize."""
    import subprocess
    import sys

    script = home() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise PipelineError(f"llama.cpp's converter is not at {script}: run `make setup`")
    out = Path(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(home() / "gguf-py"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise PipelineError(f"llama.cpp cannot convert {model_dir} to GGUF: {last[0][:300]}")
    return out


# transformers' model_type -> llama.cpp's architecture name (general.architecture), where they differ
_ARCH = {"mistral": "llama", "gemma3_text": "gemma3", "gemma2_text": "gemma2"}


def gguf_arch(model_type: str) -> str:
    """llama.cpp's architecture name for a transformers `model_type` (llama, gemma3, qwen2, ...)."""
    import gguf

    arch = _ARCH.get(model_type, model_type)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise PipelineError(f"llama.cpp has no architecture for {model_type!r} models")
    return arch
