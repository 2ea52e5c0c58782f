"""Validation during training: PSNR/SSIM (Y, border = scale) of the EMA weights, with the
bicubic reference row computed as `python -m iet_jax.evaluate` computes it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iet_jax.conventions import metrics
from iet_jax.conventions.imresize import bicubic_upscale
from iet_jax.training import sharding as sharding_lib
from iet_jax.training import state as ts


class Validator:
    """PSNR/SSIM (Y, crop = scale) of the EMA weights on the validation images."""

    def __init__(self, source, config, graphdef, param_shardings, mesh, compute_dtype):
        self.metrics = metrics
        self.scale = config.data.scale
        crop = config.data.val_crop
        limit = config.data.val_max_images or len(source)
        self.images = []
        for i in range(min(limit, len(source))):
            item = source[i]
            lr, hr = np.asarray(item["lr"]), np.asarray(item["hr"])
            if crop:
                h, w = lr.shape[:2]
                ch, cw = min(crop, h), min(crop, w)
                y0, x0 = (h - ch) // 2, (w - cw) // 2
                lr = lr[y0:y0 + ch, x0:x0 + cw]
                hr = hr[y0 * self.scale:(y0 + ch) * self.scale,
                        x0 * self.scale:(x0 + cw) * self.scale]
            bicubic = bicubic_upscale(lr, self.scale)  # the same reference row as evaluate
            self.images.append((str(item.get("name", i)), lr, hr, bicubic))
        self.bicubic = self._scores([(b, hr) for _, _, hr, b in self.images])
        replicated = sharding_lib.replicated(mesh)
        self._replicated = replicated
        self._predict = jax.jit(
            lambda params, x: ts.apply_model(graphdef, params, x.astype(compute_dtype),
                                             train=False).astype(jnp.float32),
            in_shardings=(param_shardings, replicated), out_shardings=replicated)

    def _scores(self, pairs):
        psnr = [self.metrics.psnr(sr, hr, crop_border=self.scale) for sr, hr in pairs]
        ssim = [self.metrics.ssim(sr, hr, crop_border=self.scale) for sr, hr in pairs]
        return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}

    def __call__(self, params) -> tuple[dict, list]:
        groups: dict[tuple, list[int]] = {}
        for i, (_, lr, _, _) in enumerate(self.images):
            groups.setdefault(lr.shape, []).append(i)
        outputs: list[Any] = [None] * len(self.images)
        for indices in groups.values():  # one call per image size
            x = np.stack([self.images[i][1] for i in indices]).astype(np.float32) / 255.0
            y = self._predict(params, jax.device_put(x, self._replicated))
            y = np.asarray(y.addressable_data(0))
            for j, i in enumerate(indices):
                outputs[i] = self.metrics.to_uint8(y[j])
        scores = self._scores([(sr, img[2]) for sr, img in zip(outputs, self.images)])
        triplets = [(name, np.concatenate([b, sr, hr], axis=1))
                    for (name, _, hr, b), sr in zip(self.images, outputs)]
        return scores, triplets
