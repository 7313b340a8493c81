"""The pipeline's steps as plain functions over small JSON-able dicts, so that the Airflow DAG (one task
per step, mapped over variants), the in-process CLI (`python -m tasks pipeline`) and the tests wire the
same code. Each step calls one stage; data flows one way:

    prepare (model + calibration + parent run) -> profile -> allocate (every variant's bit map)
    -> quantize (per variant) -> evaluate (per variant) -> record (MLflow run + version per variant)
    -> promote -> report
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tasks.artifacts import StageOutput, ensure_local, file_sha256, stable_hash
from tasks.errors import PipelineError
from tasks.ladder import LADDER, Rung, parse_rung
from tasks.settings import Settings

log = logging.getLogger(__name__)

BASELINE_METHOD = "unquantized"
BOOST_METHODS = ("sensiboost", "kurtboost")
RUNG_BUDGET_METHODS = ("uniform",) + BOOST_METHODS  # budgets that must be ladder rungs
EXACT_BUDGET_METHODS = ("lim", "zd", "mxq", "optimal")  # any real budget, never exceeded
METHODS = RUNG_BUDGET_METHODS + EXACT_BUDGET_METHODS
DEFAULT_OPTIONS = {
    "sensiboost": {"boost_stop": 3, "top_m": 0},  # SB30, the paper's setting
    "kurtboost": {"boost_stop": 2, "top_m": 1},  # KB21
}


@dataclass
class PipelineConfig:
    """Everything a pipeline run is parameterized by: the DAG's Params and the CLI's options."""

    model: str = "embedded"
    revision: str | None = None
    backends: list[str] = field(default_factory=lambda: ["hqq"])
    uniform_budgets: list[str] = field(default_factory=lambda: ["b4g128", "b4g64", "b3g128", "b3g64"])
    methods: list[str] = field(default_factory=lambda: ["sensiboost", "kurtboost", "lim", "zd", "mxq", "optimal"])
    budgets: list[str] = field(default_factory=lambda: ["b3g64"])
    method_options: dict = field(default_factory=dict)
    # Budget-exact methods given a rung budget get the memory the first boost method reached at that
    # rung, so that every layer-sensitive method is compared at equal memory.
    match_boost_memory: bool = True
    include_baseline: bool = True
    calibration_samples: int = 32
    # Text sources (None = the files shipped in data/): calibration text, WikiText-2 test text, C4 parquet.
    calibration_text: str | None = None
    wikitext2_text: str | None = None
    c4_parquet: str | None = None
    calibration_seq_len: int = 512
    # Calibration windows of the profiler's backward pass (the `optimal` allocator's loss estimate); 0 = none.
    fisher_samples: int = 8
    eval_tokens: int = 2048
    protocols: list[str] = field(default_factory=lambda: ["paper", "gptq"])
    # Downstream scores through lm-eval (the local task in data/lm_eval/ works offline; hub task names
    # such as "arc_easy" need a network). Empty = perplexity only.
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["quant_facts"])
    lm_eval_limit: int | None = None
    promote_max_bytes: int | None = None
    promote_min_improvement_pct: float = 1.0
    seed: int = 42

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"unknown pipeline option(s): {', '.join(unknown)}")
        config = cls(**{k: v for k, v in data.items() if v is not None or k == "revision"})
        config.validate()
        return config

    def validate(self) -> None:
        from tasks.quantize.registry import BACKENDS

        if not self.model or not str(self.model).strip():
            raise PipelineError("no model given")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise PipelineError(f"unknown method(s) {bad}: one of {', '.join(METHODS)}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise PipelineError(f"unknown backend(s) {bad}: one of {', '.join(BACKENDS)}")
        for budget in self.uniform_budgets:
            parse_rung(budget)
        for budget in self.budgets:
            parse_budget(budget)
        if self.eval_tokens < 0 or self.calibration_samples < 1 or self.fisher_samples < 0:
            raise PipelineError("eval_tokens and fisher_samples must be >= 0 and calibration_samples >= 1")


def parse_budget(text) -> float | Rung:
    """A ladder rung ('b3g64' / '3.25') or a positive real bpp ('3.4')."""
    try:
        return parse_rung(text)
    except PipelineError:
        pass
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PipelineError(f"budget {text!r} is neither a ladder rung nor a number") from None
    if not (LADDER[0].bpp * 0.5 < value <= LADDER[-1].bpp):
        raise PipelineError(f"budget {value} bpp is outside the ladder's range ({LADDER[0].bpp:.2f}..{LADDER[-1].bpp:.2f})")
    return value


def budget_label(budget: float | Rung) -> str:
    return budget.label if isinstance(budget, Rung) else f"{budget:.2f}"


def method_label(method: str, options: dict) -> str:
    if method in BOOST_METHODS:
        prefix = "SB" if method == "sensiboost" else "KB"
        return f"{prefix}{options.get('boost_stop', '')}{options.get('top_m', '')}"
    return method


# ---- steps ---------------------------------------------------------------------------------------


def calibration_params(cfg: PipelineConfig):
    from tasks.calibration import CalibrationParams

    return CalibrationParams(
        samples=cfg.calibration_samples,
        seq_len=cfg.calibration_seq_len,
        seed=cfg.seed,
        **{k: getattr(cfg, k) for k in ("calibration_text", "wikitext2_text", "c4_parquet") if getattr(cfg, k)},
    )


def prepare(config: dict) -> dict:
    """Resolve the model, tokenize calibration/evaluation sets and open the MLflow parent run."""
    from tasks.calibration import run_calibration
    from tasks.model_io import resolve_model
    from tasks.registry.tracking import start_pipeline_run

    cfg = PipelineConfig.from_dict(config)
    settings = Settings.from_env()
    model = resolve_model(cfg.model, cfg.revision, settings.cache_dir)
    calibration = run_calibration(model.path, calibration_params(cfg), settings.artifact_root, model.revision)
    parent = start_pipeline_run(
        settings.tracking_uri, model.name, model.revision, asdict(cfg), str(settings.mlflow_artifacts)
    )
    return {"config": asdict(cfg), "model": model.to_json(), "calibration": calibration, "parent_run_id": parent}


def needs_scores(cfg: PipelineConfig) -> bool:
    return any(m != "uniform" for m in cfg.methods)


def profile(prep: dict) -> str | None:
    """The scores table (cached by model and calibration); None when only uniform variants run."""
    cfg = PipelineConfig.from_dict(prep["config"])
    if not needs_scores(cfg):
        return None
    from tasks.profiling import SCORES_FORMAT, run_profiling

    settings = Settings.from_env()
    calib = ensure_local(prep["calibration"]) / "calibration.safetensors"
    key = {"model": prep["model"]["revision"], "calibration": file_sha256(calib), "fisher_samples": cfg.fisher_samples, "format": SCORES_FORMAT}
    out = StageOutput(settings.artifact_root, "profiling", key)
    if not out.is_complete():
        with out.build() as tmp:
            run_profiling(prep["model"]["path"], calib, tmp, fisher_samples=cfg.fisher_samples)
    else:
        log.info("profiling: cache hit %s", out.uri)
    return str(out.path / "scores.csv")


def allocate(prep: dict, scores: str | None) -> list[dict]:
    """Every variant's bit map, baseline first. Returns the variant dicts that the mapped steps take."""
    from tasks.bitmap import uniform_bitmap
    from tasks.model_io import linear_param_counts, read_config

    cfg = PipelineConfig.from_dict(prep["config"])
    settings = Settings.from_env()
    model = prep["model"]
    params = linear_param_counts(read_config(model["path"]))
    table = None
    if scores:
        from tasks.allocation import read_scores

        table = read_scores(ensure_local(scores))
    plans: list[tuple[str, str, object, dict]] = []  # (method, label, budget, options)
    for budget in cfg.uniform_budgets:
        plans.append(("uniform", "uniform", parse_rung(budget), {}))
    ordered = sorted((m for m in cfg.methods if m != "uniform"), key=lambda m: m not in BOOST_METHODS)
    for method in ordered:
        options = {**DEFAULT_OPTIONS.get(method, {}), **cfg.method_options.get(method, {})}
        for raw in cfg.budgets:
            budget = parse_budget(raw)
            if method in BOOST_METHODS and not isinstance(budget, Rung):
                raise PipelineError(f"{method} needs a ladder rung as budget, got {raw!r}")
            plans.append((method, method_label(method, options), budget, options))

    # Allocation is cheap and deterministic: compute every bit map, then store them as one stage output.
    reached: dict[str, float] = {}  # rung label -> bpp the first boost method reached there
    planned: list[tuple[str, str, str, object, float, dict, object]] = []
    for method, label, budget, options in plans:
        if method in EXACT_BUDGET_METHODS and isinstance(budget, Rung) and cfg.match_boost_memory and budget.label in reached:
            target = reached[budget.label]
        else:
            target = budget.bpp if isinstance(budget, Rung) else budget
        if method == "uniform":
            bitmap = uniform_bitmap(params, budget)
        else:
            from tasks.allocation import allocate as allocate_bitmap

            bitmap = allocate_bitmap(table, method, target, options)
        if method in BOOST_METHODS and budget.label not in reached:
            reached[budget.label] = bitmap.nominal_bpp
        planned.append((f"{label}-{budget_label(budget)}", method, label, budget, target, options, bitmap))
    out = StageOutput(
        settings.artifact_root,
        "allocation",
        {"model": model["revision"], "scores": scores and file_sha256(ensure_local(scores)), "bitmaps": {n: stable_hash(b.to_json()) for n, *_, b in planned}},
    )
    if not out.is_complete():
        with out.build() as tmp:
            for name, *_, bitmap in planned:
                bitmap.save(tmp / f"{name}.json")

    variants: list[dict] = []
    if cfg.include_baseline:
        variants.append(
            {"backend": "none", "method": BASELINE_METHOD, "label": BASELINE_METHOD, "budget_label": "fp32", "budget": None, "options": {}, "bitmap": None}
        )
    from tasks.quantize.registry import get_backend

    backends = {name: get_backend(name) for name in cfg.backends}
    for name, method, label, budget, target, options, bitmap in planned:
        for backend in cfg.backends:
            try:  # the cross product asks every backend for every map: skip what one cannot express
                backends[backend].check(bitmap)
            except PipelineError as exc:
                log.warning("allocate: skipping %s with %s: %s", name, backend, exc)
                continue
            variants.append(
                {
                    "backend": backend,
                    "method": method,
                    "label": label,
                    "budget_label": budget_label(budget),
                    "budget": round(float(target), 6),
                    "options": options,
                    "bitmap": str(out.path / f"{name}.json"),
                    "nominal_bpp": bitmap.nominal_bpp,
                    "extra_pct": bitmap.extra_pct,
                }
            )
    for v in variants:
        v["model"] = model
        v["calibration"] = prep["calibration"]
        v["parent_run_id"] = prep["parent_run_id"]
        v["scores"] = scores
        v["eval"] = {
            "eval_tokens": cfg.eval_tokens,
            "protocols": list(cfg.protocols),
            "lm_eval_tasks": list(cfg.lm_eval_tasks),
            "lm_eval_limit": cfg.lm_eval_limit,
        }
        # model_hash names the quantized weights (one registered version each); config_hash also
        # covers calibration and evaluation settings (one MLflow run each).
        v["model_hash"] = stable_hash(
            {"model": model["revision"], "backend": v["backend"], "bitmap": v["bitmap"] and file_sha256(v["bitmap"])}
        )
        v["config_hash"] = stable_hash(
            {"model_hash": v["model_hash"], "calibration": Path(prep["calibration"]).name, "eval": v["eval"]}
        )
    log.info("allocate: %d variants", len(variants))
    return variants


