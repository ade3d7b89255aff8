"""Assembling the daemon: config to backend, caches, worker, socket; then serve until told to stop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .backends import choose, config_for, memory_estimate
from .protocol import WireError
from .backends.base import Backend, BackendError
from .backends.cpu import kernels, weights_file
from .caches import binary
from .caches.binary import BinaryStore
from .caches.manager import PromptCaches
from .caches.text import TextStore
from .caches.watcher import TextFolderWatcher
from .check import Account, log_report, run_checks
from .commands import status
from .caches.waiters import CacheWaiters
from .commands.context import Context
from .config import Config, ConfigError
from .connections import Connections
from .endpoint import Endpoint, EndpointError
from .outbox import Outbox
from .paths import cache_dirs, default_socket, kernels_dir, weights_dir
from .server import Daemon
from .service import ServiceNotifier, enable_faulthandler
from .store import BINARY_DIR_MODE, TEXT_DIR_MODE, ArtifactStore, Kind, make_dirs
from .models import keep_alive
from .models.pool import LoadedModel, ModelPool
from .inquiries import Inquiries
from .scheduler import Scheduler
from .models.registry import Model, Registry, configured_models
from .runner.proxy import RunnerProcess
from .worker import ModelWorker

log = logging.getLogger("rkllmd")

#: How much more start-up time to ask systemd for each time a slow load makes progress.
LOAD_EXTENSION_S = 60.0


def apply_log_level(config: Config) -> None:
    level = getattr(logging, config.daemon.log_level.upper())
    logging.getLogger().setLevel(level)
    # watchdog logs every inotify event at debug level, httpcore2 (a pull's HTTP) every step
    # of every request: noise, not our daemon's story.
    logging.getLogger("watchdog").setLevel(max(level, logging.INFO))
    logging.getLogger("httpcore2").setLevel(max(level, logging.INFO))


def artifact_kinds(config: Config) -> list[Kind]:
    """The kinds of artifacts kept under this configuration, and their folders."""
    kinds = [Kind(binary.KIND, cache_dirs(config)[1], binary.PATTERN)]
    if (weights := weights_dir(config)) is not None:
        kinds.append(Kind("weights", weights, weights_file.PATTERN))
    return [*kinds, Kind("kernels", kernels_dir(config), kernels.PATTERN)]


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


def default_name(config: Config, backend: Backend) -> str:
    """``model.name``, else the loaded model's own name as a model id (smollm2-135m-instruct)."""
    if config.model.name:
        return config.model.name
    describe = backend.describe()
    name = describe.get("name") or Path(describe.get("path") or "rkllmd").stem
    return "-".join(str(name).lower().split()) or "rkllmd"


def models_file(config: Config) -> Path:
    return Path(config.daemon.models_file).expanduser() if config.daemon.models_file else cache_dirs(config)[0] / "models.json"


