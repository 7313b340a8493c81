"""The pre-flight check of a pipeline run (`python -m tasks pipeline --check`, run by `make run` before
Airflow starts): every Param against what consumes it, the text sources, the lm-eval tasks and the
model's files and architecture. A bad value is one `error:` line naming the Param; what will be skipped
(a backend that cannot express a variant) comes back as notes; `planned_variants` lists the variants the run
would name, without profiling."""

from __future__ import annotations

from pathlib import Path

from tasks.allocation.methods import METHODS
from tasks.families import layout_for
from tasks.errors import PipelineError, named_error
from tasks.allocation.budget import parse_uniform
from tasks.ladder import Preset
from tasks.orchestration.config import PROTOCOL_MIN_TOKENS, PipelineConfig, calibration_params


def preflight(config: dict, cache_dir: str | Path) -> tuple[PipelineConfig, object, list[str]]:
    """(the validated config, the resolved model, notes); raises PipelineError on the first bad Param."""
    from tasks.calibration import read_c4, read_text
    from tasks.model_io import read_config, resolve_model
    from tasks.allocation.plan import plan_variants

    cfg = PipelineConfig.from_dict(config)  # every Param's type, range and combination
    sources = calibration_params(cfg)  # each text source present, not empty, and what its name says
    for param_name, read in (("calibration_text", read_text), ("wikitext2_text", read_text), ("c4_parquet", read_c4)):
        named_error(param_name, read, getattr(sources, param_name))
    if cfg.lm_eval_tasks:
        from tasks.evaluation.downstream import check_tasks

        named_error("lm_eval_tasks", check_tasks, cfg.lm_eval_tasks)
    model = named_error("model", lambda source: resolve_model(source, cfg.revision, cache_dir), cfg.model)  # files' headers
    config_json = named_error("model", read_config, model.path)
    layout = named_error("model", layout_for, config_json)  # a supported architecture
    plan_variants(cfg, layout.model_type if layout.stacked else None)  # e.g. tie_fused false on a stacked family
    check_context(cfg, config_json)
    return cfg, model, token_notes(cfg, model) + backend_notes(cfg, layout.model_type)


def check_context(cfg: PipelineConfig, config_json: dict) -> None:
    """Windows no longer than the model's context (max_position_embeddings): calibration and evaluation."""
    context = config_json.get("max_position_embeddings")
    if not isinstance(context, int):
        return
    if cfg.calibration_seq_len > context:
        raise PipelineError(f"Param calibration_seq_len: {cfg.calibration_seq_len} tokens, longer than the model's context ({context})")
    for proto in cfg.protocols:
        if PROTOCOL_MIN_TOKENS[proto] > context:
            raise PipelineError(f"Param protocols: a {proto} window is {PROTOCOL_MIN_TOKENS[proto]} tokens, longer than the model's"
                                f" context ({context})")  # fmt: skip


def token_notes(cfg: PipelineConfig, model) -> list[str]:
    """The Params against the texts' token counts with the model's tokenizer: one calibration window at
    least (error), one evaluation window of each protocol per set (error), windows that overlap, an
    eval_tokens beyond a set and gradient windows beyond the calibration windows (notes)."""
    from tasks.calibration import window_notes

    sources = calibration_params(cfg)
    counts = _token_counts(str(model.path), model.revision, sources)
    notes = window_notes(sources, counts["calibration"])
    for dataset, param_name in (("wikitext2", "wikitext2_text"), ("c4", "c4_parquet")):
        for proto in cfg.protocols:
            if counts[dataset] < PROTOCOL_MIN_TOKENS[proto]:
                raise PipelineError(f"Param {param_name}: {counts[dataset]} tokens, fewer than one {proto} window ({PROTOCOL_MIN_TOKENS[proto]})")
        if cfg.eval_tokens > counts[dataset]:
            notes.append(f"eval_tokens {cfg.eval_tokens:,} is more than {dataset}'s {counts[dataset]:,} tokens: the whole set is evaluated")
    if cfg.scored_methods and cfg.fisher_samples > cfg.calibration_samples:
        notes.append(f"fisher_samples {cfg.fisher_samples} is more than calibration_samples {cfg.calibration_samples}: the backward pass"
                     f" takes all {cfg.calibration_samples} windows")  # fmt: skip
    return notes


