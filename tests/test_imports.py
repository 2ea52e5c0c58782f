"""The import rule of iet_jax (written down in iet_jax/__init__.py), read from the source.

Every module under iet_jax/ is parsed with `ast` (nothing is imported) and its imports of
iet_jax modules are checked: which room may import which, nothing imports a front door, no
cycles between modules, and no iet_jax import inside a function or class.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "iet_jax"

FRONT_DOORS = {"iet_jax.train", "iet_jax.evaluate", "iet_jax.upscale", "iet_jax.convert",
               "iet_jax.export", "iet_jax.visualize",
               "iet_jax.flops", "iet_jax.datasets.build"}
# room -> what it may import besides itself (rooms, or single modules of a room)
MAY_IMPORT = {
    "training": {"model", "kernels", "datasets", "io", "conventions"},
    "evaluation": {"model", "kernels", "io", "conventions", "datasets.catalog",
                   "datasets.images"},
    "io": {"model", "conventions"},
    "model": {"kernels"},
    "datasets": {"conventions"},
    "kernels": set(),
    "conventions": set(),
}


def module_names(root: Path) -> dict[str, Path]:
    """'iet_jax.model.network' -> its file, for every module under `root` (the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _place(module: str) -> str:
    """'front door', a room name, or '' for the package itself."""
    if module in FRONT_DOORS:
        return "front door"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(tree: ast.Module, module: str, is_package: bool, package: str, known):
    """(line, target module, inside a function or class) for each import of `package`."""
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == package:
                        found.append((child.lineno, alias.name, nested))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package upwards
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != package:
                    continue
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.append((child.lineno, target if target in known else base, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def problems(root: Path = PACKAGE) -> list[str]:
    """Every break of the import rule in the package at `root`, one line each."""
    package = root.name
    known = module_names(root)
    out, edges = [], {m: set() for m in known}
    for module, path in known.items():
        where = path.relative_to(root.parent)
        place = _place(module)
        if place not in MAY_IMPORT and place not in ("front door", ""):
            out.append(f"{where}: {module} is neither in a room ({', '.join(MAY_IMPORT)}) "
                       "nor a front door")
        tree = ast.parse(path.read_text(), str(path))
        for line, target, nested in _imports(tree, module, path.name == "__init__.py",
                                             package, known):
            at = f"{where}:{line}: {module}"
            if target not in known:
                out.append(f"{at} imports {target}, which is not a module of {package}")
                continue
            edges[module].add(target)
            if nested:
                out.append(f"{at} imports {target} inside a function or class; import "
                           f"{package} modules at the top of the module")
            to = _place(target)
            if to == "front door":
                out.append(f"{at} imports the front door {target}; nothing imports a front "
                           "door (move what it needs into a room)")
            elif to == "":
                out.append(f"{at} imports the package {package} itself; import the module "
                           "that holds the name")
            elif place in MAY_IMPORT and to != place:
                rest = target.split(".", 1)[1]
                if not any(rest == a or rest.startswith(a + ".") for a in MAY_IMPORT[place]):
                    allowed = ", ".join(sorted(MAY_IMPORT[place])) or f"nothing else in {package}"
                    out.append(f"{at} ({place}) imports {target} ({to}); {place} may import "
                               f"{allowed}")
            elif place == "" and to:
                out.append(f"{at} (the package) imports {target}; the package imports nothing")
    out += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
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
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:  # walk from the group's first module until a module repeats
        path, seen = [group[0]], {group[0]}
        while True:
            nxt = min(w for w in edges[path[-1]] if w in group)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_iet_jax_follows_the_import_rule():
    found = problems()
    assert not found, "the import rule (iet_jax/__init__.py) is broken:\n" + "\n".join(found)


def test_every_room_and_front_door_exists():
    known = module_names(PACKAGE)
    assert FRONT_DOORS <= set(known)
    assert {f"iet_jax.{room}" for room in MAY_IMPORT} <= set(known)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "iet_jax"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_check_names_each_kind_of_break(tmp_path):
    root = _package(tmp_path, {
        "kernels/__init__.py": "",
        "kernels/gather.py": "from iet_jax.training import sharding\n",
        "training/__init__.py": "",
        "training/sharding.py": "import iet_jax.kernels.gather\n",
        "training/loop.py": "def run():\n    from iet_jax.kernels import gather\n",
        "model/__init__.py": "",
        "model/network.py": "from iet_jax import train\n",
        "evaluation/__init__.py": "",
        "evaluation/benchmark.py": "from iet_jax.datasets import sources\n",
        "datasets/__init__.py": "",
        "datasets/sources.py": "from .nowhere import thing\n",
        "train.py": "from iet_jax.training import loop\n",
        "helpers.py": "",
    })
    found = problems(root)
    text = "\n".join(found)
    for expected in [
        "iet_jax/kernels/gather.py:1: iet_jax.kernels.gather (kernels) imports "
        "iet_jax.training.sharding (training); kernels may import nothing else in iet_jax",
        "import cycle: iet_jax.kernels.gather -> iet_jax.training.sharding -> "
        "iet_jax.kernels.gather",
        "iet_jax/training/loop.py:2: iet_jax.training.loop imports iet_jax.kernels.gather inside "
        "a function or class",
        "iet_jax/model/network.py:1: iet_jax.model.network imports the front door iet_jax.train",
        "iet_jax/evaluation/benchmark.py:1: iet_jax.evaluation.benchmark (evaluation) imports "
        "iet_jax.datasets.sources (datasets)",
        "iet_jax/datasets/sources.py:1: iet_jax.datasets.sources imports "
        "iet_jax.datasets.nowhere, which is not a module of iet_jax",
        "iet_jax/helpers.py: iet_jax.helpers is neither in a room",
    ]:
        assert expected in text, f"{expected!r} not in:\n{text}"
    # one line per break: the front door import is not also a room-rule break, and a front
    # door may import any room
    assert len(found) == 7, text
