"""Using a trained model: upscaling images and measuring it on benchmarks.

- `inference`: `Upscaler`, whole images, blended tiles, the official split test and the x8
  self-ensemble.
- `benchmark`: PSNR/SSIM over datasets with the bicubic reference row, and the results tables.
- `pictures`: picture files (PNG, JPEG, WebP; gray, alpha, 16-bit) read, upscaled and written.
- `export`: the model's forward pass on fixed-size tiles as a `jax.export` artifact (runs with
  jax alone) and the JSON spec beside it: input and output, platforms, how to tile.
- `candidates`: what each token attends to: the candidate lists of every layer
  (`IET(x, return_candidates=True)`) as positions, mean distances and figures
  (`python -m iet_jax.visualize`).
- `command_line`: what the evaluate, upscale and export commands share: the parser, `error` lines and
  `load_checkpoint`, whose every failure is one line.
"""