def quantize(variant: dict) -> dict:
    from tasks.quantize.stage import run_quantize

    if variant["backend"] == "none":
        return {**variant, "model_dir": variant["model"]["path"], "model_key": variant["model"]["revision"]}
    settings = Settings.from_env()
    uri = run_quantize(
        variant["model"]["path"],
        variant["model"]["revision"],
        variant["bitmap"],
        variant["backend"],
        settings.artifact_root,
        Path(variant["calibration"]) / "calibration.safetensors",
        {},
    )
    return {**variant, "model_dir": uri, "model_key": Path(uri).name}


def evaluate(variant: dict) -> dict:
    from tasks.evaluation.stage import EvalParams, run_evaluation

    settings = Settings.from_env()
    ev = variant["eval"]
    params = EvalParams(
        eval_tokens=ev["eval_tokens"],
        protocols=tuple(ev["protocols"]),
        lm_eval_tasks=tuple(ev.get("lm_eval_tasks", ())),
        lm_eval_limit=ev.get("lm_eval_limit"),
    )
    metrics = run_evaluation(
        variant["model_dir"], variant["backend"], variant["calibration"], params, settings.artifact_root,
        variant["model_key"], tokenizer_dir=variant["model"]["path"],
    )
    if variant.get("nominal_bpp") is not None:
        metrics["nominal_bpp"] = variant["nominal_bpp"]
    if variant.get("extra_pct") is not None:
        metrics["extra_pct"] = variant["extra_pct"]
    quant_manifest = Path(variant["model_dir"]) / "manifest.json"
    if variant["backend"] != "none" and quant_manifest.exists():
        from tasks.artifacts import read_json

        facts = read_json(quant_manifest).get("facts", {})
        if "quant_seconds" in facts:
            metrics["quant_seconds"] = facts["quant_seconds"]
    return {**variant, "metrics": metrics}


