"""The code's shape: short functions in ``enigma/``, the training system in ``enigma/train/``."""

import ast

from conftest import ROOT

MAX_LINES = 60


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def function_lengths():
    """(file, name, lines) of every function in ``enigma/``, its docstring not counted."""
    for path in sorted((ROOT / "enigma").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if node.body and _is_docstring(node.body[0]):
                    doc = node.body[0]
                    lines -= doc.end_lineno - doc.lineno + 1
                yield path.relative_to(ROOT), node.name, lines


def test_no_function_is_longer_than_60_lines():
    long = [f"{path}:{name} ({n} lines)" for path, name, n in function_lengths() if n > MAX_LINES]
    assert not long, "split these: " + ", ".join(long)


def test_the_check_sees_long_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f'def f():\n    """doc\n    more"""\n{body}\n')
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 - 2 == MAX_LINES + 1


def test_the_root_holds_the_public_api_the_cli_and_the_errors_only():
    """Each concern in a package named for it; the exported model's code follows the move."""
    assert sorted(p.name for p in (ROOT / "enigma").glob("*.py")) == [
        "__init__.py", "cli.py", "errors.py",
    ]  # fmt: skip
    rooms = {"invertible", "models", "inference", "train", "data", "cluster", "storage",
             "benchmarks"}  # fmt: skip
    assert rooms <= {p.name for p in (ROOT / "enigma").iterdir() if (p / "__init__.py").is_file()}


def test_training_modules_live_in_the_train_package():
    flat = ["trainer", "train_loop", "train_config", "ds_config", "sweep"]
    assert not [m for m in flat if (ROOT / "enigma" / f"{m}.py").exists()]
    for module in ["config", "deepspeed_json", "driver", "worker", "checkpoint", "schedule",
                   "progress", "sweep", "sweep_trial", "sweep_results"]:  # fmt: skip
        assert (ROOT / "enigma" / "train" / f"{module}.py").is_file(), module


def _imports(path, package: str) -> set[str]:
    """The project modules ``path`` imports, at any depth of the file (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("enigma"):
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_no_import_circles():
    """A name two modules share has one home: no module imports one that imports it back, at
    any depth (a lazy import inside a function counts: it is a circle all the same)."""
    modules = {}
    for path in (ROOT / "enigma").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        modules[name] = (path, package)
    graph = {
        name: {m for m in _imports(path, package) if m in modules and m != name}
        for name, (path, package) in modules.items()
    }
    circles = []

    def visit(node, trail):
        for nxt in graph[node]:
            if nxt == trail[0]:
                circles.append(" -> ".join([*trail, nxt]))
            elif nxt not in trail and len(trail) < 6:
                visit(nxt, [*trail, nxt])

    for name in graph:
        visit(name, [name])
    assert not circles, circles[:5]
