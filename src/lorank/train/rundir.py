"""A run directory's guard: one writer at a time, and no temporary files left behind.

:class:`RunLock` holds an exclusive ``fcntl`` lock on ``RUN/.lock`` while a process trains
into ``RUN`` (the lock dies with the process, so a killed run never blocks the next one);
:func:`remove_orphans` deletes the temporary files that a process killed while writing a
checkpoint leaves behind (lorank's ``.<name>.*.tmp`` and safetensors' ``.tmpXXXXXX``).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

LOCK_NAME = ".lock"
#: lorank's atomic-write temporaries (lorank._io) and those of the safetensors writer
_ORPHAN = re.compile(r"^\.(?:.+\.[A-Za-z0-9_]+\.tmp|tmp[A-Za-z0-9]{6})$")


class RunLock:
    """An exclusive lock on a run directory; :meth:`acquire` fails fast if another process
    holds it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"another lorank process (pid {holder}) is writing to "
                                  f"{str(self.directory)!r}: wait for it to finish or choose "
                                  f"another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_orphans(directory: str | os.PathLike) -> list[str]:
    """Delete leftover temporary files in ``directory`` (call while holding its lock);
    returns their names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    gone = []
    for p in directory.iterdir():
        if p.is_file() and _ORPHAN.match(p.name):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return sorted(gone)


__all__ = ["RunLock", "remove_orphans", "LOCK_NAME"]
