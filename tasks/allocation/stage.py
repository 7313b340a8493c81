"""The allocation stage's contract: `run(ctx, AllocationParams) -> Allocation`, every variant's bit map
(one stage output, cached by the model, the scores and the maps themselves) crossed with the backends
that can express it, the unquantized baseline first. A variant's plan (`VariantPlan`) is what the later
stages quantize, evaluate and record under its one name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tasks.allocation.plan import BASELINE_METHOD, allocate_variants, plan_variants, rung_errors, variant_name
from tasks.allocation.presets import preset_bitmap
from tasks.artifacts import StageOutput, ensure_local, file_sha256, stable_hash
from tasks.calibration import Calibration
from tasks.contracts import Contract
from tasks.errors import PipelineError
from tasks.model_io import ResolvedModel
from tasks.profiling.stage import Profile
from tasks.profiling.table import IMATRIX_FILE
from tasks.quantize.registry import UNQUANTIZED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocationParams(Contract):
    model: ResolvedModel
    profile: Profile | None = None  # None: only uniform variants (no method reads a profile)
    backends: tuple[str, ...] = ("hqq",)
    uniform_budgets: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    budgets: tuple[str, ...] = ()
    method_options: dict = field(default_factory=dict)
    gguf_presets: tuple[str, ...] = ()  # llama.cpp presets: each a variant, and a budget of preset_methods
    preset_methods: tuple[str, ...] = ()
    match_boost_memory: bool = True
    include_baseline: bool = True
    calibration: Calibration | None = None  # its held-out windows: the measurement of optimal's refine


@dataclass(frozen=True)
class VariantPlan(Contract):
    """One variant: its name (backend/label/budget, the one name in MLflow, tables and plots), its bit map
    and what allocation knows of it."""

    name: str
    backend: str
    method: str
    label: str
    budget_label: str
    model_hash: str  # the quantized weights' identity: model revision, backend, bit map (one registered version each)
    budget: float | None = None
    options: dict = field(default_factory=dict)
    bitmap: str | None = None  # the bit map's JSON file in the allocation's stage output
    nominal_bpp: float | None = None
    extra_pct: float | None = None
    predicted_dnll: float | None = None  # the Fisher estimate of the loss increase (nats/token), when profiled

    @property
    def quantized(self) -> bool:
        return self.backend != UNQUANTIZED

    @classmethod
    def of_bitmap(cls, model: ResolvedModel, backend: str, bitmap_file: str, bitmap, name: str | None = None) -> "VariantPlan":
        """A variant of a bit map saved outside an allocation (the benchmarks' extra maps)."""
        budget = f"{bitmap.nominal_bpp:.2f}"
        return cls(name or variant_name(backend, bitmap.method, budget), backend, bitmap.method, bitmap.method, budget,
                   _model_hash(model, backend, bitmap_file), bitmap.nominal_bpp, {}, bitmap_file, bitmap.nominal_bpp, bitmap.extra_pct)  # fmt: skip


@dataclass(frozen=True)
class Allocation(Contract):
    uri: str | None  # the bit maps' stage output
    variants: tuple[VariantPlan, ...] = ()


def baseline(model: ResolvedModel | None) -> VariantPlan:
    """The unquantized base model's variant, `none/unquantized/fp32` (model None: its name only, as --check lists it)."""
    return VariantPlan(variant_name(UNQUANTIZED, BASELINE_METHOD, "fp32"), UNQUANTIZED, BASELINE_METHOD, BASELINE_METHOD, "fp32",
                       model_hash=_model_hash(model, UNQUANTIZED, None) if model else "")  # fmt: skip


def _model_hash(model: ResolvedModel, backend: str, bitmap: str | None) -> str:
    return stable_hash({"model": model.revision, "backend": backend, "bitmap": bitmap and file_sha256(bitmap)})


def run(ctx, params: AllocationParams) -> Allocation:
    from tasks.allocation.optimal import predicted_loss_increase
    from tasks.allocation.scores import read_scores
    from tasks.families import layout_for
    from tasks.model_io import linear_param_counts, read_config
    from tasks.quantize.registry import own_error_names

    table = read_scores(ensure_local(params.profile.scores)) if params.profile else None
    checkpoint = params.model.local(ctx.settings.cache_dir)
    model_config = read_config(checkpoint)
    layout = layout_for(model_config)
    # whose own rung errors the table holds (a reused richer profile may hold some this run did not ask for)
    profiled_errors = () if table is None else tuple(e for e in own_error_names() if table.has(f"out_err_{e}") or table.ladder_rungs(e))
    counts = linear_param_counts(model_config)
    imatrix = params.profile and Path(params.profile.local()) / IMATRIX_FILE
    presets = partial(preset_bitmap, checkpoint=checkpoint, imatrix=imatrix if imatrix and imatrix.is_file() else None, params=counts)
    planned = allocate_variants(plan_variants(params, layout.model_type if layout.stacked else None, profiled_errors), table,
                                counts, params.match_boost_memory, presets, refiner(ctx, params, table))  # fmt: skip
    scores = params.profile and params.profile.scores
    out = StageOutput(ctx.settings.artifact_root, "allocation",
                      {"model": params.model.revision, "scores": scores and file_sha256(ensure_local(scores)),
                       "bitmaps": {p.spec.name: stable_hash(p.bitmap.to_json()) for p in planned}})  # fmt: skip
    if not out.is_complete():
        with out.build() as tmp:
            for p in planned:
                p.bitmap.save(tmp / f"{p.spec.name}.json")
    variants = [baseline(params.model)] if params.include_baseline else []
    backends = _backends(params.backends, layout.model_type)
    for p in planned:
        for name in (b for b in p.spec.backends or params.backends if b in backends):
            try:  # the cross product asks every backend for every map: skip what one cannot express
                backends[name].check(p.bitmap)
            except PipelineError as exc:
                log.warning("allocate: skipping %s with %s: %s", p.spec.name, name, exc)
                continue
            bitmap = str(out.path / f"{p.spec.name}.json")
            predicted = None if table is None else predicted_loss_increase(table, p.bitmap, rung_errors(name, profiled_errors))
            variants.append(VariantPlan(variant_name(name, p.spec.label, p.spec.budget_label, p.matched), name, p.spec.method, p.spec.label,
                                        p.spec.budget_label, _model_hash(params.model, name, bitmap), round(float(p.target), 6),
                                        p.spec.options, bitmap, p.bitmap.nominal_bpp, p.bitmap.extra_pct, predicted))  # fmt: skip
    log.info("allocate: %d variants", len(variants))
    return Allocation(str(out.path), tuple(variants))


def refiner(ctx, params: AllocationParams, table):
    """What applies `optimal`'s refine to a planned map (allocate_variants' `refiner`)."""
    from tasks.model_io import read_config

    checkpoint = params.model.local(ctx.settings.cache_dir)
    return partial(_refined, ctx, params, table, checkpoint, read_config(checkpoint))


def _refined(ctx, params: AllocationParams, table, checkpoint: Path, model_config, bitmap, spec):
    """`optimal`'s map refined by the measured held-out KLD (tasks.allocation.refine), once per (model,
    scores, map, options): a stage output of its own, since the search takes minutes to hours."""
    from tasks.allocation.heldout_kld import HeldoutKld, backend_quantizer
    from tasks.allocation.refine import RefineSettings, refine_bitmap
    from tasks.bitmap import BitMap
    from tasks.calibration import load_ids

    if params.calibration is None:
        raise PipelineError(f"{spec.name}: refine measures on the calibration set's held-out windows, which this allocation was not given")
    quantizer = spec.options.get("errors") or ("gguf" if spec.ladder == "gguf" else "hqq")
    settings = RefineSettings.of(spec.options["refine"])
    holdout = params.calibration.holdout()
    out = StageOutput(ctx.settings.artifact_root, "refine",
                      {"model": params.model.revision, "scores": file_sha256(ensure_local(params.profile.scores)), "start": stable_hash(bitmap.to_json()),
                       "options": spec.options, "quantizer": quantizer, "holdout": file_sha256(holdout)})  # fmt: skip
    with out.exclusive():
        if not out.is_complete():
            imatrix = params.profile.imatrix if quantizer == "gguf" else None
            quantize = backend_quantizer(quantizer, imatrix, model_config, checkpoint, load_ids(params.calibration.windows()))
            fitness = HeldoutKld(checkpoint, load_ids(holdout), quantize, max(settings.stages), ctx.device)
            refined = refine_bitmap(bitmap, table, spec.options, fitness, spec.ladder)
            with out.build() as tmp:
                refined.save(tmp / "bitmap.json")
        else:
            log.info("refine %s: cache hit %s", spec.name, out.uri)
    return BitMap.load(out.path / "bitmap.json")


def _backends(names, model_type: str) -> dict:
    """The run's backends that quantize the model's family (a refusal skips all its variants, logged)."""
    from tasks.quantize.registry import get_backend

    out = {}
    for name in names:
        backend = get_backend(name)
        refusal = backend.family_refusal(model_type)
        if refusal:
            log.warning("allocate: skipping every variant of %s: %s", name, refusal)
        else:
            out[name] = backend
    return out
