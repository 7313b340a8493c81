"""New-checkpoint triggers (tasks/watch.py, dags/checkpoint_watch.py) and the DAG files themselves:
every DAG parses, the pipeline runs on the checkpoint asset, and with QUANT_RUNTIME=docker|kubernetes
its steps become containers in the right image with a GPU where the step needs one."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks import watch, zoo
from tasks.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"


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
    obs = watch.detect([entry("a", "org/a"), entry("a-again", "org/a", eval_tokens=5), entry("a-v2", "org/a", revision="v2")], {}, lookup)
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
    entries = [entry("big", "org/big", eval_tokens=0, methods=[]), entry("local", str(tmp_path), eval_tokens=64)]
    assert watch.event_config(params, [], entries) == params, "no events: the run's own params"

    config = watch.event_config(params, [{"model": "org/big", "revision": "abc", "entry": "big"}], entries)
    assert config == {"model": "org/big", "eval_tokens": 0, "methods": [], "revision": "abc"}

    config = watch.event_config(params, [{"model": str(tmp_path), "revision": "sha256:x", "entry": "local"}], entries)
    assert config["eval_tokens"] == 64 and "revision" not in config, "a local directory is not asked for by hash"

    config = watch.event_config(params, [{"model": "org/new", "revision": "r1"}], entries)
    assert config == {**params, "model": "org/new", "revision": "r1"}, "a model outside the zoo runs with the params"

    config = watch.event_config(params, [{"model": "org/big", "revision": "a"}, {"model": "org/new", "revision": "b"}], entries)
    assert config["model"] == "org/new", "the latest event wins"


# ---- the DAG files -------------------------------------------------------------------------------


def dagbag(monkeypatch, runtime: str | None = None, **env):
    """Parse dags/ as Airflow does (the DAGs folder on sys.path) under QUANT_RUNTIME=runtime."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.syspath_prepend(str(DAGS))
    if runtime:
        monkeypatch.setenv("QUANT_RUNTIME", runtime)
    else:
        monkeypatch.delenv("QUANT_RUNTIME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}, bag.import_errors
    return bag


def pipeline_module(monkeypatch):
    """dags/quantization_pipeline.py imported afresh as a plain module, under the default runtime."""
    monkeypatch.syspath_prepend(str(DAGS))
    monkeypatch.delenv("QUANT_RUNTIME", raising=False)
    sys.modules.pop("quantization_pipeline", None)
    import quantization_pipeline

    return quantization_pipeline


def test_every_dag_parses_and_the_pipeline_runs_on_new_checkpoints(monkeypatch):
    bag = dagbag(monkeypatch)
    assert {"quantization_pipeline", "model_zoo", "checkpoint_watch"} <= set(bag.dag_ids)
    pipeline = bag.dags["quantization_pipeline"]
    assert [a.uri.rstrip("/") for a in pipeline.timetable.asset_condition.objects] == [watch.CHECKPOINTS_URI]
    assert [t.task_id for t in pipeline.tasks] == ["prepare", "profile", "allocate", "quantize", "evaluate", "record", "finish"]
    assert pipeline.get_task("quantize").operator_class.__name__ == "_PythonDecoratedOperator", "TaskFlow, mapped"
    announce = bag.dags["checkpoint_watch"].get_task("announce")
    assert [a.uri.rstrip("/") for a in announce.outlets] == [watch.CHECKPOINTS_URI]
    assert bag.dags["model_zoo"].get_task("run").max_active_tis_per_dagrun == 1
    for dag_id in ("model_zoo", "checkpoint_watch"):
        assert bag.dags[dag_id].catchup is False


def test_a_bad_runtime_is_an_import_error_naming_it(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.syspath_prepend(str(DAGS))
    monkeypatch.setenv("QUANT_RUNTIME", "ray")
    bag = DagBag(dag_folder=str(DAGS / "quantization_pipeline.py"))
    assert "QUANT_RUNTIME='ray' is not one of" in next(iter(bag.import_errors.values()))


def images() -> dict:
    return json.loads((REPO / "containers" / "images.json").read_text())


def expected_image(backend: str | None, registry="registry.example.com/ml", tag="9.9") -> str:
    table = images()
    family = table["backends"][backend] if backend else "core"
    return f"{registry}/{table['families'][family]['image']}:{tag}"


VARIANTS = [{"backend": "none", "method": "unquantized"}] + [{"backend": b, "method": "uniform"} for b in sorted(images()["backends"])]
REGISTRY_ENV = {"QUANT_IMAGE_REGISTRY": "registry.example.com/ml", "QUANT_IMAGE_TAG": "9.9"}


def test_kubernetes_runtime_launches_gpu_pods_in_each_backends_image(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes not installed")
    from kubernetes.client import ApiClient

    dag = dagbag(monkeypatch, "kubernetes", **REGISTRY_ENV).dags["quantization_pipeline"]
    steps = ["prepare", "profile", "allocate", "quantize", "evaluate", "record", "finish"]
    assert all(t in dag.task_ids for t in steps), dag.task_ids

    def pod_of(op) -> dict:
        return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))

    for step in ("quantize", "evaluate", "record"):
        mapped = dag.get_task(step)
        assert mapped.operator_class.__name__ == "KubernetesPodOperator"
        launches = dag.get_task(f"{step}_input").python_callable(step, VARIANTS)
        for variant, launch in zip(VARIANTS, launches):
            pod = pod_of(mapped.unmap(launch))
            container = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
            assert container["args"][:3] == ["step", step, "--input"] and json.loads(container["args"][3]) == variant
            gpu = container["resources"]["limits"].get("nvidia.com/gpu")
            backend = None if variant["backend"] == "none" else variant["backend"]
            if step == "record":
                assert container["image"] == expected_image(None) and gpu is None
            else:
                assert container["image"] == expected_image(backend), (step, variant)
                assert gpu == "1" and pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"], (step, variant)
            assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"]), "the step's result is its XCom"

    for step, wants_gpu in {"prepare": False, "profile": True, "allocate": False, "finish": False}.items():
        op = dag.get_task(step)
        assert op.arguments[:3] == ["step", step, "--input"] and "xcom_pull" in op.arguments[3]
        assert op.upstream_task_ids == {f"{step}_input"}
        pod = pod_of(op)
        container = pod["spec"]["containers"][0]
        assert container["image"] == expected_image(None)
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) is wants_gpu, step


