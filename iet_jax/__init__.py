"""iet-jax: the Individualized Exploratory Transformer (IET) for super-resolution in JAX.

The package is a house of rooms, one concern each, behind eight front doors:

    front doors   train.py, evaluate.py, upscale.py, export.py, visualize.py, convert.py and
                  flops.py
                  (python -m iet_jax.<name>, or the console script iet-<name>), and
                  datasets/build.py (python -m iet_jax.datasets.build, or iet-build):
                  argument parsing, calling the rooms, printing
    training/     config checks and recipes, train state, optimiser, sharding, init_from, the
                  train step, validation, logging, the loop
    evaluation/   inference (whole, tiled, split test, self-ensemble), benchmark tables,
                  picture files, the jax.export artifact of a model on tiles
    io/           safe .pth reading, the official key map and option files, model directories,
                  the training workdir, the commands' compilation cache
    datasets/     catalog of names and paths, sources, folder layouts, TFDS builders, images,
                  the training-patch loader
    model/        the model config, the network, the attention (and its initial windows as tiled
                  matrix products), the FLOPs count
    kernels/      the gather dispatch with its custom_vjp, the XLA reference, the Pallas kernels,
                  the native CPU top-k and merge
    conventions/  MATLAB bicubic, the field's PSNR/SSIM, quoting outside text in messages

Imports point one way (checked by tests/test_imports.py, which reads every module's imports):

    front doors -> any room; nothing imports a front door
    training    -> model, kernels, datasets, io, conventions
    evaluation  -> model, kernels, io, conventions, datasets.catalog, datasets.images
    io          -> model, conventions
    model       -> kernels
    datasets    -> conventions
    kernels, conventions -> nothing else in iet_jax

Modules of one room may import each other; there are no import cycles between modules; and
iet_jax is imported at the top of a module, never inside a function (a function may defer a
heavy third-party import).

The rooms, the arrows and the data flow are described in docs/architecture.md.
"""
