"""Every registered version is an MLflow model: `mlflow.pyfunc.load_model("models:/<name>@champion")`
loads it in a fresh process and `.predict(["The capital of France is"])` returns generated text.

Where the backend's checkpoint is a standard transformers checkpoint (AWQ's compressed-tensors, bnb
without int8 modules) the model has the transformers flavor (a text-generation pipeline over that
checkpoint, plus pyfunc); otherwise (HQQ, GPTQ, bnb with int8 modules) a small pyfunc model that loads
the checkpoint with the backend's own loader (`tasks.quantize.<backend>`), with this project's code
under `code/`. GPTQ stays pyfunc although transformers reads uniform GPTQ checkpoints: its GPTQ
integration (optimum) drops per-module overrides (see its Capabilities.clients). Either way:

    MLmodel, requirements.txt      the flavor(s)
    README.md                      the model card: method, backend, bit map, bpp, perplexity, how to load
    artifacts/checkpoint/ (pyfunc) or model/ (transformers)   the checkpoint with the base model's
                                   tokenizer, bitmap.json, manifest.json (the stage's) and metrics.json
 Which clients load the bare checkpoint
directory without this project is each backend's Capabilities.clients (and the README's backend table); where no
standard loader can, the checkpoint's config.json names a quantization method transformers does not
know as its model type, so `AutoModelForCausalLM.from_pretrained` refuses it with an error instead of
silently returning random weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow.pyfunc

from tasks.quantize.base import HIDDEN_MODEL_TYPE
from tasks.quantize.registry import capabilities, get_backend, runtimes
from tasks.settings import REPO_ROOT

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")  # fmt: skip
EXAMPLE = ["The capital of France is"]
MAX_NEW_TOKENS = 32
# A checkpoint transformers would load wrongly (HQQ: random weights; GPTQ with per-module overrides: the
# overridden modules at the base precision, since transformers' GPTQ integration drops `dynamic`) names
# in config.json a model type transformers does not know, so that it refuses the directory; our loaders
# read the true one (tasks.quantize.base.HIDDEN_MODEL_TYPE).
FOREIGN_MODEL_TYPE = "quantpipe-checkpoint"


class QuantizedCausalLM(mlflow.pyfunc.PythonModel):
    """Prompts (a list of strings, or a one-column DataFrame) -> greedy continuations (strings)."""

    def load_context(self, context):
        self.checkpoint = Path(context.artifacts[CHECKPOINT])
        self.backend = get_backend(_backend_of(self.checkpoint))
        self.engine = self.backend.generator(self.checkpoint)  # the serving engine's own runtime, where it has one
        self._model = self.tokenizer = None

    @property
    def model(self):
        """The checkpoint as a torch causal LM (the backend's loader), loaded when first asked for: a model
        served by its engine needs it only for the reload check."""
        from tasks.model_io import load_tokenizer

        if self._model is None:
            self._model, self.tokenizer = self.backend.load(self.checkpoint), load_tokenizer(self.checkpoint)
        return self._model

    def predict(self, context, model_input, params=None):
        import torch

        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        if self.engine is not None:
            return [self.engine(prompt, max_new) for prompt in prompts]
        out = []
        with torch.inference_mode():
            model = self.model
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
                generated = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)  # fmt: skip
                out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "iloc"):  # a DataFrame (what a served model receives): its first column
        return [str(v) for v in model_input.iloc[:, 0].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def _backend_of(checkpoint: Path) -> str:
    return json.loads((checkpoint / "quantpipe.json").read_text())["backend"]


def stage_checkpoint(model_dir: Path, backend: str, base_model_path: Path, metrics: dict, out: Path, registered_name: str = "") -> Path:
    """The checkpoint as it is registered: the backend's files, the tokenizer, the metrics, and a
    config.json that a standard loader cannot mistake for a plain checkpoint where it cannot read it."""
    shutil.copytree(model_dir, out)
    for name in TOKENIZER_FILES:
        if (Path(base_model_path) / name).exists() and not (out / name).exists():
            shutil.copy2(Path(base_model_path) / name, out / name)
    (out / "quantpipe.json").write_text(json.dumps({"backend": backend, "loader": loader_line(backend, "<dir>")}, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    get_backend(backend).serving_files(out, registered_name)
    if transformers_misreads(out, backend):  # make transformers refuse (it ignores unknown quant methods)
        config = json.loads((out / "config.json").read_text())
        config[HIDDEN_MODEL_TYPE] = config["model_type"]
        config["model_type"] = FOREIGN_MODEL_TYPE
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def serving(backend: str) -> str:
    """The version's `serving` tag: how the backend's models are served, in a few words."""
    return capabilities(backend).serving


def transformers_misreads(checkpoint: Path, backend: str) -> bool:
    return get_backend(backend).transformers_misreads(checkpoint)


def loader_line(backend: str, path: str) -> str:
    return f"from tasks.quantize.registry import get_backend; model = get_backend({backend!r}).load({path!r})"


def model_card(variant: dict, metrics: dict, registered_name: str, checkpoint_dir: str) -> str:
    from tasks.bitmap import BitMap

    lines = [f"# {registered_name}: {variant['name']}", ""]
    lines += [f"Quantized from `{variant['model']['name']}` (revision `{variant['model']['revision']}`) by quantpipe.", ""]
    facts = [("method", f"{variant['method']} ({variant['label']})"), ("backend", variant["backend"]),
             ("budget", variant["budget_label"]), ("nominal bits per parameter", _fmt(metrics.get("nominal_bpp"))),
             ("extra memory over the budget rung", f"{_fmt(metrics.get('extra_pct'))} %"),
             ("WikiText-2 perplexity", _fmt(metrics.get("ppl_wikitext2"))), ("C4 perplexity", _fmt(metrics.get("ppl_c4"))),
             ("saved size", f"{(metrics.get('saved_bytes') or 0) / 2**20:.1f} MiB"),
             *((f"WikiText-2 perplexity in {name}'s own runtime", _fmt(metrics.get(f"{prefix}_ppl_wikitext2")))
               for prefix, name in runtimes() if metrics.get(f"{prefix}_ppl_wikitext2") is not None)]  # fmt: skip
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), ""]
    if variant.get("bitmap"):
        bitmap = BitMap.load(variant["bitmap"])
        counts: dict[str, int] = {}
        for rung in bitmap.modules.values():
            counts[rung.name] = counts.get(rung.name, 0) + 1
        summary = ", ".join(f"{n} modules at {r}" for r, n in sorted(counts.items()))
        lines += [f"Bit map: {summary} (`{checkpoint_dir}/bitmap.json`).", ""]
    lines += [
        "## Load it", "",
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{registered_name}/<version>")  # or @champion',
        'model.predict(["The capital of France is"])',
        "```", "",
        f"The checkpoint alone (`{checkpoint_dir}/`): {capabilities(variant['backend']).clients}.",
        f"With this project installed: `{loader_line(variant['backend'], checkpoint_dir)}`.", "",
        *get_backend(variant["backend"]).serving_card(checkpoint_dir, registered_name),
        "Perplexities: paper protocol (sliding window 1024, stride 512) on the evaluated tokens "
        f"({_fmt(metrics.get('eval_tokens_wikitext2'))} of WikiText-2, {_fmt(metrics.get('eval_tokens_c4'))} of C4).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def requirements(backend: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("torch", "transformers", "safetensors", "accelerate", *capabilities(backend).libraries):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def transformers_flavored(checkpoint: Path, backend: str) -> bool:
    """Whether the checkpoint is one transformers loads and runs as it is (see the module docstring)."""
    return get_backend(backend).transformers_runs(checkpoint)


def build_mlflow_model(variant: dict, metrics: dict, registered_name: str, out: Path) -> Path:
    """Write the MLflow model directory of a quantized variant into `out` (which must not exist)."""
    from mlflow.models import infer_signature

    staging = out.parent / CHECKPOINT  # its name is the artifact's directory in the model
    shutil.rmtree(staging, ignore_errors=True)
    checkpoint_dir = f"artifacts/{CHECKPOINT}"
    signature = infer_signature(EXAMPLE, ["Paris."], params={"max_new_tokens": MAX_NEW_TOKENS})
    metadata = {"backend": variant["backend"], "method": variant["method"], "variant": variant["name"]}
    try:
        checkpoint = stage_checkpoint(Path(variant["model_dir"]), variant["backend"], Path(variant["model"]["path"]), metrics, staging,
                                      registered_name)  # fmt: skip
        if transformers_flavored(checkpoint, variant["backend"]):
            from mlflow import transformers as mlflow_transformers

            checkpoint_dir = "model"  # where the transformers flavor keeps the checkpoint's files
            mlflow_transformers.save_model(
                transformers_model=str(checkpoint), path=str(out), task="text-generation", signature=signature,
                input_example=EXAMPLE, pip_requirements=requirements(variant["backend"]), metadata=metadata,
            )  # fmt: skip
        else:
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=QuantizedCausalLM(),
                artifacts={CHECKPOINT: str(checkpoint)},
                code_paths=[str(REPO_ROOT / "tasks")],
                signature=signature,
                input_example=EXAMPLE,
                pip_requirements=requirements(variant["backend"]),
                metadata=metadata,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (out / "README.md").write_text(model_card(variant, metrics, registered_name, checkpoint_dir))
    return out
