"""What each token attends to: the candidate lists of a model, as positions, distances and
figures (`python -m iet_jax.visualize`).

- `candidate_lists(model, image)`: the model's `Candidates` for one image, one per layer
  (`IET.__call__(x, return_candidates=True)`, jitted), as NumPy arrays.
- `token_panels(lists, token, heads, layers)`: for one query token, the positions the
  figure draws: the initial dense and dilated windows, then per layer the kept candidates
  with their attention weights and the positions two-hop propagation added.
- `mean_distances(lists, height, width)`: per layer, the mean Euclidean distance (LR pixels)
  of the kept candidates from their query token, over the image's tokens and all heads.
- `token_figure(...)` and `summary_figure(...)`: those as PNG bytes (matplotlib, Agg).

Token `i` is the LR pixel `(i // width, i % width)` of the model's token grid, which is the
image mirror-padded to `IET.min_size()` when it is smaller.
"""

from __future__ import annotations

import dataclasses
import io

import jax.numpy as jnp
import numpy as np
from flax import nnx

from iet_jax.model import attention
from iet_jax.model.network import IET, Candidates, mirror_pad


@dataclasses.dataclass(frozen=True)
class Panel:
    """What one panel of the token figure draws; positions are (y, x) in LR pixels."""

    token: tuple[int, int]
    head: int
    block: int  # -1: the initial windows
    layer: int
    kept: np.ndarray  # (n, 2) int: candidates after the layer's top-k (initial: dense window)
    weights: np.ndarray  # (n,) their attention weights (initial: empty)
    added: np.ndarray  # (m, 2) int: positions two-hop propagation added (initial: dilated window)

    def as_json(self) -> dict:
        return {"token": list(self.token), "head": self.head, "block": self.block,
                "layer": self.layer, "kept": self.kept.tolist(),
                "weights": [float(w) for w in self.weights], "added": self.added.tolist()}


def candidate_lists(model: IET, image: np.ndarray) -> list[Candidates]:
    """One `Candidates` per layer (NumPy arrays, batch of one) for an (H, W, 3) image in
    [0, 1]: the jitted `model(x, return_candidates=True)`."""
    x = jnp.asarray(image, jnp.float32)[None]
    _, lists = nnx.jit(lambda m, x: m(x, return_candidates=True))(model, x)
    return [dataclasses.replace(
        c, idx=np.asarray(c.idx), attn=np.asarray(c.attn, np.float64),
        propagated=None if c.propagated is None else np.asarray(c.propagated)) for c in lists]


def padded_image(model: IET, image: np.ndarray) -> np.ndarray:
    """The image as the model's token grid sees it (mirror-padded when small)."""
    return np.asarray(mirror_pad(jnp.asarray(image)[None], model.min_size()))[0]


