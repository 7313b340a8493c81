"""llama.cpp's runtime as the evaluator's model: the kept positions' logits, asked of llama.cpp alone, are
exactly the ones a pass with every position's logits gives (llama-cpp-python's own eval)."""

from __future__ import annotations

import numpy as np
import torch

from tasks.model_io import _embedded_gguf
from tasks.quantize.llama_cpp_runtime import LlamaCppModel, llama_cpp_module


def test_kept_logits_are_those_of_a_pass_with_every_position():
    embedded_gguf = _embedded_gguf()  # installed by `make setup`
    llama_cpp = llama_cpp_module()
    rows = torch.randint(100, 40000, (2, 96), generator=torch.Generator().manual_seed(0))
    model = LlamaCppModel(embedded_gguf, 128)
    kept = model(rows, logits_to_keep=40).logits
    every = model(rows).logits
    model.close()
    # the settings of open_gguf, all positions asked for
    reference = llama_cpp.Llama(str(embedded_gguf), n_ctx=128, n_batch=128, n_ubatch=128, flash_attn=True, logits_all=True, verbose=False)
    for i, row in enumerate(rows.tolist()):
        reference.reset()
        reference.eval(row)
        full = torch.from_numpy(np.array(reference.scores[: len(row)], dtype=np.float32))
        torch.testing.assert_close(every[i], full, rtol=0, atol=0)
        torch.testing.assert_close(kept[i], full[-40:], rtol=0, atol=0)
    reference.close()
    assert kept.shape[:2] == (2, 40)
