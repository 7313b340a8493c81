"""The pre-flight check of a pipeline run (`python -m tasks pipeline --check`, run by `make run` before
Airflow starts): every Param against what consumes it, the text sources, the lm-eval tasks and the
model's files and architecture. A bad value is one `error:` line naming the Param; what will be skipped
(a backend that cannot express a variant) comes back as notes."""

from __future__ import annotations

from pathlib import Path

from tasks.families import layout_for
from tasks.orchestration.config import PipelineConfig, named_error, parse_rung


def preflight(config: dict, cache_dir: str | Path) -> tuple[PipelineConfig, object, list[str]]:
    """(the validated config, the resolved model, notes); raises PipelineError on the first bad Param."""
    from tasks.calibration import read_sources
    from tasks.model_io import read_config, resolve_model
    from tasks.orchestration.planner import plan_variants
    from tasks.orchestration.steps import calibration_params

    cfg = PipelineConfig.from_dict(config)  # every Param's type, range and combination
    read_sources(calibration_params(cfg))  # calibration_text, wikitext2_text, c4_parquet: readable, not empty
    if cfg.lm_eval_tasks:
        from tasks.evaluation.downstream import check_tasks

        named_error("lm_eval_tasks", check_tasks, cfg.lm_eval_tasks)
    model = resolve_model(cfg.model, cfg.revision, cache_dir)  # model files' headers, architecture
    layout = layout_for(read_config(model.path))
    plan_variants(cfg, layout.model_type if layout.stacked else None)  # e.g. tie_fused false on a stacked family
    return cfg, model, backend_notes(cfg, layout.model_type)


def backend_notes(cfg: PipelineConfig, family: str = "") -> list[str]:
    """Which (backend, variant) pairs allocation will skip, and why: a backend that refuses the model's
    family skips all; exact for the uniform rungs; for the layer-sensitive methods, what a backend that
    takes only some rungs can express."""
    from tasks.bitmap import uniform_bitmap
    from tasks.errors import PipelineError
    from tasks.quantize.registry import get_backend

    notes = []
    for name in cfg.backends:
        backend = get_backend(name)
        refusal = backend.family_refusal(family)
        if refusal:
            notes.append(f"{name} will skip every variant: {refusal}")
            continue
        caps = backend.capabilities
        for raw in cfg.uniform_budgets:
            rung = parse_rung(raw)
            try:
                backend.check(uniform_bitmap({"0.mlp.down_proj": 1}, rung))
            except PipelineError as exc:
                notes.append(f"{name} will skip uniform {rung.name}: {exc}")
        sensitive = [m for m in cfg.methods if m != "uniform"]
        if sensitive and cfg.budgets and caps.bitmap != "any":
            notes.append(f"{name} expresses only {caps.bitmap} bit maps on bits {caps.uniform_bits} and group sizes {caps.group_sizes}:"
                         f" the {', '.join(sensitive)} maps that use other rungs will be skipped")  # fmt: skip
        if name == "gptq" and cfg.gptq_errors:
            notes.append("gptq: the profile also prices every rung by GPTQ's own error for optimal on gptq (one GPTQ solve per "
                         "module input and rung; method_options.optimal.errors: hqq turns it off)")  # fmt: skip
    return notes
