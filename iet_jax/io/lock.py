"""One trainer per workdir: `WorkdirLock`, the lock file `WORKDIR/.lock`.

The lock file is created atomically (`O_CREAT | O_EXCL`) and holds JSON naming its holder:
`{"host", "pid", "started", "boot_id", "pid_start"}`. A second trainer finds it and is refused
(`WorkdirBusyError`, one line naming the holder and the fix). A lock is stale, and is taken
over with a message, when its holder is on this host (same host name and, where Linux tells,
the same boot) and no longer runs: its pid does not exist, or belongs to a process started at
another time (a reused pid), or it is this very process without a live `WorkdirLock` holding
it. A lock from a machine that has restarted since (same host name, another boot id) is stale
too. A lock from another host is never taken over: delete the file if that trainer is gone.
A lock file that holds no readable holder (a crash between creating and writing it) is stale
once it is a few seconds old.

    with WorkdirLock(workdir) as lock:   # or lock.acquire() ... lock.release()
        ...

Releasing removes the file only while it still holds this holder. A lock that is never
released is removed when its `WorkdirLock` is garbage collected or the interpreter exits;
one left by a killed process is detected as stale by the next trainer.

Two trainers that find the same stale lock at the same moment could both take it over; the
window is the few microseconds between checking the file and removing it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import weakref
from pathlib import Path

from iet_jax.io.files import WriteError

LOCK_FILE = ".lock"
# A lock file with no readable holder is stale once it is this old (seconds): its writer
# needs microseconds between creating and writing it.
UNREADABLE_GRACE_S = 5.0

_held: "weakref.WeakValueDictionary[str, WorkdirLock]" = weakref.WeakValueDictionary()


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir; the message is one line naming it and the fix."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of the whole line


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def _remove_if_ours(path: str, token: str) -> None:
    """Remove the lock file if it still holds `token` (not a lock someone took over)."""
    try:
        if Path(path).read_text() == token:
            os.unlink(path)
    except OSError:
        pass


class WorkdirLock:
    """The lock on one workdir (`WORKDIR/.lock`); `enabled=False` makes a lock that does
    nothing (processes other than the lead in a multi-process run)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self.enabled = enabled
        self.held = False
        self._token: str | None = None
        self._finalizer = None

    # ------------------------------------------------------------------ taking and leaving

    def acquire(self) -> str | None:
        """Take the lock. Returns a message when a stale lock was taken over (None when there
        was none); raises WorkdirBusyError when another trainer holds it, WriteError when the
        file cannot be written."""
        if not self.enabled or self.held:
            return None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "boot_id": _boot_id(), "pid_start": _pid_start(os.getpid())}
        token = json.dumps(me, indent=1) + "\n"
        took_over = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                why = self._stale_reason()  # raises WorkdirBusyError when held
                if why is None:  # being written right now: look again
                    time.sleep(0.05)
                    continue
                self._remove_stale(why[1])
                took_over = f"taking over the stale lock {self.path}: {why[0]}"
                continue
            except OSError as e:
                raise WriteError(self.path, e, "create the lock file") from e
            try:
                data = token.encode("utf-8")
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                raise WriteError(self.path, e, "write the lock file") from e
            os.close(fd)
            self._token, self.held = token, True
            _held[str(self.path)] = self
            self._finalizer = weakref.finalize(self, _remove_if_ours, str(self.path), token)
            return took_over
        raise WorkdirBusyError(
            f"cannot take the lock {self.path}: it keeps changing (several trainers starting "
            f"on this workdir at once?); start one trainer per workdir")

    def release(self) -> None:
        """Leave the lock (its file is removed if it still names this holder)."""
        if not self.held:
            return
        self.held = False
        _held.pop(str(self.path), None)
        if self._finalizer is not None:
            self._finalizer()  # removes the file if ours, once
            self._finalizer = None

    def __enter__(self) -> "WorkdirLock":
        message = self.acquire()
        if message:
            print(message)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ the holder

    def holder(self) -> dict | None:
        """The holder the lock file names, None if it names none (unreadable, not JSON)."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return None
        return info

    def _stale_reason(self) -> tuple[str, os.stat_result] | None:
        """(why the lock is stale, the lock file's stat) when it is; None when the file
        vanished or is being written; raises WorkdirBusyError when a live trainer holds it."""
        try:
            before = os.stat(self.path)
        except FileNotFoundError:
            return None
        info = self.holder()
        if info is None:
            age = time.time() - before.st_mtime
            if age < UNREADABLE_GRACE_S:
                return None
            return (f"it names no holder (a trainer stopped while writing it, {age:.0f} s "
                    f"ago)", before)
        host, pid = info.get("host"), info["pid"]
        since = info.get("started", "an unknown time")
        who = f"host {host}, pid {pid}, started {since}"
        if host == socket.gethostname():
            boot = _boot_id()
            if boot and info.get("boot_id") and info["boot_id"] != boot:
                return f"its holder ({who}) ran before this machine restarted", before
            if pid == os.getpid():
                other = _held.get(str(self.path))
                if other is None or not other.held:
                    return (f"it names this process ({who}), which holds no lock on it "
                            f"(left by an earlier run in this process)", before)
            elif not _pid_exists(pid):
                return f"its holder ({who}) no longer runs", before
            else:
                recorded, now = info.get("pid_start"), _pid_start(pid)
                if recorded and now and recorded != now:
                    return (f"its holder ({who}) no longer runs (pid {pid} now belongs to "
                            f"another process)", before)
        workdir = self.path.parent
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another trainer ({who}); wait for it to end or "
            f"stop it, or use another --workdir; if that trainer no longer runs, delete "
            f"{self.path}")

    def _remove_stale(self, seen: os.stat_result) -> None:
        """Remove the stale lock file, unless it changed since it was judged."""
        try:
            now = os.stat(self.path)
            if (now.st_ino, now.st_mtime_ns, now.st_size) == (
                    seen.st_ino, seen.st_mtime_ns, seen.st_size):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise WriteError(self.path, e, "remove the stale lock file") from e
