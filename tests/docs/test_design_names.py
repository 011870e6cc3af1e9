"""docs/design.md names the functions, classes and files a request and a start-up pass through;
every one of them must exist in the code, so a rename cannot leave the picture describing code
that is gone."""

import ast
import re

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "design.md"
# `module.name` / `Class.method` / `name(...)` / `path/to/file.py` in the text and pictures
DOTTED = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")
CALLED = re.compile(r"`([A-Za-z_]\w*)[(`]")
PATH = re.compile(r"\b((?:flagscale|examples)/[\w/]+(?:\.py)?)")
# variables of the code examples, not code names
NOT_NAMES = {"obs", "out", "outs", "policy", "np", "torch", "config", "Pi0", "Pi0.5"}


def code_index():
    """module basename -> every name defined in it (top level, and Class.method pairs)."""
    modules, classes = {}, {}
    for path in (REPO / "flagscale").rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                members.update(n.name for n in ast.walk(node) if hasattr(n, "name"))
                members.update(t.id for n in ast.walk(node) for t in _targets(n))
            names.update(t.id for t in _targets(node))
        modules.setdefault(path.stem, set()).update(names)
    return modules, classes


def _targets(node):
    if isinstance(node, ast.Assign):
        return [t for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target]
    return []


def design_text() -> str:
    text = DESIGN.read_text()
    return text[: text.index("## Policy contract")]  # the contract section is a usage example


def test_dotted_names_in_design_exist():
    modules, classes = code_index()
    every = set().union(*modules.values())
    missing = []
    for owner, name in DOTTED.findall(design_text()):
        if owner in NOT_NAMES or name in ("py", "md", "yaml"):
            continue
        if owner == "engine":  # the module or a config key (engine.max_graphs)
            found = name in modules["engine"] | classes["ServeConfig"]
        elif owner in classes:
            found = name in classes[owner]
        elif owner in modules:
            found = name in modules[owner]
        else:
            found = owner in every  # e.g. a variable named like a class: check the owner only
        if not found:
            missing.append(f"{owner}.{name}")
    assert not missing, f"docs/design.md names code that does not exist: {sorted(set(missing))}"


def test_called_names_in_design_exist():
    modules, classes = code_index()
    every = set().union(*modules.values()) | set(classes)
    missing = {n for n in CALLED.findall(design_text()) if n not in every | NOT_NAMES}
    assert not missing, f"docs/design.md names code that does not exist: {sorted(missing)}"


def test_paths_in_design_exist():
    missing = [p for p in PATH.findall(DESIGN.read_text()) if not (REPO / p).exists()]
    assert not missing, f"docs/design.md names files that do not exist: {missing}"
