"""Fixtures that start the real daemon on a private socket and talk to it with the real client."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

from rkllmctl import Client, DaemonUnreachable

ROOT = Path(__file__).resolve().parent.parent
#: For tests of text caches alone: a conversation state kept from an earlier request with the
#: same system message also holds the next user turn's header, so it would supply more
#: (the choice between the two is tested in test_conversations.py).
TEXT_CACHES_ONLY = {"RKLLMD_CACHE_CONVERSATIONS": "false"}
DATA = Path(__file__).resolve().parent / "data"

# Every daemon the suite starts maps one copy of the dequantized weights and loads one build
# of the C decode step (the first start writes them): a start costs well under a second
# instead of a dequantization, 540 MB written and a compilation. The process that makes the
# folder removes it; pytest-xdist's workers and any pytest a test starts inherit it.
OWN_BUILDS = "RKLLMD_TEST_BUILDS" not in os.environ
SHARED_BUILDS = Path(tempfile.mkdtemp(prefix="rkllmd-builds-") if OWN_BUILDS else os.environ["RKLLMD_TEST_BUILDS"])
os.environ["RKLLMD_TEST_BUILDS"] = str(SHARED_BUILDS)
os.environ.setdefault("RKLLMD_MODEL_WEIGHTS_DIR", str(SHARED_BUILDS / "weights"))
os.environ.setdefault("RKLLMD_MODEL_KERNELS_DIR", str(SHARED_BUILDS / "kernels"))
# Test daemons map those weights in the kernel's pages: a start then skips populating (or,
# where the kernel will not map the file so, copying) 540 MB in 2 MB pages, a fifth of a
# start. Both ways are tested in test_weights_file.py, the default one through the daemon too.
os.environ.setdefault("RKLLMD_MODEL_WEIGHTS_HUGE_PAGES", "false")


def pytest_sessionfinish(session, exitstatus) -> None:
    if OWN_BUILDS:
        shutil.rmtree(SHARED_BUILDS, ignore_errors=True)


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_without(capability: str) -> NoReturn:
    """Skip the running test (or fixture) for want of ``capability``, something the machine
    must give it (root, a mount, a namespace, a tool .ci/setup installs), which the text
    names with why it is needed ("root, to mount a tmpfs"). Outside CI a skip; under
    CI=true, where every such test must run, a failure (``pytest_runtest_makereport``)."""
    __tracebackhide__ = True  # reported where the test or helper asked for it
    skip = pytest.skip.Exception(f"needs {capability}")
    skip.capability = capability
    raise skip


def skipped_for_a_capability(item: pytest.Item, call: pytest.CallInfo) -> bool:
    """Whether a skip is for want of a capability: raised by ``skip_without``, or any skip
    of a test marked ``systemd`` (whose conditions are skipif markers)."""
    raised = call.excinfo is not None and hasattr(call.excinfo.value, "capability")
    return raised or item.get_closest_marker("systemd") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped for want of a capability is a failure: CI is where
    every such test must run."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        # What the daemons said: a CI failure must be explainable from its output alone.
        for proc in DaemonProcess.started:
            lines = proc.log().splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"rkllmd log {proc.folder} (last {len(lines)} lines)", "\n".join(lines)))
    if report.skipped and running_in_ci() and skipped_for_a_capability(item, call):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true, and this test was skipped for want of a capability CI must have: {reason}"


#: The longest a test waits for any one message from the daemon. The client's own timeout
#: bounds only a request's first reply, and a stream then waits as long as it takes: in
#: tests a daemon that stops talking fails the test instead of holding CI.
STREAM_WAIT_S = 180.0


class BoundedClient(Client):
    """The real client, whose waits without a bound of their own end after STREAM_WAIT_S."""

    def receive(self, request_id, timeout):
        return super().receive(request_id, STREAM_WAIT_S if timeout is None else timeout)

    def wait_queued(self, stream, timeout: float = 60) -> int:
        """Wait for the stream's first message, its ``queued`` (the daemon has taken the
        request in: arrival order is settled), leave it for the stream, return its position."""
        message = self.receive(stream.request_id, timeout)
        assert message["type"] == "queued", message
        self._pending[stream.request_id].appendleft(message)
        return message["position"]


def in_order(text: str, *needles: str) -> bool:
    """Whether text holds every needle, one after the other (a log's story)."""
    at = 0
    for needle in needles:
        at = text.find(needle, at)
        if at < 0:
            return False
        at += len(needle)
    return True


def mappings_kb(addresses: list[int], field: str) -> int:
    """A field of /proc/self/smaps (Rss, AnonHugePages, ...) summed over the mappings holding
    ``addresses`` (each counted once: the kernel merges neighbouring mappings), in kB."""
    total, found = 0, set()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(a, 16) for a in block.split(" ", 1)[0].split("-"))
        if any(start <= a < end for a in addresses):
            total += int(re.search(rf"^{field}:\s+(\d+) kB", block, re.M).group(1))
            found.update(a for a in addresses if start <= a < end)
    assert found == set(addresses), "an address in no mapping"
    return total


