"""The MLflow model of each backend, on a tiny model from a config: it loads in a fresh process with
MLflow's own loader and generates; where docs/backends.md says transformers reads the bare checkpoint, its
logits match the pipeline's loader (max abs diff printed); where it does not, transformers refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import boosted_bitmap

from tasks.bitmap import uniform_bitmap
from tasks.ladder import Rung

pytestmark = pytest.mark.slow  # four quantizations and a dozen fresh processes

REPO = Path(__file__).resolve().parent.parent
CASES = {  # name -> (backend, boosted map?, options, does transformers read the bare checkpoint?)
    "hqq": ("hqq", True, {}, False),
    "gptq": ("gptq", True, {}, False),  # transformers' GPTQ integration drops per-module overrides: refused
    "gptq-uniform": ("gptq", False, {}, True),
    "awq": ("awq", True, {"n_grid": 4}, True),
    "bnb-mixed": ("bnb", True, {}, False),
    "bnb-4bit": ("bnb", False, {}, True),
}


def fresh(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


LOGITS = """
import sys, torch
path, how, out = sys.argv[1:4]
ids = torch.load(sys.argv[4])
if how == "ours":
    from tasks.quantize.registry import get_backend
    model = get_backend(sys.argv[5]).load(path)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
with torch.no_grad():
    torch.save(model(ids).logits.float(), out)
print("ok")
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_backend_registers_a_loadable_mlflow_model(case, word_llama, tmp_path):
    pytest.importorskip({"gptq": "gptqmodel", "awq": "llmcompressor", "bnb": "bitsandbytes"}.get(CASES[case][0], "hqq"))
    from tasks.quantize.registry import get_backend
    from tasks.registry.mlflow_model import build_mlflow_model, transformers_flavored

    backend, boosted, options, standard = CASES[case]
    params = word_llama["params"]
    bitmap = boosted_bitmap(params) if boosted else uniform_bitmap(params, Rung(4, 64))
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    get_backend(backend).quantize(word_llama["path"], bitmap, word_llama["calibration"], quantized, options)
    bitmap_path = tmp_path / "bitmap.json"
    bitmap.save(bitmap_path)
    variant = {"name": f"{backend}/{bitmap.method}/4.25", "backend": backend, "method": bitmap.method, "label": bitmap.method,
               "budget_label": "4.25", "bitmap": str(bitmap_path), "model_dir": str(quantized),
               "model": {"name": "word-llama", "revision": "sha256:test", "path": str(word_llama["path"])}}  # fmt: skip
    model_dir = build_mlflow_model(variant, {"ppl_wikitext2": 1.0, "nominal_bpp": bitmap.nominal_bpp}, "word-llama-quant", tmp_path / "mlflow" / "model")

    mlmodel = (model_dir / "MLmodel").read_text()
    assert "python_function" in mlmodel and ("transformers" in mlmodel) is transformers_flavored(quantized, backend)
    assert (model_dir / "README.md").read_text().startswith("# word-llama-quant")
    predicted = json.loads(fresh(
        "import json, sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "print(json.dumps(m.predict(['w5 w6 w7'], params={'max_new_tokens': 4})))", str(model_dir)))  # fmt: skip
    assert len(predicted) == 1 and isinstance(predicted[0], str), predicted

    checkpoint = next(p.parent for p in model_dir.rglob("bitmap.json"))
    ids_file = tmp_path / "ids.pt"
    torch.save(word_llama["ids"], ids_file)
    fresh(LOGITS, str(checkpoint), "ours", str(tmp_path / "ours.pt"), str(ids_file), backend)
    ours = torch.load(tmp_path / "ours.pt")
    if standard:
        if backend == "gptq":  # on CPU gptqmodel's auto-selected kernel fails on overrides: pick its torch kernel
            config = json.loads((checkpoint / "config.json").read_text())
            config["quantization_config"]["backend"] = "torch"
            (checkpoint / "config.json").write_text(json.dumps(config))
        fresh(LOGITS, str(checkpoint), "transformers", str(tmp_path / "theirs.pt"), str(ids_file))
        theirs = torch.load(tmp_path / "theirs.pt")
        diff = (ours - theirs).abs().max().item()
        quant_error = (ours - word_llama["reference"]).abs().max().item()
        print(f"{case}: transformers vs the pipeline's loader, max abs logit diff {diff:.4g} (quantization moved them {quant_error:.4g})")
        assert diff <= max(1e-4, 0.5 * quant_error), (diff, quant_error)
    else:
        probe = ("import sys\nfrom transformers import AutoModelForCausalLM\nimport torch\n"
                 "try:\n    m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n    m(torch.load(sys.argv[2]))\n    print('ran')\n"
                 "except Exception as exc:\n    print('refused')\n")  # fmt: skip
        assert fresh(probe, str(checkpoint), str(ids_file)) == "refused", f"{case}: transformers must not run it with wrong weights"
