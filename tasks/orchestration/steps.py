"""The pipeline's steps: plain functions over a StepContext and small JSON-able manifests. Each calls
one stage; which step feeds which, where it runs and whether it is mapped over the variants is the step
table's business (tasks/orchestration/step_table.py), not theirs.

    prepare (model + calibration + parent run) -> profile -> allocate (every variant's bit map)
    -> quantize (per variant) -> evaluate (per variant) -> record (MLflow run + version per variant)
    -> verify (per variant: the version reloads in a fresh process and reproduces its perplexity)
    -> finish (promote, reports, parent run closed, completion marker)
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import TypedDict

from tasks.artifacts import StageOutput, ensure_local, file_sha256, stable_hash, write_json_atomic
from tasks.errors import PipelineError
from tasks.failpoints import failpoint
from tasks.orchestration.config import PipelineConfig, calibration_params
from tasks.orchestration.context import StepContext
from tasks.orchestration.planner import BASELINE_METHOD, allocate_variants, plan_variants, rung_errors, variant_name

log = logging.getLogger(__name__)

NOTE_LIMIT = 7500  # characters of a run's description (a tag: MLflow stores up to 8,000)
# The evaluation's quality metrics, with their standard errors, that the results table and JSON carry.
QUALITY_PREFIXES = ("ppl_", "kld_", "kld99_", "top1_", "dnll_", "lmeval_")


class Prepared(TypedDict):
    """prepare's manifest: the validated config, the resolved model, the token sets, the parent run."""

    config: dict
    model: dict  # ResolvedModel.to_json(): name, path, revision, source
    calibration: str  # the calibration stage's output directory (local path or s3:// URI)
    parent_run_id: str


class Variant(TypedDict, total=False):
    """One variant, as allocate plans it; quantize, evaluate and record each return it with more keys."""

    name: str  # backend/label/budget: the one name in MLflow, tables and plots
    backend: str
    method: str
    label: str
    budget_label: str
    budget: float | None
    options: dict
    bitmap: str | None
    nominal_bpp: float
    extra_pct: float
    predicted_dnll: float | None  # the Fisher estimate of the loss increase (nats/token), when profiled
    model: dict
    calibration: str
    parent_run_id: str
    scores: str | None
    eval: dict
    model_hash: str  # the quantized weights (one registered version each)
    config_hash: str  # weights + calibration + evaluation settings (one MLflow run each)
    model_dir: str  # quantize
    model_key: str
    metrics: dict  # evaluate
    evaluation: str  # the evaluation's stage output (per-token values for paired comparisons)
    run_id: str  # record
    reused_run: bool
    version: str | None
    started_ms: int  # quantize: when the variant's work began (its MLflow run's start)
    model_id: str | None  # record: the run's MLflow logged model
    load_check: str  # verify: "passed" or "failed"
    load_check_detail: str


def prepare(ctx: StepContext, config: dict) -> Prepared:
    """Resolve the model, tokenize calibration/evaluation sets and open the MLflow parent run."""
    from tasks.calibration import run_calibration
    from tasks.model_io import resolve_model
    from tasks.registry.tracking import start_pipeline_run

    cfg = PipelineConfig.from_dict(config)
    model = resolve_model(cfg.model, cfg.revision, ctx.settings.cache_dir)
    calibration = run_calibration(model.path, calibration_params(cfg), ctx.settings.artifact_root, model.revision)
    parent = start_pipeline_run(
        ctx.settings.tracking_uri, model.name, model.revision, cfg.to_dict(), str(ctx.settings.mlflow_artifacts), tags=ctx.run_tags
    )
    return {"config": cfg.to_dict(), "model": model.to_json(), "calibration": calibration, "parent_run_id": parent}


def local_model(ctx: StepContext, model: dict) -> str:
    """The model's checkpoint directory on this machine. A step in a fresh pod lacks the one prepare
    resolved (its cache is empty): it resolves the same source again into its own cache, and refuses a
    checkpoint that is not the revision the run started with."""
    if Path(model["path"]).is_dir():
        return model["path"]
    from tasks.model_io import resolve_model

    resolved = resolve_model(model["source"], model["revision"], ctx.settings.cache_dir)  # (only a hub id uses the revision)
    if resolved.revision != model["revision"]:
        raise PipelineError(f"model {model['source']} is now revision {resolved.revision}, but this run started on {model['revision']}")
    return str(resolved.path)


