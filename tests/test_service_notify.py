"""ServiceNotifier against a real AF_UNIX datagram socket standing in for systemd."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from rkllmd.service import ServiceNotifier


class FakeManager:
    """The receiving end of NOTIFY_SOCKET: every datagram with its arrival time."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> None:
        """Forget datagrams already queued."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Datagrams arriving within the next `seconds`, with monotonic timestamps."""
        got, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode()))
        return got


@pytest.fixture
def manager(tmp_path):
    path = str(tmp_path / "notify")
    m = FakeManager(path)
    m.env = {"NOTIFY_SOCKET": path}
    yield m
    m.sock.close()


@pytest.fixture
def notifier_for():
    made = []

    def make(env):
        made.append(ServiceNotifier(env))
        return made[-1]
    yield make
    for n in made:
        n.close()


def test_without_notify_socket_everything_is_a_no_op(notifier_for):
    n = notifier_for({})
    assert not n.enabled
    assert n.ready("x") is False and n.status("x") is False and n.stopping() is False
    n.start_watchdog(lambda: True)
    assert n.watchdog_interval is None
    assert "sd-watchdog" not in {t.name for t in threading.enumerate()}


def test_exact_datagrams(manager, notifier_for):
    n = notifier_for(manager.env)
    assert n.enabled
    assert n.ready()
    assert manager.recv() == "READY=1"
    n.ready("serving smollm2 on cpu")
    assert manager.recv() == "READY=1\nSTATUS=serving smollm2 on cpu"
    n.status("loading Qwen2.5 “通义” … 40%")
    assert manager.recv() == "STATUS=loading Qwen2.5 “通义” … 40%"
    n.extend_timeout(90)
    assert manager.recv() == "EXTEND_TIMEOUT_USEC=90000000"
    n.extend_timeout(0.5)
    assert manager.recv() == "EXTEND_TIMEOUT_USEC=500000"
    n.stopping()
    assert manager.recv() == "STOPPING=1"


def test_reloading_carries_the_monotonic_clock(manager, notifier_for):
    n = notifier_for(manager.env)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = manager.recv().split("\n")
    assert first == "RELOADING=1"
    name, usec = second.split("=")
    assert name == "MONOTONIC_USEC" and before <= int(usec) <= after


def test_abstract_socket_address(notifier_for):
    name = f"rkllmd-test-{uuid.uuid4().hex}"
    m = FakeManager("\0" + name)
    try:
        notifier_for({"NOTIFY_SOCKET": "@" + name}).ready()
        assert m.recv() == "READY=1"
    finally:
        m.sock.close()


def test_unsupported_address_is_refused():
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        ServiceNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})


def test_a_vanished_manager_is_reported_not_raised(tmp_path, notifier_for):
    n = notifier_for({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and n.status("x") is False


def test_watchdog_pings_at_half_the_interval(manager, notifier_for):
    n = notifier_for({**manager.env, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval == 0.2
    n.start_watchdog(lambda: True)
    pings = manager.collect(0.75)
    assert {text for _, text in pings} == {"WATCHDOG=1"}
    assert 6 <= len(pings) <= 9, pings  # one at once, then every 0.1 s
    gaps = [b[0] - a[0] for a, b in zip(pings, pings[1:])]
    assert all(0.07 < g < 0.15 for g in gaps), gaps


def test_pings_stop_while_unhealthy_and_resume(manager, notifier_for):
    healthy = threading.Event()
    healthy.set()
    seen_unhealthy = threading.Event()

    def check() -> bool:
        if not healthy.is_set():
            seen_unhealthy.set()
        return healthy.is_set()

    n = notifier_for({**manager.env, "WATCHDOG_USEC": "200000"})
    n.start_watchdog(check)
    assert len(manager.collect(0.25)) >= 2
    healthy.clear()
    # Once the watchdog has asked and heard "unhealthy", every ping it sent before is queued.
    assert seen_unhealthy.wait(2), "the watchdog never asked"
    manager.drain()
    assert manager.collect(0.6) == []
    healthy.set()
    assert manager.recv(timeout=0.3) == "WATCHDOG=1"


def test_a_failing_health_check_withholds_pings_without_killing_the_thread(manager, notifier_for):
    calls = []

    def check():
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("worker state unreadable")
        return True
    n = notifier_for({**manager.env, "WATCHDOG_USEC": "100000"})
    n.start_watchdog(check)
    assert manager.recv(timeout=1.0) == "WATCHDOG=1"
    assert len(calls) == 4


def test_stop_watchdog_stops_pinging(manager, notifier_for):
    n = notifier_for({**manager.env, "WATCHDOG_USEC": "100000"})
    n.start_watchdog(lambda: True)
    assert manager.recv() == "WATCHDOG=1"
    n.stop_watchdog()
    manager.drain()
    assert manager.collect(0.2) == []


@pytest.mark.parametrize("pid_offset, watched", [(0, True), (1, False)])
def test_watchdog_pid_must_be_ours(manager, notifier_for, pid_offset, watched):
    n = notifier_for({**manager.env, "WATCHDOG_USEC": "100000",
                      "WATCHDOG_PID": str(os.getpid() + pid_offset)})
    n.start_watchdog(lambda: True)
    assert (n.watchdog_interval is not None) == watched
    assert bool(manager.collect(0.12)) == watched


def test_faulthandler_dumps_every_thread_on_sigabrt():
    code = (
        "import os, signal, threading, time\n"
        "from rkllmd.service import enable_faulthandler\n"
        "enable_faulthandler()\n"
        "started = threading.Event()\n"
        "def stuck_in_native_call(): started.set(); time.sleep(60)\n"
        "threading.Thread(target=stuck_in_native_call, daemon=True).start()\n"
        "started.wait(30)\n"
        "os.kill(os.getpid(), signal.SIGABRT)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == -6
    assert "Fatal Python error: Aborted" in r.stderr
    assert "stuck_in_native_call" in r.stderr and "Current thread" in r.stderr
