"""Helpers of the reliability tests (issue 6): process figures, polling, a raw peer, recorded figures.

Figures a test records with ``figures.record(...)`` (fixture from ``figures_fixture()``) are printed at the end of the pytest
run and, when RKLLMD_RELIABILITY_JSON names a file, written there as JSON lines for
bench/reliability_report.py to turn into docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest
import zmq

from conftest import skip_without

DOCS = Path(__file__).resolve().parent.parent / "docs"


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def documented_errors() -> dict[int, str]:
    """The error table of docs/protocol.md: code -> name."""
    text = (DOCS / "protocol.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    table = {int(code): name for code, name in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", section, re.M)}
    assert len(table) >= 10, "could not read the error table of docs/protocol.md"
    return table


REPLY_TYPES = {"result", "error", "queued", "started", "progress", "token", "done"}


def check_envelope(reply: Any, errors: dict[int, str]) -> None:
    """Any message from the daemon: a map with v, id and a documented type; errors from the table."""
    assert isinstance(reply, dict), reply
    assert reply.get("v") == 1 and "id" in reply and reply.get("type") in REPLY_TYPES, reply
    if reply["type"] == "error":
        error = reply.get("error")
        assert isinstance(error, dict) and error.get("code") in errors, reply
        assert error.get("name") == errors[error["code"]], reply
        assert isinstance(error.get("message"), str) and error["message"], reply
        assert isinstance(error.get("details", {}), dict), reply


class RawPeer:
    """A DEALER that sends arbitrary frames, as a client in another language might."""

    def __init__(self, socket_path: Path):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{socket_path}")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 30) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)

    def exchange(self, *frames: bytes, timeout: float = 30) -> dict[str, Any]:
        self.send(*frames)
        reply = self.recv(timeout)
        assert reply is not None, f"no reply within {timeout} s"
        return reply

    def close(self) -> None:
        self.sock.close(0)


class Figures:
    """Measured figures, printed in the terminal summary and optionally written as JSON lines."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, scenario: str, **values: Any) -> None:
        row = {"scenario": scenario, **values}
        self.rows.append(row)
        target = os.environ.get("RKLLMD_RELIABILITY_JSON")
        if target:
            with open(target, "a") as f:
                f.write(json.dumps(row) + "\n")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.rows:
            return
        terminalreporter.section("reliability figures")
        for row in self.rows:
            values = ", ".join(f"{k}={v}" for k, v in row.items() if k != "scenario")
            terminalreporter.write_line(f"{row['scenario']}: {values}")


def figures_fixture() -> Any:
    """A module's ``figures`` fixture (``figures = figures_fixture()``): one Figures per run,
    ``figures.record("load", worst_queue_ms=..., ...)``."""

    @pytest.fixture(scope="session")
    def figures(pytestconfig: pytest.Config) -> Figures:
        plugin = pytestconfig.pluginmanager.get_plugin("rkllmd-reliability-figures")
        if plugin is None:
            plugin = Figures()
            pytestconfig.pluginmanager.register(plugin, "rkllmd-reliability-figures")
        return plugin

    return figures


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` for the block (root only; the test is skipped otherwise)."""
    if os.geteuid() != 0:
        skip_without("root, to mount a small tmpfs (run the suite as root to cover a full disk)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        skip_without(f"a tmpfs mount, which failed here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
