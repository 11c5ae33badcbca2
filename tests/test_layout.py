"""Issue 10: the house stays walkable: short modules and functions, thin entry scripts, no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "launch").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_modules_and_functions_are_short():
    long_modules = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 300}
    assert not long_modules, f"modules over 300 lines: {long_modules}"
    long_functions = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{module_name(p)}.{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long_functions, f"functions over 80 lines: {long_functions}"


def test_entry_scripts_stay_thin():
    for script in ("train_single.py", "train_ddp.py"):
        assert len((ROOT / script).read_text().splitlines()) <= 40, script


def imports() -> dict[str, set[str]]:
    """module -> the launch modules it imports anywhere in its body (lazy imports included)."""
    names = {module_name(p) for p in MODULES}
    graph = {}
    for p in MODULES:
        me, found = module_name(p), set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}  # `from launch import config`
        graph[me] = {m for m in found if m in names and m != me}
    return graph


def test_no_two_modules_import_each_other_directly_or_in_a_circle():
    graph = imports()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_top_level_shows_the_architecture():
    """launch/ holds about a dozen entries, each a concern (issue 22): a new capability is a module in
    its folder plus a registry line, never another file beside the loop."""
    entries = sorted(p.name for p in (ROOT / "launch").iterdir() if p.name != "__pycache__")
    assert len(entries) <= 14, entries
    loose = [e for e in entries if e.endswith(".py")]
    assert set(loose) <= {"__init__.py", "__main__.py", "errors.py", "user_code.py"}, loose
    for folder in (e for e in entries if not e.endswith(".py")):
        assert (ROOT / "launch" / folder / "__init__.py").exists(), folder
