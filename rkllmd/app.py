"""Assembling the daemon: config to backend, caches, worker, socket; then serve until told to stop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .backends import choose
from .backends.base import BackendError
from .caches.binary import BinaryStore
from .caches.manager import CacheManager
from .caches.text import TextStore
from .caches.watcher import TextFolderWatcher
from .config import Config, ConfigError
from .endpoint import Endpoint, EndpointError
from .outbox import Outbox
from .paths import default_binary_dir, default_socket, default_text_dir
from .server import Daemon
from .worker import ModelWorker

log = logging.getLogger("rkllmd")


def apply_log_level(config: Config) -> None:
    level = getattr(logging, str(config["daemon.log_level"]).upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"daemon.log_level: unknown level {config['daemon.log_level']!r}")
    logging.getLogger().setLevel(level)


def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Exit status: 0 after a clean stop, 1 when the daemon could not start."""
    try:
        apply_log_level(config)
        endpoint = Endpoint(Path(config["daemon.socket"]) if config["daemon.socket"] else default_socket())
        endpoint.claim()
    except (ConfigError, EndpointError) as exc:
        log.error("%s", exc)
        return 1
    try:
        return _run_claimed(config, endpoint, reload_config)
    finally:
        endpoint.release()


def _run_claimed(config: Config, endpoint: Endpoint, reload_config: Callable[[], Config]) -> int:
    started = time.monotonic()
    try:
        backend, reason = choose(config)
        log.info("backend: %s (%s)", backend.kind, reason)
        backend.load(progress=lambda what: log.info("loading: %s", what))
    except BackendError as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("model loaded in %.2f s", time.monotonic() - started)

    text_dir = Path(config["cache.text_dir"]).expanduser() if config["cache.text_dir"] else default_text_dir()
    binary_dir = Path(config["cache.binary_dir"]).expanduser() if config["cache.binary_dir"] else default_binary_dir()
    try:
        text_dir.mkdir(parents=True, exist_ok=True)
        binary_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("cannot create cache folders: %s", exc)
        return 1

    outbox = Outbox()
    worker = ModelWorker(backend, outbox, config["daemon.max_queue"])
    caches = CacheManager(
        TextStore(text_dir, config["cache.max_text_bytes"]),
        BinaryStore(binary_dir, backend.identity()),
        backend,
        memory_budget=config["cache.memory_budget_mb"] << 20,
        schedule_build=worker.schedule_build,
        on_change=outbox.cache_changed,
    )
    worker.caches = caches
    daemon = Daemon(config, backend, reason, endpoint, caches, worker, outbox)
    daemon.reload_handler = lambda: _reload(daemon, reload_config)
    watcher = TextFolderWatcher(str(text_dir), config["cache.debounce_ms"] / 1000, lambda name: caches.refresh(name))
    try:
        caches.scan()
        watcher.start()
        daemon.install_signal_handlers()
        daemon.bind()
    except (OSError, EndpointError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    worker.start()
    log.info("ready in %.2f s: %s on %s", time.monotonic() - started, backend.describe().get("name", backend.kind), endpoint.path)
    try:
        daemon.serve()
    finally:
        watcher.stop()
        backend.close()
    return 0


def _reload(daemon: Daemon, reload_config: Callable[[], Config]) -> None:
    """SIGHUP: re-read the configuration; keep the old one if the new one is broken."""
    try:
        config = reload_config()
        apply_log_level(config)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    daemon.config = config
    daemon.worker.max_queue = config["daemon.max_queue"]
    log.info("configuration reloaded")
