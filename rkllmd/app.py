"""Assembling the daemon: config to backend, caches, worker, socket; then serve until told to stop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .backends import choose
from .backends.base import Backend, BackendError
from .caches.atomic import BINARY_DIR_MODE, TEXT_DIR_MODE, make_dirs
from .caches.binary import BinaryStore
from .caches.manager import CacheManager
from .caches.text import TextStore
from .caches.watcher import TextFolderWatcher
from .check import Account, log_report, run_checks
from .config import MODEL_KEYS, OPTIONS, Config, ConfigError
from .endpoint import Endpoint, EndpointError
from .outbox import Outbox
from .paths import cache_dirs, default_socket, kernels_dir, weights_dir
from .server import Daemon
from .service import ServiceNotifier, enable_faulthandler
from .worker import ModelWorker

log = logging.getLogger("rkllmd")

#: How much more start-up time to ask systemd for each time a slow load makes progress.
LOAD_EXTENSION_S = 60.0


def apply_log_level(config: Config) -> None:
    level = getattr(logging, str(config["daemon.log_level"]).upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"daemon.log_level: unknown level {config['daemon.log_level']!r}")
    logging.getLogger().setLevel(level)
    # watchdog logs every inotify event at debug level: noise, not our daemon's story.
    logging.getLogger("watchdog").setLevel(max(level, logging.INFO))


def load_backend(config: Config, notifier: ServiceNotifier) -> tuple[Backend, str]:
    """Choose and load the backend, asking systemd for more time while the load progresses."""
    started = time.monotonic()
    backend, reason = choose(config, weights_dir=weights_dir(config), kernels_dir=kernels_dir(config))
    log.info("backend: %s (%s)", backend.kind, reason)

    def progress(what: str) -> None:
        log.info("loading: %s", what)
        notifier.extend_timeout(LOAD_EXTENSION_S)

    notifier.extend_timeout(LOAD_EXTENSION_S)
    backend.load(progress=progress)
    log.info("model loaded in %.2f s", time.monotonic() - started)
    return backend, reason


def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Exit status: 0 after a clean stop, 2 for a configuration error (as ``cli.main``:
    restarting cannot fix it, and the unit's RestartPreventExitStatus=2 does not try),
    1 when the daemon could not start otherwise."""
    enable_faulthandler()
    notifier = ServiceNotifier()
    try:
        apply_log_level(config)
        endpoint = Endpoint(Path(config["daemon.socket"]) if config["daemon.socket"] else default_socket())
    except (ConfigError, EndpointError) as exc:  # a bad level, a socket path too long
        log.error("configuration: %s", exc)
        return 2
    log_report(run_checks(config, Account.current()))
    try:
        endpoint.claim()
    except EndpointError as exc:
        log.error("%s", exc)
        return 1
    try:
        return _run_claimed(config, endpoint, notifier, reload_config)
    finally:
        endpoint.release()
        notifier.close()


def _run_claimed(config: Config, endpoint: Endpoint, notifier: ServiceNotifier, reload_config: Callable[[], Config]) -> int:
    started = time.monotonic()
    try:
        backend, reason = load_backend(config, notifier)
    except BackendError as exc:
        log.error("cannot start: %s", exc)
        notifier.status(f"failed to start: {exc}")
        return 1
    text_dir, binary_dir = cache_dirs(config)
    try:
        make_dirs(text_dir, TEXT_DIR_MODE)
        make_dirs(binary_dir, BINARY_DIR_MODE)
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
    daemon = Daemon(config, reason, endpoint, caches, worker, outbox, notifier)
    watcher = TextFolderWatcher(str(text_dir), config["cache.debounce_ms"] / 1000, caches.refresh)
    daemon.reload_handler = lambda: _reload(daemon, reload_config)
    daemon.watcher = watcher
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
    notifier.ready(daemon.status_line())
    if notifier.watchdog_interval:
        notifier.start_watchdog(lambda: worker.healthy(within=notifier.watchdog_interval))
    try:
        daemon.serve()
    finally:
        notifier.stopping()
        daemon.watcher.stop()
        worker.backend.close()
    return daemon.exit_status


def _reload(daemon: Daemon, reload_config: Callable[[], Config]) -> None:
    """SIGHUP: apply a new configuration without dropping the socket or queued requests.

    Log level, sampling defaults and limits apply at once; changed cache folders are
    rescanned and re-watched; a changed model is loaded on the worker after the
    requests already queued (their clients keep their answers), and all binary caches
    then belong to the new model's identity, so none of the old ones is ever used.
    A broken new configuration is refused whole and the running one kept.
    """
    daemon.notifier.reloading()
    try:
        config = reload_config()
        apply_log_level(config)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        daemon.notifier.ready(daemon.status_line())
        return
    old = daemon.config
    daemon.config = config
    daemon.worker.max_queue = config["daemon.max_queue"]
    caches = daemon.caches
    caches.lru.budget = config["cache.memory_budget_mb"] << 20
    caches.texts.max_bytes = config["cache.max_text_bytes"]

    text_dir, binary_dir = cache_dirs(config)
    if (text_dir, binary_dir) != (caches.texts.folder, caches.binaries.root):
        try:
            make_dirs(text_dir, TEXT_DIR_MODE)
            make_dirs(binary_dir, BINARY_DIR_MODE)
            watcher = TextFolderWatcher(str(text_dir), config["cache.debounce_ms"] / 1000, caches.refresh)
        except OSError as exc:
            log.error("reload: cannot use cache folders %s, %s: %s; keeping the old ones", text_dir, binary_dir, exc)
        else:
            daemon.watcher.stop()
            caches.relocate(TextStore(text_dir, config["cache.max_text_bytes"]), BinaryStore(binary_dir, caches.binaries.identity))
            daemon.watcher = watcher
            watcher.start()
            daemon.watch_paths()
            log.info("reload: caches now in %s and %s", text_dir, binary_dir)

    if any(config[k] != old[k] for k in MODEL_KEYS):
        log.info("reload: the model configuration changed; loading it after the queued requests")

        def swapped(backend: Backend, reason: str | None, error: str | None) -> None:
            if error is not None and daemon.config is config:
                # Still serving the old model: its settings stay the running ones, so the
                # next reload with these settings (a copy that has now ended) tries again.
                daemon.config = _with_model_of(old, config)
            daemon.backend_replaced(backend, reason, error)

        daemon.worker.replace_backend(lambda: load_backend(config, daemon.notifier), done=swapped)
        return
    log.info("configuration reloaded")
    daemon.notifier.ready(daemon.status_line())


def _with_model_of(serving: Config, config: Config) -> Config:
    """``config`` with the model settings of ``serving`` (the ones the running model was loaded with)."""
    def source(key: str) -> Config:
        return serving if key in MODEL_KEYS else config

    return Config({o.dotted: source(o.dotted)[o.dotted] for o in OPTIONS},
                  {o.dotted: source(o.dotted).sources[o.dotted] for o in OPTIONS}, config.file)
