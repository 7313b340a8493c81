"""llama.cpp's importance matrix, from this pipeline's own calibration set: per weight, the sum over
calibration tokens of each input column's squared activation, and the token count (llama-imatrix's
meaning: llama-quantize weighs each column's rounding error by sum/count). Written in the GGUF format
that `llama-quantize --imatrix` reads first (tools/imatrix/imatrix.cpp): the keys general.type =
"imatrix", imatrix.datasets, imatrix.chunk_count and imatrix.chunk_size, and per weight two F32
tensors `<gguf name>.in_sum2` [n_mat, columns] and `<gguf name>.counts` [n_mat, 1] (n_mat: 1 for a dense
weight, the expert count for a stacked MoE weight). Users can pass the file to llama.cpp's own tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import PipelineError

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass(frozen=True)
class ImportanceMatrix:
    sums: dict[str, np.ndarray]  # GGUF weight name (blk.0.attn_q.weight) -> float [n_mat, columns]: sum of x^2
    counts: dict[str, np.ndarray]  # -> float [n_mat, 1]: tokens seen
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray:
        """What llama-quantize uses for a weight: the mean squared activation per input column."""
        return self.sums[name] / np.maximum(self.counts[name], 1)


def gguf_weight_name(arch: str, module: str, layers: int) -> str:
    """`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q.weight`, by gguf-py's tensor map of `arch` (llama, ...)."""
    import gguf

    try:
        kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    except StopIteration:
        raise PipelineError(f"gguf has no architecture {arch!r}") from None
    name = gguf.get_tensor_name_map(kind, layers).get_name(module)
    if name is None:
        raise PipelineError(f"no GGUF tensor name for {module!r} in a {arch} model")
    return f"{name}.weight"


def write_imatrix(path: str | Path, matrix: ImportanceMatrix) -> Path:
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="imatrix")  # general.architecture is not read; general.type is
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(matrix.datasets))
    writer.add_uint32("imatrix.chunk_count", int(matrix.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(matrix.chunk_size))
    for name, sums in sorted(matrix.sums.items()):
        counts = matrix.counts[name]
        if sums.ndim != 2 or counts.shape != (sums.shape[0], 1):
            raise PipelineError(f"imatrix {name}: sums [n_mat, columns] and counts [n_mat, 1] expected, got {sums.shape} and {counts.shape}")
        writer.add_tensor(name + SUM_SUFFIX, sums.astype(np.float32))
        writer.add_tensor(name + COUNT_SUFFIX, counts.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def scalar(key: str) -> int:
        return int(fields[key].parts[fields[key].data[0]][0]) if key in fields else 0

    datasets = tuple(bytes(fields["imatrix.datasets"].parts[i]).decode() for i in fields["imatrix.datasets"].data) if "imatrix.datasets" in fields else ()
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
    sums = {n[: -len(SUM_SUFFIX)]: v for n, v in tensors.items() if n.endswith(SUM_SUFFIX)}
    counts = {n[: -len(COUNT_SUFFIX)]: v for n, v in tensors.items() if n.endswith(COUNT_SUFFIX)}
    return ImportanceMatrix(sums, counts, datasets, scalar("imatrix.chunk_count"), scalar("imatrix.chunk_size"))


def module_importance(path: str | Path, model_type: str, layers: int, keys) -> dict:
    """Per module key (`3.self_attn.q_proj`), the importance llama-quantize reads for its weight from the
    imatrix file at `path`, as a float32 tensor [columns]."""
    import torch

    from tasks.ladder import split_key
    from tasks.quantize.llama_cpp import gguf_arch

    matrix, arch = read_imatrix(path), gguf_arch(model_type)
    out = {}
    for key in keys:
        layer, module = split_key(key)
        name = gguf_weight_name(arch, f"model.layers.{layer}.{module}", layers)
        if name in matrix.sums:
            out[key] = torch.from_numpy(matrix.importance(name)[0].astype(np.float32))
    return out
