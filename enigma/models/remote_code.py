"""The modelling code a saved model carries, so that it loads with torch and transformers alone.

``EnigmaLM.save_pretrained`` writes, beside the weights, every module of this project that the
model imports (``lm.py``, ``lm_config.py``, ``attention.py``, ``rev_layers.py``, ``machine.py``,
the machine's parts, ``errors.py``), flat in the one directory, and names the classes in
``config.json``'s ``auto_map``. transformers loads such code with ``trust_remote_code=True`` and
follows only imports between siblings (``from .x import``), so imports across this project's
packages (``from ..invertible.machine import``) are written as sibling imports in the copies. A
copy loaded that way saves itself the same way: its imports are already siblings'.

transformers also checks every ``import`` in the copied files, even inside functions, and refuses
to load one that names a package the Python lacks: these modules import torch, transformers and
the standard library only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENTRY = "lm"
AUTO_MAP = {"AutoConfig": "lm_config.EnigmaConfig", "AutoModelForCausalLM": "lm.EnigmaLM"}


def _relative_imports(path: Path) -> list[tuple[ast.ImportFrom, Path]]:
    """The relative ``from ... import`` statements of ``path`` and the file each names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")).with_suffix(".py")
            if not target.is_file():
                raise FileNotFoundError(f"{path}: cannot follow `from {node.module}` to a file")
            found.append((node, target))
    return found


def closure(entry: Path) -> dict[str, Path]:
    """``entry`` and every module it imports relatively, transitively, by file stem."""
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        path = todo.pop()
        if path.stem in seen:
            if seen[path.stem] != path:
                raise ValueError(f"two modules named {path.stem}: {seen[path.stem]} and {path}")
            continue
        seen[path.stem] = path
        todo += [target for _, target in _relative_imports(path)]
    return seen


def flat_source(path: Path) -> str:
    """``path``'s source with its relative imports written as sibling imports."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for node, target in _relative_imports(path):
        line = lines[node.lineno - 1]
        dots = "." * node.level
        old = f"from {dots}{node.module} import"
        if old not in line:
            raise ValueError(f"{path}:{node.lineno}: expected {old!r} on one line")
        lines[node.lineno - 1] = line.replace(old, f"from .{target.stem} import", 1)
    return "".join(lines)


def write_remote_code(out: Path, entry: Path | None = None) -> list[str]:
    """Write the modelling code into ``out``; returns the file names."""
    entry = entry or Path(__file__).with_name(f"{ENTRY}.py")
    names = []
    for stem, path in sorted(closure(entry).items()):
        (out / f"{stem}.py").write_text(flat_source(path), encoding="utf-8")
        names.append(f"{stem}.py")
    return names
