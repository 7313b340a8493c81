"""ggml's own quantizer, called in-process on a weight matrix: what llama-quantize writes for a tensor of
a given type with a given importance matrix, and its dequantized values, so that the profiler measures
the exact error of every gguf rung (the same ggml_quantize_chunk llama-quantize calls per tensor, from
the libggml-base that `make setup` builds; no re-implementation).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tasks.errors import PipelineError
from tasks.ladder import Rung
from tasks.quantize.ggml_types import NEEDS_IMATRIX, written_rung
from tasks.quantize.llama_cpp import libggml

_ROWS_PER_CALL = 256  # bounded scratch memory per call


class _TypeTraits(ctypes.Structure):  # ggml.h `struct ggml_type_traits`
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]  # fmt: skip


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def _lib() -> ctypes.CDLL:
    lib = libggml()
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]  # fmt: skip
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def type_id(name: str) -> int:
    from gguf.constants import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def roundtrip(weight: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """dequantize(quantize(weight)) at ggml type `type_name`, weight [rows, columns] float32, with the
    importance matrix of its input columns (llama.cpp's mean squared activation per column) or None."""
    lib = _lib()
    kind = type_id(type_name)
    rows, cols = weight.shape
    block = int(lib.ggml_blck_size(kind))
    if cols % block:  # ggml asserts (aborts the process) on such rows
        raise PipelineError(f"ggml type {type_name} takes rows of a multiple of {block} weights, not {cols}")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise PipelineError(f"importance matrix of {importance.shape} for a weight of {cols} columns")
    elif type_name in NEEDS_IMATRIX:
        raise PipelineError(f"ggml type {type_name} needs an importance matrix")
    to_float = _TO_FLOAT(lib.ggml_get_type_traits(kind).contents.to_float)
    row_bytes = lib.ggml_row_size(kind, cols)
    out = np.empty_like(weight)
    imat = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if importance is not None else None

    def chunk(start: int) -> None:  # ctypes releases the GIL: chunks run on every core
        n = min(_ROWS_PER_CALL, rows - start)
        src = weight[start : start + n]
        buffer = (ctypes.c_uint8 * (row_bytes * n))()
        written = lib.ggml_quantize_chunk(kind, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buffer, 0, n, cols, imat)
        if written != row_bytes * n:
            raise PipelineError(f"ggml wrote {written} bytes for {n} rows of {type_name}, expected {row_bytes * n}")
        to_float(ctypes.cast(buffer, ctypes.c_void_p), out[start : start + n].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n * cols)

    lib.ggml_quantize_init(kind)  # once, before the threads (the i-quants' grids)
    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(chunk, range(0, rows, _ROWS_PER_CALL)))
    return out


def ggml_rung_error(weight: torch.Tensor, rung: Rung, importance: torch.Tensor | None) -> torch.Tensor:
    """W - ggml(W) at the type llama-quantize writes for `rung` on this weight's rows (its fallback when the
    row width does not take the type's block), float32 on the weight's device."""
    written = written_rung(rung, weight.shape[1])
    values = weight.detach().float().cpu().numpy()
    imp = None if importance is None else importance.detach().float().cpu().numpy()
    return (weight.detach().float() - torch.from_numpy(roundtrip(values, written.name, imp)).to(weight.device))
