"""See which candidates a token attends to, block by block.

    iet-visualize --checkpoint C --image I --token Y,X [--token Y,X ...] --output out.png
        [--summary summary.png] [--blocks 0,3,7] [--every-layer] [--heads 0,1]
        [--overwrite] [--which latest|best|STEP] [--verbose]

(`python -m iet_jax.visualize` is the same command.) The image goes through the model once,
which reports every layer's candidate lists (`IET.__call__(x, return_candidates=True)`).

- `--output`: for each `--token Y,X` (LR pixel, row then column) and head, a row of panels on
  the LR image: the initial dense (squares) and dilated (dots) windows, then per block (its
  last layer; each layer with `--every-layer`) the candidates kept after top-k, coloured by
  their attention weight (one linear scale, 0 to the largest weight drawn), and the positions
  two-hop propagation added (red x). Beside it, `<output>.json` lists every position and
  weight drawn (the same numbers).
- `--summary`: the mean distance (LR pixels) of the kept candidates from their token, per
  block, averaged over all the image's tokens and heads, with the initial windows' mean; the
  numbers are printed too.

Images smaller than the model's window are mirror-padded as the model pads them; candidates
can then lie in the padding (outlined). Files are written under a temporary name and renamed;
existing outputs are refused without `--overwrite`. A bad checkpoint, image, token or
`--blocks` is one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iet_jax.conventions.text import command, shown
from iet_jax.evaluation import candidates as cand
from iet_jax.evaluation.command_line import Parser, add_checkpoint, error, load_checkpoint
from iet_jax.evaluation.pictures import read_picture
from iet_jax.io import model_dir
from iet_jax.io.files import write_bytes_atomic, write_text_atomic


def _numbers(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{what}: give non-negative integers separated by "
                                         f"commas, not {text!r}")
    return values


def _token(text: str) -> tuple[int, int]:
    values = _numbers(text, "--token")
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"--token is Y,X (row, column), not {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=command("iet-visualize", "iet_jax.visualize"),
        description="Draw the candidates IET's attention keeps for a token, block by block.")
    add_checkpoint(p)
    p.add_argument("--image", required=True, help="the LR image (PNG, JPEG or WebP)")
    p.add_argument("--token", type=_token, action="append", default=[], metavar="Y,X",
                   help="query token: LR pixel row,column (repeat for several)")
    p.add_argument("--output", help="the token figure (PNG; its positions go to <output>.json)")
    p.add_argument("--summary", help="the summary figure (PNG): mean distance per block")
    p.add_argument("--blocks", type=lambda t: _numbers(t, "--blocks"), default=None,
                   metavar="B,B,...", help="the blocks to draw (default: all)")
    p.add_argument("--every-layer", action="store_true",
                   help="a panel (a bar) per layer, not per block")
    p.add_argument("--heads", type=lambda t: _numbers(t, "--heads"), default=None,
                   metavar="H,H,...", help="the heads to draw, a row each (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verbose", action="store_true", help="show the traceback of errors")
    return p


def _outputs(args) -> list[Path]:
    out = []
    if args.output:
        out += [Path(args.output), Path(args.output + ".json")]
    if args.summary:
        out.append(Path(args.summary))
    return out


def _check(args, model, height: int, width: int) -> None:
    """Raise ValueError (one line) for a token, block or head the model or image lacks."""
    blocks = len(model.config.depths)
    if args.blocks is not None and max(args.blocks) >= blocks:
        raise ValueError(f"--blocks {','.join(map(str, args.blocks))}: the model has blocks "
                         f"0 to {blocks - 1}")
    heads = model.config.num_heads
    if args.heads is not None and max(args.heads) >= heads:
        raise ValueError(f"--heads {','.join(map(str, args.heads))}: the model has heads "
                         f"0 to {heads - 1}")
    for y, x in args.token:
        if y >= height or x >= width:
            raise ValueError(f"--token {y},{x} is outside the image, which has {height} rows "
                             f"(Y 0 to {height - 1}) and {width} columns (X 0 to {width - 1})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.output and not args.summary:
        error("nothing to draw: give --output (with --token) and/or --summary")
        return 2
    if args.output and not args.token:
        error("--output draws the candidates of a token: give --token Y,X")
        return 2
    if args.token and not args.output:
        error("--token needs --output, the figure to draw it in")
        return 2
    for path in _outputs(args):
        if path.exists() and not args.overwrite:
            error(f"{shown(path)} exists; use --overwrite to replace it")
            return 2
        if not path.parent.is_dir():
            error(f"{shown(path.parent)} is not a folder; make it or write elsewhere")
            return 2
    try:
        pic = read_picture(args.image)
    except Exception as e:  # noqa: BLE001 - any unreadable image is one line
        error(f"cannot read the image {shown(args.image)}: {shown(e)}", args.verbose)
        return 2
    height, width = pic.rgb.shape[:2]
    try:
        model = load_checkpoint(args.checkpoint, args.dtype, args.verbose, args.which)
        _check(args, model, height, width)
    except (model_dir.CheckpointError, FileNotFoundError, ValueError) as e:
        error(e, args.verbose)
        return 2
    lists = cand.candidate_lists(model, pic.rgb)
    layers = cand.select_layers(lists, args.blocks, args.every_layer)
    try:
        if args.output:
            heads = args.heads if args.heads is not None else list(range(model.config.num_heads))
            panels = [p for t in args.token for p in cand.token_panels(model, lists, t, heads,
                                                                        layers)]
            view = cand.padded_image(model, pic.rgb)
            write_bytes_atomic(args.output, cand.token_figure(view, panels, (height, width)),
                               "--output")
            write_text_atomic(args.output + ".json", json.dumps(
                {"image": [height, width], "grid": [lists[0].height, lists[0].width],
                 "panels": [p.as_json() for p in panels]}), "--output")
            print(f"wrote {shown(args.output)} and {shown(args.output + '.json')}")
        if args.summary:
            distances = cand.mean_distances(layers, height, width)
            start = cand.initial_distance(model, height, width, (lists[0].height, lists[0].width))
            write_bytes_atomic(args.summary, cand.summary_figure(distances, args.every_layer,
                                                                 start), "--summary")
            print(f"wrote {shown(args.summary)}: mean distance of the candidates from their "
                  f"token (LR pixels); initial windows {start:.4f}")
            for block, layer, kept, grown in distances:
                after = "" if grown is None else f", after propagation {grown:.4f}"
                print(f"  block {block} layer {layer}: kept {kept:.4f}{after}")
    except OSError as e:
        error(e, args.verbose)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
