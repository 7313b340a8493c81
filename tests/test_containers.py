"""The container images: every Dockerfile is well formed for every family built from it (the stage
families share one Dockerfile and differ in build arguments), the image table is consistent with the
code, and every family's pin set resolves on PyPI (`-m network`).

There is no Docker engine here, so a Dockerfile is checked by parsing it with dockerfile-parse, and its
.dockerignore by docker-py's own pattern matcher (what `docker build` through docker-py applies).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = REPO / "containers"
IMAGES = json.loads((CONTAINERS / "images.json").read_text())
FAMILIES = IMAGES["families"]
STAGE_FAMILIES = sorted(name for name, fam in FAMILIES.items() if fam["role"] == "stage")
DOCKERFILES = sorted(CONTAINERS.glob("*/Dockerfile"))

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
CUDA_BASE = re.compile(r"^(nvidia/cuda:\d+\.\d+(\.\d+)?-.*(runtime|devel|base)-ubuntu\d+\.\d+|pytorch/pytorch:.*cuda.*)$")
ENTRYPOINT = ["python", "-m", "tasks"]

# Pins every stage image shares, and the one library each family exists for (DEPENDENCIES.md).
BASE_PINS = {"torch": "2.13.0", "transformers": "5.17.0", "numpy": "2.2.6", "lm-eval": "0.4.13"}
FAMILY_PINS = {
    "core": {"mlflow": "3.17.2", "hqq": "0.2.8.post1", "scipy": "1.17.1", "pandas": "3.1.1"},
    "hqq": {"hqq": "0.2.8.post1"},
    "gptq": {"gptqmodel": "7.6.0"},
    "llmcompressor": {"llmcompressor": "0.14.0.1"},
    "bnb": {"bitsandbytes": "0.50.2"},
    "gguf": {"gguf": "0.19.0", "sentencepiece": "0.2.3"},
    "airflow": {"apache-airflow": "3.3.2", "apache-airflow-providers-cncf-kubernetes": "10.25.0"},
    "mlflow-server": {"mlflow": "3.17.2"},
}


# ------------------------------------------------------------------------------------------ parsing


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> list[tuple[str, str, int]]:
    """(INSTRUCTION, arguments, line number) per instruction: continuations joined, comments dropped.
    With build_args, every ARG reference is replaced by its value as `docker build --build-arg` would
    (else the ARG's default); an argument the Dockerfile does not declare is an error (docker only warns)."""
    dfp = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse not installed (a test dependency)")
    parser = dfp.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    parsed = [(i["instruction"], i["value"], i["startline"] + 1) for i in parser.structure if i["instruction"] != "COMMENT"]
    if build_args is None:
        return parsed
    declared = {}
    for word, args, _ in parsed:
        if word == "ARG":
            name, _, default = args.partition("=")
            declared[name.strip()] = next(iter(shlex.split(default)), "")
    unknown = set(build_args) - set(declared)
    assert not unknown, f"{path}: build args {sorted(unknown)} are not ARGs of the Dockerfile"
    values = {**declared, **build_args}

    def substitute(text: str) -> str:
        return re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)

    return [(word, args if word == "ARG" else substitute(args), line) for word, args, line in parsed]


def family_build(family: str) -> tuple[Path, dict[str, str]]:
    """The family's Dockerfile and its build arguments (images.json)."""
    entry = FAMILIES[family]
    return REPO / entry["dockerfile"], entry.get("build_args", {})


def exec_form(args: str) -> list[str] | None:
    """The JSON (exec) form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether a context path survives a .dockerignore (docker-py's matcher: last match wins, `!` re-includes)."""
    build = pytest.importorskip("docker.utils.build", reason="docker (docker-py) not installed")
    return not build.PatternMatcher(patterns).matches(path)


def read_requirements(path: Path, seen: set | None = None) -> dict[str, str]:
    """name -> exact version, following `-r` includes; anything but `name==version` is an error."""
    seen = seen or set()
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            include = (path.parent / line[3:].strip()).resolve()
            assert include not in seen, f"{path}:{number}: include cycle"
            seen.add(include)
            pins.update(read_requirements(include, seen))
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[a-z0-9,_-]+\])?==([0-9][0-9A-Za-z.+-]*)", line)
        assert match, f"{path}:{number}: not an exact pin: {line!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in pins or pins[name] == match.group(3), f"{path}:{number}: {name} pinned twice"
        pins[name] = match.group(3)
    return pins


# ------------------------------------------------------------------------------------------ the table


