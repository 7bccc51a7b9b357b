"""imports: the static import closure, and dvc.yaml's deps and params checked against
what each stage script really imports and reads."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.imports import imported_modules, module_closure, module_file
from pipeline.params import Params
from tests.conftest import REPO

STAGES_DIR = REPO / "stages"
COMMON = STAGES_DIR / "common.py"


def test_closure_follows_imports_inside_functions_and_from_package_imports(tmp_path):
    source = tmp_path / "script.py"
    source.write_text("import os\nfrom pipeline import clinical\n"
                      "def f():\n    from pipeline.serving.score import score\n")
    assert imported_modules(source) == {"pipeline", "pipeline.clinical", "pipeline.serving.score"}
    closure = module_closure([source])
    assert {"pipeline.serving.pyfunc", "pipeline.data.prepared", "pipeline.data.images"} <= closure  # via score
    assert "pipeline.training.driver" not in closure
    assert module_file("pipeline.serving.score") == REPO / "pipeline" / "serving" / "score.py"
    assert module_file("pipeline.serving") == REPO / "pipeline" / "serving" / "__init__.py"
    assert {"pipeline.serving", "pipeline.data"} <= closure  # parent packages run first


def code_deps(stage_script: Path) -> set[str]:
    """The stage script, the stages' shared module and every package file it reaches."""
    closure = module_closure([stage_script, COMMON])
    return ({str(stage_script.relative_to(REPO)), str(COMMON.relative_to(REPO))}
            | {str(module_file(m).relative_to(REPO)) for m in closure})


def _chain(node: ast.AST) -> list[str] | None:
    """``params.a.b[params.c]`` as ``["a", "b", "${c}"]``; None if not rooted at ``params``."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            key = _chain(node.slice)
            if key is None or len(key) != 1:
                return None
            parts.append("${" + key[0] + "}")
            node = node.value
        elif isinstance(node, ast.Name) and node.id == "params":
            return parts[::-1]
        else:
            return None


def _param_path(parts: list[str]) -> str:
    """The dotted params key a chain reads: it stops at the first non-field (a method)."""
    cls: typing.Any = Params
    keep: list[str] = []
    for part in parts:
        if part.startswith("${") and keep:  # a dict keyed by another param
            keep.append(part)
            cls = typing.get_args(cls)[1] if typing.get_origin(cls) is dict else None
            continue
        if cls is None or not dataclasses.is_dataclass(cls):
            break
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            break
        keep.append(part)
        cls = typing.get_type_hints(cls)[part]
    return ".".join(keep)


def params_read(stage_script: Path) -> set[str]:
    """Params keys the script reads, its calls to ``common`` helpers included,
    reduced to the shortest keys (``train`` covers ``train.epochs``)."""
    tree = ast.parse(stage_script.read_text())
    helpers = {f.name: f for f in ast.parse(COMMON.read_text()).body if isinstance(f, ast.FunctionDef)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name) and n.func.id in helpers}
    reads = set()
    for root in [tree, *(helpers[name] for name in called)]:
        # Only whole chains: in params.a.b, the inner params.a is not a read of all of a.
        inner = {id(n.value) for n in ast.walk(root) if isinstance(n, (ast.Attribute, ast.Subscript))}
        for node in ast.walk(root):
            if isinstance(node, (ast.Attribute, ast.Subscript)) and id(node) not in inner:
                parts = _chain(node)
                if parts:
                    reads.add(_param_path(parts))
    reads.discard("")
    if any(isinstance(a, ast.Name) and a.id == "params" for n in ast.walk(tree)
           if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in helpers)
           for a in n.args):
        reads.add(WHOLE)  # all of params handed to the library: dvc.yaml names the sections
    return {r for r in reads if not any(r.startswith(o + ".") for o in reads if o != r)}


WHOLE = "*"  # params_read's mark for a script that passes every section on
# The default pipeline, and the cross-validation and external-validation ones kept out of the
# default `dvc repro`.
DVC_FILES = (REPO / "dvc.yaml", REPO / "crossval" / "dvc.yaml", REPO / "validate" / "dvc.yaml")
DVC = {name: stage for f in DVC_FILES for name, stage in yaml.safe_load(f.read_text())["stages"].items()}


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_yaml_deps_are_the_stage_import_closure(stage):
    script = STAGES_DIR / f"{stage}.py"
    declared = {d for d in DVC[stage]["deps"] if d.startswith(("pipeline/", "stages/"))}
    expected = code_deps(script)
    assert declared == expected, (f"dvc.yaml stage '{stage}': missing {sorted(expected - declared)}, "
                                  f"not imported {sorted(declared - expected)}")


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_yaml_params_are_the_keys_the_stage_reads(stage):
    declared = set(DVC[stage].get("params", []))
    expected = params_read(STAGES_DIR / f"{stage}.py")
    if WHOLE in expected:  # every explicit read is declared, and only real sections are
        sections = {f.name for f in dataclasses.fields(Params)}
        assert declared <= sections, f"dvc.yaml stage '{stage}': not sections {declared - sections}"
        expected = {r for r in expected - {WHOLE} if not any(r.startswith(d + ".") for d in declared)}
        declared = declared & expected
    assert declared == expected, (f"dvc.yaml stage '{stage}': missing {sorted(expected - declared)}, "
                                  f"not read {sorted(declared - expected)}")


def test_every_stage_script_is_a_dvc_stage_of_the_same_name():
    scripts = {p.stem for p in STAGES_DIR.glob("*.py")} - {"common"}
    assert scripts == set(DVC)
    for stage, spec in DVC.items():
        assert spec["cmd"].startswith(f"python stages/{stage}.py")
