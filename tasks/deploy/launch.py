"""Where a stage runs: in-process (default), in a Docker container, or in a Kubernetes pod with a GPU.

The choice is configuration, not code (QUANT_RUNTIME, below). Every launched
container runs the same entry point, `python -m tasks <stage> <args...>`, in the image of the stage's
dependency family (containers/images.json); a quantized model is quantized and evaluated in its
backend's image. `python -m tasks step NAME --input JSON` (a DAG step in a container) is looked up by
NAME, and its result file (XCOM_PATH) becomes the task's XCom: DockerOperator retrieves it, and
KubernetesPodOperator reads it through its XCom sidecar.

This module only builds specifications: plain dicts that a test can inspect and validate without a
cluster or a Docker engine. The Airflow providers are imported only by `operator_spec` and
`make_operator`, and only for the runtime that needs them.

In a DAG:
    config = LaunchConfig.from_env()
    if config.runtime == "inprocess":
        ...  # the @task calls the stage function, as in the embedded run
    else:
        profile = make_operator("profile", "step", None, ["profile", "--input", "{{ ti.xcom_pull('prepare') | tojson }}"])
        cls, shared, _ = operator_spec("step", None, ["quantize"])   # one mapped task over the variants:
        cls.partial(task_id="quantize", **shared).expand_kwargs(variant_kwargs)
    where `variant_kwargs` is an upstream @task returning, per variant,
    task_kwargs("step", variant["backend"], ["quantize", "--input", json.dumps(variant)]).

Environment (read by `LaunchConfig.from_env`):
  QUANT_RUNTIME               inprocess (default) | docker | kubernetes
  QUANT_IMAGE_REGISTRY        registry prefix of the images, e.g. ghcr.io/acme (default: images.json)
  QUANT_IMAGE_TAG             image tag (default: images.json, "latest"); pin a release tag in production
  QUANT_IMAGES_FILE           the image table (default: <repo>/containers/images.json)
  QUANT_GPUS                  GPUs per GPU stage (default: images.json resources.gpu.gpus)
  QUANT_K8S_NAMESPACE         namespace of the task pods (default: quantpipe)
  QUANT_K8S_SERVICE_ACCOUNT   service account of the task pods (default: quant-task)
  QUANT_K8S_CONFIGMAP         ConfigMap with the pipeline's env (default: quant-pipeline-env)
  QUANT_K8S_SECRET            Secret with S3/MLflow credentials (default: quant-pipeline-secrets)
  QUANT_K8S_CACHE_PVC         PVC mounted as the model cache (default: quant-cache; empty: none)
  QUANT_K8S_GPU_NODE_SELECTOR JSON object of GPU node labels (default: {"nvidia.com/gpu.present": "true"})
  QUANT_DOCKER_URL            Docker daemon (default: unix://var/run/docker.sock)
  QUANT_DOCKER_NETWORK        network the containers join, to reach MLflow and S3 (default: none)
  QUANT_DOCKER_CACHE_VOLUME   named volume mounted as the model cache (default: quantpipe-cache)
The stage containers get the pipeline's own variables (PASS_ENV) from the launching process for Docker,
and from the ConfigMap and Secret (by reference, never by value) for Kubernetes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from tasks.errors import PipelineError
from tasks.orchestration.step_table import BY_NAME as STEPS
from tasks.settings import REPO_ROOT

RUNTIMES = ("inprocess", "docker", "kubernetes")
GPU_RESOURCE = "nvidia.com/gpu"
ENTRYPOINT = ("python", "-m", "tasks")  # every image's ENTRYPOINT; containers get only the arguments
STEP_STAGE = "step"  # `python -m tasks step NAME --input JSON`: a DAG step, its result returned as XCom
XCOM_PATH = "/airflow/xcom/return.json"  # where DockerOperator and KubernetesPodOperator collect XCom
CONTAINER_NAME = "base"  # KubernetesPodOperator's base container name: its template must use it
CACHE_MOUNT = "/var/lib/quantpipe/cache"  # QUANT_CACHE_DIR inside the images
UID = 10001  # the images' non-root user
DEFAULT_IMAGES_FILE = REPO_ROOT / "containers" / "images.json"

# Passed to Docker containers from the launching process's environment when the DAG is parsed.
PASS_ENV = (
    "QUANT_ARTIFACT_ROOT",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
)
# Secrets: copied from the worker's environment only when the task runs (QuantDockerOperator), into
# DockerOperator's private_environment, so that their values never enter the serialized DAG, the
# rendered template fields or the logs. Kubernetes pods get them from the Secret instead.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # label set by NVIDIA GPU feature discovery
# The XCom sidecar must pass the namespace's Pod Security level ("restricted", infra/k8s/namespace.yaml).
XCOM_SIDECAR_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)


@dataclass(frozen=True)
class LaunchConfig:
    runtime: str = "inprocess"
    registry: str | None = None  # None: images.json's default
    tag: str | None = None
    images_file: Path = DEFAULT_IMAGES_FILE
    gpus: int | None = None
    namespace: str = "quantpipe"
    service_account: str = "quant-task"
    configmap: str = "quant-pipeline-env"
    secret: str = "quant-pipeline-secrets"
    cache_pvc: str = "quant-cache"
    gpu_node_selector: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GPU_NODE_SELECTOR))
    docker_url: str = "unix://var/run/docker.sock"
    docker_network: str | None = None
    docker_cache_volume: str = "quantpipe-cache"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # the launching process's (holds secrets)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise PipelineError(f"QUANT_RUNTIME={self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.gpus is not None and self.gpus < 0:
            raise PipelineError(f"QUANT_GPUS must be >= 0, got {self.gpus}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "LaunchConfig":
        env = dict(os.environ if env is None else env)
        get = lambda name, default=None: env.get(name) or default  # noqa: E731 (empty means unset)
        gpus = get("QUANT_GPUS")
        selector = get("QUANT_K8S_GPU_NODE_SELECTOR")
        try:
            gpus = int(gpus) if gpus is not None else None
            selector = json.loads(selector) if selector else dict(DEFAULT_GPU_NODE_SELECTOR)
        except ValueError as exc:
            raise PipelineError(f"bad launcher setting: {exc}") from None
        if not isinstance(selector, dict):
            raise PipelineError("QUANT_K8S_GPU_NODE_SELECTOR must be a JSON object of node labels")
        return cls(
            runtime=get("QUANT_RUNTIME", "inprocess").strip().lower(),
            registry=env.get("QUANT_IMAGE_REGISTRY"),
            tag=get("QUANT_IMAGE_TAG"),
            images_file=Path(get("QUANT_IMAGES_FILE", DEFAULT_IMAGES_FILE)),
            gpus=gpus,
            namespace=get("QUANT_K8S_NAMESPACE", "quantpipe"),
            service_account=get("QUANT_K8S_SERVICE_ACCOUNT", "quant-task"),
            configmap=get("QUANT_K8S_CONFIGMAP", "quant-pipeline-env"),
            secret=get("QUANT_K8S_SECRET", "quant-pipeline-secrets"),
            cache_pvc=env.get("QUANT_K8S_CACHE_PVC", "quant-cache"),
            gpu_node_selector=selector,
            docker_url=get("QUANT_DOCKER_URL", "unix://var/run/docker.sock"),
            docker_network=get("QUANT_DOCKER_NETWORK"),
            docker_cache_volume=get("QUANT_DOCKER_CACHE_VOLUME", "quantpipe-cache"),
            env=env,
        )


# ---------------------------------------------------------------------------------------- image table


@lru_cache(maxsize=8)
def _load_images(path: str, mtime: float) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read the image table {path}: {exc}") from None
    for key in ("families", "stages", "backends", "backend_stages", "resources"):
        if key not in table:
            raise PipelineError(f"image table {path} has no {key!r}")
    return table


def load_images(path: str | Path | None = None) -> dict:
    """The image table (containers/images.json): families, stage -> family, backend -> family."""
    path = Path(path or DEFAULT_IMAGES_FILE)
    if not path.is_file():
        raise PipelineError(f"image table {path} not found (set QUANT_IMAGES_FILE)")
    return _load_images(str(path), path.stat().st_mtime)


def workload(stage: str, args: Sequence[Any], images: dict) -> tuple[str, dict]:
    """What runs and its {"family", "gpu", "backend_image"}: a CLI stage from the image table, or for
    `step NAME ...` the step from the step table."""
    if stage == STEP_STAGE:
        name = str(args[0]) if len(args) else ""
        if name not in STEPS:
            raise PipelineError(f"unknown step {name!r}: `step` takes one of {', '.join(STEPS)} first")
        step = STEPS[name]
        return name, {"family": step.family, "gpu": step.gpu, "backend_image": step.backend_image}
    if stage not in images["stages"]:
        raise PipelineError(f"unknown stage {stage!r}: one of {', '.join(images['stages'])}")
    return stage, {**images["stages"][stage], "backend_image": stage in images["backend_stages"]}


def family_for(stage: str, backend: str | None, images: dict, args: Sequence[Any] = ()) -> str:
    """The dependency family whose image runs `stage` (with `backend`, for the backend stages/steps)."""
    _, entry = workload(stage, args, images)
    if backend and entry["backend_image"]:
        if backend not in images["backends"]:
            raise PipelineError(f"no image for backend {backend!r}: one of {', '.join(images['backends'])}")
        return images["backends"][backend]
    return entry["family"]


def image_for(
    stage: str, backend: str | None = None, config: LaunchConfig | None = None, args: Sequence[Any] = ()
) -> str:
    """Full image reference, <registry>/<image>:<tag>, for a stage (and backend)."""
    config = config or LaunchConfig.from_env()
    images = load_images(config.images_file)
    family = images["families"][family_for(stage, backend, images, args)]
    registry = images.get("registry", "") if config.registry is None else config.registry
    tag = config.tag or images.get("tag") or "latest"
    name = f"{registry.rstrip('/')}/{family['image']}" if registry else family["image"]
    return f"{name}:{tag}"


def needs_gpu(stage: str, config: LaunchConfig | None = None, args: Sequence[Any] = ()) -> bool:
    config = config or LaunchConfig.from_env()
    return bool(workload(stage, args, load_images(config.images_file))[1]["gpu"])


def _resources(stage: str, config: LaunchConfig, args: Sequence[Any]) -> tuple[dict, int]:
    images = load_images(config.images_file)
    gpu = needs_gpu(stage, config, args)
    table = images["resources"]["gpu" if gpu else "cpu"]
    gpus = (config.gpus if config.gpus is not None else int(table.get("gpus", 1))) if gpu else 0
    return table, gpus


def _argv(stage: str, args: Sequence[Any]) -> list[str]:
    if isinstance(args, (str, bytes)):
        raise PipelineError("stage arguments must be a list of strings, not one string")
    return [stage, *(str(a) for a in args)]


def _dns_name(*parts: str | None, limit: int = 63) -> str:
    """A DNS-1123 label from the parts (pod names, label values)."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(p for p in parts if p).lower()).strip("-")
    return name[:limit].rstrip("-") or "quant"


