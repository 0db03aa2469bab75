"""StateLock: one gateway per state file, by an advisory ``flock`` on a sidecar ``PATH.lock``.

The lock is taken before the database is opened at all and held until the store closes. A
second gateway's ``flock(LOCK_EX | LOCK_NB)`` fails at once and it stops with ``StoreInUse``
naming the file and the holder's pid, which the holder wrote into the lock file after locking.

Why a sidecar file and ``flock``, not the database itself:

* The kernel drops a ``flock`` when the holder dies, kill -9 included, so a lock file left by a
  killed gateway never blocks the next one: its content (a stale pid) means nothing, only the
  lock counts. The file is therefore never deleted (deleting it would let two gateways lock
  two different inodes under one name).
* SQLite locks the database with POSIX ``fcntl`` byte-range locks, held only during
  transactions, owned by the process (two stores in one process would not exclude each other)
  and dropped when any descriptor of the file in the process is closed. ``flock`` locks belong
  to the open file description, so they exclude even a second store in the same process, and
  on a separate file they never interact with SQLite's own locks (on NFS, where ``flock`` is
  emulated with ``fcntl`` locks, a lock on the database itself would fight SQLite's).
* A refused gateway never opens the database, so it cannot run WAL recovery or a checkpoint
  on a file another process is writing, and the database's bytes are never written by it.
* ``PRAGMA locking_mode=EXCLUSIVE`` would also exclude a second writer, but only says
  "database is locked", without the holder.

A pid is meaningful only within one pid namespace (containers sharing a volume see each
other's locks but not each other's pids). The lock is inherited by a forked child that does not
exec (the descriptor is close-on-exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from actors.store.base import StoreError, StoreInUse


class StateLock:
    def __init__(self, path: Path, lock_path: Path, fd: int) -> None:
        self.path = path
        self.lock_path = lock_path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> StateLock:
        """Lock ``path`` (the database) through ``path.lock``, or raise StoreInUse."""
        lock_path = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StoreError(path, f"cannot open its lock file {lock_path}: {error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreInUse(path, lock_path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing the descriptor releases the lock
            raise
        return cls(path, lock_path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the pid and unlock; idempotent. The file stays (see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
