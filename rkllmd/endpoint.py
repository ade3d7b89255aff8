"""Claiming the socket path safely.

libzmq's ipc bind unlinks whatever is at the path, so a second daemon would silently
take the socket away from a live one. Before binding we hold an exclusive lock file
beside the socket for our whole life and check that nothing answers on the path; only
a socket file nobody listens on (left by a crash) is replaced.

If the socket file is deleted while we run (a cleanup script, ``rm -rf`` of the
folder), the listening socket lives on but nobody can reach it. The socket loop checks
the path every second (``state()``) and, while the lock is still ours, binds it again
(``reclaim()``): connected clients keep their connections, new ones can connect again.
A path some other process took over is never touched: the daemon then stops with an
error instead (see docs/reliability.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

DIR_MODE = 0o750
SOCKET_MODE = 0o660
# zmq ipc paths are limited by sockaddr_un.sun_path (108 bytes with the NUL).
MAX_PATH_BYTES = 107


class EndpointError(Exception):
    """The socket path cannot be used; the message says why and what to do."""


def prepare_folder(folder: Path) -> None:
    """Create the socket's folder 0750, or check an existing one is ours and not world-open."""
    try:
        folder.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask
        return
    except FileExistsError:
        pass
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{folder} exists and is not a folder")
    if info.st_uid != os.geteuid():
        if info.st_mode & 0o002:
            raise EndpointError(f"{folder} belongs to uid {info.st_uid} and is world-writable; refusing to put a socket there")
        return  # e.g. a RuntimeDirectory made by systemd for our user's group: keep its mode
    if stat.S_IMODE(info.st_mode) != DIR_MODE and not (info.st_mode & stat.S_ISVTX):
        os.chmod(folder, DIR_MODE)


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise EndpointError(f"cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()


class Endpoint:
    """The socket path, held: ``claim()`` before bind, ``release()`` after close."""

    def __init__(self, path: Path):
        self.path = path.absolute()
        if len(os.fsencode(self.path)) > MAX_PATH_BYTES:
            raise EndpointError(f"socket path {self.path} is longer than {MAX_PATH_BYTES} bytes")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound

    @property
    def url(self) -> str:
        return f"ipc://{self.path}"

    def claim(self) -> None:
        prepare_folder(self.path.parent)
        fd = self._lock()
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                os.close(fd)
                raise EndpointError(f"something is already answering on {self.path}; refusing to take it over")
            self.path.unlink()  # stale: left by a daemon that died
        self._lock_fd = fd

    def _lock(self) -> int:
        """Open and lock the lock file; its content says who holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise EndpointError(
                f"another rkllmd (pid {holder or '?'}) is serving on {self.path}; stop it first or choose another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def secure(self) -> None:
        """After bind: the socket is for our user and group only."""
        os.chmod(self.path, SOCKET_MODE)
        info = self.path.lstat()
        self._bound = (info.st_dev, info.st_ino)

    def state(self) -> str:
        """"ok" (our socket file is in place), "missing" (deleted) or "replaced" (someone else's)."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "replaced"
        return "ok" if (info.st_dev, info.st_ino) == self._bound else "replaced"

    def reclaim(self) -> None:
        """Our socket file was deleted: make the path ready for a new bind, or raise EndpointError.

        The folder is made again if it went too, and the lock taken again if its file was
        deleted (a daemon started meanwhile may hold the new one: then the path is its).
        """
        assert self._lock_fd is not None
        prepare_folder(self.path.parent)
        try:
            ours = os.fstat(self._lock_fd)
            now = self.lock_path.stat()
            current = (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if not current:
            fd = self._lock()
            os.close(self._lock_fd)
            self._lock_fd = fd
        if self.path.exists() or self.path.is_symlink():
            raise EndpointError(f"{self.path} was replaced by another process; not taking it over")

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if self.path.is_socket() and self.state() == "ok":  # never another process's socket
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None