def test_image_table_lists_every_dockerfile():
    listed = {(CONTAINERS.parent / fam["dockerfile"]).resolve() for fam in FAMILIES.values()}
    assert listed == {p.resolve() for p in DOCKERFILES}
    for name, fam in FAMILIES.items():
        assert (REPO / fam["requirements"]).is_file(), name
        assert fam["requirements"] == f"containers/{name}/requirements.txt", f"{name}: pins live in containers/<family>/"
        if fam["role"] == "stage":  # one Dockerfile, told the family by FAMILY
            assert fam["dockerfile"] == "containers/stage/Dockerfile" and fam["build_args"]["FAMILY"] == name, name
        else:
            assert Path(fam["dockerfile"]).parent == Path(fam["requirements"]).parent and not fam.get("build_args"), name
        assert fam["role"] in ("stage", "service"), name
        assert re.fullmatch(r"[a-z0-9]+([._-][a-z0-9]+)*", fam["image"]), fam["image"]
    assert len({fam["image"] for fam in FAMILIES.values()}) == len(FAMILIES), "image names must be unique"
    assert set(STAGE_FAMILIES) == {"core", "hqq", "gptq", "llmcompressor", "bnb", "gguf"}


def test_image_table_matches_the_cli_and_the_backends():
    from tasks.__main__ import STAGES
    from tasks.orchestration.step_table import STEPS
    from tasks.quantize.registry import BACKENDS

    assert set(IMAGES["stages"]) == set(STAGES), "every `python -m tasks <stage>` needs an image, and only those"
    assert set(IMAGES["backends"]) == set(BACKENDS), "every registered backend needs an image"
    assert "steps" not in IMAGES, "the DAG steps' images come from the step table alone"
    for stage, entry in IMAGES["stages"].items():
        assert FAMILIES[entry["family"]]["role"] == "stage", stage
        assert isinstance(entry["gpu"], bool), stage
    for step in STEPS:
        assert FAMILIES[step.family]["role"] == "stage", step.name
    for backend, family in IMAGES["backends"].items():
        assert FAMILIES[family]["role"] == "stage", backend
    assert set(IMAGES["backend_stages"]) <= set(IMAGES["stages"])
    assert IMAGES["stages"]["quantize"]["gpu"] and IMAGES["stages"]["profile"]["gpu"] and IMAGES["stages"]["evaluate"]["gpu"]
    assert not IMAGES["stages"]["allocate"]["gpu"]
    steps = {s.name: s for s in STEPS}
    assert steps["quantize"].gpu and steps["profile"].gpu and steps["evaluate"].gpu and not steps["allocate"].gpu
    assert {s.name for s in STEPS if s.backend_image} == set(IMAGES["backend_stages"]) & set(steps)
    assert FAMILY_PINS["core"]["mlflow"], "record/finish/promote talk to MLflow: they run in core"
    assert all(steps[s].family == "core" for s in ("prepare", "record", "finish"))


def test_readme_names_every_image():
    readme = (CONTAINERS / "README.md").read_text()
    for name, fam in FAMILIES.items():
        assert fam["image"] in readme and fam["dockerfile"] in readme, name


