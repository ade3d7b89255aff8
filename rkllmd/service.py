"""The daemon's side of systemd: the sd_notify(3) protocol and a watchdog that means something.

A small notifier of our own rather than the `sdnotify` package: sdnotify 0.3 encodes every
message as Latin-1, so a STATUS= line naming a model or an error with any other character
("…", a CJK file name) raises inside it and is silently dropped, and the Latin-1 characters
it does send ("é") arrive as invalid UTF-8, which systemd ignores ("not UTF-8 clean").
Its abstract-socket support ("@" prefix) is fine. The protocol itself is one datagram per
call, sent as UTF-8 here.

Everything here is a no-op when NOTIFY_SOCKET is unset (the daemon run by hand or in tests).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def enable_faulthandler() -> None:
    """Dump every thread's stack to stderr (the journal) on SIGABRT, SIGSEGV and friends.

    systemd's watchdog kills a hung service with SIGABRT, so the journal then shows
    where each thread was stuck.
    """
    faulthandler.enable(file=sys.stderr, all_threads=True)


def _notify_address(value: str | None) -> str | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace socket
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(f"unsupported NOTIFY_SOCKET address {value!r}")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between required pings, or None when the watchdog is not ours to feed."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and int(pid) != os.getpid():  # inherited from a parent that systemd watches
        return None
    return int(usec) / 1e6


class ServiceNotifier:
    """Tells systemd about readiness, status, reloads and liveness (sd_notify(3)).

    The watchdog pings only while the ``healthy`` callable given to start_watchdog() says
    so: a model worker stuck in one call in the daemon's process stops them, and systemd
    kills and restarts us. (A model in a runner process that gets stuck is killed and
    restarted by the daemon itself: rkllmd/runner/proxy.py.)
    """

    def __init__(self, env: Mapping[str, str] = os.environ):
        self._address = _notify_address(env.get("NOTIFY_SOCKET"))
        self._socket = (socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                        if self._address else None)
        self.watchdog_interval = _watchdog_interval(env) if self._address else None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return self._socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of VAR=value lines; False if the manager did not take it."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as e:
            log.warning("sd_notify %s failed: %s", assignments[0].split("=")[0], e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The socket is bound and the model loaded: `systemctl start` may return."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status is not None else []))

    def status(self, text: str) -> bool:
        """One line for `systemctl status`."""
        return self.notify(f"STATUS={text}")

    def reloading(self) -> bool:
        """A reload began; call ready() when it is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> bool:
        """Shutdown began."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more, from now, to finish starting or stopping.

        Send it again each time a slow step makes progress, well before the last one runs out.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping WATCHDOG=1 every half interval while healthy() is true, on a daemon thread."""
        if self.watchdog_interval is None or self._watchdog is not None:
            return
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._feed, args=(healthy,),
                                          name="sd-watchdog", daemon=True)
        self._watchdog.start()

    def _feed(self, healthy: Callable[[], bool]) -> None:
        period = self.watchdog_interval / 2
        was_ok = True
        while True:
            try:
                ok = bool(healthy())
            except Exception:
                log.exception("health check failed")
                ok = False
            if ok:
                self.notify("WATCHDOG=1")
            elif was_ok:  # once per episode, so the journal says why systemd killed us
                log.error("model worker unhealthy: withholding watchdog pings (limit %gs)",
                          self.watchdog_interval)
            was_ok = ok
            if self._stop.wait(period):
                return

    def stop_watchdog(self) -> None:
        """Stop pinging and wait for the thread to end."""
        if self._watchdog is not None:
            self._stop.set()
            self._watchdog.join()
            self._watchdog = None

    def close(self) -> None:
        """Stop the watchdog and close the socket; later calls are no-ops."""
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
