"""What the `evaluate`, `upscale` and `export` commands share: an argparse parser and `error`
lines that escape outside text, `--which` (which checkpoint of a training workdir), and a
checkpoint loader whose every failure is one line."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from iet_jax.conventions.text import shown
from iet_jax.io import compile_cache, model_dir
from iet_jax.io import workdir as workdir_lib
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


def which_checkpoint(text: str) -> str | int:
    """`--which`: 'latest', 'best' or a step number (argparse's `type`)."""
    if text in ("latest", "best"):
        return text
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"give latest, best or a step number, not {text!r}")
    return step


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint` (a model directory or a training workdir) and `--which` (its step)."""
    parser.add_argument("--checkpoint", required=True,
                        help="model directory (config.json + params/), e.g. from "
                             "iet_jax.convert, or a training workdir")
    parser.add_argument(
        "--which", type=which_checkpoint, default="latest", metavar="latest|best|STEP",
        help="from a training workdir: the newest intact checkpoint (latest, the default), the "
             "one with the best validation PSNR (best) or step STEP; the EMA weights of it. A "
             "model directory holds one set of weights: only latest")


def load_checkpoint(checkpoint: str, dtype: str | None, verbose: bool,
                    which: str | int = "latest") -> IET:
    """`model_dir.load_model`, from a training workdir the `which` checkpoint ('latest',
    'best' or a step number; a model directory refuses any but 'latest'); what it raises
    beyond its own `CheckpointError` (a ValueError) becomes one too, naming the checkpoint."""
    directory = Path(checkpoint)
    if (which != "latest" and (directory / model_dir.PARAMS_DIR).is_dir()
            and not workdir_lib.is_training_workdir(directory)):
        raise model_dir.CheckpointError(
            f"--which {which}: {shown(checkpoint)} is a model directory, which holds one set of "
            f"weights; --which picks a checkpoint of a training workdir: leave it out")
    compile_cache.enable()  # every command that loads a checkpoint goes on to compile it
    try:
        return model_dir.load_model(checkpoint, dtype=dtype, which=which)
    except (model_dir.CheckpointError, FileNotFoundError, ValueError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - anything else a checkpoint can raise: one line
        raise model_dir.CheckpointError(
            f"cannot load the checkpoint {shown(checkpoint)}: {type(e).__name__}: {shown(e)}"
            + ("" if verbose else " (--verbose shows the traceback)")) from e
