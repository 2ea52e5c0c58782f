"""The field's conventions, shared by data building, training validation and evaluation.

- `imresize`: MATLAB's antialiased bicubic `imresize` (how LR images are made) and
  `bicubic_upscale`, the bicubic reference row of every table.
- `metrics`: PSNR and SSIM as SR papers report them (BasicSR's Y-channel convention).
- `text`: how outside text (file names, paths, names read from files) is quoted in
  messages: `shown` escapes what is not printable, `printable` also cuts long text;
  `command`, how a command names itself (`iet-train` or `python -m iet_jax.train`).

NumPy and the standard library only; imports nothing else from iet_jax.

The conventions themselves are written down in docs/conventions.md.
"""
