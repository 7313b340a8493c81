"""The model zoo (tasks/zoo.py, dags/model_zoo.py): the zoo file, revision lookup, planning and skipping,
and the acceptance: running the model-zoo DAG twice with `airflow dags test` quantizes nothing the
second time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks import zoo
from tasks.artifacts import StageOutput
from tasks.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent

TINY_ENTRY = {
    "uniform_budgets": ["b4g64"],
    "methods": [],
    "budgets": [],
    "eval_tokens": 1024,
    "protocols": ["paper"],
    "calibration_samples": 4,
    "calibration_seq_len": 128,
}


def write_zoo(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def entry(name="a", model="embedded", watch=False, **config) -> zoo.ZooEntry:
    from dataclasses import asdict

    from tasks.pipeline import PipelineConfig

    return zoo.ZooEntry(name=name, config=asdict(PipelineConfig.from_dict({"model": model, **config})), watch=watch)


def fake_lookup(revisions: dict):
    def lookup(model, revision, cache):
        value = revisions[model]
        if isinstance(value, Exception):
            raise value
        return value

    return lookup


# ---- the zoo file --------------------------------------------------------------------------------


def test_load_zoo_merges_defaults_and_normalizes(tmp_path):
    path = write_zoo(
        tmp_path / "zoo.yaml",
        """
        defaults:
          eval_tokens: 512
          methods: []
        entries:
          - name: small
            model: embedded
            watch: true
            budgets: []
          - name: other
            model: org/model
            revision: v1
            eval_tokens: 64
            uniform_budgets: [b3g64]
            budgets: []
        """,
    )
    small, other = zoo.load_zoo(path)
    assert (small.name, small.model, small.watch, small.revision) == ("small", "embedded", True, None)
    assert small.config["eval_tokens"] == 512 and small.config["methods"] == []
    assert small.config["calibration_samples"] == 32, "PipelineConfig defaults are filled in"
    assert "name" not in small.config and "watch" not in small.config
    assert (other.revision, other.config["eval_tokens"], other.watch) == ("v1", 64, False)


def test_the_shipped_zoo_file_is_valid():
    entries = zoo.load_zoo(REPO / "dags" / "zoo.yaml")
    assert entries and all(e.name for e in entries)


def test_zoo_file_from_the_environment(tmp_path, monkeypatch):
    path = write_zoo(tmp_path / "z.yaml", "entries:\n  - {name: x, model: embedded}\n")
    monkeypatch.setenv(zoo.ZOO_ENV, str(path))
    assert zoo.zoo_path() == path
    assert [e.name for e in zoo.load_zoo()] == ["x"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("entries:\n  - {name: bad, model: embedded, methods: [magic]}\n", r"zoo entry 'bad': unknown method\(s\) \['magic'\]"),
        ("entries:\n  - {name: neg, model: embedded, budgets: ['-3']}\n", r"zoo entry 'neg': budget -3.0 bpp is outside"),
        ("entries:\n  - {name: nomodel}\n", r"zoo entry 'nomodel': no model given"),
        ("entries:\n  - {name: typo, model: embedded, eval_tokenz: 5}\n", r"zoo entry 'typo': unknown pipeline option\(s\): eval_tokenz"),
        ("entries:\n  - {name: w, model: embedded, watch: maybe}\n", r"zoo entry 'w': watch must be true or false"),
        ("entries:\n  - {model: embedded}\n", r"entry #1 has no name"),
        ("entries:\n  - {name: d, model: embedded}\n  - {name: d, model: embedded}\n", r"duplicate entry name\(s\) d"),
        ("entries: [1]\n", r"entry #1 is not a mapping"),
        ("models: []\n", r"unknown top-level key\(s\) models"),
        ("entries: {a: 1}\n", r"expected a mapping with an 'entries' list"),
        ("entries: [\n", r"is not valid YAML"),
    ],
)
def test_a_bad_zoo_is_one_line_naming_the_entry(tmp_path, text, message):
    path = write_zoo(tmp_path / "zoo.yaml", text)
    with pytest.raises(PipelineError, match=message) as info:
        zoo.load_zoo(path)
    assert "\n" not in str(info.value)


def test_missing_zoo_file(tmp_path):
    with pytest.raises(PipelineError, match="cannot read the zoo file"):
        zoo.load_zoo(tmp_path / "nope.yaml")


def test_find_entry_by_name_then_model(tmp_path):
    entries = [entry("a", model=str(tmp_path)), entry("b", model="org/m")]
    assert zoo.find_entry(entries, str(tmp_path / "." )).name == "a", "local paths compare resolved"
    assert zoo.find_entry(entries, "org/m").name == "b"
    assert zoo.find_entry(entries, "org/m", name="a").name == "a"
    assert zoo.find_entry(entries, "org/other") is None


# ---- revisions -----------------------------------------------------------------------------------


def test_is_hub_id(tmp_path):
    assert zoo.is_hub_id("meta-llama/Meta-Llama-3-8B")
    assert not zoo.is_hub_id("embedded")
    assert not zoo.is_hub_id(str(tmp_path)) and not zoo.is_hub_id("./relative") and not zoo.is_hub_id("x.gguf")


def test_local_revision_is_resolve_models_content_hash(state, tiny_model_dir):
    from tasks.model_io import resolve_model

    assert zoo.lookup_revision(str(tiny_model_dir)) == resolve_model(str(tiny_model_dir)).revision


def test_hub_revision_comes_from_the_hub_api_without_a_download(monkeypatch):
    import huggingface_hub

    calls = []

    class Info:
        sha = "abc123"

    def model_info(self, repo_id, revision=None):
        calls.append((repo_id, revision))
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr("tasks.model_io.resolve_model", lambda *a, **k: pytest.fail("no download for a revision lookup"))
    assert zoo.lookup_revision("org/model", "main") == "abc123"
    assert calls == [("org/model", "main")]


def test_hub_revision_falls_back_to_resolve_model_offline(monkeypatch):
    import huggingface_hub

    from tasks.model_io import ResolvedModel

    def offline(self, repo_id, revision=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr("tasks.model_io.resolve_model", lambda s, r, c: ResolvedModel("m", Path("/x"), "cached-sha", s))
    assert zoo.lookup_revision("org/model") == "cached-sha"


# ---- planning and skipping -----------------------------------------------------------------------


def test_plan_runs_what_is_new_and_skips_what_is_done(state):
    entries = [entry("a", model="org/a", budgets=[]), entry("b", model="org/b", budgets=[])]
    lookup = fake_lookup({"org/a": "sha-a1", "org/b": "sha-b1"})
    items = zoo.plan_zoo(entries, lookup=lookup)
    assert [(i["name"], i["status"]) for i in items] == [("a", "pending"), ("b", "pending")]
    a = items[0]
    assert a["revision"] == "sha-a1" and a["config"]["revision"] == "sha-a1", "hub ids run the keyed commit"

    result = zoo.run_entry(a, runner=fake_runner(state))
    assert result["ran"] and result["parent_run_id"] == "parent-1"
    manifest = StageOutput(state / "artifacts", zoo.MARKER_STAGE, zoo.marker_inputs(a["config"], "sha-a1")).manifest()
    assert manifest["entry"] == "a" and manifest["parent_run_id"] == "parent-1" and manifest["revision"] == "sha-a1"

    again = {i["name"]: i for i in zoo.plan_zoo(entries, lookup=lookup)}
    assert again["a"]["status"] == "done" and again["a"]["parent_run_id"] == "parent-1"
    assert again["b"]["status"] == "pending"
    skipped = zoo.run_entry(again["a"], runner=lambda c: pytest.fail("a done entry must not run"))
    assert skipped["ran"] is False


def test_a_new_revision_or_a_changed_config_runs_again(state):
    done = entry("a", model="org/a", budgets=[])
    item = zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-1"}))[0]
    zoo.run_entry(item, runner=fake_runner(state))
    assert zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done"
    assert zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-2"}))[0]["status"] == "pending"
    changed = entry("a", model="org/a", budgets=[], eval_tokens=999)
    assert zoo.plan_zoo([changed], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "pending"
    renamed = entry("renamed", model="org/a", budgets=[])
    assert zoo.plan_zoo([renamed], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done", "the name is not the key"
    pinned = entry("a", model="org/a", budgets=[], revision="main")
    assert zoo.plan_zoo([pinned], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done", "the resolved commit is"


def test_duplicates_and_failed_lookups(state):
    entries = [entry("a", model="org/a", budgets=[]), entry("twin", model="org/a", budgets=[]), entry("gone", model="org/gone")]
    lookup = fake_lookup({"org/a": "sha", "org/gone": PipelineError("model 'org/gone' was not found on the hub")})
    items = {i["name"]: i for i in zoo.plan_zoo(entries, lookup=lookup)}
    assert items["a"]["status"] == "pending"
    assert items["twin"]["status"] == "duplicate" and "as a" in items["twin"]["reason"]
    assert items["gone"]["status"] == "error"
    with pytest.raises(PipelineError, match="zoo entry 'gone': model 'org/gone' was not found"):
        zoo.run_entry(items["gone"])


def test_a_failed_run_writes_no_marker(state):
    item = zoo.plan_zoo([entry("a", model="org/a", budgets=[])], lookup=fake_lookup({"org/a": "sha"}))[0]

    def broken(config):
        raise PipelineError("quantization failed")

    with pytest.raises(PipelineError, match="quantization failed"):
        zoo.run_entry(item, runner=broken)
    assert zoo.plan_zoo([entry("a", model="org/a", budgets=[])], lookup=fake_lookup({"org/a": "sha"}))[0]["status"] == "pending"


def fake_runner(state: Path):
    """Stands in for run_inprocess: writes the reports finish() would, returns its result."""
    counter = {"n": 0}

    def run(config):
        counter["n"] += 1
        reports = state / "reports" / f"parent-{counter['n']}"
        reports.mkdir(parents=True)
        (reports / "results.json").write_text(json.dumps([{"variant": "hqq/uniform/4.25", "ppl_wikitext2": 12.0}]))
        return {"reports": str(reports), "promotion": None, "table": ""}

    return run


# ---- the DAG, for real ---------------------------------------------------------------------------


def airflow_env(state: Path, tmp_path: Path, zoo_file: Path) -> dict:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="120",
        QUANT_HOME=str(state),
        MLFLOW_TRACKING_URI=f"sqlite:///{state / 'mlflow.db'}",
        QUANT_ZOO_FILE=str(zoo_file),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return env


def quantized_dirs(state: Path) -> set[str]:
    root = state / "artifacts" / "quantized"
    return {str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir()} if root.exists() else set()


@pytest.mark.slow
def test_running_the_zoo_dag_twice_quantizes_nothing_the_second_time(state, tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(json.dumps({"entries": [{"name": "tiny", "model": str(tiny_model_dir), **TINY_ENTRY}]}))
    env = airflow_env(state, tmp_path, zoo_file)

    def dags_test() -> str:
        proc = subprocess.run(["airflow", "dags", "test", "model_zoo"], check=False, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "state=success" in out, out[-4000:]
        return out

    first = dags_test()
    assert "zoo: run tiny" in first and "quantize hqq/uniform at" in first
    built = quantized_dirs(state)
    assert len(built) == 1
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    name = f"{tiny_model_dir.name}-quant"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    exp = client.get_experiment_by_name(f"quant/{tiny_model_dir.name}")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline_run") == "true"]
    assert len(parents) == 1
    markers = list((state / "artifacts" / zoo.MARKER_STAGE).glob("*/manifest.json"))
    assert len(markers) == 1 and json.loads(markers[0].read_text())["parent_run_id"] == parents[0].info.run_id

    second = dags_test()
    assert "zoo: skip tiny: done for revision" in second
    assert "quantize hqq" not in second and "running the pipeline" not in second
    assert quantized_dirs(state) == built
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == {r.info.run_id for r in runs}, "no new runs"
