"""Train IET: `python -m iet_jax.train --config configs/<recipe>.py --workdir DIR`.

Any config field can be overridden on the command line (`--config.batch_size=32`,
`--config.model.dtype=bfloat16`, `--config.optim.muon=False`). Rerunning the same command
resumes from the workdir's latest complete checkpoint and continues exactly as if the run
had not stopped (same parameters, optimiser state, EMA, and input batches).

Semantics:
- `batch_size` is the global batch over all devices and hosts (split over the mesh's data
  and fsdp axes, and over `optim.grad_accum_steps` micro-batches); the learning rate does not
  change with the number of devices. The same config on 1 or 64 devices computes the same
  updates (up to floating-point reordering).
- Loss: L1 between SR output and HR patch, averaged over pixels and the global batch.
- Validation uses the EMA weights; PSNR/SSIM on Y with `crop_border = scale`.
"""

from __future__ import annotations

import sys

import jax

from iet_jax.training.config import ConfigError
from iet_jax.training.loop import NonFiniteError, train_and_evaluate


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    flags_ = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "training config file, e.g. configs/demo.py or configs/iet_x2.py:train",
        flag_values=flags_, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where checkpoints and logs go (resumes if present)",
                        flag_values=flags_)
    try:
        flags_(argv)
    except flags.Error as e:
        print(f"error: {e}\nusage: python -m iet_jax.train --config configs/<recipe>.py "
              f"--workdir DIR [--config.FIELD=VALUE ...]", file=sys.stderr)
        return 2
    if config_flag.value is None or not flags_.workdir:
        print("usage: python -m iet_jax.train --config configs/<recipe>.py --workdir DIR "
              "[--config.FIELD=VALUE ...]", file=sys.stderr)
        return 2
    try:
        summary = train_and_evaluate(config_flag.value, flags_.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    val = summary["validation"]
    if val is not None and jax.process_index() == 0:
        print(f"done: step {summary['step']}, validation PSNR {val['psnr']:.3f} dB / SSIM "
              f"{val['ssim']:.4f} (bicubic {summary['bicubic']['psnr']:.3f} dB / "
              f"{summary['bicubic']['ssim']:.4f}); checkpoints in {flags_.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
