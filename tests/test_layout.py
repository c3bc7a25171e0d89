"""The architecture the code promises (docs/extending.md, "How the code is laid out"): layers
that import only downward, verbs that do not import each other, and task knowledge kept in the
tasks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "must"

# Low to high. A module may import from its own unit and from lower layers only.
LAYERS = [
    {"errors"},
    {"features", "files", "extends", "paths", "summary", "dense", "records"},
    {"imageio"},
    {"tasks"},
    {"data"},
    {"models", "store", "weighting"},
    {"config", "checkpoint"},
    {"training"},
    {"stages"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(file: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``must`` import that runs (annotation-only imports under
    ``if TYPE_CHECKING:`` left out: they create no import at run time)."""
    tree = ast.parse(file.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [node.module] if node.module != "must" else [f"must.{a.name}" for a in node.names]
            )
            out += [(node.lineno, m) for m in names if m.split(".")[0] == "must"]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "must"]
    return out


def _modules():
    for file in sorted(PACKAGE.rglob("*.py")):
        yield file, _module_name(file)


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(name) for _, name in _modules()}
    assert units - LAYER_OF.keys() == set(), "add the new module or folder to LAYERS"


def test_imports_go_only_downward_so_no_folder_imports_another_in_a_cycle():
    upward = []
    for file, name in _modules():
        here = _unit(name)
        for line, target in _runtime_imports(file):
            there = _unit(target)
            if there != here and LAYER_OF.get(there, 99) >= LAYER_OF[here]:
                upward.append(f"{file.relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == []


def test_no_verb_imports_another_verb():
    # must run (stages/experiment.py) runs the verbs, so it alone calls them; what the verbs
    # share lives in stages/common.py or a lower layer.
    shared = {"must.stages", "must.stages.common"}
    crossing = []
    for file, name in _modules():
        if _unit(name) != "stages" or name in (*shared, "must.stages.experiment"):
            continue
        for line, target in _runtime_imports(file):
            if target.startswith("must.stages") and target not in shared:
                crossing.append(f"{file.relative_to(PACKAGE)}:{line} imports {target}")
    assert crossing == []


# Task names that appear outside tasks/ for a reason other than knowing about the task.
NOT_TASK_KNOWLEDGE = {
    # the ResNet's depth setting, a shape's depth, error-message labels of the file decoders
    ("must.models.backbone", "depth"),
    ("must.data.styles", "depth"),
    ("must.imageio", "segmentation"),
    ("must.imageio", "depth"),
    ("must.imageio", "normals"),
    # COCO's own annotation field
    ("must.data.readers.coco", "segmentation"),
    # Fashion-MNIST is a classification dataset: its description names the task it labels
    ("must.data.importers", "classification"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
    return out


def test_no_module_outside_tasks_names_a_task():
    from must.tasks import TASK_TYPES

    found = []
    for file, name in _modules():
        if _unit(name) == "tasks":
            continue
        tree = ast.parse(file.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in TASK_TYPES
                and id(node) not in docs
                and (name, node.value) not in NOT_TASK_KNOWLEDGE
            ):
                found.append(f"{file.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert found == []