# ---------------------------------------------------------------------------------------- specs


def pod_manifest(
    stage: str, backend: str | None, args: Sequence[Any], config: LaunchConfig | None = None, *, name: str | None = None
) -> dict:
    """The Kubernetes Pod (API v1, as a plain dict) that runs `python -m tasks <stage> <args>`.

    GPU stages request `nvidia.com/gpu` as a limit (the scheduler sets the request equal) and land on
    GPU nodes by node selector and toleration; the pipeline's environment comes from the ConfigMap and the
    Secret by reference; the model cache is a PVC. The container is named "base" so that
    KubernetesPodOperator (pod_template_dict) recognizes it.
    """
    config = config or LaunchConfig.from_env()
    argv = _argv(stage, args)
    images = load_images(config.images_file)
    family = family_for(stage, backend, images, args)
    table, gpus = _resources(stage, config, args)
    limits = dict(table.get("limits", {}))
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    labels = {
        "app.kubernetes.io/name": "quantpipe",
        "app.kubernetes.io/component": "stage",
        "quantpipe/stage": _dns_name(stage),
        "quantpipe/family": _dns_name(family),
    }
    if stage == STEP_STAGE:
        labels["quantpipe/step"] = _dns_name(str(args[0]))
    if backend:
        labels["quantpipe/backend"] = _dns_name(backend)
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # torch data loaders and NCCL need more than 64 MiB
    if config.cache_pvc:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": config.cache_pvc}})
        mounts.append({"name": "cache", "mountPath": CACHE_MOUNT})
    spec: dict = {
        "restartPolicy": "Never",  # Airflow owns retries
        "serviceAccountName": config.service_account,
        "automountServiceAccountToken": False,  # a stage never talks to the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": image_for(stage, backend, config, args),
                "imagePullPolicy": "IfNotPresent",
                "args": argv,  # the image's ENTRYPOINT is python -m tasks
                "envFrom": [
                    {"configMapRef": {"name": config.configmap}},
                    {"secretRef": {"name": config.secret}},
                ],
                "resources": {"requests": dict(table.get("requests", {})), "limits": limits},
                "volumeMounts": mounts,
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": volumes,
    }
    if gpus:
        spec["nodeSelector"] = dict(config.gpu_node_selector)
        spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name or _dns_name("quant", stage, str(args[0]) if stage == STEP_STAGE else None, backend),
            "namespace": config.namespace,
            "labels": labels,
        },
        "spec": spec,
    }


