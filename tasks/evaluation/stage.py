"""Evaluation stage: load a (quantized) model from disk and measure it; results are cached by inputs.

Default evaluation is a fixed, documented prefix of each stream (`eval_tokens` tokens of WikiText-2 test
and of the first 1100 C4 validation documents); `eval_tokens=0` evaluates the full streams.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import StageOutput, ensure_local, file_sha256, read_json, write_json_atomic
from tasks.calibration import EVAL_SETS, Calibration, load_ids, window_bos
from tasks.contracts import Contract
from tasks.errors import PipelineError
from tasks.evaluation.memory import PeakRSS, directory_bytes
from tasks.evaluation.perplexity import PROTOCOLS, model_forward, score_stream, scored_prefix
from tasks.evaluation.reference import TAIL, TOP_K, Reference
from tasks.evaluation.stats import block_se, paired_difference, ppl_with_se
from tasks.model_io import ResolvedModel
from tasks.quantize.registry import UNQUANTIZED, get_backend
from tasks.quantize.stage import QuantizedModel

log = logging.getLogger(__name__)

FORMAT = 2  # of the evaluation output: 2 added standard errors, KLD and per-token values
TOKENS_FILE = "tokens.safetensors"
RELOAD_TOKENS = 2048  # WikiText-2 tokens the reload check of a registered version re-evaluates


@dataclass(frozen=True)
class EvalParams(Contract):
    """The evaluation's settings (its cache key holds them)."""

    eval_tokens: int = 16384  # per stream; 0 = the full stream
    protocols: tuple[str, ...] = ("paper",)
    datasets: tuple[str, ...] = EVAL_SETS
    lm_eval_tasks: tuple[str, ...] = ()  # downstream tasks through lm-eval (data/lm_eval/ or lm-eval's registry)
    lm_eval_limit: int | None = None  # documents per task, for quick runs
    own_pass: bool = True  # False: only the backend's serving runtime scores the windows (benchmarks judged by it)

    @property
    def reload_protocol(self) -> str:
        """The protocol of the perplexity the reload check of a registered version reproduces."""
        return "paper" if "paper" in self.protocols else self.protocols[0]


@dataclass(frozen=True)
class EvaluationParams(Contract):
    model: ResolvedModel  # the base model: its tokenizer, and the reference of KLD and top-1
    backend: str
    quantized: QuantizedModel
    calibration: Calibration
    settings: EvalParams


@dataclass(frozen=True)
class Evaluation(Contract):
    uri: str  # the stage output, with every scored token's values (paired comparisons)
    metrics: dict
    protocol: str  # of the reload check's perplexity (reload_ppl over reload_tokens)


def run(ctx, params: EvaluationParams) -> Evaluation:
    base = params.model.local(ctx.settings.cache_dir)
    model_dir = base if params.backend == UNQUANTIZED else params.quantized.uri
    metrics, uri = run_evaluation(model_dir, params.backend, params.calibration.uri, params.settings, ctx.settings.artifact_root,
                                  params.quantized.key, tokenizer_dir=base, device=ctx.device, base_dir=base,
                                  base_key=params.model.revision)  # fmt: skip
    return Evaluation(uri, metrics, params.settings.reload_protocol)


def key_params(params: EvalParams) -> dict:
    """The settings as the evaluation's cache key holds them: own_pass only when off, so the keys of
    evaluations with both passes stay as they were before it existed."""
    return {k: v for k, v in asdict(params).items() if k != "own_pass" or not v}


def suffix(dataset: str, protocol: str) -> str:
    """wikitext2 / c4 for the paper protocol, <set>_gptq for the GPTQ protocol."""
    return dataset if protocol == "paper" else f"{dataset}_{protocol}"


def metric_name(dataset: str, protocol: str) -> str:
    """ppl_wikitext2 / ppl_c4 for the paper protocol, ppl_<set>_gptq for the GPTQ protocol."""
    return f"ppl_{suffix(dataset, protocol)}"


def load_for_eval(model_dir: str | Path, backend: str, device: str = "cpu"):
    if backend == UNQUANTIZED:
        from tasks.model_io import load_model

        return load_model(model_dir).to(device)

    return get_backend(backend).load(Path(model_dir), device=device)


