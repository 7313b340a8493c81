"""The model zoo (tasks/orchestration/zoo.py): the zoo file, revision lookup, planning, skipping and the
trigger requests. The zoo DAG under a real scheduler (two runs, the second quantizes nothing):
tests/test_standalone.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tasks.artifacts import StageOutput
from tasks.errors import PipelineError
from tasks.orchestration import zoo
from tasks import model_revisions
from tasks.registry import completion

REPO = Path(__file__).resolve().parent.parent



def write_zoo(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def entry(name="a", model="embedded", watch=False, **config) -> zoo.ZooEntry:
    from dataclasses import asdict

    from tasks.orchestration.config import PipelineConfig

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
          eval_tokens: 1536
          methods: []
        entries:
          - name: small
            model: embedded
            watch: true
            budgets: []
          - name: other
            model: org/model
            revision: v1
            eval_tokens: 4096
            uniform_budgets: [b3g64]
            budgets: []
        """,
    )
    small, other = zoo.load_zoo(path)
    assert (small.name, small.model, small.watch, small.revision) == ("small", "embedded", True, None)
    assert small.config["eval_tokens"] == 1536 and small.config["methods"] == []
    assert small.config["calibration_samples"] == 32, "PipelineConfig defaults are filled in"
    assert "name" not in small.config and "watch" not in small.config
    assert (other.revision, other.config["eval_tokens"], other.watch) == ("v1", 4096, False)


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
        ("entries:\n  - {name: bad, model: embedded, methods: [magic]}\n", r"zoo entry 'bad': Param methods: unknown method\(s\) \['magic'\]"),
        ("entries:\n  - {name: neg, model: embedded, budgets: ['-3']}\n", r"zoo entry 'neg': Param budgets: budget -3.0 bpp is outside"),
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
    assert model_revisions.is_hub_id("meta-llama/Meta-Llama-3-8B")
    assert not model_revisions.is_hub_id("embedded")
    assert not model_revisions.is_hub_id(str(tmp_path)) and not model_revisions.is_hub_id("./relative") and not model_revisions.is_hub_id("x.gguf")


def test_local_revision_is_resolve_models_content_hash(state, tiny_model_dir):
    from tasks.model_io import resolve_model

    assert model_revisions.lookup_revision(str(tiny_model_dir)) == resolve_model(str(tiny_model_dir)).revision


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
    assert model_revisions.lookup_revision("org/model", "main") == "abc123"
    assert calls == [("org/model", "main")]


