"""Deterministic weights for parity tests, derived from each official parameter name.

The float64 parity fixtures were produced by the official PyTorch model loaded with exactly
these weights, so the tests rebuild them from (name, shape) instead of storing ~80 MB of
parameters. Only NumPy is used, so the generator and the tests agree bit for bit.
"""

import math
import zlib

import numpy as np


def seeded_weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array for official state-dict key `name` with a scale that keeps the net tame."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    z = rng.standard_normal(shape)
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if name.endswith("relative_position_bias"):
        return 0.5 * z
    if len(shape) == 1:
        if module.startswith("norm") and name.endswith(".weight"):
            return 1.0 + 0.1 * z
        return 0.05 * z
    fan_in = math.prod(shape[1:])
    return z * (0.5 / math.sqrt(fan_in))


def seeded_state_dict(shapes: dict[str, tuple[int, ...]],
                      scales: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """All seeded weights; `scales` multiplies the keys ending in each suffix by its factor.

    The sharp-attention fixtures use {"wqkv.weight": 6.0} (or 6.5): much larger query, key
    and value projections, so that consecutive layers can attend to nearly disjoint candidates.
    """
    state = {}
    for name, shape in shapes.items():
        weight = seeded_weight(name, tuple(shape))
        for suffix, factor in (scales or {}).items():
            if name.endswith(suffix):
                weight = weight * factor
        state[name] = weight
    return state
