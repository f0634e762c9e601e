"""One writer per output folder: an advisory lock that the operating system releases when its process dies.

Two processes writing one folder each keep their own list of finished units and overwrite
``results.json`` with it, while their predictions files overwrite each other's: that is how a result
and the predictions beside it can come from different runs. `FolderLock` makes the second
process stop with a line that names the first.

Example:
    >>> with FolderLock("runs/x"):  # doctest: +SKIP
    ...     ...  # write results
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["FolderLock", "FolderLockedError"]

LOCK_NAME = ".lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the output folder."""


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock`` that records the holder's pid.

    A lock file left by a process that died (killed, crashed) holds no ``flock`` any more, so the next
    run takes it over; a live holder makes `acquire` raise `FolderLockedError` naming it.

    Args:
        folder: the output folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._handle = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise `FolderLockedError`; returns ``self``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+" neither truncates the holder's pid before we know we own the lock, nor fails if it exists.
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderLockedError(
                f"{str(self.path.parent)!r} is being written by another run (process {holder}); wait for it "
                f"to finish or stop it, or choose another --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Give the lock up (the file stays; an unlocked file means nobody holds the folder)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
