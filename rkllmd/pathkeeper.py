"""Keeping our paths: the socket file bound, the text cache folder present and watched.

Someone may delete either while the daemon runs (a cleanup job, ``rm -rf``). Their
parent folders are watched (pathwatch.py) and, where they cannot be, checked every
second. A deleted socket file is bound again (connected clients keep their
connections); a socket some other process put there makes the daemon stop; a deleted
text folder is made again, watched again and rescanned (off the socket loop: a rescan
reads and hashes files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Executor, Future
from typing import Callable

import zmq

from .store import TEXT_DIR_MODE, make_dirs
from .caches.manager import PromptCaches
from .caches.watcher import TextFolderWatcher
from .config import CacheConfig
from .connections import Connections
from .endpoint import Endpoint, EndpointError
from .pathwatch import PathWatch

log = logging.getLogger(__name__)

#: How often the socket file and the text cache folder are checked for having been deleted,
#: only where their parent folders cannot be watched (see pathwatch.py); else never idly.
PATH_CHECK_S = 1.0
#: Quiet time after an event on those paths before checking them: a recursive delete of the
#: socket's folder finishes first (binding again at once would make its rmdir fail).
PATH_SETTLE_S = 0.2


class PathKeeper:
    def __init__(
        self,
        endpoint: Endpoint,
        connections: Connections,
        caches: PromptCaches,
        config: CacheConfig,
        io: Executor,
        wake_fd: int,
        fail: Callable[[str], None],
        refresh: Callable[[str], None],
        rescan: Callable[[], None],
    ):
        """``caches``: the default model's (their text folder is watched); ``refresh`` and
        ``rescan``: every loaded model's caches, told of a text change."""
        self.endpoint = endpoint
        self.connections = connections
        self.caches = caches
        self.refresh = refresh
        self.rescan = rescan
        self.debounce_s = config.debounce_ms / 1000
        self.io = io
        self.watcher = TextFolderWatcher(str(caches.texts.folder), self.debounce_s, refresh)
        self._wake_fd = wake_fd
        self._fail = fail
        self._path_watch: PathWatch | None = None
        self._changed = False  # set from the path watch's thread
        self._next_check: float | None = None  # when to check next (None: on an event)

    def configure(self, config: CacheConfig) -> None:
        """Apply a reloaded [cache] section (the debounce applies to the next watcher made)."""
        self.debounce_s = config.debounce_ms / 1000

    def bind(self) -> None:
        self.connections.bind(self.endpoint.url)
        self.endpoint.secure()

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        if self._path_watch is not None:
            self._path_watch.stop()

    def watch(self) -> None:
        """(Re)watch the socket file and the text folder: when serving starts, and after a
        reload moved the folder or a watched parent folder was replaced."""
        if self._path_watch is not None:
            self._path_watch.stop()
            self._path_watch = None
        watch = PathWatch([self.endpoint.path, self.caches.texts.folder], self._on_changed)
        try:
            watch.start()
        except OSError as exc:
            log.warning("cannot watch %s: %s; checking them every %.0f s instead", sorted(watch.paths), exc, PATH_CHECK_S)
            self._next_check = time.monotonic() + PATH_CHECK_S
            return
        self._path_watch = watch
        self._next_check = None

    def use_text_folder(self, watcher: TextFolderWatcher) -> None:
        """A reload moved the text folder: watch the new one instead."""
        self.watcher.stop()
        self.watcher = watcher
        watcher.start()
        self.watch()

    def _on_changed(self) -> None:
        self._changed = True
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_fd, b"p")

    def next_check(self) -> float | None:
        """When the loop must call ``check`` next (monotonic), or None."""
        return self._next_check

    def check(self) -> None:
        """When a path watch event came (or, unwatched, once a second): is our socket file
        still there, and the text folder we watch?"""
        if self._changed:  # each event postpones the check: let the other side finish
            self._changed = False
            self._next_check = time.monotonic() + PATH_SETTLE_S
        if self._next_check is None or time.monotonic() < self._next_check:
            return
        self._next_check = None if self._path_watch is not None else time.monotonic() + PATH_CHECK_S
        self._check_socket()
        if not self.watcher.intact():
            self._watch_text_folder_again()
        if self._path_watch is not None and not self._path_watch.intact():
            self.watch()

    def _check_socket(self) -> None:
        state = self.endpoint.state()
        if state == "ok":
            return
        path = self.endpoint.path
        if state == "missing":
            try:
                self.endpoint.reclaim()
                self.bind()
            except (EndpointError, OSError, zmq.ZMQError) as exc:
                self._fail(f"the socket file {path} was deleted and cannot be bound again: {exc}")
                return
            log.warning("the socket file %s was deleted; bound it again (connected clients kept their connections)", path)
            return
        self._fail(f"the socket file {path} was replaced by another process; new clients cannot reach this daemon")

    def _watch_text_folder_again(self) -> None:
        """The text folder was deleted (or replaced): make it again, watch the new one, rescan."""
        folder = self.caches.texts.folder
        try:
            make_dirs(folder, TEXT_DIR_MODE)
            watcher = TextFolderWatcher(str(folder), self.debounce_s, self.refresh)
        except OSError as exc:
            log.error("the text cache folder %s is gone and cannot be made again: %s", folder, exc)
            return
        self.watcher.stop()
        self.watcher = watcher
        watcher.start()
        self.io.submit(self.rescan).add_done_callback(_log_failure)
        log.warning("the text cache folder %s was deleted or replaced; watching it again", folder)


def _log_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("rescanning the text cache folder failed", exc_info=future.exception())