def _token_counts(model_path: str, revision: str, sources) -> dict[str, int]:
    """Token counts per source, kept per tokenizer (its files' contents) and source files: a process that
    pre-flights many configs, or many checkpoints of one tokenizer, tokenizes the texts once."""
    from tasks.artifacts import file_sha256

    files = tuple((str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in (sources.calibration_text, sources.wikitext2_text,
                                                                                       sources.c4_parquet))  # fmt: skip
    tokenizer = tuple(file_sha256(p) for p in sorted(Path(model_path).glob("tokenizer*")) if p.is_file()) or (revision,)
    key = (tokenizer, files, sources)
    if key not in _COUNTS:
        from tasks.calibration import token_counts
        from tasks.model_io import load_tokenizer

        _COUNTS[key] = token_counts(named_error("model", load_tokenizer, model_path), sources)
    return dict(_COUNTS[key])


_COUNTS: dict = {}  # (tokenizer files, source files, sources) -> token counts, for this process


def backend_notes(cfg: PipelineConfig, family: str = "") -> list[str]:
    """Which (backend, variant) pairs allocation will skip, and why: a backend that refuses the model's
    family skips all; exact for the uniform rungs; for the layer-sensitive methods, what a backend that
    takes only some rungs can express."""
    from tasks.bitmap import uniform_bitmap
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
            rung = parse_uniform(raw)
            if rung.ladder != caps.ladder:  # planned for the backends of its own ladder only
                continue
            if isinstance(rung, Preset):
                if caps.ladder != rung.ladder:
                    notes.append(f"{name} will skip preset {rung.name}: a llama.cpp preset is for the {rung.ladder} backend")
                continue
            try:
                backend.check(uniform_bitmap({"0.mlp.down_proj": 1}, rung))
            except PipelineError as exc:
                notes.append(f"{name} will skip uniform {rung.name}: {exc}")
        sensitive = [m for m in cfg.methods if METHODS[m].scored]
        if sensitive and cfg.budgets and caps.bitmap != "any":
            notes.append(f"{name} expresses only {caps.bitmap} bit maps on bits {caps.uniform_bits} and group sizes {caps.group_sizes}:"
                         f" the {', '.join(sensitive)} maps that use other rungs will be skipped")  # fmt: skip
        own = caps.own_errors
        if own and own.name in cfg.profiled_errors and caps.own_ladder:
            notes.append(f"{name}: the profile also scores every rung of the {caps.ladder} ladder by {own.title}'s own quantizer ({own.cost})")
        elif own and own.name in cfg.profiled_errors:
            for method in (m for m in cfg.scored_methods if METHODS[m].errors_option):
                option = METHODS[method].errors_option
                notes.append(f"{name}: the profile also prices every rung by {own.title}'s own error for {method} on {name} ({own.cost}; "
                             f"method_options.{method}.{option}: {METHODS[method].default(option)} turns it off)")  # fmt: skip
    return notes


def model_family(model) -> tuple[str, str | None]:
    """(model_type, the stacked family or None) of a resolved model: what allocation plans with."""
    from tasks.model_io import read_config

    layout = layout_for(read_config(model.path))
    return layout.model_type, layout.model_type if layout.stacked else None


def planned_variants(cfg: PipelineConfig, family: str = "", stacked_family: str | None = None) -> list[dict]:
    """The variants a run of `cfg` allocates, in its order, as it will name them (`hqq/optimal/3.25@SB30` where
    a budget-exact method gets a boost method's memory): dicts of name, method, budget (text), backend and
    skipped (why the backend will skip it, or None) or caveat (what decides at allocation). Pure: no profile,
    no scores; the same cross product with the backends that allocation makes."""
    from tasks.bitmap import uniform_bitmap
    from tasks.ladder import Preset, Rung
    from tasks.allocation.plan import memory_matches, plan_variants, variant_name
    from tasks.quantize.registry import get_backend

    from tasks.allocation.stage import baseline

    rows = []
    if cfg.include_baseline:
        plan = baseline(model=None)
        rows.append({"name": plan.name, "method": plan.method, "budget": plan.budget_label, "backend": plan.backend, "quantized": False,
                     "skipped": None, "caveat": None})  # fmt: skip
    backends = {name: get_backend(name) for name in cfg.backends}
    specs = plan_variants(cfg, stacked_family)
    for spec, matched in zip(specs, memory_matches(specs, cfg.match_boost_memory)):
        if isinstance(spec.budget, Preset):
            budget = f"{spec.budget.name} (llama.cpp's preset: its size)"
        elif not isinstance(spec.budget, Rung):
            budget = f"{spec.budget_label} bpp"
        elif matched:
            budget = f"{spec.budget.name} at {matched}'s memory"
        else:
            budget = f"{spec.budget.name} ({spec.budget.bpp:g} bpp)" if spec.budget.ggml else f"{spec.budget.name} ({spec.budget_label} bpp)"
        for name in spec.backends or cfg.backends:
            backend = backends[name]
            caps = backend.capabilities
            skipped, caveat = backend.family_refusal(family), None
            if not skipped and isinstance(spec.budget, Preset):
                skipped = None if caps.ladder == spec.budget.ladder else f"a llama.cpp preset is for the {spec.budget.ladder} backend"
            elif not skipped and not METHODS[spec.method].scored:
                try:
                    backend.check(uniform_bitmap({"0.mlp.down_proj": 1}, spec.budget))
                except PipelineError as exc:
                    skipped = str(exc)
            elif not skipped and caps.bitmap != "any":
                caveat = f"skipped unless its bit map is {caps.bitmap} on bits {caps.uniform_bits} and group sizes {caps.group_sizes}"
            rows.append({"name": variant_name(name, spec.label, spec.budget_label, matched), "method": spec.method,
                         "budget": budget, "backend": name, "quantized": True, "skipped": skipped, "caveat": caveat})  # fmt: skip
    return rows


def plan_lines(cfg: PipelineConfig, family: str = "", stacked_family: str | None = None) -> list[str]:
    """`--check`'s listing: one `variant:` line per planned (backend, variant) pair, and a `note:` when the
    run would quantize nothing."""
    rows = planned_variants(cfg, family, stacked_family)
    width = max((len(r["name"]) for r in rows), default=0)
    method_width = max((len(r["method"]) for r in rows), default=0)
    budget_width = max((len(r["budget"]) for r in rows), default=0)
    lines = []
    for r in rows:
        line = f"variant: {r['name']:<{width}}  method {r['method']:<{method_width}}  budget {r['budget']:<{budget_width}}  backend {r['backend']}"
        if r["skipped"]:
            line += f"  (skipped: {r['skipped']})"
        elif r["caveat"]:
            line += f"  ({r['caveat']})"
        lines.append(line.rstrip())
    quantized = [r for r in rows if r["quantized"] and not r["skipped"]]
    unbudgeted = [m for m in cfg.methods if METHODS[m].scored] if not cfg.budgets else []
    if unbudgeted and quantized:  # (with nothing quantized, the note below says so)
        lines.append(f"note: budgets is empty: {', '.join(unbudgeted)} make no variant; only the uniform rungs run")
    if not quantized:
        if not any(r["quantized"] for r in rows):
            why = "uniform_budgets is empty and " + ("budgets is empty" if not cfg.budgets else "no layer-sensitive method is selected")
        else:
            why = "every (backend, variant) pair is skipped"
        lines.append(f"note: {why}: only the baseline runs" if cfg.include_baseline else f"note: {why}: nothing runs")
    return lines
