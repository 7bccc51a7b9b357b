"""The package's shape: sub-packages import only downwards, no import cycles, modules and
functions short enough to read at once, and one value for every default."""

from __future__ import annotations

import ast
import dataclasses

import pytest

from pipeline.config import from_dict
from pipeline.imports import PACKAGE_DIR, imported_modules, module_name
from pipeline.params import Params
from tests.conftest import REPO, repo_params

# Lowest first: a module may import its own layer and the layers below it, never above.
LAYERS = ("base", "data", "serving", "training", "evaluation", "selection", "bench", "cli")
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_TRAIN_LINES = 300, 50, 25
SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))


def layer(module: str) -> int:
    """``pipeline.data.images`` → the rank of ``data``; a top-level module is ``base``, except the
    command line (``__main__`` and ``commands``), which sits on top of everything."""
    parts = module.split(".")
    if parts[1:] in (["__main__"], ["commands"]):
        return LAYERS.index("cli")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE_DIR / parts[1]).is_dir()):
        return LAYERS.index(parts[1])
    return LAYERS.index("base")


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) - {module_name(p)} for p in SOURCES}


def test_every_sub_package_is_a_known_layer():
    packages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert packages == set(LAYERS) - {"base", "cli"}


def test_imports_go_only_downwards():
    upward = [f"{m} ({LAYERS[layer(m)]}) imports {d} ({LAYERS[layer(d)]})"
              for m, deps in import_graph().items() for d in deps
              if d != "pipeline" and layer(d) > layer(m)]
    assert upward == []


def test_layer_rule_catches_an_upward_import():
    assert layer("pipeline.data.prepare") < layer("pipeline.training.driver")
    assert layer("pipeline.config") == 0 and layer("pipeline.__main__") == len(LAYERS) - 1
    assert layer("pipeline.serving") == LAYERS.index("serving")  # the package itself


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module → modules it imports), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # package __init__ files import nothing, so a package name is never part of a cycle
    graph = {m: {d for d in deps if d != "pipeline"} for m, deps in import_graph().items()}
    assert find_cycle(graph) == []


def _lengths(path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_module_or_function_is_too_long():
    sources = SOURCES + sorted((REPO / "stages").glob("*.py"))
    modules = [f"{p.relative_to(REPO)}: {n}" for p in sources
               if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    functions = [f"{where}: {n}" for p in sources for where, n in _lengths(p) if n > MAX_FUNCTION_LINES]
    assert modules == [] and functions == []


def test_the_training_driver_reads_in_one_screen():
    lengths = dict(_lengths(PACKAGE_DIR / "training" / "driver.py"))
    (train_lines,) = [n for where, n in lengths.items() if where.endswith(" train")]
    assert train_lines <= MAX_TRAIN_LINES


def default_differences(raw: dict) -> dict[str, tuple]:
    """Keys whose value in ``raw`` (params.yaml as a dict) differs from the config classes'
    default (download.sources is data, not a default: the classes hold none)."""
    from_yaml = from_dict(Params, raw)
    differ: dict[str, tuple] = {}
    for section in dataclasses.fields(Params):
        theirs = getattr(from_yaml, section.name)
        if not dataclasses.is_dataclass(theirs):
            if theirs != section.default:
                differ[section.name] = (section.default, theirs)
            continue
        a, b = dataclasses.asdict(type(theirs)()), dataclasses.asdict(theirs)
        a.pop("sources", None), b.pop("sources", None)
        differ.update({f"{section.name}.{k}": (a[k], b[k]) for k in a if a[k] != b[k]})
    return differ


def test_params_yaml_values_are_the_config_defaults():
    """params.yaml and the config classes hold the same value for every key, so a library call
    without params.yaml behaves as the pipeline does."""
    assert default_differences(repo_params()) == {}


@pytest.mark.parametrize("section, key, value", [("train", "epochs", 99), ("score", "batch_size", 7),
                                                 ("dataset", None, "bloodmnist")])
def test_the_values_check_sees_a_changed_value(section, key, value):
    changed = repo_params()
    if key is None:
        changed[section] = value
    else:
        changed[section][key] = value
    assert list(default_differences(changed)) == [section if key is None else f"{section}.{key}"]
