"""The daemon's side of a runner process: it stands where the model's ModelWorker and
PromptCaches stand in the daemon's own process (``daemon.runners = "thread"``).

Generations, cancels and embed requests go to the runner without waiting for it (the
socket loop never waits on a model); each stream message that comes back goes to the
daemon's Outbox as the worker's own would. Status and cache calls wait for the runner's
answer (status with a short bound, and a stand-in answer when the runner is not up).

When the runner process ends unasked (a segfault in the model's code, a SIGKILL), its
running and queued generations, embed requests and calls end with ``backend`` ("the runner
of model X died: signal 11 (SIGSEGV)"), one line is logged, and then either the pool marks
the model unloaded (its next request starts a new runner) or, for the default model, which
is never unloaded, a new runner starts at once while its requests wait for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

from ..backends.base import Backend, BackendError
from ..caches.binary import BinaryStore
from ..caches.manager import Entry
from ..caches.text import TextStore
from ..config import CacheConfig, Config, DaemonConfig
from ..outbox import NO_OUTPUT, Generation, Outbox
from ..paths import cache_dirs
from ..protocol import ErrorCode, WireError
from ..worker import Counters, EmbedJob
from .channel import Channel, ChannelClosed
from .portable import BackendFacts, raised_error

log = logging.getLogger(__name__)

#: Every runner is started from this one thread, which lives as long as the daemon: the
#: kernel kills a runner (PR_SET_PDEATHSIG) when the thread that started it ends.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-spawn")
#: What a runner must not inherit: systemd's notify and watchdog (the daemon reports), socket activation.
_DAEMON_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
#: Where the rkllmd package is imported from, for the runner's interpreter.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
#: How long a cache call may take (it may hash a binary cache file).
CALL_TIMEOUT_S = 120.0
#: How long status waits for a runner's answer before it shows a stand-in.
STATUS_TIMEOUT_S = 5.0
#: A default model's runner that dies sooner than this after its start, twice in a row, is
#: not restarted at once but by the next request for it: one that crashes as it starts (a
#: cache build that crashes the runtime) must not be restarted in a loop.
QUICK_DEATH_S = 10.0
#: How long the watchdog's health check waits for a runner (it must ping systemd in time).
HEALTH_TIMEOUT_S = 1.0
#: How long a stopping runner gets to hand back its queued generations.
SHUTDOWN_TIMEOUT_S = 10.0

_STARTING, _UP, _DEAD, _STOPPING = "starting", "up", "dead", "stopping"


def how_it_ended(returncode: int) -> str:
    """A process's end as a person reads it: "signal 11 (SIGSEGV)", "exit status 1"."""
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class RunnerProcess:
    """One loaded weights file's runner process, as the pool and the commands use a ModelWorker."""

    def __init__(self, name: str, config: Config, outbox: Outbox, *, restart_when_dead: bool,
                 on_change: Callable[[str], None], on_stored: Callable[[], None], on_death: Callable[[RunnerProcess], None],
                 progress: Callable[[str], None] = lambda what: None):
        self.name = name
        self.config = config
        self.outbox = outbox
        self.max_queue = config.daemon.max_queue
        self.restart_when_dead = restart_when_dead  # the default model: never unloaded, so restarted
        self._on_change = on_change
        self._on_stored = on_stored
        self._on_death = on_death
        self.progress = progress  # a load's progress (systemd is asked for more time)
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._gens: dict[int, Generation] = {}  # sent to the runner (or held for it), not ended
        self._embeds: dict[int, EmbedJob] = {}
        self._calls: dict[int, Future] = {}
        self._held: list[tuple[Any, ...]] = []  # messages for a runner being started
        self._state = _STARTING
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._counters = Counters()  # as last reported: what status shows while no runner is up
        self._summary: dict[str, Any] = {"model": name, "activity": {"running": None, "queued": 0, "builds_queued": 0, "building": None, "embeds": 0},
                                         "states": {}, "completed": 0, "last_error": None}  # as the runner last pushed it
        self.last_exit: str | None = None  # how the last runner process that died ended
        self._stuck_for: float | None = None  # set when the watchdog's check kills a stuck runner
        self._started_at = 0.0  # when the runner process up now (or last) was ready
        self._quick_deaths = 0  # runners in a row that died within QUICK_DEATH_S of their start
        self._events = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-events")  # callbacks that may call the runner
        self.backend: BackendFacts
        self.reason = ""
        self.caches = RemoteCaches(self)

    # -- starting and ending --------------------------------------------------------------

    def start(self) -> None:
        """Start a runner process and wait until it has loaded the model (BackendError if it
        cannot); messages held meanwhile then go to it."""
        try:
            proc, channel = _SPAWNER.submit(self._spawn).result()
        except OSError as exc:
            self._fail_held(WireError(ErrorCode.BACKEND, f"cannot start a runner for model {self.name}: {exc}"))
            raise
        try:
            facts, reason, binary_folder, summary, early = self._await_ready(proc, channel)
        except BaseException as exc:
            channel.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._fail_held(WireError(ErrorCode.BACKEND, f"cannot load model {self.name}: {exc}"))
            raise
        backend = self._facts(facts)
        with self._lock:
            if self._state == _STOPPING:  # the daemon stopped while it loaded
                channel.close()  # it exits at the end of its stream
                self._proc = proc
                return
            self.backend, self.reason, self._summary = backend, reason, summary
            self.caches.serving(backend, binary_folder)
            self._proc, self._channel, self._state = proc, channel, _UP
            self._started_at = time.monotonic()
            held, self._held = self._held, []
            for message in held:
                channel.send(message)
        log.info("model %s runs in runner process %d", self.name, proc.pid)
        threading.Thread(target=self._read, args=(proc, channel), name=f"runner-{self.name}", daemon=True).start()
        for message in early:
            self._dispatch(message)

    def _spawn(self) -> tuple[subprocess.Popen, Channel]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {key: value for key, value in os.environ.items() if key not in _DAEMON_ONLY_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_SOURCE_ROOT, env.get("PYTHONPATH"))))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "rkllmd.runner", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                    env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        channel = Channel(ours)
        channel.send({"name": self.name, "config": self.config, "parent": os.getpid()})
        return proc, channel

    def _await_ready(self, proc: subprocess.Popen, channel: Channel) -> tuple[dict[str, Any], str, str, dict[str, Any], list[tuple[Any, ...]]]:
        early: list[tuple[Any, ...]] = []  # cache changes its first scan reported
        while True:
            try:
                message = channel.receive()
            except ChannelClosed:
                raise BackendError(f"its runner ended while loading it: {how_it_ended(proc.wait())}") from None
            if message[0] == "progress":
                self.progress(message[1])
            elif message[0] == "failed":
                raise BackendError(message[1])
            elif message[0] == "ready":
                return message[1], message[2], message[3], message[4], early
            else:
                early.append(message)

    def restart(self) -> None:
        """A new runner in place of one that died (the default model's); requests sent
        meanwhile wait for it."""
        with self._lock:
            if self._state != _DEAD:
                return
            self._state = _STARTING
        threading.Thread(target=self._restart, name=f"runner-{self.name}-start", daemon=True).start()

    def _restart(self) -> None:
        log.info("starting a new runner for model %s", self.name)
        try:
            self.start()
        except (BackendError, OSError) as exc:
            log.error("model %s: its new runner cannot load it: %s", self.name, exc)
            with self._lock:
                self._state = _DEAD

    def _read(self, proc: subprocess.Popen, channel: Channel) -> None:
        try:
            while True:
                self._dispatch(channel.receive())
        except ChannelClosed:
            pass
        self._ended(proc, proc.wait())

    def _ended(self, proc: subprocess.Popen, returncode: int) -> None:
        """The runner process ended: asked to (the daemon stops, the model is unloaded), or not."""
        with self._lock:
            asked = self._state == _STOPPING
            if not asked:
                self._state = _DEAD
            self._channel = None
            gens, self._gens = self._gens, {}
            embeds, self._embeds = self._embeds, {}
            calls, self._calls = self._calls, {}
        how = how_it_ended(returncode)
        if asked:
            error = WireError(ErrorCode.SHUTTING_DOWN, f"model {self.name} was unloaded")
            if returncode:
                log.warning("the runner of model %s (pid %d) ended with %s", self.name, proc.pid, how)
        else:
            self.last_exit = how
            stuck, self._stuck_for = self._stuck_for, None
            error = WireError(ErrorCode.BACKEND, f"the runner of model {self.name} died: {how}" if stuck is None else
                              f"the runner of model {self.name} was killed: a call into the model made no progress in {stuck:g} s", model=self.name)
            self._quick_deaths = self._quick_deaths + 1 if time.monotonic() - self._started_at < QUICK_DEATH_S else 0
            restart = self.restart_when_dead and self._quick_deaths < 2
            then = ("; starting a new one" if restart else f"; it and the one before lived under {QUICK_DEATH_S:g} s: the next request "
                    "starts a new one" if self.restart_when_dead else "; the model is unloaded")
            log.error("the runner of model %s (pid %d) died: %s; failing its %d generation(s) and %d embed request(s)%s",
                      self.name, proc.pid, how, len(gens), len(embeds), then)
        for gen in gens.values():
            self.outbox.stream(gen, "error", error=error.to_wire())
        for future in [job.future for job in embeds.values()] + list(calls.values()):
            if not future.done():
                future.set_exception(error)
        if asked:
            return
        self._events.submit(self._on_death, self)
        if restart:
            self.restart()

    def _fail_held(self, error: WireError) -> None:
        with self._lock:
            self._held = []
            gens, self._gens = self._gens, {}
            embeds, self._embeds = self._embeds, {}
            calls, self._calls = self._calls, {}
        for gen in gens.values():
            self.outbox.stream(gen, "error", error=error.to_wire())
        for future in [job.future for job in embeds.values()] + list(calls.values()):
            future.set_exception(error)

    # -- what the runner sends --------------------------------------------------------------

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stream":
            self._stream(*message[1:])
        elif kind in ("reply", "embedded"):
            with self._lock:
                pending = self._calls if kind == "reply" else self._embeds
                waiting = pending.pop(message[1], None)
            if waiting is not None:
                _settle(waiting if kind == "reply" else waiting.future, message[2], message[3])
        elif kind == "changed":
            self._events.submit(self._on_change, message[1])
        elif kind == "stored":
            self._on_stored()
        elif kind == "summary":
            self._summary = message[1]
            self.outbox.wake()  # the status line shows it
        elif kind == "progress":
            self.progress(message[1])

    def _stream(self, number: int, type_: str, fields: dict[str, Any]) -> None:
        with self._lock:
            gen = self._gens.pop(number, None) if type_ in ("done", "error") else self._gens.get(number)
        if gen is None:
            return
        if type_ == "queued":
            waits = fields.get("cache_build")
            if (gen.position, gen.waits_for_build) == (fields["position"], waits):
                return  # the scheduler said so already
            gen.position, gen.waits_for_build = fields["position"], waits
        elif type_ == "started":
            gen.started = time.monotonic()
        self.outbox.forward(gen, type_, fields)

    # -- as a ModelWorker -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The runner process's (None while none is up)."""
        with self._lock:
            return self._proc.pid if self._proc is not None and self._state == _UP else None

    @property
    def max_batch(self) -> int:
        return min(self.config.daemon.max_batch, self.backend.max_batch)

    def submit(self, gen: Generation) -> None:
        fields = {"identity": gen.identity, "params": gen.params, "cache": gen.cache, "use_cache": gen.use_cache,
                  "received": gen.received, "chat": gen.chat, "client": gen.client,
                  "on_behalf_of": gen.on_behalf_of}
        with self._lock:
            self._check_taking()
            waiting = sum(1 for g in self._gens.values() if g.started is None)
            if waiting >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{waiting} requests are waiting; the limit is {self.max_queue}")
            number = next(self._numbers)
            self._gens[number] = gen
            self._send(("submit", number, fields))

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str | None:
        """"queued", "running", or None if it is over; the runner ends its stream."""
        with self._lock:
            number = next((n for n, g in self._gens.items() if g is gen), None)
            if number is None:
                return None
            gen.cancel_reason = reason
            gen.cancelled.set()
            held = next((m for m in self._held if m[0] == "submit" and m[1] == number), None)
            if held is None:
                self._send(("cancel", number, reason))
            else:  # the runner never saw it
                self._held.remove(held)
                del self._gens[number]
        if held is not None:
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=reason, **NO_OUTPUT)
        return "running" if gen.started is not None else "queued"

    def others_generating(self, generating: bool) -> None:
        """Another model's generations run: this one's cache builds wait for them (ModelWorker.others_generating)."""
        with self._lock:
            if self._state != _STOPPING:
                self._send(("others_generating", generating))

    def embed(self, job: EmbedJob) -> None:
        with self._lock:
            self._check_taking()
            number = next(self._numbers)
            self._embeds[number] = job
            self._send(("embed", number, job.inputs, job.truncate, job.normalize, job.received))

    def with_prompts(self, work: Callable[[Backend], Any]) -> Future:
        """``work(backend)`` on the runner's prompt thread (``work`` must pickle: a module's
        function, or a partial of one)."""
        future: Future = Future()
        with self._lock:
            self._check_taking()
            number = next(self._numbers)
            self._calls[number] = future
            self._send(("prompts", number, work))
        return future

    def _facts(self, facts: dict[str, Any]) -> BackendFacts:
        backend = BackendFacts.from_wire(facts)
        backend.fresh = lambda: self.call("backend", "describe", timeout=STATUS_TIMEOUT_S, fallback=None)
        return backend

    def configure(self, config: DaemonConfig) -> None:
        """A reloaded [daemon] section (how this model's backend is chosen stays as it is)."""
        config = dataclasses.replace(config, backend=self.config.daemon.backend)
        with self._lock:
            self.max_queue = config.max_queue
            self.config = dataclasses.replace(self.config, daemon=config)
        self.call("worker", "configure", config, fallback=None)

    def busy(self) -> bool:
        """Anything sent to it and not answered yet, or work of its own (cache builds, as its
        last pushed summary says). Never asks the runner: the loader asks under its lock."""
        with self._lock:
            activity = self._summary["activity"]
            return self._answering() or bool(activity["building"] or activity["builds_queued"])

    def answering(self) -> bool:
        """Requests sent to it and not answered yet: generations, embed requests, calls (what a
        model a reload replaced finishes before it goes). Never asks the runner."""
        with self._lock:
            return self._answering()

    def _answering(self) -> bool:
        return bool(self._gens or self._embeds or self._calls or self._held)

    def activity(self) -> dict[str, Any]:
        return self.call("worker", "activity", timeout=STATUS_TIMEOUT_S, fallback=self._activity_here())

    def _activity_here(self) -> dict[str, Any]:
        """What the daemon knows of the runner's activity itself (while none is up)."""
        with self._lock:
            waiting = sum(1 for g in self._gens.values() if g.started is None)
            running = any(g.started is not None for g in self._gens.values())
            embeds = len(self._embeds)
        return {"running": "generate" if running else None, "queued": waiting, "builds_queued": 0, "building": None, "embeds": embeds}

    def summary(self) -> dict[str, Any]:
        """The status line's facts as the runner last pushed them (never asked: the socket loop
        reads them after every wake); while no runner is up, the daemon's own view."""
        with self._lock:
            up, summary = self._state == _UP, dict(self._summary)
        if not up:
            summary["activity"] = self._activity_here()
        summary["last_error"] = summary["last_error"] or (self.last_exit and f"the runner died: {self.last_exit}")
        return summary

    def requests(self) -> dict[str, list[dict[str, Any]]]:
        """The runner's running and queued generations, by their request ids."""
        answer = self.call("worker", "requests", timeout=STATUS_TIMEOUT_S, fallback={"running": [], "queued": []})
        with self._lock:
            ids = {number: gen.request_id for number, gen in self._gens.items()}
        return {kind: [{**row, "id": ids[row["id"]]} for row in rows if row["id"] in ids] for kind, rows in answer.items()}

    def healthy(self, within: float) -> bool:
        """The runner's worker is (a runner being started, or restarted after a crash, does
        not make the daemon unhealthy; one that stops answering does)."""
        with self._lock:
            if self._state != _UP:
                return True
        try:
            return self.call("worker", "healthy", within, timeout=min(within / 4, HEALTH_TIMEOUT_S))
        except WireError:
            return False

    def stop_if_stuck(self, within: float) -> None:
        """The watchdog's check: a runner busy without progress for ``within`` seconds (a
        call into the model that never returns), or that does not answer, is killed with
        SIGABRT (its faulthandler writes every thread's stack to the journal) and its requests
        fail; the daemon stays up and keeps pinging systemd's watchdog."""
        if self.healthy(within):
            return
        with self._lock:
            proc = self._proc if self._state == _UP else None
            if proc is None:
                return
            self._stuck_for = within
        log.error("the runner of model %s (pid %d) made no progress in %g s: a call into the model is stuck; "
                  "killing it with SIGABRT (its threads' stacks follow)", self.name, proc.pid, within)
        proc.send_signal(signal.SIGABRT)

    @property
    def counters(self) -> Counters:
        counters = self.call("worker", "counters", timeout=STATUS_TIMEOUT_S, fallback=None)
        if counters is not None:
            self._counters = counters
        return self._counters

    @property
    def last_error(self) -> str | None:
        default = None if self.last_exit is None else f"the runner died: {self.last_exit}"
        return self.call("worker", "last_error", timeout=STATUS_TIMEOUT_S, fallback=default) or default

    def shutdown(self) -> list[Generation]:
        """Stop: the generations not started come back (the daemon answers them), the running
        ones are cut short by the runner, which then exits."""
        future: Future = Future()
        with self._lock:
            state, self._state = self._state, _STOPPING
            held = {m[1] for m in self._held if m[0] == "submit"}
            dropped = [self._gens.pop(number) for number in held]
            self._held = []
            if state == _UP:
                number = next(self._numbers)
                self._calls[number] = future
                self._send(("shutdown", number))
        if state != _UP:
            return dropped
        try:
            numbers = future.result(SHUTDOWN_TIMEOUT_S)
        except (WireError, FutureTimeout):
            return dropped
        with self._lock:
            return dropped + [self._gens.pop(n) for n in numbers if n in self._gens]

    def join(self, timeout: float) -> bool:
        """Wait for the runner process to exit; False if it did not in time (it dies with the daemon)."""
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    # -- calls ---------------------------------------------------------------------------

    def call(self, target: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, fallback: Any = ..., **kwargs: Any) -> Any:
        """``target.method(*args, **kwargs)`` in the runner ("worker", "backend" or "caches"; an attribute
        if not callable). ``fallback``: the answer when the runner is not up or does not
        answer in time; without one, a WireError (``backend``) says why."""
        return self.ask(("call", target, method, args, kwargs), timeout, fallback)

    def ask(self, message: tuple[Any, ...], timeout: float, fallback: Any = ...) -> Any:
        """Send ``message`` with a call number after its kind, and wait for the runner's answer."""
        future: Future = Future()
        with self._lock:
            if self._state != _UP:
                if fallback is not ...:
                    return fallback
                raise WireError(ErrorCode.BACKEND, f"the runner of model {self.name} is {'starting' if self._state == _STARTING else 'not running'}; try again",
                                model=self.name)
            number = next(self._numbers)
            self._calls[number] = future
            self._send((message[0], number, *message[1:]))
        try:
            return future.result(timeout)
        except FutureTimeout:
            with self._lock:
                self._calls.pop(number, None)
            if fallback is not ...:
                return fallback
            raise WireError(ErrorCode.BACKEND, f"the runner of model {self.name} did not answer within {timeout:g} s", model=self.name) from None
        except WireError as exc:
            if fallback is not ... and exc.code == ErrorCode.BACKEND:  # it died meanwhile
                return fallback
            raise

    def _check_taking(self) -> None:
        """Lock held: refuse work once stopping; a dead runner that restarts takes it (held)."""
        if self._state == _STOPPING:
            raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        if self._state == _DEAD:
            if not self.restart_when_dead:
                raise WireError(ErrorCode.BACKEND, f"the runner of model {self.name} died: {self.last_exit}; send the request again", model=self.name)
            self._state = _STARTING
            threading.Thread(target=self._restart, name=f"runner-{self.name}-start", daemon=True).start()

    def _send(self, message: tuple[Any, ...]) -> None:
        """Lock held: to the runner, or held for the one starting."""
        if self._state == _STARTING or self._channel is None:
            self._held.append(message)
            return
        try:
            self._channel.send(message)
        except ChannelClosed:
            pass  # its reader fails what it was sent when it sees the end


