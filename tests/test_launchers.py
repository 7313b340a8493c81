"""tasks/deploy/launch.py: the pods and containers the DAG would launch, built without a cluster or an engine.

Checks that GPU stages request `nvidia.com/gpu` and land on GPU nodes, that each backend runs in its
family's image, that the pods are valid Kubernetes objects (kubernetes-validate's schemas, strict) and
follow the policy of infra/k8s/pod-template.yaml, and, where the Airflow providers are installed, that the
operators really build those pods.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.errors import PipelineError
from tasks.deploy import launch as launchers
from tasks.deploy.launch import LaunchConfig, docker_spec, image_for, launch_spec, make_operator, pod_manifest
from tasks.orchestration.step_table import BY_NAME as STEPS

REPO = Path(__file__).resolve().parent.parent

IMAGES = json.loads((REPO / "containers" / "images.json").read_text())
K8S_ENV = {"QUANT_RUNTIME": "kubernetes", "QUANT_IMAGE_REGISTRY": "registry.example.com/ml", "QUANT_IMAGE_TAG": "1.2.3"}
STAGES = sorted(s for s in IMAGES["stages"] if s != "step")  # `step` is tested by step name below
GPU_STAGES = sorted(s for s in STAGES if IMAGES["stages"][s]["gpu"])
CPU_STAGES = sorted(s for s in STAGES if not IMAGES["stages"][s]["gpu"])
BACKENDS = sorted(IMAGES["backends"])


def image(family: str, registry="registry.example.com/ml", tag="1.2.3") -> str:
    return f"{registry}/{IMAGES['families'][family]['image']}:{tag}"


def k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    kv.validate(doc, "1.33", strict=True)


@pytest.fixture
def k8s() -> LaunchConfig:
    return LaunchConfig.from_env(K8S_ENV)


def test_default_runtime_is_inprocess():
    config = LaunchConfig.from_env({})
    assert config.runtime == "inprocess"
    spec = launch_spec("profile", None, ["--model", "embedded"], config)
    assert spec == {"runtime": "inprocess", "argv": ["python", "-m", "tasks", "profile", "--model", "embedded"]}
    with pytest.raises(PipelineError, match="no operator"):
        make_operator("profile", "profile", None, [], config)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(PipelineError, match="QUANT_RUNTIME='ray'"):
        LaunchConfig.from_env({"QUANT_RUNTIME": "ray"})
    with pytest.raises(PipelineError, match="QUANT_GPUS"):
        LaunchConfig.from_env({"QUANT_GPUS": "-1"})
    with pytest.raises(PipelineError, match="node labels"):
        LaunchConfig.from_env({"QUANT_K8S_GPU_NODE_SELECTOR": "[1]"})
    config = LaunchConfig.from_env(K8S_ENV)
    with pytest.raises(PipelineError, match="unknown stage 'train'"):
        pod_manifest("train", None, [], config)
    with pytest.raises(PipelineError, match="no image for backend 'exl2'"):
        pod_manifest("quantize", "exl2", [], config)
    with pytest.raises(PipelineError, match="list of strings"):
        pod_manifest("quantize", "hqq", "--bits 4", config)
    with pytest.raises(PipelineError, match="not found"):
        image_for("profile", None, LaunchConfig(images_file=REPO / "nope.json"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_quantizes_and_evaluates_in_its_image(backend, k8s):
    family = IMAGES["backends"][backend]
    for stage in ("quantize", "evaluate"):
        pod = pod_manifest(stage, backend, ["--backend", backend], k8s)
        container = pod["spec"]["containers"][0]
        assert container["image"] == image(family)
        assert container["args"] == [stage, "--backend", backend]
        assert "command" not in container, "the image's ENTRYPOINT (python -m tasks) runs"
        assert pod["metadata"]["labels"]["quantpipe/backend"] == backend
        assert pod["metadata"]["namespace"] == "quantpipe"


def test_stages_without_backend_run_in_core(k8s):
    for stage in STAGES:
        assert image_for(stage, None, k8s) == image(IMAGES["stages"][stage]["family"])
    assert image_for("profile", "gptq", k8s) == image("core"), "only backend stages follow the backend"
    assert image_for("profile", None, LaunchConfig()) == "quantpipe-core:latest", "images.json defaults"


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_gpu_stages_request_a_gpu(stage, k8s):
    pod = pod_manifest(stage, "hqq", ["--x", 1], k8s)
    spec = pod["spec"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert limits[launchers.GPU_RESOURCE] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    k8s_validate(pod)
    gpus = LaunchConfig.from_env({**K8S_ENV, "QUANT_GPUS": "2", "QUANT_K8S_GPU_NODE_SELECTOR": '{"gpu": "h100"}'})
    pod = pod_manifest(stage, None, [], gpus)
    assert pod["spec"]["containers"][0]["resources"]["limits"][launchers.GPU_RESOURCE] == "2"
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}


@pytest.mark.parametrize("stage", CPU_STAGES)
def test_cpu_stages_do_not_hold_a_gpu(stage, k8s):
    pod = pod_manifest(stage, None, [], k8s)
    assert launchers.GPU_RESOURCE not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
    k8s_validate(pod)


@pytest.mark.parametrize("stage,backend", [(s, None) for s in STAGES] + [("quantize", b) for b in BACKENDS])
def test_every_pod_is_a_valid_kubernetes_object(stage, backend, k8s):
    pod = pod_manifest(stage, backend, ["--artifact-root", "s3://bucket/x", "--budget", "4.25"], k8s)
    k8s_validate(pod)
    assert len(pod["metadata"]["name"]) <= 63


def test_pods_follow_the_infra_pod_template(k8s):
    """The launchers and infra/k8s/pod-template.yaml describe the same GPU pod policy."""
    template = yaml.safe_load((REPO / "infra" / "k8s" / "pod-template.yaml").read_text())
    pod = pod_manifest("quantize", "gptq", [], k8s)
    for key in ("restartPolicy", "serviceAccountName", "automountServiceAccountToken", "nodeSelector",
                "tolerations", "securityContext", "volumes"):  # fmt: skip
        assert pod["spec"][key] == template["spec"][key], key
    ours, theirs = pod["spec"]["containers"][0], template["spec"]["containers"][0]
    for key in ("name", "envFrom", "resources", "volumeMounts", "securityContext", "imagePullPolicy"):
        assert ours[key] == theirs[key], key
    assert pod["metadata"]["namespace"] == template["metadata"]["namespace"]


def test_docker_spec():
    env = {"QUANT_RUNTIME": "docker", "QUANT_DOCKER_NETWORK": "quantpipe", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "id", "UNRELATED": "x"}  # fmt: skip
    config = LaunchConfig.from_env(env)
    spec = launch_spec("quantize", "bnb", ["--bits", 4], config)
    container = spec["container"]
    assert spec["image"] == container["image"] == "quantpipe-bnb:latest"
    assert container["command"] == ["quantize", "--bits", "4"]
    assert container["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert container["environment"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "s3cr3t" not in json.dumps(spec), "secrets are added by the operator at run time only"
    assert container["network_mode"] == "quantpipe"
    assert container["mounts"][0]["target"] == launchers.CACHE_MOUNT
    assert docker_spec("allocate", None, [], config)["device_requests"] == []


def test_the_module_imports_no_provider():
    code = ("import sys; import tasks.deploy.launch; "
            "print(sorted(m for m in sys.modules if m.startswith(('airflow', 'docker', 'kubernetes'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_kubernetes_pod_operator_builds_the_same_pod(k8s):
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes not installed")
    from kubernetes.client import ApiClient

    op = make_operator("quantize_gptq", "quantize", "gptq", ["--bitmap", "{{ ti.xcom_pull('allocate') }}"], k8s)
    assert "{{" in op.arguments[-1], "arguments stay templated for Airflow to render"
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    container = pod["spec"]["containers"][0]
    assert container["image"] == image("gptq")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"]
    assert pod["metadata"]["namespace"] == "quantpipe"
    k8s_validate(pod)


def test_docker_operator_gets_a_gpu_and_secrets_only_at_run_time(monkeypatch):
    pytest.importorskip("airflow.providers.docker", reason="apache-airflow-providers-docker not installed")
    from airflow.providers.docker.operators.docker import DockerOperator
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-at-parse-time")
    config = LaunchConfig.from_env({**__import__("os").environ, "QUANT_RUNTIME": "docker"})
    with DAG("launchers_docker_secrets", schedule=None) as dag:
        op = make_operator("quantize_awq", "quantize", "awq", ["--x"], config)
    assert isinstance(op, DockerOperator) and op.image == "quantpipe-llmcompressor:latest"
    assert op.command == ["quantize", "--x"] and "AWS_SECRET_ACCESS_KEY" not in op.environment
    assert op.device_requests[0]["Driver"] == "nvidia" and op.device_requests[0]["Capabilities"] == [["gpu"]]
    assert "s3cr3t" not in json.dumps(DagSerialization.to_dict(dag)), "no secret in the serialized DAG"

    seen = {}
    monkeypatch.setattr(DockerOperator, "execute", lambda self, context: seen.update(self._private_environment))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-at-run-time")
    op.execute({})
    assert seen == {"AWS_SECRET_ACCESS_KEY": "s3cr3t-at-run-time"}


@pytest.mark.parametrize("runtime", ["docker", "kubernetes"])
def test_per_task_kwargs_for_mapped_stages(runtime):
    """Variants of one stage share the policy and differ only in image and command line (JSON-able)."""
    config = LaunchConfig.from_env({**K8S_ENV, "QUANT_RUNTIME": runtime})
    per_task = [launchers.task_kwargs("quantize", b, ["--backend", b], config) for b in BACKENDS]
    assert json.loads(json.dumps(per_task)) == per_task
    assert [t["image"] for t in per_task] == [image(IMAGES["backends"][b]) for b in BACKENDS]
    assert all(set(t) == set(launchers.TASK_KEYS[runtime]) for t in per_task)


@pytest.mark.parametrize("runtime", ["docker", "kubernetes"])
def test_mapped_operator_serializes(runtime):
    """`cls.partial(**shared).expand_kwargs(per_task)` in a DAG survives Airflow's DAG serialization."""
    provider = {"docker": "airflow.providers.docker", "kubernetes": "airflow.providers.cncf.kubernetes"}[runtime]
    pytest.importorskip(provider, reason=f"{provider} not installed")
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    config = LaunchConfig.from_env({"QUANT_RUNTIME": runtime})
    cls, shared, _ = launchers.operator_spec("step", None, ["quantize"], config)
    with DAG(f"launchers_{runtime}", schedule=None) as dag:
        per_task = [launchers.task_kwargs("step", b, ["quantize", "--input", "{}"], config) for b in BACKENDS]
        cls.partial(task_id="quantize", **shared).expand_kwargs(per_task)
        make_operator("allocate", "allocate", None, ["--budget", "4.25"], config)
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert set(restored.task_dict) == {"quantize", "allocate"}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_dag_steps_run_in_the_right_image(step, k8s):
    """`python -m tasks step NAME --input JSON`: image and GPU follow the step, and the backend for
    quantize/evaluate."""
    args = [step, "--input", '{"backend": "gptq"}']
    pod = pod_manifest("step", "gptq", args, k8s)
    container = pod["spec"]["containers"][0]
    family = "gptq" if STEPS[step].backend_image else STEPS[step].family
    assert container["image"] == image(family)
    assert container["args"] == ["step", *args]
    assert (launchers.GPU_RESOURCE in container["resources"]["limits"]) == STEPS[step].gpu
    assert pod["metadata"]["labels"]["quantpipe/step"] == step
    k8s_validate(pod)
    docker = docker_spec("step", "gptq", args, LaunchConfig.from_env({"QUANT_RUNTIME": "docker"}))
    assert docker["retrieve_output"] and docker["retrieve_output_path"] == launchers.XCOM_PATH
    assert bool(docker["device_requests"]) == STEPS[step].gpu


def test_unknown_step_is_an_error(k8s):
    with pytest.raises(PipelineError, match="unknown step 'train'"):
        pod_manifest("step", None, ["train"], k8s)
    with pytest.raises(PipelineError, match="unknown step ''"):
        pod_manifest("step", None, [], k8s)
    assert "retrieve_output" not in docker_spec("profile", None, [], LaunchConfig.from_env({"QUANT_RUNTIME": "docker"}))


def test_kubernetes_step_returns_xcom_through_a_restricted_sidecar(k8s):
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes not installed")
    from kubernetes.client import ApiClient

    op = make_operator("quantize", "step", "awq", ["quantize", "--input", "{{ ti.xcom_pull('allocate') }}"], k8s)
    assert op.do_xcom_push
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["base", "airflow-xcom-sidecar"]
    base, sidecar = pod["spec"]["containers"]
    assert base["image"] == image("llmcompressor") and base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"mountPath": "/airflow/xcom", "name": "xcom"} in base["volumeMounts"]
    assert sidecar["securityContext"]["runAsNonRoot"] and sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]
    k8s_validate(pod)


def test_config_repr_hides_the_environment():
    config = LaunchConfig.from_env({"QUANT_RUNTIME": "docker", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(config)