def profile(ctx: StepContext, prep: Prepared) -> str | None:
    """The scores table (cached by model and calibration); None when only uniform variants run."""
    cfg = PipelineConfig.from_dict(prep["config"])
    if not cfg.scored_methods:
        return None
    from tasks.profiling import SCORES_FORMAT, run_profiling
    from tasks.profiling.dkld import DEFAULT_WINDOWS as DKLD_WINDOWS
    from tasks.profiling.driver import SUMMARY_FILE as PROFILE_SUMMARY
    from tasks.quantize.registry import own_error_names
    from tasks.registry.tracking import client_for, log_profile_run

    calib = ensure_local(prep["calibration"]) / "calibration.safetensors"
    base = {"model": prep["model"]["revision"], "calibration": file_sha256(calib), "fisher_samples": cfg.gradient_windows, "format": SCORES_FORMAT}
    own_errors = cfg.profiled_errors and _measurable(cfg.profiled_errors, local_model(ctx, prep["model"]))
    extras = [({"rival_scores": True}, cfg.rival_scores), ({"dkld_windows": DKLD_WINDOWS}, cfg.dkld),
              *(({f"{name}_errors": True}, name in own_errors) for name in own_error_names())]  # e.g. {"gptq_errors": True}
    key = {**base, **{k: v for extra, wanted in extras for k, v in extra.items() if wanted}}
    out = StageOutput(ctx.settings.artifact_root, "profiling", key)
    # A finished profile with more columns than this run needs (the opt-in rival measurements) serves as is.
    if not out.is_complete():
        unwanted = [extra for extra, wanted in extras if not wanted]
        combos = (c for n in range(1, len(unwanted) + 1) for c in itertools.combinations(unwanted, n))
        richer = (StageOutput(ctx.settings.artifact_root, "profiling", {**key, **{k: v for e in c for k, v in e.items()}}) for c in combos)
        found = next((r for r in richer if r.is_complete()), None)
        if found is not None:
            log.info("profiling: reusing %s, which also holds opt-in scores this run does not need", found.uri)
            out = found
    with out.exclusive():  # concurrent runs on one model: one profiles, the others wait for its scores
        if not out.is_complete():
            with out.build(resume=True) as tmp:  # a killed attempt's per-layer progress is picked up
                if (tmp / PROFILE_SUMMARY).exists():  # written last: that attempt died after its scores
                    log.info("profiling: the interrupted attempt had finished its scores; %s", tmp)
                else:
                    run_profiling(local_model(ctx, prep["model"]), calib, tmp, fisher_samples=cfg.gradient_windows,
                                  device=ctx.device, rival_scores=cfg.rival_scores, dkld_windows=DKLD_WINDOWS if cfg.dkld else 0,
                                  **{f"{name}_errors": True for name in own_errors})  # fmt: skip
        else:
            log.info("profiling: cache hit %s", out.uri)
        # One MLflow run per profile, which every pipeline run that uses it links to.
        profile_run = log_profile_run(ctx.settings.tracking_uri, prep["model"]["name"], prep["model"]["revision"],
                                      ensure_local(out.path), out.key, str(ctx.settings.mlflow_artifacts))  # fmt: skip
    client_for(ctx.settings.tracking_uri).set_tag(prep["parent_run_id"], "profile_run_id", profile_run)
    return str(out.path / "scores.csv")


def _measurable(profiled_errors: tuple[str, ...], model_path: str) -> tuple[str, ...]:
    """The own rung errors worth profiling for this model: those of a backend that quantizes its family."""
    from tasks.families import layout_for
    from tasks.model_io import read_config
    from tasks.quantize.registry import BACKENDS, get_backend

    family = layout_for(read_config(model_path)).model_type
    out = []
    for name in profiled_errors:
        owners = [b for b in map(get_backend, BACKENDS) if b.capabilities.own_errors and b.capabilities.own_errors.name == name]
        refusals = [r for r in (b.family_refusal(family) for b in owners) if r]
        if len(refusals) == len(owners):
            log.info("profiling: no %s rung errors: %s", name, "; ".join(refusals))
        else:
            out.append(name)
    return tuple(out)