def reference_cases() -> list[dict]:
    return json.loads((DATA / "smollm2-greedy.json").read_text())


def stop_process(proc: subprocess.Popen | None) -> int | None:
    """SIGTERM, then its exit status; killed (and TimeoutExpired raised) after 20 s. None if
    it never started."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


#: Lines of each daemon's log shown under a failed test.
LOG_TAIL_LINES = 80


class DaemonProcess:
    """One ``rkllmd`` process in its own short-pathed folder (ipc paths are limited to 107 bytes)."""

    #: The daemons not yet cleaned up, whose logs a failed test shows.
    started: list[DaemonProcess] = []

    def __init__(self, *extra: str, env: dict[str, str] | None = None, folder: Path | None = None):
        self.folder = folder or Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
        self.socket = self.folder / "run" / "rkllmd.sock"
        self.text_dir = self.folder / "text"
        self.binary_dir = self.folder / "bin"
        self.log_path = self.folder / "daemon.log"
        self.extra = extra
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "rkllmd",
            "--socket", str(self.socket),
            "--cache-dir", str(self.text_dir),
            "--binary-cache-dir", str(self.binary_dir),
            "--log-level", "debug",
            *self.extra,
        ]

    def start(self, wait: bool = True, timeout: float = 120) -> DaemonProcess:
        self.text_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        log.close()
        if self not in DaemonProcess.started:
            DaemonProcess.started.append(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rkllmd exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    with Client(self.socket, timeout=2) as client:
                        client.ping()
                        return
                except DaemonUnreachable:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"rkllmd not ready after {timeout} s:\n{self.log()}")

    def client(self, timeout: float = 30) -> Client:
        return BoundedClient(self.socket, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            if self in DaemonProcess.started:
                DaemonProcess.started.remove(self)


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """The shared daemon: for tests that leave it as they found it."""
    proc = DaemonProcess("--backend", "cpu").start()
    yield proc
    proc.cleanup()


@pytest.fixture
def make_daemon() -> Iterator:
    """A factory of private daemons, for tests that stop, kill or reconfigure them."""
    made: list[DaemonProcess] = []

    def make(*extra: str, start: bool = True, **kwargs) -> DaemonProcess:
        proc = DaemonProcess("--backend", "cpu", *extra, **kwargs)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.cleanup()


@pytest.fixture(scope="session")
def fake_runtime(tmp_path_factory):
    """The fake RKLLM runtime (tests/fake_rkllm), built on first use: ``fake_runtime["1.2"]``
    and ``fake_runtime["1.3"]`` are the two libraries' paths."""
    from fake_rkllm.build import build_for_session

    return build_for_session(tmp_path_factory)


def rkllmctl(*args: str, socket: Path | None = None, input: str | None = None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real rkllmctl command line."""
    cmd = [sys.executable, "-m", "rkllmctl"]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    return subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture(scope="session")
def gateway(daemon):
    """rkllmd-http in front of the shared daemon."""
    from http_gateway import GatewayProcess

    proc = GatewayProcess(daemon.socket).start()
    yield proc
    proc.cleanup()
