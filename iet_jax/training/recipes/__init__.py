"""The recipes that ship with iet-jax, named on the command line by their file's stem.

    iet-train --config demo --workdir workdirs/demo
    iet-flops --config iet_x4:eval

`--config NAME[:SETTINGS]` names one of `names()` (the `.py` files in this folder) and works
from an installed package, without a checkout; SETTINGS goes to the recipe's `get_config`
(the official recipes take `train`, the default, or `eval`; `demo` takes none). A value that
has a `/` or ends in `.py` is a config file's path, as it always was (`configs/NAME.py` in a
checkout holds one line that loads the recipe here).

Nothing here imports JAX: the commands resolve `--config` before anything heavy loads.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

FOLDER = Path(__file__).parent


class UnknownRecipeError(ValueError):
    """`--config NAME` names no packaged recipe; the message (one line) lists them."""


def names() -> list[str]:
    """The packaged recipes' names: `demo`, `iet_x4`, `iet_light_x2`, ..."""
    return sorted(p.stem for p in FOLDER.glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> Path:
    """The file of the packaged recipe `name`; `UnknownRecipeError` if there is none."""
    if name not in names():
        raise UnknownRecipeError(
            f"no recipe named {name!r}; the named recipes are {', '.join(names())} "
            f"(e.g. --config iet_x4:eval), or give a config file's path (e.g. configs/demo.py)")
    return FOLDER / f"{name}.py"


def is_name(value: str) -> bool:
    """Whether a `--config` value names a recipe (`iet_x4`, `iet_x4:eval`) rather than giving
    a file: no `/`, no `.py` ending, and not a file that exists."""
    file = value.split(":", 1)[0]
    return bool(file) and not (
        "/" in file or os.sep in file or file.endswith(".py") or Path(file).is_file())


def resolve(value: str) -> str:
    """A `--config` value with a recipe's name replaced by its file's path (the `:SETTINGS`
    kept); a path is returned as it is. `UnknownRecipeError` for an unknown name."""
    if not is_name(value):
        return value
    name, colon, settings = value.partition(":")
    return str(path(name)) + colon + settings


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--FLAG` (`--FLAG=V`, `--FLAG V`, one dash too) resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        for prefix in (f"--{flag}=", f"-{flag}="):
            if arg.startswith(prefix):
                out[i] = prefix + resolve(arg[len(prefix):])
        if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def summary(name: str) -> str:
    """What a packaged recipe is: its docstring's first paragraph on one line, up to the
    first quoted command line (the file is read, not imported)."""
    doc = ast.get_docstring(ast.parse(path(name).read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.split("`")[0].strip().rstrip(":").strip()


def describe() -> str:
    """The named recipes, one a line with their summaries (for `--help`)."""
    width = max(len(n) for n in names())
    return "\n".join(f"  {n:<{width}}  {summary(n)}" for n in names())
