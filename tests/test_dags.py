"""The DAG files as Airflow parses them: every DAG imports under each runtime, the pipeline's tasks are
exactly the step table's, its Params are PipelineConfig's, it runs on the checkpoint asset, and with
QUANT_RUNTIME=docker|kubernetes its steps become containers in the right image with a GPU where the
step needs one; the zoo triggers pipeline runs instead of running the pipeline itself."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from tasks.orchestration import watch
from tasks.orchestration.config import PipelineConfig
from tasks.orchestration.step_table import STEPS

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"
STEP_NAMES = [s.name for s in STEPS]


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


def test_dags_folder_holds_only_dag_definitions():
    for path in DAGS.glob("*.py"):
        text = path.read_text()
        assert "@dag(" in text, f"{path.name} defines no DAG: library code belongs in tasks/"
        assert len(text.splitlines()) < 200, f"{path.name} is wiring and should stay short"


def test_every_dag_parses_and_the_pipeline_is_the_step_table(monkeypatch):
    bag = dagbag(monkeypatch)
    assert {"quantization_pipeline", "model_zoo", "checkpoint_watch"} <= set(bag.dag_ids)
    pipeline = bag.dags["quantization_pipeline"]
    assert [a.uri.rstrip("/") for a in pipeline.timetable.asset_condition.objects] == [watch.CHECKPOINTS_URI]
    assert [t.task_id for t in pipeline.tasks] == STEP_NAMES
    for step in STEPS:
        task = pipeline.get_task(step.name)
        assert task.operator_class.__name__ == "_PythonDecoratedOperator", "TaskFlow in-process"
        assert task.retries == step.retries, step.name
        assert (task.max_active_tis_per_dagrun == 1) is step.serial, step.name
        upstream = {i for i in step.inputs if i != "conf"}
        assert task.upstream_task_ids == upstream, step.name
    announce = bag.dags["checkpoint_watch"].get_task("announce")
    assert [a.uri.rstrip("/") for a in announce.outlets] == [watch.CHECKPOINTS_URI]
    for dag_id in ("model_zoo", "checkpoint_watch"):
        assert bag.dags[dag_id].catchup is False


def test_a_bad_runtime_is_an_import_error_naming_it(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.syspath_prepend(str(DAGS))
    monkeypatch.setenv("QUANT_RUNTIME", "ray")
    bag = DagBag(dag_folder=str(DAGS / "quantization_pipeline.py"))
    assert "QUANT_RUNTIME='ray' is not one of" in next(iter(bag.import_errors.values()))


def test_dag_params_are_the_pipeline_config(monkeypatch):
    """A run triggered without conf gets the same configuration as `python -m tasks pipeline`, and every
    config field can be set from the form."""
    dag = dagbag(monkeypatch).dags["quantization_pipeline"]
    defaults = PipelineConfig()
    assert set(dag.params) == {f.name for f in fields(PipelineConfig)}
    for name in dag.params:
        assert dag.params[name] == getattr(defaults, name), name
    dag.params.validate()  # the defaults pass their own schema
    for name, bad in {"budgets": ["-3.0"], "methods": ["magic"], "backends": ["exllama"], "protocols": ["lambada"], "eval_tokens": -1}.items():
        with pytest.raises(Exception, match="valid|schema|not one of|does not match|less than"):
            dag.params.get_param(name).resolve(bad)


def images() -> dict:
    return json.loads((REPO / "containers" / "images.json").read_text())


def expected_image(backend: str | None, registry="registry.example.com/ml", tag="9.9") -> str:
    table = images()
    family = table["backends"][backend] if backend else "core"
    return f"{registry}/{table['families'][family]['image']}:{tag}"


# The mapped steps' items as the orchestrator reads them (tasks.orchestration.steps.VariantRecord.to_json):
# the name and the backend whose image runs the variant (none for the base model: the core image).
VARIANTS = [{"name": "none/unquantized/fp32", "backend_image": None}] + [
    {"name": f"{b}/uniform/4.25", "backend_image": b} for b in sorted(images()["backends"])
]
REGISTRY_ENV = {"QUANT_IMAGE_REGISTRY": "registry.example.com/ml", "QUANT_IMAGE_TAG": "9.9"}


def assert_pipeline_pods(dag) -> None:
    """Under kubernetes: every step is a pod in its image, the GPU steps request a GPU, each variant's
    quantize and evaluate pods run in its backend's image."""
    from kubernetes.client import ApiClient

    assert all(t in dag.task_ids for t in STEP_NAMES), dag.task_ids

    def pod_of(op) -> dict:
        return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))

    for step in STEPS:
        if step.mapped:
            mapped = dag.get_task(step.name)
            assert mapped.operator_class.__name__ == "KubernetesPodOperator"
            launches = dag.get_task(f"{step.name}_input").python_callable(VARIANTS)
            for variant, launch in zip(VARIANTS, launches):
                pod = pod_of(mapped.unmap(launch))
                container = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
                assert container["args"][:3] == ["step", step.name, "--input"] and json.loads(container["args"][3]) == variant
                gpu = container["resources"]["limits"].get("nvidia.com/gpu")
                backend = variant["backend_image"] if step.backend_image else None
                assert container["image"] == expected_image(backend), (step.name, variant)
                assert (gpu == "1") is step.gpu, (step.name, variant)
                if step.gpu:
                    assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"], (step.name, variant)
                assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"]), "the step's result is its XCom"
        else:
            op = dag.get_task(step.name)
            assert op.arguments[:3] == ["step", step.name, "--input"] and "xcom_pull" in op.arguments[3]
            assert op.upstream_task_ids == {f"{step.name}_input"}
            container = pod_of(op)["spec"]["containers"][0]
            assert container["image"] == expected_image(None)
            assert ("nvidia.com/gpu" in container["resources"]["limits"]) is step.gpu, step.name
        assert dag.get_task(step.name).retries == step.retries, step.name


