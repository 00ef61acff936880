"""Files replaced whole or not at all, for every writer of the project: a reader (Triton polling a repository,
`--resume auto`, a person opening a report) sees the old file or the new one, never half of one, and a write that
fails (a full disk) leaves no temporary file beside them; and the lock files that keep two writers of one folder
apart. Kept free of heavy imports, like the rest of `cli`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# mkstemp makes 0600; checkpoints, model repositories and reports are read by other users (containers, serving)
SHARED_FILE_MODE = 0o644


def atomic_write(path: Path, write: Callable[[BinaryIO], object], prefix: str | None = None) -> None:
    """`write` into a temporary file in `path`'s folder (named `prefix`..., else .<name>....tmp), fsync it, then
    rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, SHARED_FILE_MODE)
        os.replace(temporary, path)
    except OSError as error:
        # a failed write names no file, a failed rename the temporary one: name the file the user asked for
        if error.errno is not None and error.filename in (None, temporary):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        Path(temporary).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, prefix: str | None = None) -> None:
    atomic_write(path, lambda file: file.write(text.encode()), prefix)


def atomic_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as original:
        atomic_write(target, lambda file: shutil.copyfileobj(original, file))


def save_figure(figure, path: Path, dpi: int) -> None:
    """A matplotlib figure saved whole, in the format its suffix names (matplotlib is the caller's import)."""
    atomic_write(path, lambda file: figure.savefig(file, format=path.suffix.lstrip(".") or "png", dpi=dpi))


def os_error_behind(error: BaseException | None) -> OSError | None:
    """The OSError that `error` is or was raised while handling. torch.save on a full disk raises its zip writer's
    RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ...") in the OSError's place."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


class LockHeld(Exception):
    """Another process holds the lock; `holder` says which, as it wrote it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def try_lock(path: Path) -> BinaryIO | None:
    """An exclusive flock on `path` (made if missing), held until the returned file is closed or the process ends:
    the kernel releases an flock then, so a crashed holder leaves no stale lock. Raises `LockHeld` where another
    process holds it; returns None on a file system without locks; a lock file that cannot be opened is the
    caller's OSError. The file stays: removing it would let a waiter lock a file no one else can find."""
    # unbuffered: a write that fails leaves nothing pending for close() to fail on again
    try:
        handle = open(path, "a+b", buffering=0)
    except PermissionError:  # another user's lock file in a shared folder: an flock needs no write access
        handle = open(path, "rb", buffering=0)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        raise LockHeld(holder) from None
    except OSError:
        handle.close()
        return None
    with contextlib.suppress(OSError):  # who holds it, for those who wait; the lock holds without it
        handle.truncate(0)
        handle.write(f"{this_process()}\n".encode())
    return handle


def this_process() -> str:
    """This process, as those who wait for a lock it holds see it named."""
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M')}"
