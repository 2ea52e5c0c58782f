"""Train IET: `iet-train --config RECIPE --workdir DIR` (or `python -m iet_jax.train ...`).

RECIPE names a packaged recipe (`demo`, `iet_x4`, `iet_light_x2`, ...; `--help` lists them),
or is a config file's path (`configs/iet_x4.py` in a checkout); either takes the recipe's
`:SETTINGS` (`iet_x4:train`, the default, or `iet_x4:eval`).

Any config field can be overridden on the command line (`--config.batch_size=32`,
`--config.model.dtype=bfloat16`, `--config.optim.muon=False`). Rerunning the same command
resumes from the workdir's latest complete checkpoint and continues exactly as if the run
had not stopped (same parameters, optimiser state, EMA, and input batches). A rerun may
change how long it trains and what it logs, validates and keeps, but not what it computes
(`iet_jax.training.config.RESUME_MAY_CHANGE`); another config is refused, naming the fields.
One trainer at a time per workdir (the lock file WORKDIR/.lock).

Several processes (hosts): run the same command in each, with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or `--config.distributed.*`), or under a launcher
JAX detects (SLURM, Open MPI, a Cloud TPU pod, a Kubernetes Job); see the README's
"Multi-host" section and `iet_jax.training.sharding.distributed_plan`.

Semantics:
- `batch_size` is the global batch over all devices and hosts (split over the mesh's data
  and fsdp axes, and over `optim.grad_accum_steps` micro-batches); the learning rate does not
  change with the number of devices. The same config on 1 or 64 devices computes the same
  updates (up to floating-point reordering).
- Loss: L1 between SR output and HR patch, averaged over pixels and the global batch.
- Validation uses the EMA weights; PSNR/SSIM on Y with `crop_border = scale`.

A mistake (a config field that does not exist, a config file that is missing, a workdir that
does not fit, a full disk, ...) is one line on stderr naming it and the fix, and a non-zero
exit status (2: refused before training; 3: stopped on a non-finite loss; 1: a file could not
be written); `--verbose` prints the traceback too.
"""

from __future__ import annotations

import difflib
import re
import sys
import traceback
from pathlib import Path

import jax

from iet_jax.conventions.text import command
from iet_jax.datasets.loader import SmallImageError
from iet_jax.io import compile_cache
from iet_jax.io.files import WriteError
from iet_jax.io.lock import WorkdirBusyError
from iet_jax.io.stored import CheckpointError
from iet_jax.io.workdir import CheckpointWriteError
from iet_jax.training import recipes
from iet_jax.training.config import ConfigError
from iet_jax.training.loop import NonFiniteError, train_and_evaluate
from iet_jax.training.sharding import DistributedInitError

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def usage() -> str:
    return (f"usage: {command('iet-train', 'iet_jax.train')} --config RECIPE[:SETTINGS] "
            f"--workdir DIR [--config.FIELD=VALUE ...] [--verbose]")


def _one_line(text: str) -> str:
    """A message on one line: its lines joined ('a:' + 'b' -> 'a: b', else '; ')."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def _fail(message: str, code: int, verbose: bool) -> int:
    """Print `message` on one line (after the traceback of the error being handled, if
    `verbose`) and return the exit status `code`."""
    if verbose and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(_one_line(message), file=sys.stderr)
    return code


def _config_file(argv: list[str]) -> str | None:
    """The --config value on the command line (None if absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config=") or arg.startswith("-config="):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: list[str]) -> list[str]:
    """The config fields set on the command line (`--config.a.b=1` -> 'a.b')."""
    out = []
    for arg in argv:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if m:
            out.append(m.group(1))
    return out


def _unknown_field(path: str, argv: list[str]) -> str | None:
    """The first `--config.FIELD` that the config does not have, described with the nearest
    known names; None if they all exist (or the config cannot be loaded again)."""
    from ml_collections import ConfigDict
    from ml_collections.config_flags import config_flags as cf

    try:
        config = cf.ConfigFileFlagParser("config", lock_config=False).parse(path)
    except Exception:  # noqa: BLE001 - reported by the caller's message
        return None
    for override in _overrides(argv):
        node, done = config, []
        for part in override.split("."):
            if not isinstance(node, (ConfigDict, dict)) or part not in node:
                known = sorted(node.keys()) if isinstance(node, (ConfigDict, dict)) else []
                where = ".".join(done)
                near = [k for k in known if "_" in k and part.lower() == "".join(
                    w[:1] for w in k.split("_"))]  # lr -> learning_rate
                near += [k for k in difflib.get_close_matches(part, known, n=3, cutoff=0.5)
                         if k not in near]
                if near:
                    hint = "did you mean " + " or ".join(
                        f"--config.{where + '.' if where else ''}{k}" for k in near) + "?"
                else:
                    hint = (f"{where or 'the config'} has: {', '.join(known)}" if known else
                            f"{where} is not a group of fields")
                return (f"--config.{override}: the config ({path}) has no field "
                        f"{'.'.join(done + [part])!r}; {hint}")
            node, done = node[part], done + [part]
    return None


def _parse(argv: list[str], verbose: bool):
    """(config, workdir, verbose) from the command line, or an exit status."""
    from absl import flags
    from ml_collections import config_flags

    path = _config_file(argv)
    if path is not None:
        file = Path(path.split(":", 1)[0])
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "does not exist"
            return _fail(f"error: the config file {file} {what}; give a recipe's name (--config "
                         f"demo; --help lists them) or a config file, e.g. "
                         f"--config=configs/demo.py in a checkout", 2, verbose)
    flags_ = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "a recipe's name or a config file, e.g. demo, iet_x2:eval or "
        "configs/iet_x2.py:train", flag_values=flags_, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where checkpoints and logs go (resumes if present)",
                        flag_values=flags_)
    flags.DEFINE_boolean("verbose", False, "print the traceback of an error too",
                         flag_values=flags_)
    try:
        flags_(argv)
        config = config_flag.value
        if config is not None:
            config.get("batch_size")  # a config file that failed to load raises here
    except (AttributeError, KeyError) as e:  # a field the config does not have
        message = _unknown_field(path, argv) if path else None
        message = message or f"a --config.FIELD the config does not have ({_one_line(e)})"
        return _fail(f"error: {message}", 2, verbose)
    except flags.Error as e:
        return _fail(f"error: {e}; {usage()}", 2, verbose)
    except Exception as e:  # noqa: BLE001 - the config file's own error (syntax, ...)
        return _fail(f"error: cannot load the config {path}: {type(e).__name__}: "
                     f"{_one_line(e)}; fix the file or give another --config", 2, verbose)
    if config is None or not flags_.workdir:
        return _fail(f"error: --config and --workdir are required; {usage()}", 2, False)
    return config, flags_.workdir, verbose or flags_.verbose


