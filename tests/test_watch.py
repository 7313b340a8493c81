"""New-checkpoint triggers (tasks/orchestration/watch.py): detection, the watch state, and the pipeline
config an announced checkpoint starts. The DAG files themselves: tests/test_dags.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks.errors import PipelineError
from tasks.orchestration import watch, zoo

REPO = Path(__file__).resolve().parent.parent


def entry(name, model, watch_=True, **config) -> zoo.ZooEntry:
    return zoo.ZooEntry(name=name, config={"model": model, **config}, watch=watch_)


def lookup_from(revisions: dict):
    calls = []

    def lookup(model, revision, cache):
        calls.append(model)
        value = revisions[model]
        if isinstance(value, Exception):
            raise value
        return value

    lookup.calls = calls
    return lookup


# ---- detection -----------------------------------------------------------------------------------


def test_first_sight_unchanged_and_changed(state):
    entries = [entry("a", "org/a"), entry("quiet", "org/q", watch_=False)]
    state0 = watch.load_state()
    assert state0 == {"checkpoints": {}}

    first = watch.detect(entries, state0, lookup_from({"org/a": "sha1"}))
    assert [(o["entry"], o["status"], o["previous"]) for o in first] == [("a", "first", None)], "unwatched entries are ignored"
    state1, problems = watch.apply(state0, first)
    assert problems == [] and state1["checkpoints"]["org/a@default"]["revision"] == "sha1"
    watch.save_state(state1)

    unchanged = watch.detect(entries, watch.load_state(), lookup_from({"org/a": "sha1"}))
    assert [o["status"] for o in unchanged] == ["unchanged"]

    changed = watch.detect(entries, watch.load_state(), lookup_from({"org/a": "sha2"}))
    assert [(o["status"], o["previous"], o["revision"]) for o in changed] == [("changed", "sha1", "sha2")]
    extra = watch.event_extra(changed[0])
    assert extra == {"model": "org/a", "revision": "sha2", "previous": "sha1", "entry": "a"}
    state2, problems = watch.apply(watch.load_state(), changed, [extra])
    assert problems == [] and state2["checkpoints"]["org/a@default"]["revision"] == "sha2"


def test_a_change_that_was_not_announced_stays_unrecorded(state):
    state1, _ = watch.apply({"checkpoints": {}}, watch.detect([entry("a", "org/a")], {}, lookup_from({"org/a": "sha1"})))
    changed = watch.detect([entry("a", "org/a")], state1, lookup_from({"org/a": "sha2"}))
    state2, problems = watch.apply(state1, changed, announced=[])
    assert state2["checkpoints"]["org/a@default"]["revision"] == "sha1", "announced again next time"
    assert problems == ["a: new revision sha2 was not announced"]


def test_failed_lookups_are_reported_and_keep_the_old_state(state):
    entries = [entry("gone", "org/gone"), entry("a", "org/a")]
    obs = watch.detect(entries, {"checkpoints": {}}, lookup_from({"org/gone": PipelineError("not on the hub"), "org/a": "s"}))
    assert [o["status"] for o in obs] == ["error", "first"]
    state, problems = watch.apply({"checkpoints": {}}, obs)
    assert problems == ["gone: not on the hub"] and list(state["checkpoints"]) == ["org/a@default"]


def test_a_checkpoint_watched_twice_is_looked_up_once(state):
    lookup = lookup_from({"org/a": "sha"})
    obs = watch.detect([entry("a", "org/a"), entry("a-again", "org/a", eval_tokens=3000), entry("a-v2", "org/a", revision="v2")], {}, lookup)
    assert [o["entry"] for o in obs] == ["a", "a-v2"], "a branch is another checkpoint"
    assert lookup.calls == ["org/a", "org/a"]


def test_local_checkpoints_are_watched_by_content(state, tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, model)
    entries = [entry("local", str(model))]
    state1, _ = watch.apply({}, watch.detect(entries, {}))
    assert [o["status"] for o in watch.detect(entries, state1)] == ["unchanged"]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert [o["status"] for o in watch.detect(entries, state1)] == ["changed"]


def test_state_file_location_and_corruption(state, tmp_path, monkeypatch):
    assert watch.state_path() == state.resolve() / "watch" / "checkpoints.json"
    monkeypatch.setenv(watch.STATE_ENV, str(tmp_path / "s.json"))
    assert watch.state_path() == tmp_path / "s.json"
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(PipelineError, match="unreadable"):
        watch.load_state()
    (tmp_path / "s.json").write_text("[]")
    with pytest.raises(PipelineError, match="no 'checkpoints'"):
        watch.load_state()


# ---- asset-triggered pipeline runs ----------------------------------------------------------------


@dataclass
class Event:  # the fields of Airflow's AssetEventDagRunReferenceResult that event_extras reads
    extra: dict
    timestamp: str
    source_aliases: list = field(default_factory=list)


def test_event_extras_oldest_first():
    events = {"asset": [Event({"model": "b"}, "2026-01-02"), Event({"model": "a"}, "2026-01-01"), Event({}, "2026-01-03")]}
    assert watch.event_extras(events) == [{"model": "a"}, {"model": "b"}]
    assert watch.event_extras({}) == [] and watch.event_extras(None) == []


def test_event_config_takes_the_zoo_entry_and_pins_hub_commits(tmp_path):
    params = {"model": "embedded", "eval_tokens": 2048, "methods": ["sensiboost"]}
    entries = [entry("big", "org/big", eval_tokens=0, methods=[]), entry("local", str(tmp_path), eval_tokens=4096)]
    assert watch.event_config(params, [], entries) == params, "no events: the run's own params"

    config = watch.event_config(params, [{"model": "org/big", "revision": "abc", "entry": "big"}], entries)
    assert config == {"model": "org/big", "eval_tokens": 0, "methods": [], "revision": "abc"}

    config = watch.event_config(params, [{"model": str(tmp_path), "revision": "sha256:x", "entry": "local"}], entries)
    assert config["eval_tokens"] == 4096 and "revision" not in config, "a local directory is not asked for by hash"

    config = watch.event_config(params, [{"model": "org/new", "revision": "r1"}], entries)
    assert config == {**params, "model": "org/new", "revision": "r1"}, "a model outside the zoo runs with the params"

    config = watch.event_config(params, [{"model": "org/big", "revision": "a"}, {"model": "org/new", "revision": "b"}], entries)
    assert config["model"] == "org/new", "the latest event wins"
