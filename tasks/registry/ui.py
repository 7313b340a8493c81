"""Links into MLflow's UI that open where a reader of a pipeline run wants to be.

MLflow 3's UI opens an experiment in its GenAI mode (traces) unless the browser chose "Model training"
(the toggle at the top of the sidebar); a link with `?workflowType=machine_learning` chooses it, so
every link here carries it. The runs table of a pipeline run is a *shared view*: the experiment tag
`mlflow.sharedViewState.<key>` holds the table's state (the run's variant runs, the key metric columns,
sorted by size), which the UI applies when a URL names the key (`viewStateShareKey=<key>`), as its own
"Share" button does.
"""

from __future__ import annotations

import json
import urllib.parse

from tasks.registry.tracking import KEY_METRICS, KEY_PREFIX

WORKFLOW_QUERY = "workflowType=machine_learning"
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# What each printed link opens (links.json keys), in the order `make run` prints them.
LINK_LABELS = {"runs": "runs table", "compare": "compare page", "champion": "champion version"}
NOTE_LIMIT = 7500  # characters of a run's description (a tag: MLflow stores up to 8,000)
TAG_LIMIT = 5000  # characters MLflow stores in an experiment tag's value
LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui --port 5000` over a local store (README, "Open the MLflow UI")
# The runs table's columns besides the run name (the variant): how long, what it produced, how big, how good.
KEY_COLUMNS = ("bpp", "size_mib", "kld_wikitext2", "ppl_wikitext2", "top1_wikitext2", "kld_c4", "ppl_c4")
ATTRIBUTE_COLUMNS = ("Duration", "Models", "Source")


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or `mlflow ui` on this machine for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's canonical column key


def view_state(run_ids: list[str]) -> dict:
    """The runs table showing exactly these runs, with the key metrics as columns, smallest model first."""
    assert set(KEY_COLUMNS) <= {*KEY_METRICS, "size_mib"}
    ids = ", ".join(f"'{r}'" for r in run_ids)
    return {
        "searchFilter": f"attributes.run_id IN ({ids})",
        "orderByKey": _column("metrics", f"{KEY_PREFIX}size_mib"),
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": [*(_column("attributes", a) for a in ATTRIBUTE_COLUMNS), *(_column("metrics", f"{KEY_PREFIX}{m}") for m in KEY_COLUMNS)],
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": False,
        "hideEmptyCharts": True,
    }


def share_runs_view(client, experiment_id: str, key: str, run_ids: list[str]) -> str:
    """Write the shared view of these runs on the experiment; return its key."""
    state = view_state(run_ids)
    if len(json.dumps(state)) > TAG_LIMIT:  # too many runs to name: the experiment's runs, same columns and order
        state["searchFilter"] = ""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + key, json.dumps(state, separators=(",", ":")))
    return key


def runs_url(base: str, experiment_id: str, share_key: str | None = None) -> str:
    share = f"&viewStateShareKey={share_key}" if share_key else ""
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}{share}"


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The runs-comparison page (a route of the single-page app, hence after '#'; JSON lists URL-encoded)."""
    query = f"runs={json.dumps(run_ids)}&experiments={json.dumps(experiment_ids)}"
    return f"{base}/#/compare-runs?{urllib.parse.quote(query, safe='=&')}&{WORKFLOW_QUERY}"


def version_url(base: str, model: str, version: str) -> str:
    return f"{base}/#/models/{urllib.parse.quote(model)}/versions/{version}?{WORKFLOW_QUERY}"


def run_links(tracking_uri: str, parent_run_id: str, variant_run_ids: list[str], model: str | None = None,
              champion: str | None = None) -> dict:  # fmt: skip
    """Share the run's view and return its links: runs table, compare page, champion version."""
    from tasks.registry.tracking import client_for

    base = ui_base(tracking_uri)
    client = client_for(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    key = share_runs_view(client, experiment_id, parent_run_id, variant_run_ids)
    links = {
        "runs": runs_url(base, experiment_id, key),
        "compare": compare_url(base, variant_run_ids, [experiment_id]),
        "parent_run": f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}?{WORKFLOW_QUERY}",
    }
    if model and champion:
        links["champion"] = version_url(base, model, champion)
    return links


def link_text(links: dict) -> str:
    """The links as markdown, in LINK_LABELS order (the parent run's description)."""
    return ", ".join(f"[{label}]({links[k]})" for k, label in LINK_LABELS.items() if k in links)


def pipeline_description(variants: int, links: dict, champion: str, table: str, summary: list[str]) -> str:
    """The parent run's description: its links, the champion decision, the table and the noise summary;
    without the table when MLflow's tag limit would cut it (reports/results.md holds it)."""
    head = f"Results of {variants} variants ({link_text(links)})."
    description = "\n\n".join([head, champion, table, *summary])
    if len(description) > NOTE_LIMIT:
        description = "\n\n".join([head, champion, "The table: artifact `reports/results.md`."])
    return description
