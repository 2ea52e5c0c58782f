"""What a run reports: `metrics.jsonl` in the workdir, TensorBoard events (tensorboardX, if
installed) and a tqdm progress bar, on the lead process only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from iet_jax.io import files
from iet_jax.io.workdir import METRICS_FILE


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records of `path` (metrics.jsonl) up to `last_step`, rewritten atomically.

    A line that is not a JSON record (a partial last line after a crash or a full disk, or
    damage) is dropped, said once on stderr; it never stops the run."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise files.WriteError(path, e, "read") from e
    kept, damaged = [], []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a record")
            step = int(record.get("step", 0))
        except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError included
            damaged.append(number)
            continue
        if step <= last_step:
            kept.append(line.decode("utf-8"))
    if damaged:
        last = len(raw.split(b"\n")) - (1 if raw.endswith(b"\n") else 0)
        what = ("a partial last line (a crash or a full disk while writing it)"
                if damaged == [last] else f"lines {', '.join(map(str, damaged[:10]))}"
                + (" ..." if len(damaged) > 10 else "") + " (not JSON records)")
        print(f"{path}: dropped {what}; the other records are kept", file=sys.stderr)
    files.write_text_atomic(path, "".join(line + "\n" for line in kept))


class Logger:
    """metrics.jsonl, TensorBoard (tensorboardX, if installed) and the progress bar."""

    def __init__(self, workdir: Path, start_step: int, total: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run rewrites what came after its checkpoint
            trim_metrics(self.path, start_step)
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            print("tensorboardX is not installed: no TensorBoard logs (metrics.jsonl is "
                  "written); pip install tensorboardX", file=sys.stderr)
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True,
                        smoothing=0.1)

    def scalars(self, step: int, values: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v
                                                         for k, v in values.items()}}
        files.append_line(self.path, json.dumps(record))
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def images(self, step: int, triplets) -> None:
        """TensorBoard images tagged `val/<image name>`: each is the bicubic upscaling, the
        model's output and the HR image side by side, in that order (left to right)."""
        if self.enabled and self.writer is not None:
            for name, img in triplets:
                self.writer.add_image(f"val/{name}", img, step, dataformats="HWC")

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
