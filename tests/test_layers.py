"""The package structure tells the truth: layers without circles, and modules one can read in a sitting.

Every import of every project module is read from its source (ast, so nothing is executed): module-level and
function-local, `import x` and `from x import y` (y a submodule or a name), relative ones resolved. Each module
has a layer, lowest first:

    common, ds_configs < data_prep < pretrain.models < pretrain.runtime < pretrain (the rest) < finetune, embed

A module may import its own layer or a lower one, never a higher one, and no two modules may reach each other
through imports (a circle), not even inside a function. scripts/ and tests/ are not checked. No project
module is over MAX_LINES lines (docs/STYLE.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "ds_configs", "data_prep", "pretrain", "finetune", "embed")
MAX_LINES = 400

# (prefix, layer): the longest matching prefix wins
LAYERS = (
    ("common", 0),
    ("ds_configs", 0),
    ("data_prep", 1),
    ("pretrain.models", 2),
    ("pretrain.runtime", 3),
    ("pretrain", 4),
    ("finetune", 5),
    ("embed", 5),
)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `module` imports anywhere in its source (the most specific module named)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c`: the module a.b.c where c is one, else a.b (c is a name in it)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {m: imported(m, p, modules) for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The walker itself: a circle through a function-local import and a relative one, an upward import."""
    (tmp_path / "data_prep").mkdir()
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "data_prep" / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "__init__.py").write_text("")
    (tmp_path / "data_prep" / "a.py").write_text("def f():\n    from pretrain import b\n")
    (tmp_path / "pretrain" / "b.py").write_text("from . import c\n")
    (tmp_path / "pretrain" / "c.py").write_text("import data_prep.a as a\nfrom data_prep.a import f\n")
    graph = import_graph(tmp_path)
    assert graph["data_prep.a"] == {"pretrain.b"}
    assert graph["pretrain.b"] == {"pretrain.c"}
    assert graph["pretrain.c"] == {"data_prep.a"}
    assert circles(graph) == [["data_prep.a", "pretrain.b", "pretrain.c"]]
    assert layer("data_prep.a") < layer("pretrain.b") and layer("pretrain.models.x") < layer("pretrain.runtime.y")


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_import_from_a_higher_layer():
    upward = sorted(
        f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
        for m, targets in import_graph().items()
        for i in targets
        if layer(i) > layer(m)
    )
    assert upward == []


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_module_size(module):
    lines = len(project_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along a seam (docs/STYLE.md)"


def test_a_task_kind_sees_only_its_own_flags():
    """The fine-tuning task kinds (finetune/kinds/) are made from their inputs and their own options: none imports
    the command's whole config or the loop, and each kind's flags are a group of their own in --help."""
    from finetune.run import build_parser

    graph = import_graph()
    kinds = [m for m in graph if m == "finetune.kinds" or m.startswith("finetune.kinds.")]
    assert {"finetune.kinds.classify", "finetune.kinds.qa"} <= set(kinds)
    above = {"finetune.config", "finetune.run", "finetune.suite"}
    assert {m: sorted(graph[m] & above) for m in kinds if graph[m] & above} == {}
    groups = {g.title: [a.dest for a in g._group_actions] for g in build_parser()._action_groups}
    assert groups["classify options"] == ["text_column", "pair_column", "label_column"]
    assert groups["qa options"] == ["doc_stride", "max_query_length", "max_answer_length", "n_best", "null_threshold"]
