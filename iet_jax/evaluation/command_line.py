"""What the `evaluate`, `upscale` and `export` commands share: an argparse parser and `error` lines that
escape outside text, and a checkpoint loader whose every failure is one line."""

from __future__ import annotations

import argparse
import sys
import traceback

from iet_jax.conventions.text import shown
from iet_jax.io import model_dir
from iet_jax.model.network import IET


class Parser(argparse.ArgumentParser):
    """argparse, with the command line's own text escaped in its error messages."""

    def error(self, message: str):
        super().error(shown(message))


def error(message: object, verbose: bool = False, write=print) -> None:
    """One `error:` line (outside text escaped); with `verbose`, the traceback after it."""
    write(f"error: {shown(message, keep_newlines=True)}", file=sys.stderr)
    if verbose and sys.exc_info()[0] is not None:
        write(shown(traceback.format_exc().rstrip(), keep_newlines=True), file=sys.stderr)


def load_checkpoint(checkpoint: str, dtype: str | None, verbose: bool) -> IET:
    """`model_dir.load_model`; what it raises beyond its own `CheckpointError` (a ValueError)
    becomes one too, naming the checkpoint."""
    try:
        return model_dir.load_model(checkpoint, dtype=dtype)
    except (model_dir.CheckpointError, FileNotFoundError, ValueError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - anything else a checkpoint can raise: one line
        raise model_dir.CheckpointError(
            f"cannot load the checkpoint {shown(checkpoint)}: {type(e).__name__}: {shown(e)}"
            + ("" if verbose else " (--verbose shows the traceback)")) from e