# ------------------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dockerfile_is_well_formed(family: str):
    dockerfile, build_args = family_build(family)
    parsed = parse_dockerfile(dockerfile, build_args)
    first = next(i for i, (word, _, _) in enumerate(parsed) if word != "ARG")  # only ARGs may precede FROM
    assert parsed and parsed[first][0] == "FROM", f"{dockerfile}: the first instruction must be FROM"
    for word, args, line in parsed:
        assert word in INSTRUCTIONS, f"{dockerfile}:{line}: unknown instruction {word}"
        assert args, f"{dockerfile}:{line}: {word} without arguments"
        if word in ("CMD", "ENTRYPOINT", "SHELL") or (word == "RUN" and args.startswith("[")):
            assert word not in ("ENTRYPOINT", "SHELL") or exec_form(args) is not None, f"{dockerfile}:{line}: use the exec form"
            if args.startswith("["):
                exec_form(args)
        if word == "ENV":
            tokens = shlex.split(args)
            assert tokens and all("=" in t for t in tokens), f"{dockerfile}:{line}: ENV wants key=value pairs"
        if word == "USER":
            assert args.split(":")[0] not in ("root", "0"), f"{dockerfile}:{line}: images run as non-root"

    declared = {re.split(r"[= ]", a, maxsplit=1)[0] for w, a, _ in parsed if w == "ARG"}
    for word, args, line in parsed:
        if word == "RUN":
            for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", args):
                env = {t.split("=")[0] for w, a, _ in parsed if w == "ENV" for t in shlex.split(a)}
                assert var in declared | env, f"{dockerfile}:{line}: ${var} is neither an ARG nor an ENV"

    entrypoints = [exec_form(a) for w, a, _ in parsed if w == "ENTRYPOINT"]
    if FAMILIES[family]["role"] == "stage":
        base = [t for w, a, _ in parsed if w == "FROM" for t in a.split() if not t.startswith("--")][0]  # FROM [--platform=..] image
        assert CUDA_BASE.match(base), f"{dockerfile}: a stage image is CUDA-based, got {base}"
        assert entrypoints and entrypoints[-1] == ENTRYPOINT, f"{dockerfile}: ENTRYPOINT must be exactly {ENTRYPOINT}"
        requirements = FAMILIES[family]["requirements"]
        runs = " ".join(a for w, a, _ in parsed if w == "RUN")
        assert f"-r {requirements}" in runs and "--extra-index-url" in runs, f"{dockerfile}: installs {requirements} with the CUDA index"
        assert any(w == "COPY" and a.split()[0] == "tasks/" for w, a, _ in parsed), f"{dockerfile}: copies tasks/"
        assert any(w == "USER" for w, _, _ in parsed), f"{dockerfile}: drops root"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_copy_sources_exist_in_the_context(family: str):
    """The build context is the repository root; its Dockerfile.dockerignore must let every source in."""
    dockerfile, build_args = family_build(family)
    ignore = dockerfile.with_name("Dockerfile.dockerignore")
    assert ignore.is_file(), f"{ignore} missing: the context would carry .venv/ and .state/"
    patterns = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert patterns[0] == "*", f"{ignore}: start from excluding everything"
    copies = 0
    for word, args, line in parse_dockerfile(dockerfile, build_args):
        if word not in ("COPY", "ADD"):
            continue
        tokens = [t for t in (exec_form(args) or shlex.split(args)) if not t.startswith("--")]
        assert not any(t.startswith("--from") for t in shlex.split(args)), "no multi-stage copies expected"
        for source in tokens[:-1]:
            copies += 1
            assert not source.startswith(("/", "..", "http")), f"{dockerfile}:{line}: {source} is outside the context"
            assert (REPO / source).exists(), f"{dockerfile}:{line}: COPY source {source} does not exist"
            assert dockerignore_allows(patterns, source.rstrip("/")), f"{dockerfile}:{line}: {source} is excluded by {ignore.name}"
    assert copies


# ------------------------------------------------------------------------------------------ pins


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_requirements_are_exact_pins(family: str):
    pins = read_requirements(REPO / FAMILIES[family]["requirements"])
    expected = {**(BASE_PINS if FAMILIES[family]["role"] == "stage" else {}), **FAMILY_PINS[family]}
    for name, version in expected.items():
        assert pins.get(name) == version, f"{family}: {name} should be pinned to {version}, got {pins.get(name)}"


def test_stage_pins_match_the_project_environment():
    """The images pin what the project's own tests run with (where a package is installed here)."""
    pins = {}
    for family in STAGE_FAMILIES:
        pins.update(read_requirements(REPO / FAMILIES[family]["requirements"]))
    drift = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version:
            drift[name] = (version, installed)
    assert not drift, f"container pins differ from this environment (pin, installed): {drift}"


def test_pins_agree_with_the_project_lock():
    """Where a package is in the project's lock file (requirements/lock.txt), the images pin the same version."""
    lock_file = REPO / "requirements" / "lock.txt"
    if not lock_file.is_file():
        pytest.skip("no requirements/lock.txt")
    lock = {}
    for line in lock_file.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?==(\S+)", line.split("#")[0].strip())
        if match:
            lock[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3).split("+")[0]
    drift = {}
    for family, fam in FAMILIES.items():
        for name, version in read_requirements(REPO / fam["requirements"]).items():
            if name in lock and lock[name] != version:
                drift[f"{family}:{name}"] = (version, lock[name])
    assert not drift, f"container pins differ from requirements/lock.txt (pin, lock): {drift}"


@pytest.mark.network
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pin_set_resolves(family: str, tmp_path: Path):
    """pip resolves the family's whole pin set against PyPI (dry run: metadata only, nothing installed).

    torch==2.13.0 resolves here to the CPU wheel that lies on this machine (2.13.0+cpu satisfies the pin);
    the images get the CUDA build of the same version from PyPI or the PyTorch CUDA index. The CUDA wheel
    and its nvidia-* dependencies are gigabytes that a resolution check does not need.
    """
    report = tmp_path / "report.json"
    requirements = REPO / FAMILIES[family]["requirements"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "-r", str(requirements)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{family} does not resolve:\n{result.stderr[-3000:]}"
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, version in read_requirements(requirements).items():
        assert resolved.get(name, "").split("+")[0] == version, f"{family}: {name} resolved to {resolved.get(name)}"
