"""rkllmd.service under a real systemd, and the offline checks of the unit.

The booted tests share one systemd per module (tests/systemd_harness.py): it gets the unit,
sysusers.d and tmpfiles.d files through `make install-systemd` run inside the namespaces,
plus fake NPU device nodes and a few test users. A stand-in daemon built on
rkllmd/service.py then runs under the unit's full hardening, to prove the notify
protocol, the watchdog, reload, stop and the sandbox itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from systemd_harness import SystemdUnderTest, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "rkllmd.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")
_why_not = unavailable_reason()
requires_namespaces = pytest.mark.skipif(_why_not is not None,
                                         reason=f"no systemd under test: {_why_not}")


# -- offline ---------------------------------------------------------------------------

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


@needs_analyze
def test_security_exposure_is_low():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for rkllmd\.service: (\d+\.\d+)",
                            r.stdout).group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, r.stdout


# -- under systemd ---------------------------------------------------------------------

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
    exposed = sorted({str(p) for p in map(Path, (sys.prefix, sys.base_prefix, ROOT))
                      if any(p.is_relative_to(h) for h in homes)})
    # Tests start the service more often than the unit's start limit allows.
    lines = ["[Unit]", "StartLimitIntervalSec=0",
             "[Service]", "ExecStart=", f"ExecStart={exec_start}",
             f"Environment=PYTHONPATH={ROOT} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"]
    if exposed:
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(exposed)}"]
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


# A daemon stand-in: the libraries the real one loads (numpy, ctypes callbacks, libzmq),
# the notify protocol through rkllmd/service.py, and hooks to hang its "worker".
STANDIN = r'''
import ctypes, errno, json, logging, mmap, os, signal, socket, sys, threading, time
import numpy, zmq
from rkllmd.service import ServiceNotifier, enable_faulthandler

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
enable_faulthandler()
notifier = ServiceNotifier()
libc = ctypes.CDLL(None)

for step in range(1, 5):  # a "model load" longer than TimeoutStartSec, extended as it goes
    notifier.extend_timeout(1)
    notifier.status(f"loading {step}/4")
    time.sleep(0.3)

def probe():
    """What the sandbox lets this process do."""
    out = {"uid": os.getuid(), "gid": os.getgid()}
    a = numpy.arange(256.0).reshape(16, 16)
    out["numpy"] = float((a @ a).trace())
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
    for name in ("STATE_DIRECTORY", "CACHE_DIRECTORY"):
        with open(os.path.join(os.environ[name], "written"), "w") as f:
            f.write("x")
    return out

with open(os.path.join(os.environ["STATE_DIRECTORY"], "probe.json"), "w") as f:
    json.dump(probe(), f)

ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind("ipc://" + os.path.join(os.environ["RUNTIME_DIRECTORY"], "rkllmd.sock"))

worker_stuck = threading.Event()
def stuck_in_native_call():
    worker_stuck.set()
    libc.sleep(3600)

reloads = 0
def on_hup(*_):
    global reloads
    notifier.reloading()
    reloads += 1
    notifier.ready(f"serving (stand-in), reloads={reloads}")

def on_term(*_):
    notifier.stopping()
    sock.close(linger=0)
    ctx.term()
    sys.exit(0)

signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
def on_usr1(*_):  # the test's fault hook
    threading.Thread(target=stuck_in_native_call, daemon=True).start()

signal.signal(signal.SIGUSR1, on_usr1)
notifier.ready("serving (stand-in), reloads=0")
notifier.start_watchdog(lambda: not worker_stuck.is_set())
while True:
    signal.pause()
'''


@pytest.fixture(scope="module")
def standin(sd):
    """rkllmd.service running the stand-in, with short timeouts to keep the tests quick."""
    dropin = "/etc/systemd/system/rkllmd.service.d/50-standin.conf"
    sd.install("/usr/local/lib/rkllmd-test/standin.py", STANDIN)
    sd.install(dropin, checkout_dropin(f"{sys.executable} /usr/local/lib/rkllmd-test/standin.py",
                                       TimeoutStartSec="1s", WatchdogSec="2s", RestartSec="100ms"))
    sd.systemctl("daemon-reload")
    yield sd
    sd.systemctl("stop", "rkllmd.service", check=False)
    sd.path(dropin).unlink()
    sd.systemctl("daemon-reload")


def started(sd: SystemdUnderTest) -> dict[str, str]:
    sd.systemctl("start", "rkllmd.service")
    return sd.show("rkllmd.service", "MainPID", "NRestarts", "StatusText", "ActiveState")


@pytest.mark.usefixtures("standin")
class TestStandIn:
    pytestmark = [pytest.mark.systemd, requires_namespaces]

    def test_start_returns_only_after_ready(self, sd):
        sd.systemctl("stop", "rkllmd.service")
        t0 = time.monotonic()
        sd.systemctl("start", "rkllmd.service")
        took = time.monotonic() - t0
        state = sd.show("rkllmd.service", "ActiveState", "SubState", "StatusText")
        assert state == {"ActiveState": "active", "SubState": "running",
                         "StatusText": "serving (stand-in), reloads=0"}
        # 1.2 s of loading against TimeoutStartSec=1s: EXTEND_TIMEOUT_USEC carried it.
        assert took >= 1.2
        status = sd.systemctl("status", "rkllmd.service").stdout
        assert 'Status: "serving (stand-in), reloads=0"' in status

    def test_sandbox(self, sd):
        started(sd)
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

    def test_directories_and_socket(self, sd):
        started(sd)
        ls = sd.run(["stat", "-c", "%n %a %U:%G", "/run/rkllmd", "/run/rkllmd/rkllmd.sock",
                     "/var/lib/rkllmd", "/var/cache/rkllmd", "/var/lib/rkllmd/written",
                     "/var/cache/rkllmd/written"]).stdout.splitlines()
        # The stand-in's socket is as libzmq creates it under UMask=0007 (rkllmd itself
        # narrows it to 0660); its files are group-readable and -writable.
        assert ls == ["/run/rkllmd 750 rkllmd:rkllm", "/run/rkllmd/rkllmd.sock 770 rkllmd:rkllm",
                      "/var/lib/rkllmd 2770 rkllmd:rkllm", "/var/cache/rkllmd 750 rkllmd:rkllm",
                      "/var/lib/rkllmd/written 660 rkllmd:rkllm",
                      "/var/cache/rkllmd/written 660 rkllmd:rkllm"]
        connect = [sys.executable, "-c", "import socket, zmq; socket.socket(socket.AF_UNIX)"
                   ".connect('/run/rkllmd/rkllmd.sock')"]
        assert sd.run(connect, user="alice").returncode == 0
        refused = sd.run(connect, user="mallory", check=False)
        assert "PermissionError: [Errno 13] Permission denied" in refused.stderr

    def test_members_edit_each_others_text_caches(self, sd):
        started(sd)
        sd.run(["sh", "-c", "umask 022; echo one > /var/lib/rkllmd/house-rules.txt"], user="alice")
        sd.run(["sh", "-c", "echo two >> /var/lib/rkllmd/house-rules.txt"], user="bob")
        assert sd.path("/var/lib/rkllmd/house-rules.txt").read_text() == "one\ntwo\n"
        outsider = sd.run(["cat", "/var/lib/rkllmd/house-rules.txt"], user="mallory", check=False)
        assert "Permission denied" in outsider.stderr

    def test_reload_keeps_the_process(self, sd):
        before = started(sd)
        sd.systemctl("reload", "rkllmd.service")
        # ExecReload=kill -HUP returns at once (Type=notify-reload needs systemd 253).
        sd.wait_until(lambda: sd.show("rkllmd.service", "StatusText")["StatusText"]
                      == "serving (stand-in), reloads=1", what="the reload's READY")
        assert sd.show("rkllmd.service", "MainPID") == {"MainPID": before["MainPID"]}

    def test_watchdog_kills_a_stuck_worker_and_systemd_restarts_it(self, sd):
        before = started(sd)
        sd.systemctl("kill", "--kill-whom=main", "--signal=SIGUSR1", "rkllmd.service")
        after = sd.wait_until(
            lambda: (s := sd.show("rkllmd.service", "MainPID", "NRestarts", "ActiveState",
                                  "StatusText"))["NRestarts"] != before["NRestarts"]
            and s["ActiveState"] == "active" and s["StatusText"].startswith("serving") and s,
            timeout=15, what="a watchdog restart")
        assert after["MainPID"] != before["MainPID"]
        log = sd.journal("rkllmd.service")
        assert "Watchdog timeout" in log
        assert "withholding watchdog pings" in log
        assert "Fatal Python error: Aborted" in log and "stuck_in_native_call" in log

    def test_stop_is_clean(self, sd):
        started(sd)
        t0 = time.monotonic()
        sd.systemctl("stop", "rkllmd.service")
        took = time.monotonic() - t0
        state = sd.show("rkllmd.service", "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert took < 5


@pytest.mark.systemd
@requires_namespaces
def test_harness_leaves_the_host_as_it_was():
    def snapshot():
        cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup/unified").rglob("*")
                         if p.is_dir())
        return {"mounts": Path("/proc/self/mountinfo").read_text(),
                "cgroups": cgroups, "run": sorted(p.name for p in Path("/run").iterdir()),
                "tmp": sorted(p.name for p in Path("/tmp").glob("rkllmd-harness-*")),
                "children": Path(f"/proc/self/task/{os.getpid()}/children").read_text()}
    before = snapshot()
    with SystemdUnderTest() as sd:
        sd.run(["mount", "-t", "tmpfs", "scratch", "/mnt"])  # torn down with the namespace
    assert snapshot() == before
