"""The run folder of ``biformer train``: one run at a time, and nothing a user had overwritten.

- An exclusive ``fcntl.flock`` on ``OUT/.lock``, held open for the whole run, keeps a second run
  out; the file names the holder (pid, host) for the second run's error. The kernel releases the
  flock when the holder dies, so a lock file that still names a holder while its flock is free was
  left by a run that was killed: it is reported, and taken over only with ``--resume`` or
  ``--overwrite``.
- A new run refuses a folder that already holds results unless ``--overwrite``, which says what
  it removes before removing it.
- Temporaries of our own naming left by a save that was killed are removed (only while holding the
  lock, only in this folder).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional

from ..checkpoint import temporary_name_pattern
from ..errors import UserError

LOCK_FILE = ".lock"
# What a run writes into its folder; any of these means the folder holds a run's results.
RESULT_FILES = ("config.yaml", "best.safetensors", "last.safetensors", "state.pt", "metrics.csv", "steps.csv",
                "curves.png")
RESULT_DIRS = ("tb",)


class RunFolderBusy(UserError):
    """Another live run holds the folder's lock."""


def _describe_holder(info: Dict[str, object]) -> str:
    pid, host = info.get("pid", "?"), info.get("host", "?")
    return f"pid {pid} on host {host}"


def _read_holder(handle: IO[str]) -> Dict[str, object]:
    handle.seek(0)
    text = handle.read()
    if not text.strip():
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}  # written by someone else, or cut short: a holder all the same
    return info if isinstance(info, dict) else {"pid": "?", "host": "?"}


@dataclass
class RunLock:
    """An exclusive lock on a run folder; :meth:`release` clears the holder and unlocks."""

    path: Path
    handle: Optional[IO[str]]

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.handle.seek(0)
            self.handle.truncate()  # an empty lock file is a released one
            self.handle.flush()
        except OSError:
            pass  # a full or vanished disk must not hide the run's own error
        finally:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"got --output {str(out)!r}, which is a file; expected a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a parent is a file
        raise UserError(f"cannot create the run folder {str(out)!r}: {e.strerror} ({e.filename})") from e
    except OSError as e:
        reason = "the file system is read-only" if e.errno == errno.EROFS else e.strerror
        raise UserError(f"cannot create the run folder {str(out)!r}: {reason}") from e


def _alive_here(info: Dict[str, object]) -> bool:
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def acquire_lock(out: Path, take_over_stale: bool, note: Callable[[str], None]) -> RunLock:
    """Lock ``out`` for this process, or raise :class:`RunFolderBusy` naming the holder."""
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        reason = "the file system is read-only" if e.errno == errno.EROFS else e.strerror
        raise UserError(f"cannot write the lock file {str(path)!r}: {reason}") from e
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        handle.close()
        raise RunFolderBusy(
            f"{str(out)!r} is in use by another run ({_describe_holder(holder) if holder else 'holder starting'}, "
            f"lock {str(path)!r}); wait for it to finish or choose another --output") from None
    stale = _read_holder(handle)
    if stale:
        # the flock is free, so no run holds the folder; a live pid here was reused, or the folder copied
        running = " (that pid is alive now, but it holds no lock)" if _alive_here(stale) else ""
        message = (f"a run with {_describe_holder(stale)} stopped without releasing {str(path)!r}; "
                   f"it is not running now{running}")
        if not take_over_stale:
            handle.close()  # releases our flock
            raise UserError(f"{message}; pass --resume {out} to continue it, or --overwrite to start again")
        note(f"note: {message}; taking the folder over")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    handle.flush()
    return RunLock(path, handle)


def existing_results(out: Path) -> List[str]:
    """The names of a previous run's results in ``out``."""
    found = [name for name in RESULT_FILES if (out / name).exists()]
    return found + [name + "/" for name in RESULT_DIRS if (out / name).exists()]


def remove_stale_temporaries(out: Path, note: Callable[[str], None]) -> List[str]:
    """Delete temporaries of :func:`biformer.checkpoint.atomic_write` for our files in ``out``."""
    patterns = [temporary_name_pattern(name) for name in RESULT_FILES]
    removed: List[str] = []
    size = 0
    for entry in out.iterdir():
        if entry.is_file() and any(p.fullmatch(entry.name) for p in patterns):
            size += entry.stat().st_size
            entry.unlink()
            removed.append(entry.name)
    if removed:
        note(f"note: removed {len(removed)} temporary file(s) of an interrupted save ({size / 2**20:.1f} MB): "
             f"{', '.join(sorted(removed))}")
    return removed


def prepare_run_folder(out: Path, resume: bool, overwrite: bool, note: Callable[[str], None]) -> RunLock:
    """Create and lock ``out``; refuse a previous run's results unless resuming or overwriting;
    clean temporaries of an interrupted save. The caller releases the returned lock."""
    if resume and overwrite:
        raise UserError("got both --resume and --overwrite; --resume continues the run, --overwrite starts again")
    _make_folder(out)
    lock = acquire_lock(out, take_over_stale=resume or overwrite, note=note)
    try:
        if not resume:
            found = existing_results(out)
            if found and not overwrite:
                raise UserError(
                    f"{str(out)!r} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
                    "start again with --overwrite (removes those), or choose another --output")
            if found:
                note(f"--overwrite: removing the previous run's {', '.join(found)} from {out}")
                for name in found:
                    target = out / name.rstrip("/")
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
        remove_stale_temporaries(out, note)
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["LOCK_FILE", "RESULT_FILES", "RunFolderBusy", "RunLock", "existing_results", "prepare_run_folder",
           "remove_stale_temporaries"]