def allocate(ctx: StepContext, prep: Prepared, scores: str | None) -> list[Variant]:
    """Every variant's bit map (one stage output), crossed with the backends that can express it;
    the baseline first."""
    from tasks.families import layout_for
    from tasks.model_io import linear_param_counts, read_config
    from tasks.quantize.registry import get_backend, own_error_names

    cfg = PipelineConfig.from_dict(prep["config"])
    model = prep["model"]
    table = None
    if scores:
        from tasks.allocation import read_scores

        table = read_scores(ensure_local(scores))
    from tasks.allocation.optimal import predicted_loss_increase

    model_config = read_config(local_model(ctx, model))
    layout = layout_for(model_config)
    # whose own rung errors the table holds (a reused richer profile may hold some this run did not ask for)
    profiled_errors = () if table is None else tuple(e for e in own_error_names() if table.has(f"out_err_{e}"))
    planned = allocate_variants(plan_variants(cfg, layout.model_type if layout.stacked else None, profiled_errors), table,
                                linear_param_counts(model_config), cfg.match_boost_memory)  # fmt: skip
    out = StageOutput(
        ctx.settings.artifact_root,
        "allocation",
        {"model": model["revision"], "scores": scores and file_sha256(ensure_local(scores)), "bitmaps": {p.spec.name: stable_hash(p.bitmap.to_json()) for p in planned}},
    )
    if not out.is_complete():
        with out.build() as tmp:
            for p in planned:
                p.bitmap.save(tmp / f"{p.spec.name}.json")

    variants: list[Variant] = []
    if cfg.include_baseline:
        variants.append({"backend": "none", "method": BASELINE_METHOD, "label": BASELINE_METHOD, "budget_label": "fp32", "budget": None, "options": {}, "bitmap": None})
    backends = {name: get_backend(name) for name in cfg.backends}
    family = layout.model_type
    for name, backend in list(backends.items()):
        refusal = backend.family_refusal(family)
        if refusal:
            log.warning("allocate: skipping every variant of %s: %s", name, refusal)
            del backends[name]
    for p in planned:
        for backend in p.spec.backends or cfg.backends:
            if backend not in backends:
                continue
            try:  # the cross product asks every backend for every map: skip what one cannot express
                backends[backend].check(p.bitmap)
            except PipelineError as exc:
                log.warning("allocate: skipping %s with %s: %s", p.spec.name, backend, exc)
                continue
            variants.append(
                {
                    "name": variant_name(backend, p.spec.label, p.spec.budget_label, p.matched),  # '@SB30': at SB30's memory
                    "backend": backend,
                    "method": p.spec.method,
                    "label": p.spec.label,
                    "budget_label": p.spec.budget_label,
                    "budget": round(float(p.target), 6),
                    "options": p.spec.options,
                    "bitmap": str(out.path / f"{p.spec.name}.json"),
                    "nominal_bpp": p.bitmap.nominal_bpp,
                    "extra_pct": p.bitmap.extra_pct,
                    "predicted_dnll": None if table is None else predicted_loss_increase(table, p.bitmap, rung_errors(backend, profiled_errors)),
                }
            )
    evaluation = {"eval_tokens": cfg.eval_tokens, "protocols": list(cfg.protocols), "lm_eval_tasks": list(cfg.lm_eval_tasks), "lm_eval_limit": cfg.lm_eval_limit}
    for v in variants:
        v.update(name=v.get("name") or variant_name(v["backend"], v["label"], v["budget_label"]), model=model, calibration=prep["calibration"],
                 parent_run_id=prep["parent_run_id"], scores=scores, eval=evaluation)  # fmt: skip
        v["model_hash"] = stable_hash({"model": model["revision"], "backend": v["backend"], "bitmap": v["bitmap"] and file_sha256(v["bitmap"])})
        v["config_hash"] = stable_hash({"model_hash": v["model_hash"], "calibration": Path(prep["calibration"]).name, "eval": v["eval"]})
    log.info("allocate: %d variants", len(variants))
    return variants


def quantize(ctx: StepContext, variant: Variant) -> Variant:
    from tasks.quantize.stage import run_quantize

    variant = {**variant, "started_ms": int(time.time() * 1000)}  # the variant's MLflow run starts here
    if variant["backend"] == "none":
        return {**variant, "model_dir": variant["model"]["path"], "model_key": variant["model"]["revision"]}
    uri = run_quantize(
        local_model(ctx, variant["model"]),
        variant["model"]["revision"],
        variant["bitmap"],
        variant["backend"],
        ctx.settings.artifact_root,
        Path(variant["calibration"]) / "calibration.safetensors",
        {},
    )
    return {**variant, "model_dir": uri, "model_key": Path(uri).name}


