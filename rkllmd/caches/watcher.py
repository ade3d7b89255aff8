"""Rebuild binary caches when their text files change, whatever the editor does.

Editors save in different ways: in place (several modify events), write-to-temp then
rename over (vim, gedit), truncate then write (VS Code), delete then create. Every
event is reduced to "this cache name may have changed" and debounced: the name is
refreshed once the folder has been quiet for ``debounce`` seconds. The refresh itself
is deduplicated by content hash, so a save that changes nothing builds nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .names import name_of_text_file

log = logging.getLogger(__name__)


class Debouncer:
    """Calls ``action(key)`` once a key has had no new ``touch`` for ``delay`` seconds.

    One thread waits on a condition variable for the earliest deadline, so idle costs
    nothing and a burst of touches costs one call.
    """

    def __init__(self, delay: float, action: Callable[[str], None]):
        self.delay = delay
        self._action = action
        self._due: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="cache-debounce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def touch(self, key: str) -> None:
        with self._cond:
            self._due[key] = time.monotonic() + self.delay
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    ready = [k for k, t in self._due.items() if t <= now]
                    if ready:
                        for key in ready:
                            del self._due[key]
                        break
                    timeout = min(self._due.values()) - now if self._due else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
            for key in ready:
                try:
                    self._action(key)
                except Exception:  # one bad file must not stop the watcher
                    log.exception("handling a change to cache %s failed", key)


class _Handler(FileSystemEventHandler):
    def __init__(self, folder: str, touch: Callable[[str], None]):
        self._folder = folder
        self._touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        for path in paths:
            if not path:
                continue
            path = os.fsdecode(path)
            if os.path.dirname(path) != self._folder:
                continue
            name = name_of_text_file(os.path.basename(path))
            if name:
                self._touch(name)


class TextFolderWatcher:
    """Watches one folder (not its subfolders) and reports changed cache names, debounced."""

    def __init__(self, folder: str, debounce: float, on_change: Callable[[str], None]):
        self.folder = os.path.abspath(folder)
        info = os.stat(self.folder)
        self._identity = (info.st_dev, info.st_ino)
        self._debouncer = Debouncer(debounce, on_change)
        self._observer = Observer()
        self._observer.schedule(_Handler(self.folder, self._debouncer.touch), self.folder, recursive=False)

    def start(self) -> None:
        self._debouncer.start()
        self._observer.start()
        log.info("watching %s for text cache changes", self.folder)

    def intact(self) -> bool:
        """False once the folder watched was deleted or replaced (inotify then reports nothing)."""
        try:
            info = os.stat(self.folder)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._identity

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
        self._debouncer.stop()
