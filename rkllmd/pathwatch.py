"""Learn that one of our own paths was deleted or replaced, without polling.

The daemon must notice when its socket file is deleted (to bind it again) or its text
cache folder is removed (to make and watch it again). Each path's parent folder is
watched with inotify (through watchdog, non-recursively): an event naming one of the
paths wakes the daemon, which then checks what happened. Idle, nothing wakes up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

#: Only these reach us: inotify is not even asked for writes, opens and closes, so files
#: that are busy beside our paths (a log file, say) never wake the daemon.
_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent, FileMovedEvent, DirMovedEvent]


def _identity(folder: str) -> tuple[int, int] | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class _Handler(FileSystemEventHandler):
    def __init__(self, paths: frozenset[str], on_change: Callable[[], None]):
        self._paths = paths
        self._on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        touched = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if touched & self._paths:
            self._on_change()


class PathWatch:
    """Calls ``on_change()`` (from a watchdog thread) when any of ``paths`` is created,
    deleted, moved or replaced. ``start`` raises ``OSError`` if a parent cannot be watched."""

    def __init__(self, paths: Iterable[Path], on_change: Callable[[], None]):
        self.paths = frozenset(os.path.abspath(p) for p in paths)
        self._parents = frozenset(os.path.dirname(p) for p in self.paths)
        self._identities = {parent: _identity(parent) for parent in self._parents}
        self._observer = Observer()
        # The parents too: a deleted parent (its last event) must wake the daemon as well.
        handler = _Handler(self.paths | self._parents, on_change)
        for parent in self._parents:
            self._observer.schedule(handler, parent, recursive=False, event_filter=_EVENTS)

    def start(self) -> None:
        self._observer.start()

    def intact(self) -> bool:
        """False once a watched parent folder was itself deleted or replaced."""
        return all(_identity(parent) == identity for parent, identity in self._identities.items())

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