def _fields(config, prefix: str = "") -> list[str]:
    """`FIELD = VALUE` of every field of a config, groups flattened (`optim.muon = True`)."""
    out = []
    for key in sorted(config.keys()):
        value = config[key]
        if hasattr(value, "keys"):
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} = {value!r}")
    return out


def help_text(argv: list[str]) -> str:
    """`--help`: what the command does, its flags, the named recipes and the fields of the
    --config given (of `demo` without one), each with its value there."""
    from ml_collections.config_flags import config_flags as cf

    path = _config_file(argv)
    shown_as = path or "demo"
    try:
        config = cf.ConfigFileFlagParser("config", lock_config=False).parse(
            recipes.resolve(shown_as))
        fields = "\n".join("  " + line for line in _fields(config))
    except Exception as e:  # noqa: BLE001 - the help is printed all the same
        fields = f"  (cannot load {shown_as}: {_one_line(e)})"
    return "\n".join([
        usage(), "",
        __doc__.strip(), "",
        "flags:",
        "  --config RECIPE|FILE[:SETTINGS]  a named recipe (below) or a config file's path",
        "  --workdir DIR                    checkpoints and logs (a rerun resumes there)",
        "  --config.FIELD=VALUE             set a config field (the fields are below)",
        "  --verbose                        print the traceback of an error too",
        "  -h, --help                       this help (with --config: that config's fields)",
        "",
        "named recipes (--config NAME, shipped in the package; the official ones take :eval,",
        "the network the released checkpoints were evaluated with):",
        recipes.describe(), "",
        f"config fields of {shown_as} (--config.FIELD=VALUE sets one):",
        fields])


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    # `--config.distributed=on` (before the group existed) means --config.distributed.mode=on
    argv = [re.sub(r"^(--?config\.distributed)=(auto|on|off)$", r"\1.mode=\2", a) for a in argv]
    verbose = any(re.fullmatch(r"--?verbose(=(true|1|True))?", a) for a in argv[1:])
    try:
        recipes.resolve(_config_file(argv) or "demo")  # a mistyped name: before any help
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(help_text(argv))
            return 0
        argv = recipes.resolve_argv(argv)
    except recipes.UnknownRecipeError as e:
        return _fail(f"error: --config {_config_file(argv)}: {e}", 2, verbose)
    parsed = _parse(argv, verbose)
    if isinstance(parsed, int):
        return parsed
    config, workdir, verbose = parsed
    compile_cache.enable()  # a rerun or a resume reads the compiled step back from disk
    try:
        summary = train_and_evaluate(config, workdir)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2, verbose)
    except (WorkdirBusyError, CheckpointError, DistributedInitError) as e:
        return _fail(f"error: {e}", 2, verbose)
    except SmallImageError as e:
        return _fail(f"error: {e} (data.patch_size, data.small_images=skip)", 2, verbose)
    except NonFiniteError as e:
        return _fail(f"stopped: {e}", 3, verbose)
    except (WriteError, CheckpointWriteError) as e:
        return _fail(f"error: {e}", 1, verbose)
    except OSError as e:  # a disk, a permission or a file system; --verbose says where
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _fail(f"error: {e.strerror or e}{where}; --verbose shows where", 1, verbose)
    val = summary["validation"]
    if val is not None and jax.process_index() == 0:
        print(f"done: step {summary['step']}, validation PSNR {val['psnr']:.3f} dB / SSIM "
              f"{val['ssim']:.4f} (bicubic {summary['bicubic']['psnr']:.3f} dB / "
              f"{summary['bicubic']['ssim']:.4f}); checkpoints in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
