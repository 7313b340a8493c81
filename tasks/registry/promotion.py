"""Promotion: move the `champion` alias to the version worth serving.

The rule (mlflow/CONVENTIONS.md): among versions that passed their reload check (tag `load_check`,
tasks/registry/load_check.py), whose `saved_bytes` fit the cap and that have the metric, the champion is
the *smallest* saved model whose metric is within `tolerance` of the base model (KLD or NLL increase,
both 0 for the base model), or, when none is, the one closest to the base model. Nobody quantizes to get
the largest model: without a tolerance the best metric always wins, which is the variant with the most
bits. A new pick replaces the current champion only if it improves on it by at least
`min_improvement_pct` percent (in size when both meet the tolerance, else in the metric), or if the
champion is no longer eligible. The alias is moved with `MlflowClient.set_registered_model_alias`; why
is written into the versions' descriptions; no version is ever deleted (a champion that fails its reload
check with nothing eligible to replace it loses the alias, and says why). A decision to keep writes
nothing, so promotion is idempotent.

The decision itself (`decide`) is a pure function over plain candidate records, testable without MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

ALIAS = "champion"
# The default rule: the smallest model whose WikiText-2 KL divergence from the base model is at most 0.35
# nats per token (README, "The champion"); PipelineConfig.promote_metric/promote_tolerance set them per run.
DEFAULT_METRIC, DEFAULT_TOLERANCE = "kld_wikitext2", 0.35


@dataclass(frozen=True)
class Candidate:
    """One registered version as promotion sees it."""

    version: int
    value: float | None  # the metric; None when the version has none
    saved_bytes: float | None
    load_check: str | None = "passed"  # the version's reload check: only "passed" may be champion


@dataclass(frozen=True)
class Rule:
    """What makes a champion. `tolerance` bounds the metric (at most, or at least when higher is better);
    None means the best metric wins whatever its size."""

    metric: str = DEFAULT_METRIC
    tolerance: float | None = DEFAULT_TOLERANCE
    max_saved_bytes: float | None = None
    min_improvement_pct: float = 1.0
    lower_is_better: bool = True

    def text(self) -> str:
        """The rule in words, recorded with every promotion so a reader knows why without reading code."""
        cap = f", saved size <= {int(self.max_saved_bytes)} bytes ({_mib(self.max_saved_bytes)})" if self.max_saved_bytes is not None else ""
        if self.tolerance is None:
            best = "lowest" if self.lower_is_better else "highest"
            pick = f"the {best} {self.metric}"
        else:
            bound = "<=" if self.lower_is_better else ">="
            pick = f"the smallest saved model with {self.metric} {bound} {self.tolerance:g} (else the best {self.metric})"
        return f"{pick} among versions that reload{cap}; replaces the champion if better by >= {self.min_improvement_pct:g}%"

    def eligible(self, c: Candidate) -> bool:
        if c.value is None or not math.isfinite(c.value) or c.load_check != "passed":
            return False
        return self.max_saved_bytes is None or (c.saved_bytes is not None and c.saved_bytes <= self.max_saved_bytes)

    def within(self, c: Candidate) -> bool:
        """Within the tolerance of the base model (always False without one)."""
        if self.tolerance is None or c.value is None:
            return False
        return c.value <= self.tolerance if self.lower_is_better else c.value >= self.tolerance


@dataclass(frozen=True)
class Decision:
    action: str  # "promote" or "keep"
    champion: int  # the champion after the decision
    previous: int | None  # the champion before it
    best: int
    best_value: float
    previous_value: float | None
    improvement_pct: float | None  # how much better (smaller, or closer to the base) the best is than the previous champion
    reason: str
    eligible: int
    considered: int


def _mib(nbytes: float | None) -> str:
    return "? MiB" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def _size(c: Candidate) -> float:
    return c.saved_bytes if c.saved_bytes is not None else math.inf


def decide(candidates: list[Candidate], current: int | None, rule: Rule | None = None) -> Decision:
    """Apply the promotion rule. Pure: no MLflow, no clock."""
    rule = rule or Rule()
    metric, sign = rule.metric, 1.0 if rule.lower_is_better else -1.0
    eligible = [c for c in candidates if rule.eligible(c)]
    if not eligible:
        cap = f" with saved_bytes <= {int(rule.max_saved_bytes)}" if rule.max_saved_bytes is not None else ""
        raise PipelineError(f"no eligible version to promote: none of {len(candidates)} version(s) has metric {metric!r}{cap} "
                            "and a passed reload check")
    within = [c for c in eligible if rule.within(c)]
    # Ties: fewer saved bytes (or the better metric), then the older version, so the choice is deterministic.
    if within:
        best = min(within, key=lambda c: (_size(c), sign * c.value, c.version))
        why = f"v{best.version} is the smallest version within the tolerance ({_mib(best.saved_bytes)}, {metric} {best.value:.4g})"
    else:
        best = min(eligible, key=lambda c: (sign * c.value, _size(c), c.version))
        far = f"no version has {metric} within {rule.tolerance:g}; " if rule.tolerance is not None else ""
        why = f"{far}v{best.version} has the best {metric} {best.value:.4g} ({_mib(best.saved_bytes)})"
    by_version = {c.version: c for c in candidates}
    cur = by_version.get(current) if current is not None else None
    common = dict(best=best.version, best_value=best.value, eligible=len(eligible), considered=len(candidates))

    if cur is None:
        prefix = "no champion yet" if current is None else f"champion v{current} is not among the versions"
        return Decision("promote", best.version, current, previous_value=None, improvement_pct=None, reason=f"{prefix}; {why}", **common)
    if cur.version == best.version:
        return Decision("keep", cur.version, cur.version, previous_value=cur.value, improvement_pct=0.0,
                        reason=f"champion v{cur.version} is still the pick: {why}", **common)
    if not rule.eligible(cur):
        return Decision("promote", best.version, cur.version, previous_value=cur.value, improvement_pct=None,
                        reason=f"champion v{cur.version} is no longer eligible (no {metric}, over the memory cap or "
                        f"reload check {cur.load_check or 'not run'}); {why}", **common)
    if rule.within(best) and not rule.within(cur):
        return Decision("promote", best.version, cur.version, previous_value=cur.value, improvement_pct=None,
                        reason=f"champion v{cur.version} ({metric} {cur.value:.4g}) is outside the tolerance; {why}", **common)
    if rule.within(best):  # both within: the smaller model wins, if it is smaller by enough
        gain, what = 100.0 * (_size(cur) - _size(best)) / _size(cur) if math.isfinite(_size(cur)) else math.inf, "smaller"
    else:
        gain, what = 100.0 * sign * (cur.value - best.value) / abs(cur.value) if cur.value else math.inf, f"better in {metric}"
    if gain > 0 and gain >= rule.min_improvement_pct:
        return Decision("promote", best.version, cur.version, previous_value=cur.value, improvement_pct=gain,
                        reason=f"{why}; {gain:.2f}% {what} than champion v{cur.version} (>= {rule.min_improvement_pct:g}%)", **common)
    return Decision("keep", cur.version, cur.version, previous_value=cur.value, improvement_pct=gain,
                    reason=f"champion v{cur.version} kept: v{best.version} is only {gain:.2f}% {what} (< {rule.min_improvement_pct:g}%)", **common)


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_candidates(client, registered_model: str, metric: str) -> list[Candidate]:
    """Every version of the registered model with its metric and saved bytes.

    The run's metric is the record; the version tag of the same name (a string copy) is the fallback
    for versions whose run is gone or was logged elsewhere.
    """
    from mlflow.exceptions import MlflowException

    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{registered_model}'", page_token=token)
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    runs: dict[str, dict] = {}
    found = []
    for v in versions:
        metrics = {}
        if v.run_id:
            if v.run_id not in runs:
                try:
                    runs[v.run_id] = client.get_run(v.run_id).data.metrics
                except MlflowException:
                    runs[v.run_id] = {}
            metrics = runs[v.run_id]
        tags = v.tags or {}
        value = _float(metrics.get(metric, tags.get(metric)))
        saved = _float(metrics.get("saved_bytes"))
        if saved is None and _float(tags.get("size_mib")) is not None:
            saved = _float(tags["size_mib"]) * 2**20
        found.append(Candidate(int(v.version), value, saved, tags.get("load_check")))
    return found


def _current_champion(client, registered_model: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(registered_model)
    except MlflowException:
        raise PipelineError(f"registered model {registered_model!r} does not exist in the tracking store") from None
    aliases = getattr(model, "aliases", None) or {}
    return int(aliases[ALIAS]) if ALIAS in aliases else None


def promote_by(tracking_uri: str, registered_model: str, params) -> dict:
    """The promotion rule of a run's Params (promote_metric, promote_tolerance, promote_max_bytes,
    promote_min_improvement_pct) applied; a rule that cannot decide (no version passed its reload check)
    is a decision of no champion, recorded, not fatal."""
    try:
        return run_promotion(tracking_uri, registered_model, metric=params.promote_metric, tolerance=params.promote_tolerance,
                             max_saved_bytes=params.promote_max_bytes, min_improvement_pct=params.promote_min_improvement_pct)  # fmt: skip
    except PipelineError as exc:
        log.warning("promotion: %s", exc)
        return {"action": "none", "changed": False, "champion": None, "reason": str(exc)}


def run_promotion(
    tracking_uri: str,
    registered_model: str,
    *,
    metric: str = DEFAULT_METRIC,
    tolerance: float | None = DEFAULT_TOLERANCE,
    max_saved_bytes: float | None = None,
    min_improvement_pct: float = 1.0,
    lower_is_better: bool = True,
) -> dict:
    """Decide and apply the promotion; return the decision as a JSON-able dict (see CONVENTIONS.md)."""
    from mlflow import MlflowClient

    if min_improvement_pct < 0:
        raise PipelineError(f"min_improvement_pct must be >= 0, got {min_improvement_pct}")
    if max_saved_bytes is not None and max_saved_bytes <= 0:
        raise PipelineError(f"the memory cap must be positive, got {max_saved_bytes}")
    if tolerance is not None and not math.isfinite(tolerance):
        raise PipelineError(f"the promotion tolerance must be a finite number, got {tolerance}")
    rule = Rule(metric, tolerance, max_saved_bytes, min_improvement_pct, lower_is_better)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    current = _current_champion(client, registered_model)
    candidates = load_candidates(client, registered_model, metric)
    try:
        d = decide(candidates, current, rule)
    except PipelineError:
        failed = next((c for c in candidates if c.version == current and c.load_check == "failed"), None)
        if failed is None:
            raise
        return _demote(client, registered_model, failed, rule.text())
    changed = d.action == "promote"
    if changed:
        _record(client, registered_model, d, rule.text())
    log.info("%s %s@%s = v%s: %s", d.action, registered_model, ALIAS, d.champion, d.reason)
    chosen = next(c for c in candidates if c.version == d.champion)
    return {
        "model": registered_model,
        "alias": ALIAS,
        "action": d.action,
        "changed": changed,
        "champion": str(d.champion),
        "previous_champion": None if d.previous is None else str(d.previous),
        "metric": metric,
        "value": chosen.value,
        "saved_bytes": chosen.saved_bytes,
        "tolerance": tolerance,
        "within_tolerance": rule.within(chosen),
        "best": str(d.best),
        "best_value": d.best_value,
        "previous_value": d.previous_value,
        "improvement_pct": d.improvement_pct,
        "max_saved_bytes": max_saved_bytes,
        "min_improvement_pct": min_improvement_pct,
        "eligible": d.eligible,
        "considered": d.considered,
        "reason": d.reason,
        "rule": rule.text(),
    }


def _demote(client, name: str, champion: Candidate, rule: str) -> dict:
    """The champion failed its reload check and no other version may replace it: the alias goes (the
    version and its history stay), so nothing serves a model that does not load."""
    from tasks.registry.tracking import set_version_tag
    from tasks.registry.versions import set_note

    detail = client.get_model_version(name, str(champion.version)).tags.get("load_check_detail", "")
    reason = f"champion v{champion.version} failed its reload check ({detail}) and no other version is eligible"
    set_version_tag(client, name, champion.version, "demoted_reason", reason)
    set_note(client, name, str(champion.version), f"**Demoted** ({_now()}): {reason}.")
    client.delete_registered_model_alias(name, ALIAS)
    log.warning("demote %s@%s (v%s): %s", name, ALIAS, champion.version, reason)
    return {"model": name, "alias": ALIAS, "action": "demote", "changed": True, "champion": None,
            "previous_champion": str(champion.version), "reason": reason, "rule": rule}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _record(client, name: str, d: Decision, rule: str) -> None:
    """Move the alias and write why into the descriptions (the champion's, the former champion's and the
    registered model's). Descriptions first, alias last: a crash in between leaves the old champion in
    place and the next run promotes again (the same decision)."""
    from tasks.registry.versions import set_note

    now = _now()
    new, old = str(d.champion), None if d.previous is None else str(d.previous)
    after = f", after v{old}" if old else ""
    set_note(client, name, new, f"**Champion** since {now}{after}: {d.reason}.\n\nRule: {rule}.")
    client.set_registered_model_alias(name, ALIAS, new)
    client.update_registered_model(name, description=f"Quantized variants of {client.get_registered_model(name).tags.get('base_model', name)}. "
                                   f"`champion` = v{new} since {now}: {d.reason}.\n\nRule: {rule}.")  # fmt: skip
    if old is not None and old != new:
        try:
            set_note(client, name, old, f"**Former champion**, until {now}: superseded by v{new} ({d.reason}).")
        except Exception as exc:  # the old version may live in a store we cannot write; the alias moved anyway
            log.warning("could not note the previous champion v%s: %s", old, exc)