def eval_streams(calibration_dir: Path, params: EvalParams) -> dict[str, torch.Tensor]:
    """The evaluated prefix of each evaluation stream."""
    streams = {}
    for dataset in params.datasets:
        ids = load_ids(calibration_dir / f"{dataset}.safetensors").reshape(-1)
        streams[dataset] = ids[: params.eval_tokens] if params.eval_tokens else ids
    return streams


def check_window_fits(params: EvalParams, available: dict[str, int] | None = None) -> None:
    """eval_tokens must give every protocol at least one window (GPTQ's is 2048 tokens)."""
    for proto in params.protocols:
        need = PROTOCOLS[proto].max_length if proto == "gptq" else 2
        for dataset in params.datasets:
            have = params.eval_tokens or (available or {}).get(dataset)
            if available is not None and params.eval_tokens:
                have = min(have, available.get(dataset, have))
            if have is not None and have < need:
                raise PipelineError(f"eval_tokens {have} is too few for one {proto} window of {need} tokens ({dataset})")


def evaluate_model(model, streams: dict[str, torch.Tensor], params: EvalParams, device: str = "cpu", reference: Reference | None = None,
                   capture: Reference | None = None, bos: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics and per-token arrays (nll/kld/top1 per set and protocol). With `reference` (the base
    model's), KLD, top-1 agreement and the NLL increase are measured too; `capture` receives this model's
    own top-k (when this model is the base). `bos`: the token each window starts with (window_bos)."""
    metrics, tokens, fed, seconds = {}, {}, 0, 0.0
    forward = model_forward(model, bos)
    for dataset, ids in streams.items():
        ids = ids.to(device)
        for proto in params.protocols:
            s = suffix(dataset, proto)
            ref = reference.dist(dataset, proto) if reference is not None else None
            result = score_stream(forward, ids, PROTOCOLS[proto], reference=ref, capture_top_k=TOP_K if capture is not None else 0,
                                  capture_tail=TAIL if capture is not None else 0)  # fmt: skip
            if capture is not None:
                capture.add(dataset, proto, result.captured, result.nll)
            ppl, ppl_se = ppl_with_se(result.nll)
            metrics[f"ppl_{s}"], metrics[f"ppl_{s}_se"] = ppl, ppl_se
            tokens[f"nll/{s}"] = result.nll
            if result.kld is not None:
                base_nll = reference.nll(dataset, proto)
                metrics[f"kld_{s}"] = float(result.kld.mean())
                metrics[f"kld_{s}_se"] = block_se(result.kld)
                metrics[f"kld99_{s}"] = float(np.percentile(result.kld, 99))
                metrics[f"top1_{s}"] = float(result.top1.mean())
                metrics[f"dnll_{s}"], metrics[f"dnll_{s}_se"] = paired_difference(result.nll, base_nll)
                tokens[f"kld/{s}"], tokens[f"top1/{s}"] = result.kld, result.top1
            fed += result.tokens_forwarded
            seconds += result.seconds
            log.info("%s %s protocol: ppl %.3f +- %.3f%s over %d tokens (%.0f tok/s)", dataset, proto, ppl, ppl_se,
                     f", KLD {metrics[f'kld_{s}']:.4f}" if result.kld is not None else "", result.tokens_scored, result.tokens_per_s)  # fmt: skip
        metrics[f"eval_tokens_{dataset}"] = int(ids.numel())
    metrics["tokens_per_s"] = fed / seconds if seconds else float("nan")
    return metrics, tokens


def run_evaluation(
    model_dir: str | Path,
    backend: str,
    calibration_dir: str | Path,
    params: EvalParams,
    artifact_root: str | Path,
    model_key: str,
    tokenizer_dir: str | Path | None = None,
    device: str = "cpu",
    base_dir: str | Path | None = None,
    base_key: str | None = None,
) -> tuple[dict, str]:
    """(metrics, the stage output's location). Metrics: perplexities with standard errors, and with the
    base model (`base_dir`, keyed `base_key`; the evaluated model itself for backend 'none') KLD, its
    99th percentile, top-1 agreement and the NLL increase; saved_bytes, peak_mem_bytes, tokens_per_s,
    load_seconds. The output also holds every scored token's values (tokens.safetensors) for paired
    comparisons. The model runs on `device` (cpu, cuda, cuda:N)."""
    unknown = [p for p in params.protocols if p not in PROTOCOLS]
    if unknown:
        raise PipelineError(f"unknown evaluation protocol(s) {unknown}: one of {', '.join(PROTOCOLS)}")
    if params.eval_tokens < 0:
        raise PipelineError(f"eval_tokens must be >= 0 (0 = full set), got {params.eval_tokens}")
    check_window_fits(params)
    if not params.own_pass and backend != UNQUANTIZED:
        from tasks.quantize.registry import capabilities

        if capabilities(backend).runtime is None:
            raise PipelineError(f"own_pass=False scores only in a serving runtime: backend {backend!r} has none")
        if params.lm_eval_tasks:
            raise PipelineError("own_pass=False cannot run lm-eval tasks (they need this project's own model)")
    calibration_dir = ensure_local(calibration_dir)
    model_dir = ensure_local(model_dir)
    if backend == UNQUANTIZED:
        base_dir, base_key = model_dir, model_key
    reference_out = None
    if base_dir is not None:
        reference_out = StageOutput(artifact_root, "reference", reference_inputs(base_key, calibration_dir, params))
    inputs = {
        "model": model_key,
        "backend": backend,
        "params": key_params(params),
        "tokens": {d: file_sha256(calibration_dir / f"{d}.safetensors") for d in params.datasets},
        "reference": reference_out and reference_out.key,
        "format": FORMAT,
        **({"bos": bos} if (bos := window_bos(calibration_dir)) is not None else {}),  # keys of models without stay as they were
        **({"device": device} if device != "cpu" else {}),  # speed and memory differ; CPU keys stay as they were
    }
    out = StageOutput(artifact_root, "evaluation", inputs)
    with out.exclusive():
        if out.is_complete():
            log.info("evaluate %s: cache hit %s", model_key, out.uri)
            return read_json(out.path / "metrics.json"), str(out.path)
        return _measure(out, model_dir, backend, calibration_dir, params, tokenizer_dir, device, base_dir, reference_out), str(out.path)


def _measure(out: StageOutput, model_dir: Path, backend: str, calibration_dir: Path, params: EvalParams, tokenizer_dir,
             device: str, base_dir, reference_out: StageOutput | None) -> dict:  # fmt: skip
    streams, bos = eval_streams(calibration_dir, params), window_bos(calibration_dir)
    reference = capture = None
    if reference_out is not None:
        with reference_out.exclusive():
            if reference_out.is_complete():
                reference = Reference.load(reference_out.path)
            elif backend == UNQUANTIZED:
                capture = Reference({})  # the base model's own pass is the reference: one forward, not two
            else:
                reference = build_reference(base_dir, reference_out, streams, params, device, bos)
    with PeakRSS() as memory:
        model, load_seconds, metrics, tokens = None, math.nan, {}, {}
        if params.own_pass or backend == UNQUANTIZED:  # the base model's own pass is the reference
            started = time.perf_counter()
            model = load_for_eval(model_dir, backend, device)
            load_seconds = time.perf_counter() - started
            metrics, tokens = evaluate_model(model, streams, params, device, reference, capture, bos)
    if capture is not None:
        with reference_out.build() as tmp:
            capture.save(tmp)
        reference = capture
        metrics, tokens = _against_self(metrics, tokens, params)
    metrics.update(reload_metrics(tokens, params))
    if backend != UNQUANTIZED:
        engine, engine_tokens = runtime_metrics(model_dir, backend, streams, params, reference, metrics, bos)
        metrics.update(engine)
        tokens.update(engine_tokens)
    if params.lm_eval_tasks:
        from tasks.evaluation.downstream import metric_names, run_downstream
        from tasks.model_io import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        metrics.update(metric_names(run_downstream(model, tokenizer, params.lm_eval_tasks, limit=params.lm_eval_limit)))
    metrics.update(
        saved_bytes=directory_bytes(model_dir) if backend == UNQUANTIZED else get_backend(backend).saved_bytes(model_dir),
        peak_mem_bytes=memory.delta_bytes,
        load_seconds=load_seconds,
    )
    del model
    with out.build() as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        save_tokens(tokens, tmp / TOKENS_FILE)
    return metrics


def runtime_metrics(model_dir: Path, backend: str, streams: dict, params: EvalParams, reference: Reference | None,
                    ours: dict, bos: int | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The same windows and tokens scored in the backend's serving engine (Capabilities.runtime, e.g.
    llama.cpp's own kernels): its metrics under the engine's prefix, with per perplexity how far the two
    evaluators are apart in units of ours's standard error (`<prefix>_ppl_gap_se_<set>`: under 1 agrees),
    and its per-token values (`<prefix>:kld/wikitext2`, ...) for paired comparisons."""
    from tasks.quantize.registry import capabilities

    runtime = capabilities(backend).runtime
    if runtime is None:
        return {}, {}
    prefix, name = runtime
    log.info("evaluate: the same windows in %s's own runtime", name)
    model = get_backend(backend).runtime(model_dir, max(PROTOCOLS[p].max_length for p in params.protocols))
    try:
        metrics, tokens = evaluate_model(model, streams, params, "cpu", reference, bos=bos)
    finally:
        model.close()
    out = {f"{prefix}_{k}": v for k, v in metrics.items() if not k.startswith("eval_tokens")}
    for key, value in metrics.items():
        if key.startswith("ppl_") and not key.endswith("_se") and ours.get(f"{key}_se"):
            out[f"{prefix}_ppl_gap_se_{key[4:]}"] = abs(value - ours[key]) / ours[f"{key}_se"]
    return out, {f"{prefix}:{k}": v for k, v in tokens.items()}


def reference_inputs(base_key: str | None, calibration_dir: Path, params: EvalParams) -> dict:
    bos = window_bos(calibration_dir)
    return {
        **({"bos": bos} if bos is not None else {}),
        "model": base_key,
        "tokens": {d: file_sha256(calibration_dir / f"{d}.safetensors") for d in params.datasets},
        "eval_tokens": params.eval_tokens,
        "protocols": list(params.protocols),
        "top_k": TOP_K,
        "tail": TAIL,
    }


def build_reference(base_dir: str | Path, out: StageOutput, streams: dict, params: EvalParams, device: str, bos: int | None = None) -> Reference:
    """The base model's pass over the evaluation windows, cached (before a quantized variant's own
    evaluation, so its memory is not counted as the variant's)."""
    log.info("evaluate: computing the base model's reference distributions (once per model and evaluation set)")
    model = load_for_eval(ensure_local(base_dir), UNQUANTIZED, device)
    capture = Reference({})
    evaluate_model(model, streams, params, device, capture=capture, bos=bos)
    del model
    with out.build() as tmp:
        capture.save(tmp)
    return capture


def _against_self(metrics: dict, tokens: dict, params: EvalParams) -> tuple[dict, dict]:
    """The base model measured against its own reference: zero divergence, full agreement, by definition."""
    for dataset in params.datasets:
        for proto in params.protocols:
            s = suffix(dataset, proto)
            n = tokens[f"nll/{s}"].size
            metrics.update({f"kld_{s}": 0.0, f"kld_{s}_se": 0.0, f"kld99_{s}": 0.0, f"top1_{s}": 1.0, f"dnll_{s}": 0.0, f"dnll_{s}_se": 0.0})
            tokens[f"kld/{s}"], tokens[f"top1/{s}"] = np.zeros(n), np.ones(n, dtype=bool)
    return metrics, tokens


def reload_metrics(tokens: dict, params: EvalParams) -> dict:
    """The WikiText-2 perplexity of the first RELOAD_TOKENS tokens (a prefix of the evaluation, same
    windows), which the reload check of a registered version reproduces at a fraction of the cost."""
    proto = params.reload_protocol
    nll = tokens.get(f"nll/{suffix('wikitext2', proto)}")
    if nll is None:
        return {}
    check = min(RELOAD_TOKENS, params.eval_tokens or RELOAD_TOKENS)
    n = scored_prefix(check, PROTOCOLS[proto])
    if n == 0 or n > nll.size:
        return {}
    return {"reload_ppl": math.exp(float(nll[:n].mean())), "reload_tokens": check}


def save_tokens(tokens: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool else v) for k, v in tokens.items()}, str(path))


def load_tokens(evaluation_dir: str | Path) -> dict[str, np.ndarray]:
    """Per-token values of an evaluation output: nll/<s>, kld/<s>, top1/<s> (s as in `suffix`)."""
    from safetensors.numpy import load_file

    path = ensure_local(evaluation_dir) / TOKENS_FILE
    if not path.is_file():
        raise PipelineError(f"evaluation output {evaluation_dir} has no {TOKENS_FILE}: cannot compare variants token by token")
    return load_file(str(path))
