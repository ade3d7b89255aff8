"""An idle daemon costs nothing: no thread wakes up, whatever happens beside its paths."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import DaemonProcess
from reliability import poll
from rkllmctl.errors import DaemonUnreachable


def wakeups(pid: int) -> int:
    """Context switches of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def settled(pid: int, quiet_s: float = 0.5, within: float = 30) -> int:
    """The process's wakeups once none came for ``quiet_s``: what it had to do (the last
    reply, a client's disconnection, a neighbour file's creation) is done. Fails if it
    never goes quiet within ``within`` seconds."""
    deadline = time.monotonic() + within
    last, since = wakeups(pid), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"the daemon kept waking up for {within} s"
        time.sleep(0.05)
        now = wakeups(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_idle_daemon_never_wakes_even_beside_a_busy_file(make_daemon) -> None:
    proc: DaemonProcess = make_daemon("--log-level", "debug")
    with proc.client() as client:
        client.generate("Hello", max_tokens=2).wait()
    settled(proc.proc.pid)
    neighbours = [proc.socket.parent / "neighbour.log", proc.text_dir.parent / "neighbour.log"]
    for path in neighbours:
        path.touch()
    before = settled(proc.proc.pid)
    for _ in range(30):  # files written beside the socket and the text folder
        for path in neighbours:
            with open(path, "a") as f:
                f.write("busy\n")
        time.sleep(0.1)
    assert wakeups(proc.proc.pid) - before == 0
    # Its own paths still wake it: a deleted socket file is bound again at once (the file
    # appears at bind, a moment before the daemon listens: a client may then be refused).
    proc.socket.unlink()
    poll(lambda: answers_ping(proc), timeout=5, what="the socket bound again and answering")


def answers_ping(proc: DaemonProcess) -> bool:
    try:
        with proc.client() as client:
            return client.ping()["pong"] is True
    except DaemonUnreachable:
        return False