def evaluate(ctx: StepContext, variant: Variant) -> Variant:
    from tasks.artifacts import read_json
    from tasks.evaluation.stage import EvalParams, run_evaluation

    ev = variant["eval"]
    params = EvalParams(
        eval_tokens=ev["eval_tokens"],
        protocols=tuple(ev["protocols"]),
        lm_eval_tasks=tuple(ev.get("lm_eval_tasks", ())),
        lm_eval_limit=ev.get("lm_eval_limit"),
    )
    base = local_model(ctx, variant["model"])
    model_dir = base if variant["backend"] == "none" else variant["model_dir"]
    metrics, evaluation = run_evaluation(
        model_dir, variant["backend"], variant["calibration"], params, ctx.settings.artifact_root,
        variant["model_key"], tokenizer_dir=base, device=ctx.device, base_dir=base, base_key=variant["model"]["revision"],
    )
    for key in ("nominal_bpp", "extra_pct", "predicted_dnll"):
        if variant.get(key) is not None:
            metrics[key] = variant[key]
    quant_manifest = ensure_local(variant["model_dir"]) / "manifest.json" if variant["backend"] != "none" else None
    if quant_manifest is not None and quant_manifest.exists():
        facts = read_json(quant_manifest).get("facts", {})
        if "quant_seconds" in facts:
            metrics["quant_seconds"] = facts["quant_seconds"]
    return {**variant, "metrics": metrics, "evaluation": evaluation}


def record(ctx: StepContext, variant: Variant) -> Variant:
    """The variant's MLflow child run (bit map and its heat map, metrics, logged model) and, for quantized
    variants, its registered model version, made from the logged model."""
    from tasks.registry.mlflow_model import serving as serving_of
    from tasks.registry.naming import BITMAP_JSON, BITMAP_PNG, EVALUATION_JSON, MANIFEST_JSON
    from tasks.registry.tracking import log_variant
    from tasks.registry.versions import register_version, version_description, version_tags

    model = variant["model"]
    info = {
        "name": variant["name"],
        "backend": variant["backend"],
        "method": variant["method"],
        "budget_label": variant["budget_label"],
        "base_model": model["name"],
        "base_revision": model["revision"],
        "config_hash": variant["config_hash"],
        "model_hash": variant["model_hash"],
        "options": variant["options"],
    }
    quantized = variant["backend"] != "none"
    serving = serving_of(variant["backend"]) if quantized else "the unquantized base model"
    with tempfile.TemporaryDirectory(prefix="quant-record-") as tmp:
        evaluation = {"variant": variant["name"], "settings": variant["eval"], "metrics": variant["metrics"]}
        files = {EVALUATION_JSON: str(write_json_atomic(Path(tmp) / EVALUATION_JSON, evaluation)),
                 BITMAP_JSON: variant["bitmap"] and str(ensure_local(variant["bitmap"]))}  # fmt: skip
        if files[BITMAP_JSON]:
            files[BITMAP_PNG] = str(_bitmap_figure(files[BITMAP_JSON], variant["name"], Path(tmp) / BITMAP_PNG))
        build = None
        if quantized:
            from tasks.registry.mlflow_model import build_mlflow_model
            from tasks.registry.naming import registered_model_name

            files[MANIFEST_JSON] = str(ensure_local(variant["model_dir"]) / "manifest.json")
            local = {**variant, "model_dir": str(ensure_local(variant["model_dir"])),
                     "bitmap": files[BITMAP_JSON], "model": {**model, "path": local_model(ctx, model)}}  # fmt: skip
            name = registered_model_name(model["name"])
            build = lambda out: build_mlflow_model(local, variant["metrics"], name, out)  # noqa: E731
        description = version_description(info, variant["metrics"], serving)
        run_id, reused, model_id = log_variant(
            ctx.settings.tracking_uri, variant["parent_run_id"], info, variant["metrics"], files, build,
            weights_dir=files.get(MANIFEST_JSON) and Path(files[MANIFEST_JSON]).parent,
            started_ms=variant.get("started_ms"), description=description,
        )  # fmt: skip
    version = None
    failpoint("record.logged")  # the run logged, the version not yet registered
    if quantized:
        version, _ = register_version(
            ctx.settings.tracking_uri,
            model["name"],
            run_id,
            version_tags(variant["name"], variant["method"], variant["backend"], variant["metrics"], variant["model_hash"], serving),
            claims_root=str(ctx.settings.artifact_root),
            description=description,
            model_id=model_id,
        )
        failpoint("record.registered")
    return {**variant, "run_id": run_id, "reused_run": reused, "version": version, "model_id": model_id}


