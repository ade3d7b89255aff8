"""Crash-safe file replacement: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".tmp-"
#: Free space under which a failed write is taken for a full disk: writers do not all say
#: ENOSPC (numpy's tofile says "N requested and M written", a vendor runtime an error code).
LOW_SPACE = 1 << 20
#: Modes of the folders the daemon makes, whatever its umask: the text caches are edited by
#: the group (as the systemd unit's StateDirectoryMode), the binary caches are the daemon's.
TEXT_DIR_MODE = 0o770
BINARY_DIR_MODE = 0o750
LOCK_NAME = ".lock"


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents with exactly ``mode`` (mkdir's is filtered by
    the umask: under umask 0 it would make them world-writable). Existing folders keep theirs."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue
        os.chmod(folder, mode)


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder (so rename is atomic); removed unless used."""
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def commit(tmp: Path, path: Path, mode: int = 0o640) -> None:
    """fsync ``tmp``, give it ``mode``, rename it over ``path`` and fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a write into ``folder`` that raised ``exc`` failed for lack of space; ask
    while the partial file still exists (removing it frees the space again)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < LOW_SPACE


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    with temporary_beside(path) as tmp:
        tmp.write_bytes(data)
        commit(tmp, path, mode)


def remove_leftovers(folder: Path) -> int:
    """Delete temporary files a killed process left behind; return how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (``BINARY_DIR_MODE``) if missing and hold its lock file: processes
    sharing the folder take turns, so one builds what the others then use."""
    make_dirs(folder, BINARY_DIR_MODE)
    lock = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)
