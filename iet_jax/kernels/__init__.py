"""The attention's two gather steps: one dispatch point and its implementations.

- `gather`: `gather_qk` / `gather_av` with their hand-written backward (`jax.custom_vjp`),
  dispatching to an implementation by name; `BATCH_AXES`, the mesh axes the batch is split
  over.
- `reference`: the plain-XLA primitives (CPU/TPU path, and the oracle the tests compare with).
- `pallas_gather`: the Pallas (Triton) primitives for GPUs.

Imports nothing else from iet_jax.
"""