def docker_spec(stage: str, backend: str | None, args: Sequence[Any], config: LaunchConfig | None = None) -> dict:
    """DockerOperator keyword arguments (plain data) that run `python -m tasks <stage> <args>`.

    GPU stages get a device request for the NVIDIA runtime (the `--gpus N` of `docker run`).
    `device_requests` and `mounts` are dicts here; `make_operator` turns them into docker.types objects.
    No secret is in here: the operator adds SECRET_ENV from the worker's environment at run time.
    """
    config = config or LaunchConfig.from_env()
    command = _argv(stage, args)
    _, gpus = _resources(stage, config, args)
    spec = {
        "image": image_for(stage, backend, config, args),
        "command": command,
        "environment": {k: config.env[k] for k in PASS_ENV if config.env.get(k)},
        "device_requests": [{"driver": "nvidia", "count": gpus, "capabilities": [["gpu"]]}] if gpus else [],
        "mounts": [{"source": config.docker_cache_volume, "target": CACHE_MOUNT, "type": "volume"}]
        if config.docker_cache_volume
        else [],
        "docker_url": config.docker_url,
        "network_mode": config.docker_network,
        "auto_remove": "success",
        "mount_tmp_dir": False,
        "shm_size": 8 * 2**30,
        "user": f"{UID}:{UID}",
    }
    if stage == STEP_STAGE:  # the step's result JSON becomes the task's XCom
        spec.update(retrieve_output=True, retrieve_output_path=XCOM_PATH)
    return spec