def positions(indices: np.ndarray, width: int) -> np.ndarray:
    """Token indices (empty slots, -1, dropped) -> (n, 2) int (y, x)."""
    indices = np.asarray(indices)
    indices = indices[indices >= 0]
    return np.stack([indices // width, indices % width], axis=-1).astype(int)


def select_layers(lists: list[Candidates], blocks: list[int] | None, every_layer: bool
                  ) -> list[Candidates]:
    """The last layer of each block in `blocks` (None: all), or each of their layers."""
    last = {}
    for c in lists:
        last[c.block] = max(last.get(c.block, -1), c.layer)
    return [c for c in lists if (blocks is None or c.block in blocks)
            and (every_layer or c.layer == last[c.block])]


def token_panels(model: IET, lists: list[Candidates], token: tuple[int, int],
                 heads: list[int], layers: list[Candidates]) -> list[Panel]:
    """For query `token` (y, x) and each head: the initial windows, then one panel per
    entry of `layers`. Reads the positions from `lists`, nothing else."""
    height, width = lists[0].height, lists[0].width
    y, x = token
    i = y * width + x
    cfg = model.config
    initial = attention.initial_candidates(height, width, cfg.local_range, cfg.sparse_range,
                                           cfg.dilation)
    dilated = initial.idx[i, initial.dense:][~initial.duplicate[i]]
    panels = []
    for head in heads:
        panels.append(Panel(token, head, -1, -1, positions(initial.idx[i, :initial.dense], width),
                            np.zeros(0), positions(dilated, width)))
        for c in layers:
            idx, attn = c.idx[0, head, i], c.attn[0, head, i]
            order = np.argsort(attn, kind="stable")  # the heaviest drawn last, on top
            idx, attn = idx[order], attn[order]
            weights = attn[idx >= 0]
            added = np.zeros((0, 2), int)
            if c.propagated is not None:
                grown = c.propagated[0, head, i]
                added = positions(np.setdiff1d(grown[grown >= 0], idx), width)
            panels.append(Panel(token, head, c.block, c.layer, positions(idx, width), weights,
                                added))
    return panels


def mean_distances(lists: list[Candidates], height: int, width: int
                   ) -> list[tuple[int, int, float, float | None]]:
    """Per layer: (block, layer, mean distance of the kept candidates, mean distance of the
    lists after propagation or None), in LR pixels, averaged over the distinct candidates of
    each query token of the `height` x `width` image (not its padding) and head, then over
    those. (A layer on the initial lists lists the dilated entries that repeat the dense
    window too; they count once.)"""
    out = []
    grid_w = lists[0].width
    ty, tx = np.divmod(np.arange(lists[0].height * grid_w), grid_w)
    queries = (ty < height) & (tx < width)

    def mean(idx):
        idx = np.sort(idx[:, :, queries], axis=-1)  # (B, h, n, K)
        repeat = np.zeros(idx.shape, bool)
        repeat[..., 1:] = idx[..., 1:] == idx[..., :-1]
        idx = np.where(repeat, -1, idx)
        cy, cx = np.divmod(np.maximum(idx, 0), grid_w)
        d = np.hypot(cy - ty[queries][:, None], cx - tx[queries][:, None])
        valid = idx >= 0
        per_query = (d * valid).sum(-1) / np.maximum(valid.sum(-1), 1)
        return float(per_query.mean())

    for c in lists:
        out.append((c.block, c.layer, mean(c.idx),
                    None if c.propagated is None else mean(c.propagated)))
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_figure(view: np.ndarray, panels: list[Panel], image_size: tuple[int, int]) -> bytes:
    """PNG: one row per (token, head), one column per panel; `view` is the padded LR image,
    `image_size` (H, W) the image's own part (outlined when padded). The weights share one
    linear colour scale, from 0 to the largest weight drawn."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    rows = list(dict.fromkeys((p.token, p.head) for p in panels))
    cols = len(panels) // len(rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols + 1, 2.6 * len(rows)),
                             squeeze=False, layout="constrained")
    # one linear scale for the figure, 0 to the largest weight drawn
    top = max((float(p.weights.max()) for p in panels if len(p.weights)), default=1.0)
    norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    mappable = None
    for ax, p in zip(axes.flat, panels):
        ax.imshow(np.clip(view, 0, 1), interpolation="nearest")
        if view.shape[:2] != tuple(image_size):
            ax.add_patch(plt.Rectangle((-0.5, -0.5), image_size[1], image_size[0], fill=False,
                                       ls="--", ec="white", lw=0.8))
        if p.block < 0:
            ax.scatter(p.kept[:, 1], p.kept[:, 0], s=10, marker="s", c="cyan", label="dense")
            ax.scatter(p.added[:, 1], p.added[:, 0], s=10, marker="o", c="orange",
                       label="dilated")
            title = f"start: {len(p.kept)} dense + {len(p.added)} dilated"
        else:
            mappable = ax.scatter(p.kept[:, 1], p.kept[:, 0], s=14, c=p.weights,
                                  cmap="viridis", norm=norm, edgecolors="none")
            if len(p.added):
                ax.scatter(p.added[:, 1], p.added[:, 0], s=14, marker="x", c="red", lw=0.8)
            kept = len({tuple(q) for q in p.kept.tolist()})  # the initial lists repeat some
            title = f"block {p.block} layer {p.layer}: {kept} kept"
            title += f", +{len(p.added)}" if len(p.added) else ""
        ax.plot(p.token[1], p.token[0], marker="*", ms=11, mec="black", mfc="white")
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if p is panels[0] or p.block < 0:
            ax.set_ylabel(f"token {p.token[0]},{p.token[1]} head {p.head}", fontsize=7)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.8)
        bar.set_label("attention weight", fontsize=7)
    return _png(fig)


def summary_figure(distances: list[tuple[int, int, float, float | None]], every_layer: bool,
                   initial: float) -> bytes:
    """PNG: mean distance of the kept candidates per block (or layer), bars; after
    propagation, dots; the initial windows' mean, a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(distances) + 2), 3.2),
                           layout="constrained")
    labels = [f"{b}.{l}" if every_layer else str(b) for b, l, _, _ in distances]
    xs = np.arange(len(distances))
    ax.bar(xs, [d for _, _, d, _ in distances], color="tab:blue", label="kept after top-k")
    grown = [(x, p) for x, (_, _, _, p) in zip(xs, distances) if p is not None]
    if grown:
        ax.plot([x for x, _ in grown], [p for _, p in grown], "o", color="tab:red",
                label="after two-hop propagation")
    ax.axhline(initial, ls="--", color="gray", label="initial dense + dilated windows")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("block.layer" if every_layer else "block (its last layer)")
    ax.set_ylabel("mean distance to the token (LR pixels)")
    top = max([initial] + [d for _, _, d, _ in distances] + [p for _, p in grown])
    ax.set_ylim(0, 1.45 * top)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def initial_distance(model: IET, height: int, width: int, grid: tuple[int, int]) -> float:
    """`mean_distances`' measure for the initial dense + dilated windows."""
    cfg = model.config
    idx = attention.initial_candidates(grid[0], grid[1], cfg.local_range, cfg.sparse_range,
                                       cfg.dilation).idx
    fake = Candidates(0, 0, grid[0], grid[1], idx[None, None], np.zeros(idx.shape)[None, None],
                      None)
    return mean_distances([fake], height, width)[0][2]
