"""The import graph of the `tasks` package and the house rules it keeps, read from the sources with `ast`
(every import, function-level ones included; nothing is imported). Dynamic imports (importlib, the step
table's "module:function" strings) are not edges: they point from the wiring down, never back."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tasks"

# Stage packages: numeric code that the orchestration calls, and that never calls it back.
STAGES = ("tasks.calibration", "tasks.profiling", "tasks.allocation", "tasks.quantize", "tasks.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, top_level_only: bool = False) -> set[str]:
    """Every dotted name an import statement of the file names (`from a import b`: a.b, and a unless b is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = {f"{base}.{alias.name}" for alias in node.names}
            # `from package import submodule` runs the submodule; only other names make the package an edge
            out.update(names & set(modules()) if names <= set(modules()) else names | {base})
    return out


@lru_cache(maxsize=None)
def graph() -> dict[str, frozenset[str]]:
    """module -> the project modules it imports (a `from package import name` names the submodule when there is one)."""
    known = modules()
    return {m: frozenset(n for n in imported_names(p) if n in known and n != m) for m, p in known.items()}


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_tasks_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}) == [["a", "b", "c"]]


def test_stage_packages_never_import_the_orchestration():
    offenders = {m: sorted(n for n in imported_names(p) if within(n, ["tasks.orchestration"]))
                 for m, p in modules().items() if within(m, STAGES)}  # fmt: skip
    assert {m: n for m, n in offenders.items() if n} == {}


def test_numeric_stage_code_never_imports_mlflow_or_airflow():
    """MLflow and Airflow belong to tasks/registry, tasks/orchestration and tasks/deploy (the operators) and the DAG files."""
    offenders = {m: sorted(n for n in imported_names(p) if within(n, ["mlflow", "airflow"]))
                 for m, p in modules().items() if not within(m, ["tasks.registry", "tasks.orchestration", "tasks.deploy"])}  # fmt: skip
    assert {m: n for m, n in offenders.items() if n} == {}


def top_level_closure(roots: set[str]) -> set[str]:
    """The project modules that importing `roots` executes: their top-level imports, transitively, with
    the packages above each (whose __init__ runs first)."""
    known = modules()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # tasks, tasks.orchestration, tasks.orchestration.config
            parent = ".".join(parts[:i])
            if parent in known and parent not in seen:
                seen.add(parent)
                todo += [n for n in imported_names(known[parent], top_level_only=True) if n.split(".")[0] == "tasks"]
    return seen


def test_the_dag_files_import_no_torch_when_parsed():
    for dag_file in sorted((ROOT / "dags").glob("*.py")):
        tree = ast.parse(dag_file.read_text())
        direct = {n for n in (imported_names_of(tree)) if n.split(".")[0] == "tasks"}
        loaded = top_level_closure(direct)
        heavy = {m: sorted(n for n in imported_names(modules()[m], top_level_only=True) if within(n, ["torch"])) for m in loaded}
        assert {m: n for m, n in heavy.items() if n} == {}, dag_file.name
        assert not any(within(n, ["torch"]) for n in imported_names_of(tree)), dag_file.name


def imported_names_of(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


# ---- the command line: every entry in a cli.py -------------------------------------------------------


def cli_stages() -> dict[str, str]:
    """tasks/__main__.py's STAGES (stage -> module), read from its source."""
    tree = ast.parse((PACKAGE / "__main__.py").read_text())
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "STAGES" for t in node.targets))  # fmt: skip
    return {stage: module for stage, (module, _help) in ast.literal_eval(table).items()}


def top_level_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text(), str(path)).body if isinstance(node, ast.FunctionDef)}


def test_every_stage_of_python_m_tasks_lives_in_a_cli_module_with_its_configure_and_run():
    stages = cli_stages()
    assert stages, "tasks/__main__.py has no STAGES table"
    wrong = {}
    for stage, module in stages.items():
        if not module.endswith(".cli") or module not in modules():
            wrong[stage] = f"{module}: not a cli module of the tasks package"
            continue
        missing = {f"configure_{stage}", f"run_{stage}"} - top_level_functions(modules()[module])
        if missing:
            wrong[stage] = f"{module} lacks {', '.join(sorted(missing))}"
    assert wrong == {}


def argparse_uses(path: Path) -> list[str]:
    """Where the file imports argparse or calls add_argument (add_argument_group and the like)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "argparse" for alias in node.names):
            found.append(f"line {node.lineno}: import argparse")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse" and not node.level:
            found.append(f"line {node.lineno}: from argparse import")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("add_argument"):
            found.append(f"line {node.lineno}: {node.func.attr}")
    return found


def test_no_module_but_the_cli_modules_holds_argparse_code():
    """Stage modules keep no command line: parsing lives in each package's cli.py (and tasks/__main__.py)."""
    offenders = {m: argparse_uses(p) for m, p in modules().items() if p.name != "cli.py" and m != "tasks.__main__"}
    assert {m: found for m, found in offenders.items() if found} == {}


def test_the_argparse_scan_finds_a_parser():
    assert argparse_uses(PACKAGE / "__main__.py") and argparse_uses(PACKAGE / "allocation" / "cli.py")


MAX_FUNCTION_LINES = 80  # a longer function does several things: split it where its comments say "then"


def test_no_function_in_tasks_is_longer_than_80_lines():
    long = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def test_the_orchestration_stays_wiring():
    """The step functions, the config, the DAG factory, the zoo: under 1,600 lines in all, steps.py under 250."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in sorted((PACKAGE / "orchestration").glob("*.py"))}
    assert sum(sizes.values()) < 1600, sizes
    assert sizes["steps.py"] < 250
