"""The gguf backend's rungs are llama.cpp's types: bits per weight as llama.cpp's own libggml sizes them,
the fallback llama-quantize writes for rows a type's block does not divide, and the importance matrix in
the GGUF format llama-quantize reads."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import PipelineError
from tasks.quantize import llama_cpp
from tasks.quantize.ggml_types import LADDER, ggml_type, tensor_bytes, written_type
from tasks.quantize.imatrix import ImportanceMatrix, gguf_weight_name, read_imatrix, write_imatrix

needs_llama_cpp = pytest.mark.skipif(not llama_cpp.available(), reason=f"llama.cpp is not built at {llama_cpp.home()} (make setup builds it)")


@needs_llama_cpp
def test_the_ladder_sizes_every_type_as_libggml_does():
    from gguf.constants import GGMLQuantizationType

    lib = llama_cpp.libggml()
    for name in (*LADDER, "F16"):
        kind = GGMLQuantizationType[name]
        assert lib.ggml_type_name(kind.value).decode().upper() == name
        ours = ggml_type(name)
        assert (ours.block, ours.block_bytes) == (lib.ggml_blck_size(kind.value), lib.ggml_type_size(kind.value)), name


def test_bits_per_weight_are_exact():
    assert {n: ggml_type(n).bpw for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0", "IQ4_XS")} == {
        "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q4_0": 4.5, "Q8_0": 8.5, "IQ4_XS": 4.25}  # fmt: skip
    assert [ggml_type(n).bpw for n in LADDER] == sorted(ggml_type(n).bpw for n in LADDER), "cheapest first"


def test_rows_a_block_does_not_divide_get_llama_cpps_fallback():
    # SmolLM2's 576-wide rows (q/k/v/o, gate/up) take no 256-block type; its 1536-wide down_proj rows do.
    assert [written_type(n, 576).name for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0")] == [
        "Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q4_0"]  # fmt: skip
    assert written_type("Q4_K", 1536).name == "Q4_K"
    assert written_type("Q4_K", 100).name == "F16", "no 32-block either: llama.cpp writes F16"
    assert tensor_bytes("Q4_K", 576, 576) == 576 * 576 // 32 * 22 and tensor_bytes("Q4_K", 576, 1536) == 576 * 1536 // 256 * 144
    with pytest.raises(PipelineError, match="unknown ggml type 'Q4_X'"):
        ggml_type("Q4_X")


def test_the_imatrix_is_the_mean_squared_activation_per_column_and_reads_back(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 100, 16)).astype(np.float32)  # windows x tokens x columns
    name = gguf_weight_name("llama", "model.layers.2.mlp.gate_proj", 30)
    assert name == "blk.2.ffn_gate.weight"
    flat = x.reshape(-1, 16)
    matrix = ImportanceMatrix({name: (flat**2).sum(0, keepdims=True)}, {name: np.array([[flat.shape[0]]])}, ("wikitext2 valid",), 3, 100)
    back = read_imatrix(write_imatrix(tmp_path / "imatrix.gguf", matrix))
    assert (back.datasets, back.chunk_count, back.chunk_size) == (("wikitext2 valid",), 3, 100)
    np.testing.assert_allclose(back.importance(name)[0], (flat.astype(np.float64) ** 2).mean(0), rtol=1e-6)


@needs_llama_cpp
def test_a_failing_tool_is_one_line():
    with pytest.raises(PipelineError, match="llama.cpp's llama-quantize failed"):
        llama_cpp.run_tool("llama-quantize", ["/nonexistent/model.gguf", "/tmp/out.gguf", "Q4_K"], timeout_s=60)


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
@needs_llama_cpp
def test_llama_quantize_writes_the_types_the_ladder_predicts_with_our_imatrix(tmp_path, tiny_model_dir):
    """The tiny llama through llama.cpp's converter and llama-quantize, every weight given its own type and
    our importance matrix: the file holds, per tensor, the type `written_type` predicts (fallbacks included)."""
    import gguf

    source = llama_cpp.convert_to_gguf(tiny_model_dir, tmp_path / "f32.gguf")
    weights = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in gguf.GGUFReader(str(source)).tensors
               if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}  # fmt: skip
    assert weights, "the converter wrote the decoder's weights"
    wanted = {name: LADDER[i % len(LADDER)] for i, name in enumerate(sorted(weights))}  # i-quants need the imatrix
    rng = np.random.default_rng(0)
    matrix = ImportanceMatrix({n: rng.uniform(0.5, 2, size=(1, cols)).astype(np.float32) for n, (cols, _) in weights.items()},
                              {n: np.array([[64.0]]) for n in weights}, ("test",), 1, 64)  # fmt: skip
    imatrix = write_imatrix(tmp_path / "imatrix.gguf", matrix)
    overrides = [arg for name, kind in wanted.items() for arg in ("--tensor-type", f"^{name.replace('.', chr(92) + '.')}$={kind.lower()}")]
    out = tmp_path / "mixed.gguf"
    log = llama_cpp.run_tool("llama-quantize", ["--imatrix", imatrix, *overrides, source, out, "Q8_0"], timeout_s=600)
    assert f"loaded {len(weights)} importance matrix entries" in log
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors if t.name in weights}
    assert written == {name: written_type(kind, weights[name][0]).name for name, kind in wanted.items()}
    assert {n for n in wanted if written[n] != wanted[n]} and {n for n in wanted if written[n] == wanted[n]}, "fallbacks and exact types both"
