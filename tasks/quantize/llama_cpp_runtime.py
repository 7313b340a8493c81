"""A GGUF file in llama.cpp's own runtime (its CPU kernels, through llama-cpp-python bound to the libraries
`make setup` built), as a causal LM this project's evaluator scores and a generator the registry's checks
and pyfunc call. Its logits are llama.cpp's, on exactly the windows and tokens of every other evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from tasks.errors import PipelineError


def llama_cpp_module():
    """llama-cpp-python, bound to this machine's llama.cpp build (it ships no libraries of its own here)."""
    from tasks.quantize.llama_cpp import home

    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(home() / "lib"))
    try:
        import llama_cpp
    except ImportError as exc:
        raise PipelineError(f"llama.cpp's runtime needs llama-cpp-python and the libraries `make setup` builds ({exc})") from None
    except (OSError, RuntimeError) as exc:
        raise PipelineError(f"llama.cpp's libraries do not load from {os.environ['LLAMA_CPP_LIB_PATH']}: {exc}; run `make setup`") from None
    return llama_cpp


def open_gguf(path: str | Path, context: int):
    """llama.cpp's model and context over a GGUF file, or one PipelineError line if llama.cpp cannot load it."""
    llama_cpp = llama_cpp_module()
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"GGUF file not found: {path}")
    threads = max(1, len(os.sched_getaffinity(0)))
    try:
        # flash attention and one 1024-token micro-batch: 0.70-0.82 of the time of 512 without, on 2 CPU cores
        # (benchmarks/llama_cpp_runtime.py)
        return llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, n_ubatch=min(context, 1024),
                               n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)  # fmt: skip
    except (ValueError, RuntimeError, OSError) as exc:
        raise PipelineError(f"llama.cpp cannot load {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def check_loads(path: str | Path, timeout_s: float = 600) -> None:
    """llama.cpp loads the file (model and vocabulary), tried in a child process: llama.cpp aborts the whole
    process on some bad files (an unknown tokenizer model), which must not take the caller with it."""
    import subprocess
    import sys

    code = ("import sys; from tasks.quantize.llama_cpp_runtime import open_gguf; open_gguf(sys.argv[1], 64).close(); print('loaded')")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))})  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PipelineError(f"llama.cpp did not load {path} in {timeout_s:.0f} s") from None
    if done.returncode != 0 or "loaded" not in done.stdout:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip() and not line.startswith(("  File", "Traceback"))]
        why = next((line for line in reversed(lines) if "error" in line.lower() or "what()" in line or "failed" in line.lower()), lines[-1] if lines else "")
        why = why.strip().removeprefix("tasks.errors.PipelineError: ")
        raise PipelineError(why[:400] if why.startswith("llama.cpp cannot load") else f"llama.cpp cannot load {path} (exit {done.returncode}): {why[:300]}")


def llama_cpp_tokens(path: str | Path, text: str, special: bool = False, timeout_s: float = 300) -> list[int]:
    """llama.cpp's own token ids of `text` with the vocabulary of a GGUF file, read in a child process
    (vocabulary only). `special`: the BOS/EOS the file's metadata asks for, as llama.cpp adds them (no
    special-token parsing of the text either way)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from tasks.quantize.llama_cpp_runtime import llama_cpp_module; lc = llama_cpp_module(); "
            "llm = lc.Llama(sys.argv[1], vocab_only=True, verbose=False); "
            "print(json.dumps(llm.tokenize(sys.stdin.read().encode(), add_bos=sys.argv[2] == '1', special=False)))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(path), "1" if special else "0"], input=text, capture_output=True, text=True,
                          timeout=timeout_s, env=env)  # fmt: skip
    if done.returncode != 0:
        raise PipelineError(f"llama.cpp cannot read the vocabulary of {path} (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tokenizer_mismatch(tokenizer, path: str | Path, text: str) -> str | None:
    """Where a transformers tokenizer and llama.cpp's vocabulary of a GGUF split `text` differently: None
    when both give the same ids, with and without BOS/EOS; else what differs ("text" is checked first, then
    "BOS/EOS") and the two token counts, for an error line."""
    for special in (False, True):
        theirs = llama_cpp_tokens(path, text, special=special)
        ours = tokenizer(text, add_special_tokens=special)["input_ids"]
        if ours != theirs:
            return f"{'BOS/EOS' if special else 'text'} ({len(ours)} tokens where llama.cpp's own gives {len(theirs)} on a {len(text)}-character probe)"
    return None


class LlamaCppModel(nn.Module):
    """forward(input_ids [B, T]) -> .logits [B, keep or T, vocab] float32, each row one fresh llama.cpp
    sequence (its KV cache cleared), as transformers' causal LMs answer the evaluator."""

    def __init__(self, path: str | Path, context: int):
        super().__init__()
        self.path, self.context = Path(path), int(context)
        self.llm = open_gguf(path, self.context)
        self._logits = llama_cpp_module().llama_get_logits

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0, **_) -> SimpleNamespace:
        if input_ids.shape[1] > self.context:
            raise PipelineError(f"a window of {input_ids.shape[1]} tokens exceeds llama.cpp's context of {self.context}")
        keep = min(logits_to_keep or input_ids.shape[1], input_ids.shape[1])
        n_vocab = self.llm.n_vocab()
        rows = []
        for row in input_ids.tolist():
            # One batch whose output flags ask llama.cpp for the kept positions' logits only: the output head
            # runs on those alone (the same values as with every position's, without computing and copying
            # the rest: a third of the FLOPs on a 262k-vocabulary model). llama-cpp-python's Llama.eval asks
            # for all positions or the last; its batch and context are reused here (pinned 0.3.36).
            self.llm.reset()
            self.llm._ctx.kv_cache_clear()
            batch, first = self.llm._batch.batch, len(row) - keep
            batch.n_tokens = len(row)
            for i, token in enumerate(row):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, i >= first
                batch.seq_id[i][0] = 0
            self.llm._ctx.decode(self.llm._batch)
            rows.append(torch.from_numpy(np.ctypeslib.as_array(self._logits(self.llm._ctx.ctx), shape=(keep, n_vocab)).copy()))
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        self.llm.close()


class LlamaCppGenerator:
    """Greedy completions by llama.cpp over a GGUF file, opened once (the registered model's pyfunc)."""

    def __init__(self, path: str | Path, context: int = 2048):
        self.path, self.context = Path(path), context
        self.llm = None

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        if self.llm is None:
            self.llm = open_gguf(self.path, self.context)
        out = self.llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]