def record(variant: dict) -> dict:
    """The variant's MLflow child run and, for quantized variants, its registered model version."""
    from tasks.registry.tracking import log_variant
    from tasks.registry.versions import register_version

    settings = Settings.from_env()
    model = variant["model"]
    info = {
        "backend": variant["backend"],
        "method": variant["method"],
        "budget_label": variant["budget_label"],
        "base_model": model["name"],
        "base_revision": model["revision"],
        "config_hash": variant["config_hash"],
        "options": variant["options"],
    }
    files = {"bitmap": variant["bitmap"]}
    quantized = variant["backend"] != "none"
    if quantized:
        files["manifest"] = str(Path(variant["model_dir"]) / "manifest.json")
    run_id, reused = log_variant(
        settings.tracking_uri, variant["parent_run_id"], info, variant["metrics"], files, variant["model_dir"] if quantized else None
    )
    version = None
    if quantized:
        m = variant["metrics"]
        version, _ = register_version(
            settings.tracking_uri,
            model["name"],
            run_id,
            {
                "method": variant["method"],
                "backend": variant["backend"],
                "budget": variant["budget_label"],
                "nominal_bpp": m.get("nominal_bpp"),
                "extra_pct": m.get("extra_pct"),
                "ppl_wikitext2": m.get("ppl_wikitext2"),
                "ppl_c4": m.get("ppl_c4"),
                "saved_bytes": m.get("saved_bytes"),
                "variant": f"{variant['backend']}/{variant['method']}/{variant['budget_label']}",
                "config_hash": variant["config_hash"],
                "model_hash": variant["model_hash"],
                "base_revision": model["revision"],
            },
        )
    return {**variant, "run_id": run_id, "reused_run": reused, "version": version}