def launch_spec(stage: str, backend: str | None, args: Sequence[Any], config: LaunchConfig | None = None) -> dict:
    """What the DAG would launch for one stage under the configured runtime.

    {"runtime": "inprocess", "argv": [...]} | {"runtime": "docker", "image", "argv", "container": {...}} |
    {"runtime": "kubernetes", "image", "argv", "pod": {...}}; argv is the full command line.
    """
    config = config or LaunchConfig.from_env()
    argv = [*ENTRYPOINT, *_argv(stage, args)]
    if config.runtime == "inprocess":
        family_for(stage, backend, load_images(config.images_file), args)  # same validation as the others
        return {"runtime": "inprocess", "argv": argv}
    image = image_for(stage, backend, config, args)
    if config.runtime == "docker":
        return {"runtime": "docker", "image": image, "argv": argv, "container": docker_spec(stage, backend, args, config)}
    return {"runtime": "kubernetes", "image": image, "argv": argv, "pod": pod_manifest(stage, backend, args, config)}


# ---------------------------------------------------------------------------------------- operators

# The keys of an operator's arguments that differ between the mapped instances of one stage (one
# variant each): an upstream @task can return a list of `task_kwargs(...)` for `.expand_kwargs()`.
TASK_KEYS = {"docker": ("image", "command"), "kubernetes": ("image", "arguments", "name", "labels")}


