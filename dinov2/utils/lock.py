"""One writer per folder: an exclusive, stale-safe lock on ``FOLDER/.lock``.

Two ``dinov2 train`` on one run folder, or two ``curate run`` into one output folder, would
overwrite each other's checkpoints, metrics and temp files.  The second one is refused before it
touches anything, with a message naming the holder.

The lock is ``flock`` on the file, so the kernel drops it when the holder exits for any reason
(SIGKILL and OOM included): a crashed run never leaves a lock that blocks the next one.  The file
itself stays (removing it would let two processes lock two different files).  A ``flock`` belongs
to the open file, which a forked child (a data-loader worker) shares: each child closes its copy
right after the fork, so a worker that outlives a killed trainer by a few seconds does not keep the
folder locked.  It holds the holder's
host, pid and start time, for the error message only.  Where the file system has no ``flock``
(some parallel file systems mounted without it) the lock degrades to an ``O_EXCL`` marker whose
holder is checked by pid on the same host; a marker from another host must be removed by hand
once that run is known to be gone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"

_HELD: weakref.WeakSet[FolderLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    # Only close: LOCK_UN here would release the parent's lock, which is the same open file.
    for lock in list(_HELD):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
        lock._fd, lock._marker = None, False
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return f"pid {info.get('pid')} on {info.get('host', '?')} (since {since}, {info.get('what', '')})".replace(", )", ")")


def _holder_info(what: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                       "what": what}).encode()


class FolderLock:
    def __init__(self, folder: str | Path, what: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._marker = False

    def _refuse(self) -> FolderLocked:
        return FolderLocked(f"{self.folder} is in use by {_holder_text(self.path)}: two runs on one folder would "
                            f"overwrite each other's files. Wait for it to finish, or use another folder.")

    def acquire(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse() from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                return self._acquire_marker()
            raise
        os.ftruncate(fd, 0)
        os.write(fd, _holder_info(self.what))
        self._fd = fd
        _HELD.add(self)
        return self

    def _acquire_marker(self) -> FolderLock:
        marker = self.folder / (LOCK_NAME + ".held")
        for _ in range(2):
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if not _marker_is_stale(marker):
                    self.path = marker
                    raise self._refuse() from None
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
                continue
            os.write(fd, _holder_info(self.what))
            os.close(fd)
            self.path, self._marker = marker, True
            _HELD.add(self)
            return self
        self.path = marker
        raise self._refuse()

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._marker:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._marker = False
        _HELD.discard(self)

    @property
    def held(self) -> bool:
        return self._fd is not None or self._marker

    def __enter__(self) -> FolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _marker_is_stale(marker: Path) -> bool:
    try:
        info = json.loads(marker.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False  # cannot see another host's processes: keep refusing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "") -> Iterator[FolderLock]:
    lock = FolderLock(folder, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