def test_hub_revision_falls_back_to_resolve_model_offline(monkeypatch):
    import huggingface_hub

    from tasks.model_io import ResolvedModel

    def offline(self, repo_id, revision=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr("tasks.model_io.resolve_model", lambda s, r, c: ResolvedModel("m", Path("/x"), "cached-sha", s))
    assert model_revisions.lookup_revision("org/model") == "cached-sha"


# ---- planning and skipping -----------------------------------------------------------------------


def complete(state: Path, item: dict, parent: str = "parent-1") -> str:
    """What a finished pipeline run of the item's conf does: finish() marks its (normalized) config
    done for the checkpoint it resolved."""
    from tasks.orchestration.config import PipelineConfig

    config = PipelineConfig.from_dict(item["config"]).to_dict()  # as the triggered run's prepare sees it
    model = {"source": item["model"], "revision": item["revision"]}
    return completion.record_completion(state / "artifacts", config, model, parent, state / "reports" / parent, [{"variant": "hqq/uniform/4.25"}])


def test_plan_runs_what_is_new_and_skips_what_is_done(state):
    entries = [entry("a", model="org/a", budgets=[]), entry("b", model="org/b", budgets=[])]
    lookup = fake_lookup({"org/a": "sha-a1", "org/b": "sha-b1"})
    items = zoo.plan_zoo(entries, lookup=lookup)
    assert [(i["name"], i["status"]) for i in items] == [("a", "pending"), ("b", "pending")]
    a = items[0]
    assert a["revision"] == "sha-a1" and a["config"]["revision"] == "sha-a1", "hub ids run the keyed commit"
    assert [r["conf"] for r in zoo.trigger_requests(items, "run-1")] == [a["config"], items[1]["config"]]

    complete(state, a)
    manifest = StageOutput(state / "artifacts", completion.MARKER_STAGE, completion.marker_inputs(a["config"], "sha-a1")).manifest()
    assert manifest["parent_run_id"] == "parent-1" and manifest["revision"] == "sha-a1" and manifest["model"] == "org/a"
    assert complete(state, a, parent="parent-2") and StageOutput(state / "artifacts", completion.MARKER_STAGE, completion.marker_inputs(a["config"], "sha-a1")).manifest()["parent_run_id"] == "parent-1", "the first marker stays"

    again = {i["name"]: i for i in zoo.plan_zoo(entries, lookup=lookup)}
    assert again["a"]["status"] == "done" and again["a"]["parent_run_id"] == "parent-1"
    assert again["b"]["status"] == "pending"
    assert [r["conf"]["model"] for r in zoo.trigger_requests(list(again.values()), "run-2")] == ["org/b"], "a done entry is not triggered"


def test_trigger_run_ids_are_stable_per_zoo_run_and_distinct_across_runs(state):
    items = zoo.plan_zoo([entry("a", model="org/a", budgets=[])], lookup=fake_lookup({"org/a": "sha"}))
    first = zoo.trigger_requests(items, "scheduled__2026-12-01")
    assert first == zoo.trigger_requests(items, "scheduled__2026-12-01"), "a retried trigger task finds its own run"
    assert first[0]["trigger_run_id"] != zoo.trigger_requests(items, "scheduled__2026-12-02")[0]["trigger_run_id"]
    assert first[0]["trigger_run_id"].startswith(f"zoo__a__{items[0]['key']}__")


def test_a_new_revision_or_a_changed_config_runs_again(state):
    done = entry("a", model="org/a", budgets=[])
    item = zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-1"}))[0]
    complete(state, item)
    assert zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done"
    assert zoo.plan_zoo([done], lookup=fake_lookup({"org/a": "sha-2"}))[0]["status"] == "pending"
    changed = entry("a", model="org/a", budgets=[], eval_tokens=3000)
    assert zoo.plan_zoo([changed], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "pending"
    renamed = entry("renamed", model="org/a", budgets=[])
    assert zoo.plan_zoo([renamed], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done", "the name is not the key"
    pinned = entry("a", model="org/a", budgets=[], revision="main")
    assert zoo.plan_zoo([pinned], lookup=fake_lookup({"org/a": "sha-1"}))[0]["status"] == "done", "the resolved commit is"


def test_duplicates_and_failed_lookups(state):
    entries = [entry("a", model="org/a", budgets=[]), entry("twin", model="org/a", budgets=[]), entry("gone", model="org/gone")]
    lookup = fake_lookup({"org/a": "sha", "org/gone": PipelineError("model 'org/gone' was not found on the hub")})
    items = zoo.plan_zoo(entries, lookup=lookup)
    by_name = {i["name"]: i for i in items}
    assert by_name["a"]["status"] == "pending"
    assert by_name["twin"]["status"] == "duplicate" and "as a" in by_name["twin"]["reason"]
    assert by_name["gone"]["status"] == "error"
    assert [r["conf"]["model"] for r in zoo.trigger_requests(items, "run")] == ["org/a"], "one run for the twins, none for the error"
    assert zoo.failed_lookups(items) == ["gone: model 'org/gone' was not found on the hub"]


def test_the_cli_runs_pending_entries_in_process_and_a_failure_marks_nothing(state):
    items = zoo.plan_zoo([entry("a", model="org/a", budgets=[]), entry("b", model="org/b", budgets=[])],
                         lookup=fake_lookup({"org/a": "sha", "org/b": "sha"}))  # fmt: skip
    complete(state, items[1])
    ran = []
    results = zoo.run_pending(zoo.plan_zoo([entry("a", model="org/a", budgets=[]), entry("b", model="org/b", budgets=[])],
                                           lookup=fake_lookup({"org/a": "sha", "org/b": "sha"})),
                              runner=lambda c: ran.append(c["model"]) or {"parent_run_id": "p", "reports": "r"})  # fmt: skip
    assert ran == ["org/a"] and results == [{"name": "a", "parent_run_id": "p", "reports": "r"}]

    def broken(config):
        raise PipelineError("quantization failed")

    with pytest.raises(PipelineError, match="quantization failed"):
        zoo.run_pending(items, runner=broken)
    assert zoo.plan_zoo([entry("a", model="org/a", budgets=[])], lookup=fake_lookup({"org/a": "sha"}))[0]["status"] == "pending"
