"""Downstream task scores with lm-eval (EleutherAI lm-evaluation-harness 0.4.x) on any variant.

The model is evaluated in memory: `lm_eval.simple_evaluate` with an `HFLM` wrapping the already-loaded
(quantized) model and its tokenizer, so every backend's reloaded model is scored exactly as evaluated
for perplexity. Tasks are named: lm-eval's own (hellaswag, arc_easy, ...; they download their data
from the hub, so need a network) or local ones from a directory of task YAMLs, by default the offline
task shipped in data/lm_eval/ (`quant_facts`). Results are {task: {metric: value}}; `metric_names`
flattens them to the MLflow names `lmeval_<task>_<metric>` (mlflow/CONVENTIONS.md).

lm-eval is optional: it is imported only here, and a missing install is a one-line PipelineError.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tasks.errors import PipelineError
from tasks.settings import REPO_ROOT

log = logging.getLogger(__name__)

TASK_DIR = REPO_ROOT / "data" / "lm_eval"
DEFAULT_TASKS = ("quant_facts",)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PipelineError(f"lm-eval is not installed in this environment ({exc.name or exc}): pip install lm-eval==0.4.13") from None
    return lm_eval, HFLM, TaskManager


def resolve_task_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy a directory of task YAMLs, making relative `dataset_kwargs.data_files` absolute.

    The `datasets` library resolves data files against the working directory; a task shipped with its
    JSONL beside it must work from anywhere. YAMLs that PyYAML cannot read (lm-eval's `!function` tags)
    and other files are copied unchanged.
    """
    import yaml

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise PipelineError(f"lm-eval task directory not found: {src}")
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in (".yaml", ".yml"):
            shutil.copyfile(path, target)
            continue
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            shutil.copyfile(path, target)
            continue
        files = (config or {}).get("dataset_kwargs", {}).get("data_files") if isinstance(config, dict) else None
        if files is None:
            shutil.copyfile(path, target)
            continue
        config["dataset_kwargs"]["data_files"] = _absolute(files, path.parent)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


def _absolute(files, base: Path):
    """data_files may be a path, a list of paths, or {split: path(s)}; URLs and absolute paths stay."""
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    text = str(files)
    if "://" in text or Path(text).is_absolute():
        return text
    path = (base / text).resolve()
    if not path.exists():
        raise PipelineError(f"lm-eval task data file not found: {path}")
    return str(path)


def clean_metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.06, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.06}.

    A metric under a non-default filter keeps the filter: "exact_match,strict-match" -> "exact_match_strict-match".
    """
    found = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else f"{metric}_{filt}"
        found[name] = float(value)
    return found


def metric_names(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"lmeval_<task>_<metric>": v}, names safe for MLflow, NaN dropped."""
    flat = {}
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if value is None or not math.isfinite(value):
                continue
            flat[re.sub(r"[^A-Za-z0-9_./ -]", "_", f"lmeval_{task}_{metric}")] = value
    return flat


def run_downstream(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    task_dir: str | Path | None = TASK_DIR,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Score an in-memory causal LM on lm-eval tasks; return {task: {metric: value}}.

    model: a transformers PreTrainedModel (quantized or not), eval mode, on its device.
    tasks: lm-eval task or group names; local tasks are looked up in `task_dir` (None: lm-eval's only).
    limit: at most this many documents per task (a float < 1 is a fraction), for quick runs.
    """
    lm_eval, HFLM, _ = _require_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise PipelineError("no lm-eval task given")
    with tempfile.TemporaryDirectory(prefix="lmeval-tasks-") as tmp:
        manager = task_manager(tasks, task_dir, Path(tmp))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)
        log.info("lm-eval: %s (limit %s)", ", ".join(tasks), limit)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,  # means get the closed-form stderr; only medians, F1, BLEU... are resampled
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if not out or "results" not in out:
        raise PipelineError("lm-eval returned no results")
    return {task: clean_metrics(res) for task, res in out["results"].items()}


def task_manager(tasks: Sequence[str], task_dir: str | Path | None, tmp: Path):
    """lm-eval's TaskManager knowing `tasks` (local ones copied under `tmp`), or a one-line error naming
    the tasks that are neither local nor in lm-eval's registry."""
    _, _, TaskManager = _require_lm_eval()
    include = str(resolve_task_dir(task_dir, tmp / "tasks")) if task_dir else None
    # Indexing lm-eval's thousands of built-in YAMLs takes seconds: only when a task is not local.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {task_dir}" if task_dir else ""
        raise PipelineError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's registry{where}")
    return manager


def check_tasks(tasks: Sequence[str], task_dir: str | Path | None = TASK_DIR) -> None:
    """Pre-flight: every task resolves (nothing is downloaded or run)."""
    with tempfile.TemporaryDirectory(prefix="lmeval-tasks-") as tmp:
        task_manager(tasks, task_dir, Path(tmp))


def load_variant(model_dir: str | Path, backend: str = "none"):
    """The model of a variant as the evaluation stage loads it: plain checkpoint or a backend's reload."""
    from tasks.model_io import load_model

    if backend in ("none", "", None):
        return load_model(model_dir)
    from tasks.quantize.registry import get_backend

    return get_backend(backend).load(Path(model_dir))
