"""The profiling stage's contract: `run(ctx, ProfileParams) -> Profile`, the scores table of one model on
one calibration set, cached by its params. The opt-in measurements (the rivals' scores, ExLlamaV3's
dKLD, a backend's own rung errors) each add a key to the cache key only when asked for, so a profile
taken without them keeps its key, and a finished profile that holds more than a run asks for serves it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.artifacts import StageOutput, ensure_local, file_sha256
from tasks.calibration import Calibration
from tasks.contracts import Contract
from tasks.model_io import ResolvedModel
from tasks.profiling.table import IMATRIX_FILE, SCORES_CSV, SCORES_FORMAT, SUMMARY_FILE

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ProfileParams(Contract):
    model: ResolvedModel
    calibration: Calibration
    fisher_samples: int = 8  # calibration windows of the backward pass (the first ones)
    rival_scores: bool = False
    dkld: bool = False
    own_errors: tuple[str, ...] = ()  # whose own rung errors to measure too (Capabilities.own_errors names)

    def opt_ins(self, own_error_names: tuple[str, ...]) -> list[tuple[dict, bool]]:
        """Each opt-in measurement's cache-key entry, and whether these params ask for it."""
        from tasks.profiling.dkld import DEFAULT_WINDOWS

        # with GPTQ's own errors profiled, the rival scores include their per-token product (taylor_dloss_gptq)
        rivals = {"rival_scores": True, **({"taylor_dloss_gptq": True} if "gptq" in self.own_errors else {})}
        return [(rivals, self.rival_scores), ({"dkld_windows": DEFAULT_WINDOWS}, self.dkld),
                *(({f"{name}_errors": True}, name in self.own_errors) for name in own_error_names)]  # fmt: skip

    def cache_key(self, own_error_names: tuple[str, ...] = ()) -> dict:
        base = {"model": self.model.revision, "calibration": file_sha256(self.calibration.windows()),
                "fisher_samples": self.fisher_samples, "format": SCORES_FORMAT}  # fmt: skip
        return {**base, **{k: v for extra, wanted in self.opt_ins(own_error_names) if wanted for k, v in extra.items()}}


@dataclass(frozen=True)
class Profile(Contract):
    uri: str  # the stage output's local path (under the S3 mirror with an s3:// root: ensure_local fetches it)
    key: str  # its cache key's hash (names the profile's MLflow run)

    @property
    def scores(self) -> str:
        return str(Path(self.uri) / SCORES_CSV)

    @property
    def imatrix(self) -> str | None:
        """llama.cpp's importance matrix of the calibration set, where the profile wrote one (gguf rungs)."""
        path = self.local() / IMATRIX_FILE
        return str(path) if path.is_file() else None

    def local(self) -> Path:
        return ensure_local(self.uri)


def run(ctx, params: ProfileParams) -> Profile:
    """The scores table, profiled once per key (a killed attempt's per-layer progress is picked up)."""
    from tasks.families import layout_for
    from tasks.model_io import read_config
    from tasks.quantize.registry import measurable_errors, own_error_names

    model_path = params.model.local(ctx.settings.cache_dir)
    if params.own_errors:
        params = replace(params, own_errors=measurable_errors(params.own_errors, layout_for(read_config(model_path)).model_type))
    names = own_error_names()
    out = StageOutput(ctx.settings.artifact_root, "profiling", params.cache_key(names))
    if not out.is_complete():
        out = _richer(ctx, params, names) or out
    with out.exclusive():  # concurrent runs on one model: one profiles, the others wait for its scores
        if out.is_complete():
            log.info("profiling: cache hit %s", out.uri)
        else:
            with out.build(resume=True) as tmp:
                if (tmp / SUMMARY_FILE).exists():
                    log.info("profiling: the interrupted attempt had finished its scores; %s", tmp)
                else:
                    from tasks.profiling import run_profiling
                    from tasks.profiling.dkld import DEFAULT_WINDOWS

                    run_profiling(model_path, params.calibration.windows(), tmp, fisher_samples=params.fisher_samples,
                                  device=ctx.device, rival_scores=params.rival_scores, dkld_windows=DEFAULT_WINDOWS if params.dkld else 0,
                                  **{f"{name}_errors": True for name in params.own_errors})  # fmt: skip
    return Profile(uri=str(out.path), key=out.key)


def _richer(ctx, params: ProfileParams, names: tuple[str, ...]) -> StageOutput | None:
    """A finished profile with more opt-in columns than these params ask for (it serves as is)."""
    key = params.cache_key(names)
    unwanted = [extra for extra, wanted in params.opt_ins(names) if not wanted]
    for combo in (c for n in range(1, len(unwanted) + 1) for c in itertools.combinations(unwanted, n)):
        found = StageOutput(ctx.settings.artifact_root, "profiling", {**key, **{k: v for e in combo for k, v in e.items()}})
        if found.is_complete():
            log.info("profiling: reusing %s, which also holds opt-in scores this run does not need", found.uri)
            return found
    return None
