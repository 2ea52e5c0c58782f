"""Using a trained model: upscaling images and measuring it on benchmarks.

- `inference`: `Upscaler`, whole images, blended tiles, the official split test and the x8
  self-ensemble.
- `benchmark`: PSNR/SSIM over datasets with the bicubic reference row, and the results tables.
- `pictures`: picture files (PNG, JPEG, WebP; gray, alpha, 16-bit) read, upscaled and written.
- `command_line`: what the evaluate and upscale commands share: the parser, `error` lines and
  `load_checkpoint`, whose every failure is one line.
"""
