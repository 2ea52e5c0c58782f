"""Official PyTorch IET weights -> iet-jax.

    iet-convert --official-options options/test/003_IET_SRx4_finetune.yml \
        --checkpoint IET-SR-classical-x4.pth --output converted/iet_x4

(or `python -m iet_jax.convert ...`) writes an iet-jax model directory (see
`iet_jax.io.model_dir`); in Python, `iet_jax.io.official.load_official(options, checkpoint,
dtype='float32')` returns the ready model.

`.pth` files are read by `iet_jax.io.pth` without torch and without running any code from the
file. Every official key must be used and every parameter filled; otherwise the error lists
the keys and shapes that do not match.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from iet_jax.conventions.text import command, printable
from iet_jax.io import model_dir, official
from iet_jax.model import config as config_lib


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; a mistake exits (SystemExit 2) after one `error:` line."""
    parser = argparse.ArgumentParser(prog=command("iet-convert", "iet_jax.convert"),
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-options", required=True, type=Path,
                        help="the official BasicSR option file (.yml) of the checkpoint")
    parser.add_argument("--checkpoint", required=True, type=Path, help="official net_g_*.pth")
    parser.add_argument("--output", required=True, type=Path, help="directory to write")
    parser.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model directory --output if it holds one already")
    args = parser.parse_args(argv)
    output = args.output
    if output.exists() and not output.is_dir():
        parser.exit(2, f"error: --output {printable(str(output))} is a file; give a folder "
                       f"(made if missing)\n")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        parser.exit(2, f"error: --output {printable(str(output))} is not empty; give a new "
                       f"folder, or --overwrite to replace the model directory there\n")
    try:
        model, which = official.convert_official(args.official_options, args.checkpoint,
                                                 args.dtype)
        digest = _sha256(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # a permission, a disk
        parser.exit(2, f"error: cannot read {printable(str(e.filename or args.checkpoint))}: "
                       f"{e.strerror or e}\n")
    out = model_dir.save_model(output, model, metadata={
        "official_options": str(args.official_options), "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": digest, "state_dict_key": which,
    })
    print(f"wrote {out} ({which} of {args.checkpoint.name}, x{model.config.scale})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
