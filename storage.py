"""Files on disk that survive crashes and full disks: the one atomic writer, the one
appender of JSON lines, and the one reader of tensor files.

  write_atomic / write_text_atomic / save_torch: the bytes go to a temporary file beside
      the target, are flushed to the disk and renamed over it, so a reader sees the old
      file or the new one, never half of one; the temporary file is removed when the write
      fails (a full disk stays no fuller than before).
  append_line: one line at the end of a JSON-lines file. A torn last line (a crash or a
      full disk in the middle of an earlier append) is first moved to `<file>.torn` and
      reported, so it is never glued to the new line; a failed append is cut off again.
  read_plain: torch.load with weights_only=True (a stranger's file must not run code),
      one clear line when the file is missing or damaged.
  exclusive: a lock on `<file>.lock` that one process at a time holds, across processes and
      machines that share the folder, for "check, make, write" of a file several may want.

A full disk (ENOSPC, EDQUOT) becomes a UserError naming the file and the space it needed.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import sys
from pathlib import Path

import torch
from filelock import FileLock

from constants import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def no_space(path: Path, needed: int) -> UserError:
    """The one line for a full disk: which file, how much it needed, how much is free."""
    try:
        free = f", {_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    return UserError(f"no space left on the disk for {path}: it needs {_size(needed)}{free}; "
                     "free some space there (or point the folder elsewhere) and run again")


def _write_all(f, data: bytes) -> None:
    """Every byte reaches the disk here (tests stand a full disk in for this function)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]
    os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise no_space(path, len(data)) from None
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, text.encode())


def save_torch(obj, path: str | Path) -> Path:
    """torch.save, atomically (the bytes are built in memory first: their size is known)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


def set_aside_torn_tail(path: str | Path) -> None:
    """A JSON-lines file that does not end in a newline lost the end of its last line (a
    crash or a full disk mid-write): move that piece to `<file>.torn` and say so."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    side = path.with_name(path.name + ".torn")
    with open(side, "ab") as f:  # first kept aside, then cut off: a crash between loses nothing
        f.write(data[cut:] + b"\n")
    os.truncate(path, cut)
    print(f"warning: {path} ended in a torn line ({len(data) - cut} bytes, left by a crash or a "
          f"full disk); moved it to {side}", file=sys.stderr)


def append_line(path: str | Path, line: str) -> None:
    """Append one line; on failure the file is cut back to what it was."""
    path = Path(path)
    data = (line + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        set_aside_torn_tail(path)
        with open(path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                _write_all(f, data)
            except BaseException:
                f.truncate(start)
                raise
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space(path, len(data)) from None
        raise


def complete_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of every newline-terminated line; a torn last line is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # the piece after the last newline is torn or empty
    return [(n, text) for n, text in enumerate(lines, 1) if text.strip()]


def read_plain(path: str | Path, what: str):
    """torch.load with weights_only=True; one clear line when the file is missing or holds
    anything but tensors and plain data (a truncated or otherwise damaged file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"cannot read {what} {path}: {str(e).splitlines()[0][:200]} "
                        "(damaged, or not a file of tensors and plain metadata)") from None


@contextlib.contextmanager
def exclusive(path: str | Path):
    """Hold the lock of `path` (`<path>.lock`, flock: the kernel releases it when its holder
    dies, even by SIGKILL, so no lock is left stale). Check whether `path` exists inside it:
    another holder may have made it while this one waited. The lock file stays (removing it
    would let a waiter and a newcomer hold two different locks). Locks on one path do not
    nest within a process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield
