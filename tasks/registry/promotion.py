"""Promotion: move the `champion` alias to the best registered version under a memory cap.

The rule (mlflow/CONVENTIONS.md): among versions that passed their reload check (tag `load_check`,
tasks/registry/load_check.py), whose `saved_bytes` fit the cap and that have the metric, take the best
(lowest by default); it replaces the current champion only if better by at least
`min_improvement_pct` percent, or if the current champion is no longer eligible. The alias is moved with
`MlflowClient.set_registered_model_alias` and the reason is written to tags; no version is ever deleted (a
champion that fails its reload check with nothing eligible to replace it loses the alias, and says why).
A decision to keep writes nothing, so promotion is idempotent.

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


@dataclass(frozen=True)
class Candidate:
    """One registered version as promotion sees it."""

    version: int
    value: float | None  # the metric; None when the version has none
    saved_bytes: float | None
    load_check: str | None = "passed"  # the version's reload check: only "passed" may be champion


@dataclass(frozen=True)
class Decision:
    action: str  # "promote" or "keep"
    champion: int  # the champion after the decision
    previous: int | None  # the champion before it
    best: int
    best_value: float
    previous_value: float | None
    improvement_pct: float | None  # how much better the best is than the previous champion
    reason: str
    eligible: int
    considered: int


def rule_text(metric: str, max_saved_bytes: float | None, min_improvement_pct: float, lower_is_better: bool) -> str:
    """The rule in words, recorded with every promotion so a reader knows why without reading code."""
    best = "lowest" if lower_is_better else "highest"
    cap = f"saved_bytes <= {int(max_saved_bytes)}" if max_saved_bytes is not None else "no memory cap"
    return f"{best} {metric} among versions with {cap}; replaces the champion if better by >= {min_improvement_pct:g}%"


def _eligible(c: Candidate, max_saved_bytes: float | None) -> bool:
    if c.value is None or not math.isfinite(c.value) or c.load_check != "passed":
        return False
    if max_saved_bytes is None:
        return True
    return c.saved_bytes is not None and c.saved_bytes <= max_saved_bytes


def decide(
    candidates: list[Candidate],
    current: int | None,
    *,
    max_saved_bytes: float | None = None,
    min_improvement_pct: float = 1.0,
    lower_is_better: bool = True,
    metric: str = "metric",
) -> Decision:
    """Apply the promotion rule. Pure: no MLflow, no clock."""
    eligible = [c for c in candidates if _eligible(c, max_saved_bytes)]
    if not eligible:
        cap = f" with saved_bytes <= {int(max_saved_bytes)}" if max_saved_bytes is not None else ""
        raise PipelineError(f"no eligible version to promote: none of {len(candidates)} version(s) has metric {metric!r}{cap} "
                            "and a passed reload check")
    sign = 1.0 if lower_is_better else -1.0
    # Ties: fewer saved bytes, then the older version, so the choice is deterministic.
    best = min(eligible, key=lambda c: (sign * c.value, c.saved_bytes if c.saved_bytes is not None else math.inf, c.version))
    by_version = {c.version: c for c in candidates}
    cur = by_version.get(current) if current is not None else None
    common = dict(best=best.version, best_value=best.value, eligible=len(eligible), considered=len(candidates))

    if cur is None:
        why = "no champion yet" if current is None else f"champion v{current} is not among the versions"
        return Decision("promote", best.version, current, previous_value=None, improvement_pct=None,
                        reason=f"{why}; v{best.version} has the best {metric} {best.value:.6g}", **common)
    if cur.version == best.version:
        return Decision("keep", cur.version, cur.version, previous_value=cur.value, improvement_pct=0.0,
                        reason=f"champion v{cur.version} is the best eligible version ({metric} {cur.value:.6g})", **common)
    if not _eligible(cur, max_saved_bytes):
        return Decision("promote", best.version, cur.version, previous_value=cur.value, improvement_pct=None,
                        reason=f"champion v{cur.version} is no longer eligible (no {metric}, over the memory cap or "
                        f"reload check {cur.load_check or 'not run'}); "
                        f"v{best.version} has the best {metric} {best.value:.6g}", **common)
    improvement = 100.0 * sign * (cur.value - best.value) / abs(cur.value) if cur.value else math.inf
    if improvement > 0 and improvement >= min_improvement_pct:
        return Decision("promote", best.version, cur.version, previous_value=cur.value, improvement_pct=improvement,
                        reason=f"v{best.version} {metric} {best.value:.6g} beats champion v{cur.version} "
                        f"{cur.value:.6g} by {improvement:.2f}% (>= {min_improvement_pct:g}%)", **common)
    return Decision("keep", cur.version, cur.version, previous_value=cur.value, improvement_pct=improvement,
                    reason=f"best v{best.version} {metric} {best.value:.6g} improves on champion v{cur.version} "
                    f"{cur.value:.6g} by only {improvement:.2f}% (< {min_improvement_pct:g}%)", **common)


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
        saved = _float(metrics.get("saved_bytes", tags.get("saved_bytes")))
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


def run_promotion(
    tracking_uri: str,
    registered_model: str,
    *,
    metric: str = "ppl_wikitext2",
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
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    current = _current_champion(client, registered_model)
    candidates = load_candidates(client, registered_model, metric)
    rule = rule_text(metric, max_saved_bytes, min_improvement_pct, lower_is_better)
    try:
        d = decide(candidates, current, max_saved_bytes=max_saved_bytes, min_improvement_pct=min_improvement_pct,
                   lower_is_better=lower_is_better, metric=metric)
    except PipelineError:
        failed = next((c for c in candidates if c.version == current and c.load_check == "failed"), None)
        if failed is None:
            raise
        return _demote(client, registered_model, failed, rule)
    changed = d.action == "promote"
    if changed:
        _record(client, registered_model, d, rule)
    log.info("%s %s@%s = v%s: %s", d.action, registered_model, ALIAS, d.champion, d.reason)
    return {
        "model": registered_model,
        "alias": ALIAS,
        "action": d.action,
        "changed": changed,
        "champion": str(d.champion),
        "previous_champion": None if d.previous is None else str(d.previous),
        "metric": metric,
        "value": d.best_value if d.champion == d.best else d.previous_value,
        "best": str(d.best),
        "best_value": d.best_value,
        "previous_value": d.previous_value,
        "improvement_pct": d.improvement_pct,
        "max_saved_bytes": max_saved_bytes,
        "min_improvement_pct": min_improvement_pct,
        "eligible": d.eligible,
        "considered": d.considered,
        "reason": d.reason,
        "rule": rule,
    }


def _demote(client, name: str, champion: Candidate, rule: str) -> dict:
    """The champion failed its reload check and no other version may replace it: the alias goes (the
    version and its history stay), so nothing serves a model that does not load."""
    detail = client.get_model_version(name, str(champion.version)).tags.get("load_check_detail", "")
    reason = f"champion v{champion.version} failed its reload check ({detail}) and no other version is eligible"
    client.set_model_version_tag(name, str(champion.version), "demoted_reason", reason)
    client.delete_registered_model_alias(name, ALIAS)
    log.warning("demote %s@%s (v%s): %s", name, ALIAS, champion.version, reason)
    return {"model": name, "alias": ALIAS, "action": "demote", "changed": True, "champion": None,
            "previous_champion": str(champion.version), "reason": reason, "rule": rule}


def _record(client, name: str, d: Decision, rule: str) -> None:
    """Move the alias and write why. Tags first, alias last: a crash in between leaves the old champion
    in place and the next run promotes again (the same decision)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new, old = str(d.champion), None if d.previous is None else str(d.previous)
    for key, value in {
        "champion_reason": d.reason,
        "champion_rule": rule,
        "promoted_at": now,
        "previous_champion": old or "",
    }.items():
        client.set_model_version_tag(name, new, key, value)
    client.set_registered_model_alias(name, ALIAS, new)
    for key, value in {
        "champion_version": new,
        "champion_reason": d.reason,
        "champion_rule": rule,
        "champion_promoted_at": now,
    }.items():
        client.set_registered_model_tag(name, key, value)
    if old is not None and old != new:
        try:
            client.set_model_version_tag(name, old, "champion_until", now)
            client.set_model_version_tag(name, old, "superseded_by", new)
        except Exception as exc:  # the old version may live in a store we cannot write; the alias moved anyway
            log.warning("could not tag the previous champion v%s: %s", old, exc)


def configure_parser(parser) -> None:
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking (and registry) URI")
    parser.add_argument("--model", required=True, help="registered model name, e.g. SmolLM2-135M-Instruct-quant")
    parser.add_argument("--max-bytes", type=float, default=None, help="memory cap on saved_bytes (default: none)")
    parser.add_argument("--min-improvement-pct", type=float, default=1.0,
                        help="replace the champion only if better by at least this percent (default 1.0)")
    parser.add_argument("--metric", default="ppl_wikitext2", help="metric to compare (default ppl_wikitext2)")
    parser.add_argument("--higher-is-better", action="store_true", help="for scores such as lm-eval accuracy")


def run_cli(args) -> int:
    d = run_promotion(
        args.tracking_uri,
        args.model,
        metric=args.metric,
        max_saved_bytes=args.max_bytes,
        min_improvement_pct=args.min_improvement_pct,
        lower_is_better=not args.higher_is_better,
    )
    if d["action"] == "demote":
        print(f"demote: {d['model']}@{d['alias']} removed from v{d['previous_champion']}; {d['reason']}")
    else:
        print(f"{d['action']}: {d['model']}@{d['alias']} = v{d['champion']} ({d['metric']} {d['value']:.6g}); {d['reason']}")
    return 0
