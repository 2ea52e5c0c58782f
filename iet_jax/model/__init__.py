"""The network: IET and IET-light as Flax NNX modules, and what describes them.

- `config`: model configs (defaults, the six official networks, validation).
- `network`: the modules (`IET`), built from a config; `IET(x, return_candidates=True)` also
  returns each layer's candidate lists (`network.Candidates`).
- `attention`: the Individualized Exploratory Attention as parameter-free functions, planned
  once per config in Python; its two gathers go through `iet_jax.kernels`.
- `flops`: the official FLOPs count of a config.

`from iet_jax.model import IET` is the network.
"""

from iet_jax.model.network import IET

__all__ = ["IET"]