def _bitmap_figure(bitmap_json: str, name: str, out: Path) -> Path:
    """The bit map's heat map (modules x layers, colour = rung), for the variant's run."""
    from tasks.bitmap import BitMap
    from tasks.reports.plots import plot_bitmap_heatmap

    return plot_bitmap_heatmap(BitMap.load(bitmap_json), out, name=name)


def verify(ctx: StepContext, variant: Variant) -> Variant:
    """The reload check of the variant's registered version (tasks/registry/load_check.py), unless it
    passed before; only versions that pass may become champion."""
    if variant["backend"] == "none" or not variant.get("version"):
        return variant
    from tasks.registry.load_check import DETAIL_TAG, TAG, check_version
    from tasks.registry.naming import registered_model_name
    from tasks.registry.tracking import client_for

    name = registered_model_name(variant["model"]["name"])
    tags = client_for(ctx.settings.tracking_uri).get_model_version(name, variant["version"]).tags
    if tags.get(TAG) == "passed":
        return {**variant, "load_check": "passed", "load_check_detail": tags.get(DETAIL_TAG, "")}
    m = variant["metrics"]
    protocol = "paper" if "ppl_wikitext2" in m else "gptq"
    if "reload_ppl" in m:  # the first 2,048 tokens' perplexity, recorded by the evaluation
        expected, tokens = m["reload_ppl"], int(m["reload_tokens"])
    else:
        expected, tokens = m["ppl_wikitext2" if protocol == "paper" else "ppl_wikitext2_gptq"], variant["eval"]["eval_tokens"]
    calibration = str(ensure_local(variant["calibration"]))
    result = check_version(ctx.settings.tracking_uri, name, variant["version"], calibration, tokens, expected, protocol)
    return {**variant, "load_check": "passed" if result["passed"] else "failed", "load_check_detail": result["detail"]}


def results_rows(variants: list[Variant]) -> list[dict]:
    rows = []
    for v in variants:
        m = v.get("metrics", {})
        rows.append(
            {
                "variant": v["name"],
                "backend": v["backend"],
                "method": v["method"],
                "label": v["label"],
                "budget": v["budget_label"],
                "nominal_bpp": m.get("nominal_bpp"),
                "extra_pct": m.get("extra_pct"),
                **{k: m.get(k) for k in ("saved_bytes", "peak_mem_bytes", "tokens_per_s", "quant_seconds", "predicted_dnll")},
                **{k: val for k, val in m.items() if k.startswith(QUALITY_PREFIXES)},
                "run_id": v.get("run_id"),
                "version": v.get("version"),
                "load_check": v.get("load_check"),
            }
        )
    return rows


def finish(ctx: StepContext, prep: Prepared, recorded: list[Variant]) -> dict:
    """Promote the champion, write the reports, log them on the parent run, close it, share its runs
    view, and mark this configuration done for this checkpoint (the zoo's completion marker)."""
    from tasks.artifacts import write_text_atomic
    from tasks.orchestration.zoo import record_completion
    from tasks.registry.naming import registered_model_name
    from tasks.registry.tracking import finish_pipeline_run
    from tasks.reports.table import results_table

    cfg = PipelineConfig.from_dict(prep["config"])
    recorded = list(recorded)
    reports = ctx.settings.home / "reports"
    out = reports / prep["parent_run_id"]
    registered = registered_model_name(prep["model"]["name"])
    decision = promote(ctx, cfg, registered) if any(v["backend"] != "none" for v in recorded) else None
    if decision is not None:
        write_json_atomic(out / "promotion.json", decision)
    champion = next((v["name"] for v in recorded if decision and v.get("version") == decision.get("champion")), None)
    rows = results_rows(recorded)
    for row in rows:
        row["champion"] = row["variant"] == champion
    summary, run_metrics = compare_variants(recorded, rows)
    table = results_table(rows)
    choice = champion_line(decision, champion)
    write_text_atomic(out / "results.md", table + "\n\n" + "\n\n".join([choice, *summary]) + "\n")
    write_json_atomic(out / "results.json", rows)
    _write_reports(rows, recorded, out, champion)
    failpoint("finish.reported")
    links = _share_links(ctx, prep, recorded, registered, decision)
    write_json_atomic(out / "links.json", links)
    head = f"Results of {len(recorded)} variants ({_link_text(links)})."
    description = "\n\n".join([head, choice, table, *summary])
    if len(description) > NOTE_LIMIT:  # MLflow caps a tag's value: the table stays in reports/results.md
        description = "\n\n".join([head, choice, "The table: artifact `reports/results.md`."])
    finish_pipeline_run(ctx.settings.tracking_uri, prep["parent_run_id"], out, metrics=run_metrics, description=description)
    _point_latest(reports, out)
    record_completion(ctx.settings.artifact_root, prep["config"], prep["model"], prep["parent_run_id"], out, rows)
    log.info("results:\n%s\n%s", table, choice)
    return {"reports": str(out), "promotion": decision, "table": table, "champion": choice, "parent_run_id": prep["parent_run_id"],
            "links": links}