class RemoteCaches:
    """A runner's PromptCaches, seen from the daemon. The text caches are files shared by
    every model: the daemon reads and writes them itself; what concerns binary caches and
    states runs in the runner."""

    def __init__(self, runner: RunnerProcess):
        self._runner = runner
        text_dir, self._binary_root = cache_dirs(runner.config)
        self.texts = TextStore(text_dir, runner.config.cache.max_text_bytes)
        self.binaries: BinaryStore

    def serving(self, backend: BackendFacts, binary_folder: str) -> None:
        """A runner serves ``backend`` with its binary caches in ``binary_folder``."""
        self.binaries = BinaryStore(Path(binary_folder).parent, backend.identity())  # names its folder; the runner holds it

    def close(self) -> None:
        """The model is unloaded: its runner released its binary caches as it exited (a
        reload's move that comes later finds it stopped, and does nothing). A collection may
        now remove them once superseded: ask for one."""
        self._runner._on_stored()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._runner.call("caches", method, *args, **kwargs)

    def refresh(self, name: str, *, force: bool = False) -> Entry | None:
        return self._call("refresh", name, force=force)

    def forget(self, name: str) -> None:
        self._call("forget", name, fallback=None)  # a runner that starts scans the folder anew

    def scan(self) -> None:
        self._call("scan", fallback=None)

    def rescan(self) -> None:
        self._call("rescan", fallback=None)

    def entry(self, name: str) -> Entry | None:
        return self._call("entry", name)

    def settled(self, name: str) -> tuple[bool, str | None]:
        return self._call("settled", name)

    def listing(self) -> list[dict[str, Any]]:
        return self._call("listing")

    def text_of(self, name: str) -> tuple[str | None, str | None]:
        return self._call("text_of", name)

    def memory(self) -> dict[str, int]:
        return self._call("memory", timeout=STATUS_TIMEOUT_S, fallback={"used_bytes": 0, "budget_bytes": self._runner.config.cache.memory_budget_mb << 20, "states": 0})

    def conversations(self) -> dict[str, Any]:
        return self._call("conversations", timeout=STATUS_TIMEOUT_S, fallback={"enabled": self._runner.config.cache.conversations})

    def counts(self) -> dict[str, int]:
        return self._call("counts", timeout=STATUS_TIMEOUT_S, fallback={})

    def building(self) -> dict[str, Any] | None:
        return self._call("building", timeout=STATUS_TIMEOUT_S, fallback=None)

    @property
    def builds(self) -> int:
        return self._call("builds", timeout=STATUS_TIMEOUT_S, fallback=0)

    def configure(self, config: CacheConfig) -> None:
        runner = self._runner
        runner.config = dataclasses.replace(runner.config, cache=config)
        self.texts.max_bytes = config.max_text_bytes
        self._call("configure", config, fallback=None)

    def move(self, texts: TextStore, binary_root: Path) -> None:
        """Serve caches from other folders (a reload changed them)."""
        self.texts = TextStore(texts.folder, texts.max_bytes)
        folder = self._runner.ask(("move", str(texts.folder), texts.max_bytes, str(binary_root)), CALL_TIMEOUT_S, fallback=None)
        if folder is not None:
            self.serving(self._runner.backend, folder)


def _settle(future: Future, ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    elif value[0] == "cancelled":
        future.cancel()
    else:
        future.set_exception(raised_error(value))
