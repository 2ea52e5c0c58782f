"""Small files written so that a failure leaves nothing half-written.

`write_text_atomic` (and `write_bytes_atomic`) writes a whole file under a temporary name in
the same folder and renames it over the final name (`os.replace`), so the final name always
holds either the old content or the new, never a 0-byte or cut file. `append_line` appends one line and, if the write fails,
cuts the file back to where it was. Both raise `WriteError` on failure: an `OSError` whose
message is one line naming the file, the system's reason (e.g. "No space left on device") and
the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class WriteError(OSError):
    """A file that could not be written; `str()` is one line naming it, the reason and a fix."""

    def __init__(self, path: str | Path, error: OSError, what: str = "write",
                 option: str = "--workdir"):
        super().__init__(error.errno, error.strerror or str(error), str(path))
        reason = error.strerror or str(error) or type(error).__name__
        fix = {errno.ENOSPC: f"free space on that disk or use another {option}",
               errno.EDQUOT: f"free space within your quota or use another {option}",
               errno.EROFS: f"use a {option} on a writable disk",
               errno.EACCES: f"use a {option} you may write to",
               errno.EPERM: f"use a {option} you may write to"}.get(
                   error.errno, "check the disk and the folder's permissions")
        self.message = f"cannot {what} {path}: {reason}; {fix}"

    def __str__(self) -> str:
        return self.message


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_text_atomic(path: str | Path, text: str, option: str = "--workdir") -> None:
    """Write `text` (UTF-8) to `path` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over `path`. On failure nothing is left but the old `path` (if any);
    raises `WriteError` naming `path` (its fix names `option`, the command line's option for
    where the file goes)."""
    write_bytes_atomic(path, text.encode("utf-8"), option)


def write_bytes_atomic(path: str | Path, data: bytes, option: str = "--workdir") -> None:
    """`write_text_atomic` for bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteError(path, e, option=option) from e


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to `path`; if that fails, cut the file back to its length
    before (no partial line is left where the disk allows it) and raise `WriteError`."""
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the next resume drops the partial line (metrics_log.Logger)
            raise WriteError(path, e) from e
    finally:
        os.close(fd)


def make_dirs(path: str | Path, option: str = "--workdir") -> None:
    """`mkdir -p`, its failures as `WriteError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e, "create the folder", option) from e
