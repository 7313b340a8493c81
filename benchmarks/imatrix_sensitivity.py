"""How much a llama.cpp preset file moves when its importance matrix moves by float rounding.

The imatrix is computed by torch on the machine's CPU, and another CPU rounds its sums differently (about
1e-7 to 1e-6 relative). llama-quantize searches each block's scales weighted by the imatrix, so near-ties
flip. This quantizes `base` at `--preset` twice, with the imatrix as it is and multiplied by
(1 + noise * N(0, 1)) per entry, and prints how many tensors and bytes differ, the two files' KLD to each
other and their mean NLL difference on --tokens of an evaluation set (llama.cpp's runtime, paper windows):
what a rerun of the preset benchmark on another machine can move by.

    python benchmarks/imatrix_sensitivity.py <base.f32.gguf> <imatrix.gguf> <eval.safetensors> [--preset Q2_K]
                                             [--noise 1e-6] [--tokens 16384]

The three inputs are a pipeline run's: $QUANT_CACHE_DIR/gguf/*.f32.gguf, the profile's imatrix.gguf and the
calibration stage's c4.safetensors (or wikitext2.safetensors) under $QUANT_HOME/artifacts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.evaluation.perplexity import PROTOCOLS  # noqa: E402
from tasks.quantize.gguf import quantize_gguf  # noqa: E402
from tasks.quantize.imatrix import ImportanceMatrix, read_imatrix, write_imatrix  # noqa: E402
from tasks.quantize.llama_cpp_runtime import LlamaCppModel  # noqa: E402


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("imatrix", type=Path)
    ap.add_argument("eval_set", type=Path, help="an evaluation set's input_ids (safetensors)")
    ap.add_argument("--preset", default="Q2_K")
    ap.add_argument("--noise", type=float, default=1e-6)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imatrix-sensitivity-") as tmp:  # two whole GGUF files: removed after
        return measure(args, Path(tmp))


def measure(args, work: Path) -> int:
    from safetensors.torch import load_file

    matrix = read_imatrix(args.imatrix)
    rng = np.random.default_rng(0)
    moved = {k: (v * (1 + args.noise * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in matrix.sums.items()}
    write_imatrix(work / "moved.imatrix.gguf", ImportanceMatrix(moved, matrix.counts, matrix.datasets, matrix.chunk_count, matrix.chunk_size))
    for name, imatrix in (("as_is", args.imatrix), ("moved", work / "moved.imatrix.gguf")):
        quantize_gguf(args.base, work / f"{name}.gguf", args.preset, imatrix, {}, {})
    a, b = tensor_bytes(work / "as_is.gguf"), tensor_bytes(work / "moved.gguf")
    differ = [k for k in a if a[k][1] != b[k][1]]
    quantized = sum(len(v) for kind, v in a.values() if kind not in ("F32", "F16"))
    changed = sum(int(np.count_nonzero(np.frombuffer(a[k][1], np.uint8) != np.frombuffer(b[k][1], np.uint8))) for k in differ)
    print(f"{args.preset}, imatrix x (1 + {args.noise:g} N(0,1)): {len(differ)}/{len(a)} tensors differ, "
          f"{changed} of {quantized} quantized bytes ({100 * changed / quantized:.3f}%)")

    paper = PROTOCOLS["paper"]  # windows of max_length tokens every stride, the last stride scored
    width, stride = paper.max_length, paper.stride
    ids = load_file(str(args.eval_set))["input_ids"].flatten()[: args.tokens + width - stride].long()
    models = [LlamaCppModel(work / f"{name}.gguf", width) for name in ("as_is", "moved")]
    kld, dnll = [], []
    for start in range(0, len(ids) - width + 1, stride):
        window = ids[start : start + width][None]
        la, lb = (torch.log_softmax(m(window, logits_to_keep=stride + 1).logits[0, :-1].double(), -1) for m in models)
        target = window[0, width - stride :, None]
        kld.append((la.exp() * (la - lb)).sum(-1))
        dnll.append(la.gather(1, target)[:, 0] - lb.gather(1, target)[:, 0])
    for m in models:
        m.close()
    kld, dnll = torch.cat(kld), torch.cat(dnll)
    print(f"on {len(kld)} tokens: KLD(as_is || moved) {kld.mean():.5f}; NLL(moved) - NLL(as_is) {dnll.mean():+.5f} "
          f"+- {dnll.std() / len(dnll) ** 0.5:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
