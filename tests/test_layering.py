"""The import graph of ``src/vitlab`` flows one way (issue 11, section 3 "Layering").

Every module is read with :mod:`ast` (nothing is imported), and every ``import`` in it is
collected: module-level and inside functions or ``if TYPE_CHECKING`` blocks, absolute
(``vitlab.x``) and relative (``from ..x import y``). Each module belongs to a layer; an import
may only reach the module's own layer or a layer below it.

The layers, from the bottom::

    util        vitlab/config.py, vitlab/errors.py: validation helpers and error types
    components  building blocks (attention, embeddings, layers)        may use: util
    datasets    readers, transforms, augmentation                      may use: util
    models      the families and the registry of random-init builders  may use: util, components
    pretrained  checkpoint I/O, conversion, hub, create_model/load_model
                                                                        may use: models and below
    tasks       what is trained (+ its losses, metrics, plots)          may use: pretrained, datasets
                                                                        and below
    training    the engine                                              may use: tasks and below
    evaluation  explainability, attention analysis, FLOPs               may use: tasks and below
    deploy      inference modes, ViTClassifier, ONNX export             may use: training, evaluation
                                                                        and below
    benchmark   the benchmark harness (modes x batch sizes, reports)   may use: deploy and below
    cli         the ``vitlab`` command                                  may use: everything

``training`` and ``evaluation`` are siblings: neither imports the other (the metrics and
plots a run needs sit in ``tasks/``, below the trainer). ``datasets`` knows nothing of models,
tasks or training. ``vitlab/__init__.py`` is the public facade: it re-exports from every layer
and is exempt, and nothing inside the package imports it. A new top-level module or package
must be given a layer here (the test says so) before it can pass.

A second test forbids import cycles between modules (a circle such as the old
``evaluation/analysis.py`` <-> ``evaluation/visualization.py``), counting lazy imports too
(imports under ``if TYPE_CHECKING:`` count for the layers but not as cycles: they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vitlab"

_ORDER = ["util", "components", "datasets", "models", "pretrained", "tasks", "training", "evaluation", "deploy",
          "benchmark", "cli"]
#: layer -> the layers it may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "util": set(),
    "components": {"util"},
    "datasets": {"util"},
    "models": {"util", "components"},
    "pretrained": {"util", "components", "models"},
    "tasks": {"util", "components", "datasets", "models", "pretrained"},
    "training": {"util", "components", "datasets", "models", "pretrained", "tasks"},
    "evaluation": {"util", "components", "datasets", "models", "pretrained", "tasks"},
    "deploy": {"util", "components", "datasets", "models", "pretrained", "tasks", "training", "evaluation"},
    "benchmark": {"util", "components", "datasets", "models", "pretrained", "tasks", "training", "evaluation",
                  "deploy"},
    "cli": set(_ORDER) - {"cli"},
}
#: top-level modules and packages of vitlab -> their layer.
TOP_LEVEL = {
    "config": "util", "errors": "util", "components": "components", "datasets": "datasets", "models": "models",
    "pretrained": "pretrained", "tasks": "tasks", "training": "training", "evaluation": "evaluation",
    "deploy": "deploy", "benchmark": "benchmark", "cli": "cli",
}
FACADE = "vitlab"


def _modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _resolve(name: str, modules: dict[str, tuple[Path, bool]]) -> str:
    """The longest prefix of ``name`` that is a module of the package (an attribute import
    ``from vitlab.models import build_model`` resolves to ``vitlab.models``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else name


def _type_checking_imports(tree: ast.AST) -> set[ast.AST]:
    """Import nodes under ``if TYPE_CHECKING:`` (they never run)."""
    out: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                out.update(n for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def import_edges(root: Path = PACKAGE, runtime_only: bool = False) -> list[tuple[str, Path, int, str]]:
    """Every import of a vitlab module: (importing module, file, line, imported module).

    ``runtime_only`` leaves out imports under ``if TYPE_CHECKING:``.
    """
    modules = _modules(root)
    edges = []
    for mod, (path, is_pkg) in modules.items():
        package = mod.split(".") if is_pkg else mod.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_imports(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if node in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
                names = [f"{base_name}.{alias.name}" for alias in node.names]
            for name in names:
                if name == "vitlab" or name.startswith("vitlab."):
                    edges.append((mod, path, node.lineno, _resolve(name, modules)))
    return edges


def layer_of(module: str) -> str | None:
    """The layer of a dotted vitlab module; None for the facade ``vitlab`` itself."""
    if module == FACADE:
        return None
    top = module.split(".")[1]
    if top not in TOP_LEVEL:
        raise AssertionError(
            f"{module} is not assigned a layer: add {top!r} to TOP_LEVEL in tests/test_layering.py "
            f"(and to the README's layout section)")
    return TOP_LEVEL[top]


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import that goes against the layer order, as ``file:line module -> target``."""
    bad: list[str] = []
    for mod, path, line, target in import_edges(root):
        src_layer, dst_layer = layer_of(mod), layer_of(target)
        if src_layer is None:  # the facade re-exports from every layer
            continue
        if dst_layer is None:
            why = "imports the public facade"
        elif dst_layer == src_layer or dst_layer in ALLOWED[src_layer]:
            continue
        else:
            why = f"{src_layer} -> {dst_layer}"
        bad.append(f"{path.relative_to(root.parent.parent)}:{line} {mod} -> {target} ({why})")
    return sorted(set(bad))


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected groups of modules (size > 1) in the import graph of imports that
    run (``if TYPE_CHECKING:`` ones are the way to name a type without a cycle); a package
    ``__init__`` importing its own submodules is not counted as an edge back up."""
    graph: dict[str, set[str]] = {}
    for mod, _path, _line, target in import_edges(root, runtime_only=True):
        if target != mod and not target.startswith(mod + "."):
            graph.setdefault(mod, set()).add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_layer_table_is_consistent() -> None:
    for layer, allowed in ALLOWED.items():
        assert allowed <= set(_ORDER) - {layer}, layer
        # Only downward: every allowed layer comes earlier in the order.
        assert all(_ORDER.index(a) < _ORDER.index(layer) for a in allowed), layer
    assert "evaluation" not in ALLOWED["training"] and "training" not in ALLOWED["evaluation"]
    assert not ({"models", "pretrained", "tasks", "training"} & ALLOWED["datasets"])


def test_every_module_has_a_layer() -> None:
    for mod in _modules():
        layer_of(mod)


def test_edges_are_found() -> None:
    """The walker sees relative, absolute, from-package and lazy imports (guards against a
    walker that silently finds nothing and so passes everything)."""
    edges = {(mod, target) for mod, _p, _l, target in import_edges()}
    assert ("vitlab.models.vit", "vitlab.components") in edges  # from ..components import ...
    assert ("vitlab.cli", "vitlab.training.run") in edges  # lazy, inside a function
    assert ("vitlab.models", "vitlab.models.registry") in edges


def test_no_upward_imports() -> None:
    bad = upward_imports()
    assert not bad, "imports against the layer order (see tests/test_layering.py):\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    cycles = import_cycles()
    assert not cycles, "import cycles between modules:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_checker_catches_an_upward_and_a_circular_import(tmp_path: Path) -> None:
    """A copy of a tiny package with one lazy upward import and one circle is flagged."""
    pkg = tmp_path / "vitlab"
    for sub in ("models", "training", "evaluation"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .training import x\n")
    (pkg / "models" / "vit.py").write_text("def f():\n    from ..training import trainer\n")
    (pkg / "training" / "trainer.py").write_text("from ..models import vit\n")
    (pkg / "evaluation" / "a.py").write_text("from . import b\n")
    (pkg / "evaluation" / "b.py").write_text("import vitlab.evaluation.a\n")
    (pkg / "models" / "base.py").write_text("from typing import TYPE_CHECKING\nfrom . import reg\n")
    (pkg / "models" / "reg.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .base import B\n")
    bad = upward_imports(pkg)
    assert len(bad) == 1 and "vitlab/models/vit.py:2" in bad[0] and "models -> training" in bad[0]
    assert sorted(import_cycles(pkg)) == [["vitlab.evaluation.a", "vitlab.evaluation.b"],
                                          ["vitlab.models.vit", "vitlab.training.trainer"]]


def test_readme_layout_matches_the_tree() -> None:
    """The README's layout section names every top-level package and module, and nothing
    that is not there (the project's own map stays true)."""
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    block = section[section.index("```") + 3:]
    block = block[: block.index("```")]
    named = set()
    for line in block.splitlines():
        if line.startswith("src/vitlab/"):
            head = line.split("  ")[0]  # "src/vitlab/config.py, errors.py" or "src/vitlab/models"
            for item in head[len("src/vitlab/"):].split(","):
                named.add(item.strip().removesuffix(".py"))
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert named == present, f"README layout names {sorted(named - present)} that do not exist and misses " \
        f"{sorted(present - named)}"
    assert present - {"__init__"} <= set(TOP_LEVEL), "every top-level module has a layer"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


#: What the engine may import of ``vitlab.tasks``: the plugin interface, never a task.
TASK_PLUGIN_API = {"vitlab.tasks.base", "vitlab.tasks.registry"}


def training_task_imports(root: Path = PACKAGE) -> list[str]:
    """``file:line imports module`` for every import by ``vitlab.training`` of a ``vitlab.tasks``
    module other than the plugin interface (:data:`TASK_PLUGIN_API`)."""
    return [f"{path.name}:{line} imports {target}" for mod, path, line, target in import_edges(root)
            if mod.startswith("vitlab.training") and target.startswith("vitlab.tasks")
            and target not in TASK_PLUGIN_API]


def test_training_imports_no_task_module() -> None:
    assert training_task_imports() == []


def test_training_task_import_check_catches_a_task_import(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "vitlab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    trainer = copy / "training" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\nfrom ..tasks.segmentation.task import SegmentationSection\n")
    found = training_task_imports(copy)
    assert len(found) == 1 and "vitlab.tasks.segmentation.task" in found[0]