def results_rows(variants: list[dict]) -> list[dict]:
    rows = []
    for v in variants:
        m = v.get("metrics", {})
        rows.append(
            {
                "variant": f"{v['backend']}/{v['label']}/{v['budget_label']}",
                "backend": v["backend"],
                "method": v["method"],
                "label": v["label"],
                "budget": v["budget_label"],
                "nominal_bpp": m.get("nominal_bpp"),
                "extra_pct": m.get("extra_pct"),
                **{k: m.get(k) for k in ("ppl_wikitext2", "ppl_c4", "ppl_wikitext2_gptq", "ppl_c4_gptq", "saved_bytes", "peak_mem_bytes", "tokens_per_s", "quant_seconds")},
                **{k: val for k, val in m.items() if k.startswith("lmeval_")},
                "run_id": v.get("run_id"),
                "version": v.get("version"),
            }
        )
    return rows


def finish(prep: dict, recorded: list[dict]) -> dict:
    """Promote the champion, write the reports, log them on the parent run and close it."""
    import json

    from tasks.artifacts import write_json_atomic
    from tasks.registry.naming import registered_model_name
    from tasks.registry.tracking import finish_pipeline_run
    from tasks.table import markdown_table

    cfg = PipelineConfig.from_dict(prep["config"])
    settings = Settings.from_env()
    rows = results_rows(recorded)
    out = settings.home / "reports" / prep["parent_run_id"]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    write_json_atomic(out / "results.json", rows)
    decision = None
    if any(v["backend"] != "none" for v in recorded):
        try:
            from tasks.promotion import run_promotion
        except ImportError:
            log.warning("promotion is not available in this environment")
        else:
            decision = run_promotion(
                settings.tracking_uri,
                registered_model_name(prep["model"]["name"]),
                max_saved_bytes=cfg.promote_max_bytes,
                min_improvement_pct=cfg.promote_min_improvement_pct,
            )
            (out / "promotion.json").write_text(json.dumps(decision, indent=2, default=str))
    try:
        from tasks.reports import write_reports
    except ImportError:
        log.warning("reports are not available in this environment")
    else:
        scores = next((v.get("scores") for v in recorded if v.get("scores")), None)
        import pandas as pd

        from tasks.bitmap import BitMap

        bitmaps = [BitMap.load(v["bitmap"]) for v in recorded if v.get("bitmap")]
        write_reports(pd.DataFrame(rows), bitmaps, scores, out)
    finish_pipeline_run(settings.tracking_uri, prep["parent_run_id"], out)
    latest = settings.home / "reports" / "latest"
    latest.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            (latest / f.name).write_bytes(f.read_bytes())
    log.info("results:\n%s", table)
    return {"reports": str(out), "promotion": decision, "table": table}