def task_kwargs(stage: str, backend: str | None, args: Sequence[Any], config: LaunchConfig | None = None) -> dict:
    """The per-task operator arguments (JSON-able, no provider import): image and command line."""
    config = config or LaunchConfig.from_env()
    if config.runtime == "inprocess":
        raise PipelineError("QUANT_RUNTIME=inprocess runs stages in the Airflow worker: there is no operator to make")
    if config.runtime == "docker":
        spec = docker_spec(stage, backend, args, config)
        return {"image": spec["image"], "command": spec["command"]}
    pod = pod_manifest(stage, backend, args, config)
    container = pod["spec"]["containers"][0]
    return {
        "image": container["image"],
        "arguments": container["args"],  # templated by the operator; replaces the template's args
        "name": pod["metadata"]["name"],
        "labels": pod["metadata"]["labels"],
    }


_DOCKER_OPERATOR = None


def docker_operator_class():
    """DockerOperator that fills private_environment with SECRET_ENV from os.environ in execute().

    Defined on first use, so that importing this module never imports the Docker provider.
    """
    global _DOCKER_OPERATOR
    if _DOCKER_OPERATOR is None:
        from airflow.providers.docker.operators.docker import DockerOperator

        class QuantDockerOperator(DockerOperator):
            # `python -m tasks step` writes its XCom as JSON; json.load reads the bytes the provider
            # hands to its pickling library, so results arrive as data, not as a pickle error.
            pickling_library = json

            def execute(self, context):
                secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
                self._private_environment = {**secrets, **self._private_environment}
                return super().execute(context)

        QuantDockerOperator.__module__ = __name__
        _DOCKER_OPERATOR = QuantDockerOperator
    return _DOCKER_OPERATOR


def operator_spec(stage: str, backend: str | None, args: Sequence[Any], config: LaunchConfig | None = None):
    """(operator class, shared kwargs, per-task kwargs) for DockerOperator or KubernetesPodOperator.

    Shared kwargs carry the policy (GPU request, env, volumes, pod template) and are the same for every
    backend of a stage, so a mapped task is `cls.partial(task_id=..., **shared).expand_kwargs(per_task_list)`.
    """
    config = config or LaunchConfig.from_env()
    per_task = task_kwargs(stage, backend, args, config)
    if config.runtime == "docker":
        try:
            from docker.types import DeviceRequest, Mount

            DockerOperator = docker_operator_class()
        except ImportError as exc:
            raise PipelineError(f"QUANT_RUNTIME=docker needs apache-airflow-providers-docker ({exc})") from None
        shared = {k: v for k, v in docker_spec(stage, backend, args, config).items() if k not in TASK_KEYS["docker"]}
        shared["device_requests"] = [DeviceRequest(**d) for d in shared["device_requests"]]
        shared["mounts"] = [Mount(**m) for m in shared["mounts"]]
        return DockerOperator, shared, per_task
    try:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    except ImportError as exc:
        raise PipelineError(f"QUANT_RUNTIME=kubernetes needs apache-airflow-providers-cncf-kubernetes ({exc})") from None
    template = pod_manifest(stage, None, args, config)  # the same for every backend; per_task sets the image
    template["metadata"]["labels"] = {  # per-task labels (backend, family) come with each task
        k: v for k, v in template["metadata"]["labels"].items() if k.startswith("app.kubernetes.io/")
    }
    shared = {
        "namespace": config.namespace,
        "pod_template_dict": template,
        "base_container_name": CONTAINER_NAME,
        "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",
    }
    if stage == STEP_STAGE:  # the step writes XCOM_PATH; the operator's sidecar hands it to Airflow
        shared["do_xcom_push"] = True
        shared["xcom_sidecar_container_security_context"] = dict(XCOM_SIDECAR_SECURITY_CONTEXT)
    return KubernetesPodOperator, shared, per_task


def make_operator(
    task_id: str,
    stage: str,
    backend: str | None,
    args: Sequence[Any],
    config: LaunchConfig | None = None,
    **operator_kwargs,
):
    """An Airflow operator that launches the stage: DockerOperator or KubernetesPodOperator.

    `args` may hold Jinja templates (e.g. "{{ ti.xcom_pull('allocate') }}"): both operators render their
    command/arguments. For QUANT_RUNTIME=inprocess there is no operator: the DAG calls the stage function
    in a @task, and this raises PipelineError.
    """
    cls, shared, per_task = operator_spec(stage, backend, args, config)
    return cls(task_id=task_id, **{**shared, **per_task, **operator_kwargs})
