"""The import rules of docs/architecture.md, checked on the source text (ast; nothing is imported).

- only ``widgets/`` and ``launch.py`` import a GUI toolkit (Qt bindings, napari, magicgui, superqt);
- ``training`` never imports the widgets;
- the layers import downwards only: models -> checkpoints -> engine -> annotation -> widgets;
- no import cycle between the modules of a package, counting imports made inside functions too (an import moved
  into a function hides a cycle, it does not remove it);
- no class over 400 lines, no function over 80 lines without a reason in its docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"napari_robustmedsam": ROOT / "src" / "napari_robustmedsam", "training": ROOT / "training"}
GUI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")
GUI_ALLOWED = ("napari_robustmedsam.widgets", "napari_robustmedsam.launch")
LAYERS = ("models", "checkpoints", "engine", "annotation", "widgets")  # each may import only those before it


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for alias in child.names:
                    candidate = f"{prefix}.{alias.name}"
                    found.append((candidate if candidate in MODULES else prefix, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "napari_robustmedsam" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_only_the_widgets_and_the_launcher_import_a_gui_toolkit():
    offenders = [f"{m} imports {target}" for m, imports in IMPORTS.items() for target, _ in imports
                 if target.split(".")[0] in GUI and not m.startswith(GUI_ALLOWED)]
    assert offenders == []


def test_training_never_imports_the_widgets():
    offenders = [f"{m} imports {target}" for m, imports in IMPORTS.items() if m.startswith("training")
                 for target, _ in imports if target.startswith("napari_robustmedsam.widgets")]
    assert offenders == []


def test_layers_import_downwards_only():
    offenders = []
    for m, imports in IMPORTS.items():
        own = _layer(m)
        if own is None:
            continue
        offenders += [f"{m} imports {target}" for target, _ in imports
                      if _layer(target) is not None and _layer(target) > own]
    assert offenders == []


def _cycles() -> set[frozenset[str]]:
    graph = {m: {t for t, _ in IMPORTS[m] if t in MODULES and t != m} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    """Inside a package the lower module holds what two modules share (docs/architecture.md)."""
    assert [sorted(c) for c in _cycles()] == []


@pytest.mark.parametrize("rule", ["gui", "layers"])
def test_the_checks_see_a_violation(rule, tmp_path, monkeypatch):
    """The rules above would catch a breach (the checks are not vacuous)."""
    if rule == "gui":
        imports = _imports("napari_robustmedsam.engine.x", _write(tmp_path, "def f():\n    import qtpy\n"))
        assert ("qtpy", True) in imports
    else:
        imports = _imports("napari_robustmedsam.models.x", _write(tmp_path, "from ..engine import cache\n"))
        assert any(_layer(t) == LAYERS.index("engine") for t, _ in imports)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.py"
    path.write_text(text)
    return path


MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def _sizes(path: Path):
    """(kind, name, lines, docstring) of every class and function of a module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield kind, node.name, node.end_lineno - node.lineno + 1, ast.get_docstring(node) or ""


def _too_long(path: Path) -> list[str]:
    found = []
    for kind, name, lines, doc in _sizes(path):
        if kind == "class" and lines > MAX_CLASS_LINES:
            found.append(f"{path.name}: class {name} has {lines} lines")
        if kind == "function" and lines > MAX_FUNCTION_LINES and "on purpose" not in doc:
            found.append(f"{path.name}: {name}() has {lines} lines and no reason ('... on purpose') in its docstring")
    return found


def test_no_class_over_400_lines_and_no_long_function_without_a_reason():
    """A class over 400 lines does more than one job: split it by job. A function over 80 lines says in its
    docstring why it is one function ("Long on purpose: ...")."""
    offenders = [line for path in MODULES.values() for line in _too_long(path)]
    assert offenders == []


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert _too_long(_write(tmp_path, f"def f():\n{body}"))
    assert not _too_long(_write(tmp_path, f'def f():\n    """Long on purpose: a table."""\n{body}'))
