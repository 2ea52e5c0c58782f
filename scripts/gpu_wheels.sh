#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (its image has jax 0.11.2, flax, optax,
# orbax, torch, triton, Pillow, scikit-image, tqdm, but none of these); they travel in .whl/
# (ignored by git) with `carry: [".whl"]`. See scripts/gpu_session.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl \
    ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
    array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1 \
    simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0 toml==0.10.2 \
    googleapis-common-protos==1.76.0 pypng==0.20220715.0 tensorboardX==2.6.5 \
    grain==0.2.18 portpicker==1.6.0 importlib-resources==7.1.0
# Source-only packages (pure Python): build their wheels here.
python3 -m pip wheel --no-deps -w .whl promise==2.3
du -sh .whl
