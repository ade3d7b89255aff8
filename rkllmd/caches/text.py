"""Text caches: ``NAME.txt`` files in one folder, read defensively, written atomically."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..store import TEXT_DIR_MODE, atomic_write, make_dirs
from .names import TEXT_SUFFIX, check_name, name_of_text_file


def system_text(text: str) -> str:
    """A system message as the model sees it: without trailing line breaks.

    Editors end a file with a newline and the shell's ``$(cat file)`` drops them all, so
    the same rules reach the daemon both ways. The daemon applies this to every text
    cache and to every system message of a request alike, so either form of the same
    text renders the same prompt and hits the same cache (docs/caches.md).
    """
    return text.rstrip("\r\n")


class TextCacheError(Exception):
    """A text cache file exists but cannot be used; the message is the reason shown in ``cache ls``."""


@dataclass(frozen=True)
class TextCache:
    name: str
    text: str
    sha256: str
    size: int
    mtime: float


class TextStore:
    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{TEXT_SUFFIX}"

    def names(self) -> list[str]:
        """Valid cache names present in the folder (other files are not caches)."""
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n for n in (name_of_text_file(e) for e in entries) if n)

    def refused(self) -> list[tuple[str, str]]:
        """Files that look like text caches but are not usable names: (shown name, reason)."""
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if entry.endswith(TEXT_SUFFIX) and not entry.startswith(".") and name_of_text_file(entry) is None:
                shown = entry.encode("unicode_escape").decode("ascii")  # control bytes shown, not sent raw
                out.append((shown, "invalid cache name"))
        return sorted(out)

    def read(self, name: str) -> TextCache | None:
        """The cache's text, or None if there is no such file.

        Never follows a symlink, never opens anything but a regular file (a FIFO would
        block, a device could be anything), never reads more than ``max_bytes``.
        """
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if os.path.islink(path):
                raise TextCacheError("is a symbolic link (not followed)") from None
            raise TextCacheError(f"cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise TextCacheError("not a regular file")
            if info.st_size > self.max_bytes:
                raise TextCacheError(f"{info.st_size} bytes; the limit is {self.max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise TextCacheError(f"larger than {self.max_bytes} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextCacheError(f"not UTF-8 (byte {exc.start})") from None
        if "\x00" in text:
            raise TextCacheError("contains a NUL character")
        return TextCache(name, text, hashlib.sha256(data).hexdigest(), len(data), info.st_mtime)

    def write(self, name: str, text: str) -> TextCache:
        data = text.encode("utf-8")
        if len(data) > self.max_bytes:
            raise TextCacheError(f"{len(data)} bytes; the limit is {self.max_bytes}")
        if "\x00" in text:
            raise TextCacheError("contains a NUL character")
        make_dirs(self.folder, TEXT_DIR_MODE)
        path = self.path(name)
        atomic_write(path, data, mode=0o660)
        return TextCache(name, text, hashlib.sha256(data).hexdigest(), len(data), path.stat().st_mtime)

    def remove(self, name: str) -> bool:
        try:
            self.path(name).unlink()
            return True
        except FileNotFoundError:
            return False