def test_kubernetes_runtime_launches_gpu_pods_in_each_backends_image(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes not installed")
    assert_pipeline_pods(dagbag(monkeypatch, "kubernetes", **REGISTRY_ENV).dags["quantization_pipeline"])


def test_the_zoo_triggers_pipeline_runs_whose_variants_get_gpu_pods(monkeypatch, tmp_path, tiny_model_dir):
    """The zoo under kubernetes: one triggered quantization_pipeline run per pending entry, with the
    entry's config as conf; that DAG's per-variant pods request a GPU in the right image. Planning
    imports no torch (it runs in the Airflow image)."""
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes not installed")
    import subprocess
    import sys

    bag = dagbag(monkeypatch, "kubernetes", **REGISTRY_ENV)
    zoo_dag = bag.dags["model_zoo"]
    trigger = zoo_dag.get_task("trigger")
    assert trigger.operator_class.__name__ == "TriggerDagRunOperator"
    assert trigger.partial_kwargs["trigger_dag_id"] == "quantization_pipeline"
    assert trigger.partial_kwargs["wait_for_completion"] and trigger.partial_kwargs["deferrable"]
    items = [
        {"name": "a", "status": "pending", "key": "k1", "config": {"model": "org/a", "budgets": ["b3g64"]}},
        {"name": "b", "status": "done", "key": "k2", "config": {"model": "org/b"}},
    ]
    requests = zoo_dag.get_task("pending").python_callable(items, run_id="scheduled__2026-12-01")
    assert [r["conf"] for r in requests] == [items[0]["config"]]
    assert requests[0]["trigger_run_id"].startswith("zoo__a__k1__")
    assert requests == zoo_dag.get_task("pending").python_callable(items, run_id="scheduled__2026-12-01"), "a retry finds its run"
    assert_pipeline_pods(bag.dags[trigger.partial_kwargs["trigger_dag_id"]])

    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(json.dumps({"entries": [{"name": "tiny", "model": str(tiny_model_dir), "uniform_budgets": ["b4g64"]}]}))
    code = ("import sys, tasks.orchestration.zoo as z; assert z.plan_zoo(z.load_zoo(sys.argv[1]))[0]['status'] == 'pending'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'transformers')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(zoo_file)], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_docker_runtime_launches_containers_with_a_gpu(monkeypatch):
    pytest.importorskip("airflow.providers.docker", reason="apache-airflow-providers-docker not installed")
    dag = dagbag(monkeypatch, "docker", **REGISTRY_ENV).dags["quantization_pipeline"]
    mapped = dag.get_task("quantize")
    launches = dag.get_task("quantize_input").python_callable(VARIANTS)
    for variant, launch in zip(VARIANTS, launches):
        op = mapped.unmap(launch)
        assert op.image == expected_image(variant["backend_image"])
        assert op.command[:3] == ["step", "quantize", "--input"]
        assert op.device_requests and op.device_requests[0]["Capabilities"] == [["gpu"]]
    allocate = dag.get_task("allocate")
    assert allocate.device_requests == [] and allocate.command[:2] == ["step", "allocate"]


def test_in_process_tasks_hand_each_step_its_inputs_as_they_are(monkeypatch):
    """TaskFlow passes native values: a path string stays a string (the profile's scores.csv), a lazy
    sequence of mapped results becomes a list."""
    from tasks.orchestration import dag_factory, runner
    from tasks.orchestration.step_table import BY_NAME

    seen = []
    monkeypatch.setattr(runner, "run_step", lambda step, *inputs: seen.append((step.name, inputs)))

    class Lazy(__import__("collections.abc").abc.Sequence):  # what Airflow hands over for mapped results
        def __getitem__(self, i):
            return [{"name": "a"}, {"name": "b"}][i]

        def __len__(self):
            return 2

    dag_factory._callable(BY_NAME["allocate"])({"config": {}}, "/artifacts/profiling/k/scores.csv")
    dag_factory._callable(BY_NAME["finish"])({"config": {}}, Lazy())
    assert seen == [("allocate", ({"config": {}}, "/artifacts/profiling/k/scores.csv")),
                    ("finish", ({"config": {}}, [{"name": "a"}, {"name": "b"}]))]  # fmt: skip


def test_container_steps_read_each_others_results():
    """The glue between container steps: XComs arrive as dicts (Kubernetes), JSON text (Docker) or lazy lists."""
    from tasks.orchestration.dag_factory import _data, run_conf

    assert _data('{"a": 1}') == {"a": 1} and _data({"a": 1}) == {"a": 1}
    assert _data(['{"a": 1}', {"b": 2}]) == [{"a": 1}, {"b": 2}]
    params = {"model": "embedded"}
    assert run_conf({"params": params, "triggering_asset_events": {}}) == params