def run_inprocess(config: dict) -> dict:
    """The whole pipeline in this process, without Airflow (same steps as the DAG)."""
    prep = prepare(config)
    scores = profile(prep)
    variants = allocate(prep, scores)
    recorded = [record(evaluate(quantize(v))) for v in variants]
    return finish(prep, recorded)


def configure_parser(parser) -> None:
    parser.add_argument("--config", default=None, help="JSON file or inline JSON with PipelineConfig fields")
    parser.add_argument("--model", default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="validate the config and resolve the model, then stop")


def run_cli(args) -> int:
    import json

    config: dict = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"--config is not valid JSON: {exc}") from None
    if args.model:
        config["model"] = args.model
    if args.eval_tokens is not None:
        config["eval_tokens"] = args.eval_tokens
    if args.check:
        from tasks.calibration import read_sources
        from tasks.model_io import resolve_model

        cfg = PipelineConfig.from_dict(config)
        read_sources(calibration_params(cfg))  # empty or missing texts stop here, before Airflow starts
        model = resolve_model(cfg.model, cfg.revision, Settings.from_env().cache_dir)
        print(f"ok: {model.name} ({model.revision}) at {model.path}")
        return 0
    result = run_inprocess(config)
    print(result["table"])
    print(f"\nreports: {result['reports']}")
    return 0
