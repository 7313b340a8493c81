"""Evaluation stage: load a (quantized) model from disk and measure it; results are cached by inputs.

Default evaluation is a fixed, documented prefix of each stream (`eval_tokens` tokens of WikiText-2 test
and of the first 1100 C4 validation documents); `eval_tokens=0` evaluates the full streams.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.artifacts import StageOutput, ensure_local, file_sha256, read_json, write_json_atomic
from tasks.calibration import EVAL_SETS, load_ids
from tasks.errors import PipelineError
from tasks.evaluation.memory import PeakRSS, directory_bytes
from tasks.evaluation.perplexity import PROTOCOLS, perplexity

log = logging.getLogger(__name__)

UNQUANTIZED = "none"  # backend name of the full-precision baseline


@dataclass(frozen=True)
class EvalParams:
    eval_tokens: int = 2048  # per stream; 0 = the full stream
    protocols: tuple[str, ...] = ("paper", "gptq")
    datasets: tuple[str, ...] = EVAL_SETS
    lm_eval_tasks: tuple[str, ...] = ()  # downstream tasks through lm-eval (data/lm_eval/ or lm-eval's registry)
    lm_eval_limit: int | None = None  # documents per task, for quick runs


def metric_name(dataset: str, protocol: str) -> str:
    """ppl_wikitext2 / ppl_c4 for the paper protocol, ppl_<set>_gptq for the GPTQ protocol."""
    return f"ppl_{dataset}" if protocol == "paper" else f"ppl_{dataset}_{protocol}"


def load_for_eval(model_dir: str | Path, backend: str, device: str = "cpu"):
    if backend == UNQUANTIZED:
        from tasks.model_io import load_model

        return load_model(model_dir).to(device)
    from tasks.quantize.registry import get_backend

    return get_backend(backend).load(Path(model_dir), device=device)


def evaluate_model(model, streams: dict[str, torch.Tensor], params: EvalParams, device: str = "cpu") -> dict:
    metrics, fed, seconds = {}, 0, 0.0
    forward = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
    for dataset in params.datasets:
        ids = streams[dataset].reshape(-1).to(device)
        if params.eval_tokens:
            ids = ids[: params.eval_tokens]
        for proto in params.protocols:
            result = perplexity(forward, ids, PROTOCOLS[proto])
            metrics[metric_name(dataset, proto)] = result.ppl
            fed += result.tokens_forwarded
            seconds += result.seconds
            log.info("%s %s protocol: ppl %.3f over %d tokens (%.0f tok/s)", dataset, proto, result.ppl, result.tokens_scored, result.tokens_per_s)
        metrics[f"eval_tokens_{dataset}"] = int(ids.numel())
    metrics["tokens_per_s"] = fed / seconds if seconds else float("nan")
    return metrics


def run_evaluation(
    model_dir: str | Path,
    backend: str,
    calibration_dir: str | Path,
    params: EvalParams,
    artifact_root: str | Path,
    model_key: str,
    tokenizer_dir: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Metrics dict: perplexities, saved_bytes, peak_mem_bytes, tokens_per_s, load_seconds. The model
    runs on `device` (cpu, cuda, cuda:N)."""
    unknown = [p for p in params.protocols if p not in PROTOCOLS]
    if unknown:
        raise PipelineError(f"unknown evaluation protocol(s) {unknown}: one of {', '.join(PROTOCOLS)}")
    if params.eval_tokens < 0:
        raise PipelineError(f"eval_tokens must be >= 0 (0 = full set), got {params.eval_tokens}")
    calibration_dir = ensure_local(calibration_dir)
    model_dir = ensure_local(model_dir)
    token_files = {d: calibration_dir / f"{d}.safetensors" for d in params.datasets}
    inputs = {
        "model": model_key,
        "backend": backend,
        "params": asdict(params),
        "tokens": {d: file_sha256(p) for d, p in token_files.items()},
        **({"device": device} if device != "cpu" else {}),  # speed and memory differ; CPU keys stay as they were
    }
    out = StageOutput(artifact_root, "evaluation", inputs)
    if out.is_complete():
        log.info("evaluate %s: cache hit %s", model_key, out.uri)
        return read_json(out.path / "metrics.json")
    streams = {d: load_ids(p) for d, p in token_files.items()}
    with PeakRSS() as memory:
        started = time.perf_counter()
        model = load_for_eval(model_dir, backend, device)
        load_seconds = time.perf_counter() - started
        metrics = evaluate_model(model, streams, params, device)
    if params.lm_eval_tasks:
        from tasks.evaluation.downstream import metric_names, run_downstream
        from tasks.model_io import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        metrics.update(metric_names(run_downstream(model, tokenizer, params.lm_eval_tasks, limit=params.lm_eval_limit)))
    metrics.update(
        saved_bytes=directory_bytes(model_dir),
        peak_mem_bytes=memory.delta_bytes,
        load_seconds=load_seconds,
    )
    del model
    with out.build() as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
    return metrics