def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Exit status: 0 after a clean stop, 2 for a configuration error (as ``cli.main``:
    restarting cannot fix it, and the unit's RestartPreventExitStatus=2 does not try),
    1 when the daemon could not start otherwise."""
    enable_faulthandler()
    notifier = ServiceNotifier()
    try:
        apply_log_level(config)
        endpoint = Endpoint(Path(config.daemon.socket) if config.daemon.socket else default_socket())
    except (ConfigError, EndpointError) as exc:  # a bad level, a socket path too long
        log.error("configuration: %s", exc)
        return 2
    log_report(run_checks(config, Account.current(), parse=False))  # the load parses the tokenizer
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
    text_dir, binary_dir = cache_dirs(config)
    try:
        make_dirs(text_dir, TEXT_DIR_MODE)
        make_dirs(binary_dir, BINARY_DIR_MODE)
    except OSError as exc:
        log.error("cannot create cache folders: %s", exc)
        return 1

    outbox = Outbox()
    #: One thread for work that reads, writes or hashes files (see Context.disk).
    disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")
    store = ArtifactStore(artifact_kinds(config), config.store)
    in_runners = config.daemon.runners == "process"

    def collect() -> None:
        """A collection on the disk thread: binary caches were stored, or let go by an unloaded model."""
        with contextlib.suppress(RuntimeError):  # the daemon stops: its disk thread is shut down
            disk.submit(store.collect)

    def extend_start(what: str) -> None:
        log.info("loading: %s", what)
        notifier.extend_timeout(LOAD_EXTENSION_S)

    def runner_for(name: str, model_config: Config, *, default: bool) -> LoadedModel:
        """A runner process that has loaded ``model_config``'s model, served as ``name``."""

        def cache_changed(cache: str) -> None:
            outbox.wake()  # the status line counts caches
            waiters.changed(cache)

        runner = RunnerProcess(name, model_config, outbox, restart_when_dead=default, on_change=cache_changed,
                               on_stored=collect, on_death=lambda dead: pool.runner_died(dead),
                               progress=extend_start if default else lambda what: None)
        waiters = CacheWaiters(runner.caches)
        runner.start()
        return LoadedModel(name, runner, runner.caches, waiters, runner.reason, memory_estimate(model_config))

    try:
        if in_runners:
            notifier.extend_timeout(LOAD_EXTENSION_S)
            default_runner = runner_for(config.model.name or "default", config, default=True)  # named once the registry knows its name
            backend, reason = default_runner.backend, default_runner.reason
            log.info("backend: %s (%s)", backend.kind, reason)
            log.info("model loaded in %.2f s", time.monotonic() - started)
        else:
            backend, reason = load_backend(config, notifier)
    except (BackendError, OSError) as exc:  # OSError: the runner process could not be started
        log.error("cannot start: %s", exc)
        notifier.status(f"failed to start: {exc}")
        return 1

    def serve(backend: Backend, reason: str, name: str, current: Config, size: int) -> LoadedModel:
        """A loaded backend with its worker and prompt caches (text caches shared by name,
        binary caches under the backend's identity); ``size``: what the memory budget counts."""
        worker = ModelWorker(backend, outbox, current.daemon)

        def cache_changed(name: str) -> None:
            outbox.wake()  # the status line counts caches
            waiters.changed(name)

        text_dir, binary_dir = cache_dirs(current)
        caches = PromptCaches(
            TextStore(text_dir, current.cache.max_text_bytes),
            BinaryStore(binary_dir, backend.identity()),
            backend,
            memory_budget=current.cache.memory_budget_mb << 20,
            schedule_build=worker.schedule_build,
            on_change=cache_changed,
            on_stored=collect,
            keep_conversations=current.cache.conversations,
        )
        worker.caches = caches
        waiters = CacheWaiters(caches)
        return LoadedModel(name, worker, caches, waiters, reason, size)

    def open_default(current: Config) -> LoadedModel:
        """The default model as ``current`` configures it (a reload changed it), loaded beside
        the one serving, under its name; systemd is asked for more time while the load progresses."""
        if in_runners:
            notifier.extend_timeout(LOAD_EXTENSION_S)
            return runner_for(ctx.registry.default, current, default=True)
        backend, reason = load_backend(current, notifier)
        loaded = serve(backend, reason, ctx.registry.default, current, memory_estimate(current))
        loaded.caches.scan()
        loaded.worker.start()
        return loaded

    def open_model(model: Model) -> LoadedModel:
        """Load another weights file (on the pool's loader thread) and serve it."""
        current = ctx.config
        its = config_for(current, model)
        if in_runners:
            return runner_for(model.name, its, default=False)
        backend, reason = choose(its, weights_dir=weights_dir(current), kernels_dir=kernels_dir(current))
        backend.load()
        loaded = serve(backend, reason, model.name, current, memory_estimate(its))
        loaded.caches.scan()
        loaded.worker.start()
        return loaded

    try:
        registry = Registry(default_name(config, backend), configured_models(config.models), models_file(config))
        for name in config.models:
            registry.resolve(name)  # a [models.NAME] from a model that does not exist
    except WireError as exc:
        log.error("configuration: [models]: %s", exc)
        return 2
    if in_runners:
        default = default_runner
        default.name = default.worker.name = registry.default
    else:
        default = serve(backend, reason, registry.default, config, memory_estimate(config))
    worker, caches = default.worker, default.caches
    pool = ModelPool(open_model, max_loaded=config.daemon.max_loaded_models, memory_budget=config.daemon.models_memory_mb << 20,
                     keep_alive=keep_alive.seconds(config.daemon.keep_alive),
                     memory_needed=lambda m: memory_estimate(config_for(ctx.config, m)))
    scheduler = Scheduler(pool, outbox, max_queue=config.daemon.max_queue)
    connections = Connections(endpoint.path, outbox, scheduler, config.daemon)
    ctx = Context(
        config=config,
        caches=caches,
        worker=worker,
        generations=connections.generations,
        disk=disk,
        inquiries=Inquiries(),
        store=store,
        traffic=connections.traffic,
        socket=endpoint.path,
        started=time.time(),
        backend_reason=reason,
        registry=registry,
        pool=pool,
        scheduler=scheduler,
        outbox=outbox,
    )
    daemon = Daemon(ctx, endpoint, connections, outbox, notifier)
    reload_loads = InTurn("reload-model")
    daemon.reload_handler = lambda: _reload(
        daemon, reload_config, lambda new, old: reload_loads.run(lambda: _load_default(daemon, new, old, open_default)))
    try:
        if not in_runners:
            caches.scan()  # a runner scans its caches as it starts
        disk.submit(store.collect)
        daemon.install_signal_handlers()
        daemon.bind()
    except (OSError, EndpointError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    if not in_runners:
        worker.start()
    pool.start(default)
    scheduler.start()
    log.info("ready in %.2f s: %s on %s", time.monotonic() - started, backend.describe().get("name", backend.kind), endpoint.path)
    notifier.ready(status.line(ctx))
    if notifier.watchdog_interval and in_runners:
        notifier.start_watchdog(lambda: _stop_stuck_runners(pool, notifier.watchdog_interval))
    elif notifier.watchdog_interval:
        notifier.start_watchdog(lambda: ctx.worker.healthy(within=notifier.watchdog_interval))
    try:
        daemon.serve()  # its shutdown stops the worker, which closes the backend after its last call
    finally:
        notifier.stopping()
        daemon.paths.stop()
    return daemon.exit_status


def _stop_stuck_runners(pool: ModelPool, within: float) -> bool:
    """The watchdog's check with runner processes: a stuck runner is the daemon's to kill
    and restart (systemd would restart every model with the daemon); the daemon is healthy."""
    for model in pool.in_memory():
        model.worker.stop_if_stuck(within)
    return True


class InTurn:
    """Work run off the socket loop on threads of their own, one after the other in the
    order given: a reload's model load (minutes on an NPU), two reloads' in order."""

    def __init__(self, name: str):
        self._name = name
        self._last: threading.Thread | None = None

    def run(self, work: Callable[[], None]) -> None:
        """From the socket loop."""
        before = self._last

        def in_turn() -> None:
            if before is not None:
                before.join()
            work()

        self._last = threading.Thread(target=in_turn, name=self._name, daemon=True)
        self._last.start()


def _reload(daemon: Daemon, reload_config: Callable[[], Config], load_default: Callable[[Config, Config], None]) -> None:
    """SIGHUP: apply a new configuration without dropping the socket or queued requests.

    The new configuration is loaded and checked whole (and its cache folders made)
    before anything changes: a broken one is refused and the running one kept. Then
    each component applies its own section: log level, limits, sampling defaults and
    memory budget at once; changed cache folders are rescanned (on the disk thread) and
    watched.

    A changed default model is a change of the model registry: the new one is loaded
    beside the running one, off the socket loop (``load_default``), and once it is loaded
    it serves the default model's name (``ModelPool.replace_default``). Which model answers
    a generation is decided when it arrives: every one received before that switch (before
    the signal, or while the new model loaded) runs on the old model, rendered with its
    template, and its client keeps its answer; every one received after it runs on the new
    one. The old model then answers what it was given and is unloaded (its runner process
    ends). Binary caches are per model identity: the new one never uses the old one's. A
    new model that cannot be loaded leaves the old one serving, its settings still the
    running ones (so the same reload again tries again).
    """
    ctx, notifier = daemon.ctx, daemon.notifier
    notifier.reloading()
    caches = ctx.caches
    try:
        config = reload_config()
        text_dir, binary_dir = cache_dirs(config)
        moved = (text_dir, binary_dir) != (caches.texts.folder, caches.binaries.root)
        if moved:
            make_dirs(text_dir, TEXT_DIR_MODE)
            make_dirs(binary_dir, BINARY_DIR_MODE)
            watcher = TextFolderWatcher(str(text_dir), config.cache.debounce_ms / 1000, ctx.pool.refresh)
        registry = ctx.registry.reconfigured(configured_models(config.models))
    except WireError as exc:  # a [models.NAME] refused
        log.error("reload refused, keeping the running configuration: [models]: %s", exc)
        notifier.ready(status.line(ctx))
        return
    except (ConfigError, OSError) as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        notifier.ready(status.line(ctx))
        return
    old, ctx.config = ctx.config, config
    apply_log_level(config)
    daemon.connections.configure(config.daemon)
    ctx.registry.adopt(registry)
    ctx.scheduler.configure(config.daemon.max_queue)
    ctx.pool.configure(max_loaded=config.daemon.max_loaded_models, memory_budget=config.daemon.models_memory_mb << 20,
                       keep_alive=keep_alive.seconds(config.daemon.keep_alive))
    for model in ctx.pool.loaded():
        model.worker.configure(config.daemon)
        model.caches.configure(config.cache)
    ctx.store.configure(config.store, artifact_kinds(config))
    ctx.disk.submit(ctx.store.collect)
    daemon.paths.configure(config.cache)
    if moved:
        # Every model loaded now, the default one too while it serves; a new default model
        # of this same reload is loaded with the new folders.
        for model in ctx.pool.loaded():
            ctx.disk.submit(model.caches.move, TextStore(text_dir, config.cache.max_text_bytes), binary_dir)
        daemon.paths.use_text_folder(watcher)
        log.info("reload: caches now in %s and %s", text_dir, binary_dir)

    if config.model_differs(old):
        log.info("reload: the model configuration changed; loading it beside the running one")
        load_default(config, old)
        return
    log.info("configuration reloaded")
    notifier.ready(status.line(ctx))


def _load_default(daemon: Daemon, config: Config, old: Config, open_default: Callable[[Config], LoadedModel]) -> None:
    """Off the socket loop: load the default model ``config`` names (``old``: the configuration
    before the reload), then have the socket loop serve it, or keep the old one."""
    started = time.monotonic()
    try:
        new = open_default(config)
    except (BackendError, OSError) as exc:  # OSError: its runner process could not be started
        error = str(exc)
        daemon.call_soon(lambda: _kept_old_model(daemon, config, old, error))
        return
    log.info("reload: the new model loaded in %.2f s", time.monotonic() - started)
    daemon.call_soon(lambda: _serve_new_default(daemon, new))


def _serve_new_default(daemon: Daemon, new: LoadedModel) -> None:
    """On the socket loop: ``new`` serves the default model from the next request on."""
    ctx = daemon.ctx
    log.info("reload: now serving %s (pid %s); the model it replaces is unloaded once it has answered what it was given",
             new.backend.describe().get("name", new.backend.kind), new.worker.pid)
    old = ctx.scheduler.replace_default(new)  # the loader thread may unload the old one once it has answered
    ctx.worker, ctx.caches, ctx.backend_reason = new.worker, new.caches, new.reason
    daemon.paths.caches = new.caches
    # After the cache operations already on the disk thread, which may still wait there.
    ctx.disk.submit(old.waiters.hand_over, new.waiters)
    daemon.notifier.ready(status.line(ctx))
    daemon.outbox.wake()  # to refresh the status line


def _kept_old_model(daemon: Daemon, config: Config, old: Config, error: str) -> None:
    """On the socket loop: the model ``config`` names could not be loaded; the old one goes on serving."""
    ctx = daemon.ctx
    log.error("reload: cannot load the new model, keeping the running one: %s", error)
    if ctx.config is config:
        # Still serving the old model: its settings stay the running ones, so the next reload
        # with these settings (a copy that has now ended) tries again.
        ctx.config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, backend=old.daemon.backend),
                                         model=old.model, rkllm=old.rkllm)
    daemon.notifier.ready(f"reload failed, still serving the old model: {error}")
    daemon.outbox.wake()
