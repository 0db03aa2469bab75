"""StateLock: who may open a state file, by an advisory ``flock`` on a sidecar ``PATH.lock``.

The lock is taken before the database is opened at all and held until the store closes. It has
two modes:

* **Exclusive** (one gateway, ``SqliteStore``): ``flock(LOCK_EX | LOCK_NB)``. A second gateway's
  attempt fails at once and it stops with ``StoreInUse`` naming the file and the holder's pid,
  which the holder wrote into the lock file after locking.
* **Shared** (gateway replicas, ``SharedSqliteStore``): ``flock(LOCK_SH | LOCK_NB)``, which any
  number of replicas hold at once while it excludes an exclusive holder, both ways: a replica
  finding an exclusive gateway gets ``StoreInUse`` with that gateway's pid; an exclusive opener
  finding replicas gets ``InUseByReplicas`` (a ``StoreInUse``; replicas write no pid, there may
  be many). SQLite itself keeps the replicas' writes apart (``actors/store/sqlite_shared.py``).

**Setting the file up among replicas.** Inspecting the raw file, creating it or migrating it
must happen with nobody else in it, yet replicas start together (``tmg serve --processes N``).
So a replica first takes a second, *blocking* ``flock(LOCK_EX)`` on ``PATH.setup.lock``: one
replica at a time is past it, the others wait there (for a set-up, never for a gateway). Past
it, the replica tries ``LOCK_EX | LOCK_NB`` on ``PATH.lock``: if it gets it, no other gateway
has the file (``alone``), and it inspects, creates or migrates the file like a single gateway,
then turns its lock into a shared one (``settle``). Otherwise it takes ``LOCK_SH | LOCK_NB``:
other replicas hold the file, which they set up already. If even that fails an exclusive
gateway holds it (a replica setting up would hold the set-up lock, which this one has).
``settle`` then releases the set-up lock for the next replica. Turning ``LOCK_EX`` into
``LOCK_SH`` is not atomic (``flock(2)``): an exclusive opener may slip in between; then that
replica fails with ``StoreInUse``, as it would have a moment later. An exclusive opener that
comes while a replica sets up finds ``LOCK_EX`` held and no pid: "pid unknown".

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


class InUseByReplicas(StoreInUse):
    """The state file is held by gateway replicas sharing it (``holder_pid`` is None: replicas
    record no pid). Its message is its own, not ``StoreInUse``'s "another gateway (pid …)"."""

    def __init__(self, path: str | Path, lock_path: str | Path) -> None:
        StoreError.__init__(self, path, f"in use by gateway replicas (lock held on {lock_path})")
        self.lock_path = str(lock_path)
        self.holder_pid = None


class StateLock:
    """A held lock on ``path`` (see the module docstring). ``shared``: the replicas' mode.
    ``alone``: no other gateway had the file when it was taken, so the holder may inspect,
    create and migrate it (always True for an exclusive lock); a shared holder calls
    ``settle`` once it has, or once it found the file set up by others."""

    def __init__(
        self,
        path: Path,
        lock_path: Path,
        fd: int,
        *,
        shared: bool = False,
        alone: bool = True,
        setup_fd: int | None = None,
    ) -> None:
        self.path = path
        self.lock_path = lock_path
        self.shared = shared
        self.alone = alone
        self._fd: int | None = fd
        self._setup_fd = setup_fd

    @classmethod
    def acquire(cls, path: Path, *, shared: bool = False) -> StateLock:
        """Lock ``path`` (the database) through ``path.lock``, or raise StoreInUse."""
        lock_path = _sidecar(path, ".lock")
        if shared:
            return cls._acquire_shared(path, lock_path)
        fd = _open(path, lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(path, lock_path, fd)
            os.close(fd)
            raise error from None
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

    @classmethod
    def _acquire_shared(cls, path: Path, lock_path: Path) -> StateLock:
        setup_fd = _open(path, _sidecar(path, ".setup.lock"))
        fd: int | None = None
        try:
            fcntl.flock(setup_fd, fcntl.LOCK_EX)  # blocks while another replica sets up
            fd = _open(path, lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
                os.ftruncate(fd, 0)  # a stale pid of an exclusive gateway killed long ago
            except BlockingIOError:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    alone = False
                except BlockingIOError:
                    raise StoreInUse(path, lock_path, _read_pid(fd)) from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            os.close(setup_fd)
            raise
        return cls(path, lock_path, fd, shared=True, alone=alone, setup_fd=setup_fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def settle(self) -> None:
        """A shared lock's set-up is over: keep only ``LOCK_SH`` on ``PATH.lock`` and let the
        next replica set up. Nothing for an exclusive lock; idempotent. If an exclusive opener
        slipped in while the lock turned shared (see the module docstring), the lock is gone:
        StoreInUse."""
        setup_fd, self._setup_fd = self._setup_fd, None
        if setup_fd is None:
            return
        try:
            if self.alone and self._fd is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(self._fd)
                    self.release()
                    raise StoreInUse(self.path, self.lock_path, holder) from None
        finally:
            os.close(setup_fd)

    def release(self) -> None:
        """Unlock (an exclusive holder clears its pid first); idempotent. The files stay (see
        the module docstring)."""
        setup_fd, self._setup_fd = self._setup_fd, None
        if setup_fd is not None:
            os.close(setup_fd)
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self.shared:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # drops the flock


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _open(path: Path, lock_path: Path) -> int:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StoreError(path, f"cannot open its lock file {lock_path}: {error}") from error


def _in_use(path: Path, lock_path: Path, fd: int) -> StoreInUse:
    """Why an exclusive lock was refused: if a shared lock can be had, replicas hold the file
    (the probe's lock is dropped with the descriptor); else an exclusive gateway, whose pid the
    file holds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return StoreInUse(path, lock_path, _read_pid(fd))
    fcntl.flock(fd, fcntl.LOCK_UN)
    return InUseByReplicas(path, lock_path)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