def promote(ctx: StepContext, cfg: PipelineConfig, registered: str) -> dict:
    """The promotion rule of the run's Params applied to the registered model's versions."""
    from tasks.registry.promotion import run_promotion

    try:
        return run_promotion(ctx.settings.tracking_uri, registered, metric=cfg.promote_metric, tolerance=cfg.promote_tolerance,
                             max_saved_bytes=cfg.promote_max_bytes, min_improvement_pct=cfg.promote_min_improvement_pct)  # fmt: skip
    except PipelineError as exc:  # e.g. no version passed its reload check: recorded, not fatal
        log.warning("promotion: %s", exc)
        return {"action": "none", "changed": False, "champion": None, "reason": str(exc)}


def champion_line(decision: dict | None, champion: str | None) -> str:
    """The champion decision in one line, printed under the results table."""
    if not decision or not decision.get("champion"):
        return f"Champion: none ({decision['reason']})." if decision else "Champion: none (no quantized variant)."
    where = champion or "a version of an earlier run"
    return (f"Champion: {where} (version {decision['champion']}, {decision['action']}), by the rule \"{decision['rule']}\": "
            f"{decision['reason']}.")


def _share_links(ctx: StepContext, prep: Prepared, recorded: list[Variant], registered: str, decision: dict | None) -> dict:
    from tasks.registry.tracking import client_for
    from tasks.registry.ui import run_links

    client = client_for(ctx.settings.tracking_uri)
    experiment = client.get_run(prep["parent_run_id"]).info.experiment_id
    run_ids = [v["run_id"] for v in recorded if v.get("run_id")]
    return run_links(ctx.settings.tracking_uri, experiment, prep["parent_run_id"], run_ids, registered,
                     decision and decision.get("champion"))  # fmt: skip


def _link_text(links: dict) -> str:
    from tasks.registry.ui import LINK_LABELS

    return ", ".join(f"[{label}]({links[k]})" for k, label in LINK_LABELS.items() if k in links)


def compare_variants(recorded: list[Variant], rows: list[dict]) -> tuple[list[str], dict]:
    """Adds each row's 'within noise of' cell; returns the report's summary lines and the run's metrics."""
    from tasks.evaluation.compare import run_summary
    from tasks.evaluation.stage import load_tokens

    tokens = [load_tokens(v["evaluation"]) if v.get("evaluation") else {} for v in recorded]
    measured = [v.get("metrics", {}).get("dnll_wikitext2") for v in recorded]
    predicted = [v.get("predicted_dnll") for v in recorded]
    cells, metrics, lines = run_summary(tokens, measured, predicted)
    for row, cell in zip(rows, cells):
        row["ties"] = cell
    return lines, metrics


def _write_reports(rows: list[dict], recorded: list[Variant], out: Path, champion: str | None = None) -> None:
    import pandas as pd

    from tasks.bitmap import BitMap
    from tasks.reports import write_reports

    scores = next((v.get("scores") for v in recorded if v.get("scores")), None)
    # one heatmap per bit map (backends that share a map share its figure), named by its file: SB30-3.25-tied
    files = dict.fromkeys(v["bitmap"] for v in recorded if v.get("bitmap"))  # each file fetched and read once
    bitmaps = {Path(f).stem: BitMap.load(ensure_local(f)) for f in files}
    write_reports(pd.DataFrame(rows), bitmaps, scores and ensure_local(scores), out, champion=champion)


def _point_latest(reports: Path, out: Path) -> None:
    """reports/latest -> this run's directory, swapped atomically (a symlink replaced by rename)."""
    import os
    import shutil

    latest = reports / "latest"
    tmp = reports / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name, target_is_directory=True)
    if latest.is_dir() and not latest.is_symlink():  # a copy left by an older version
        shutil.rmtree(latest)
    os.replace(tmp, latest)