def test_docker_runtime_launches_containers_with_a_gpu(monkeypatch):
    pytest.importorskip("airflow.providers.docker", reason="apache-airflow-providers-docker not installed")
    dag = dagbag(monkeypatch, "docker", **REGISTRY_ENV).dags["quantization_pipeline"]
    mapped = dag.get_task("quantize")
    launches = dag.get_task("quantize_input").python_callable("quantize", VARIANTS)
    for variant, launch in zip(VARIANTS, launches):
        op = mapped.unmap(launch)
        assert op.image == expected_image(None if variant["backend"] == "none" else variant["backend"])
        assert op.command[:3] == ["step", "quantize", "--input"]
        assert op.device_requests and op.device_requests[0]["Capabilities"] == [["gpu"]]
    allocate = dag.get_task("allocate")
    assert allocate.device_requests == [] and allocate.command[:2] == ["step", "allocate"]


def test_container_steps_read_each_others_results(monkeypatch):
    """The glue between container steps: XComs arrive as dicts (Kubernetes) or JSON text (Docker)."""
    qp = pipeline_module(monkeypatch)

    assert qp._loads('{"a": 1}') == {"a": 1} and qp._loads({"a": 1}) == {"a": 1}
    assert qp._loads(['{"a": 1}', {"b": 2}]) == [{"a": 1}, {"b": 2}]
    params = {"model": "embedded"}
    assert qp.run_config({"params": params, "triggering_asset_events": {}}) == params


def test_dag_params_default_to_the_pipeline_config(monkeypatch):
    """A run triggered without conf must get the same configuration as `python -m tasks pipeline`."""
    from dataclasses import fields

    from tasks.pipeline import PipelineConfig

    qp = pipeline_module(monkeypatch)
    defaults = PipelineConfig()
    assert set(qp.PARAMS) <= {f.name for f in fields(PipelineConfig)}
    for name, param in qp.PARAMS.items():
        assert param.value == getattr(defaults, name), name
