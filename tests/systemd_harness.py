"""A real systemd, booted as PID 1 of private namespaces, for tests of the service.

PID 1 of this machine is not systemd, so the suite boots systemd 252 itself (see
../shared/systemd-under-test.md): a fresh cgroup2 subtree, new pid/mount/uts/ipc/net/cgroup
namespaces and a throw-away root, an overlay whose lower layer is the host's ``/`` so
installed Python and the checkout are visible while every write lands in a tmpfs.
Booting takes well under a second and teardown leaves nothing behind on the host: no
mounts, processes, cgroups or files.

    with SystemdUnderTest() as sd:
        sd.install("/etc/systemd/system/x.service", text)
        sd.systemctl("daemon-reload")
        sd.systemctl("start", "x.service")
        print(sd.journal("x.service"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def cgroup2_mount(mountinfo: str) -> Path | None:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup itself on a pure cgroup v2
    host, /sys/fs/cgroup/unified on a hybrid one (v1 controllers beside it), else any."""
    mounts = [Path(line.split()[4]) for line in mountinfo.splitlines()
              if " - " in line and line.split(" - ", 1)[1].split()[0] == "cgroup2"]
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in mounts:
            return preferred
    return mounts[0] if mounts else None


CGROUP2 = cgroup2_mount(Path("/proc/self/mountinfo").read_text()) or Path("/sys/fs/cgroup")
MANAGER = "/lib/systemd/systemd"
BOOT_TARGET = "rkllmd-harness.target"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host objects are named <prefix><pid of the test process>-<random>.
_PREFIX = "rkllmd-harness-"

# Stage 2 runs as PID 1 of the new pid namespace, still in the host's cgroup namespace:
# it moves into <cgroup>/payload and unshares the cgroup namespace there, so the manager
# sees payload as its root cgroup and never the host's processes. Stage 3 builds the
# throw-away root, pivots into it and becomes systemd.
_STAGES = r"""
set -euo pipefail
case "$1" in
stage2)
    echo 0 > "$HARNESS_CGROUP/payload/cgroup.procs"
    exec unshare --cgroup bash -c "$HARNESS_STAGES" stage3 stage3
    ;;
stage3)
    T="$HARNESS_DIR/root"
    mount -t tmpfs -o mode=0755 harness "$T"
    mkdir "$T/upper" "$T/work" "$T/merged"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/merged"
    R="$T/merged"
    mount -t proc proc "$R/proc"
    mount --bind "$R/proc/sys" "$R/proc/sys"
    mount -o remount,bind,ro "$R/proc/sys"
    mount --bind /sys "$R/sys"
    mount -o remount,bind,ro "$R/sys"
    mount -t cgroup2 -o nsdelegate cgroup2 "$R/sys/fs/cgroup"
    console=$(tty)
    mount -t tmpfs -o mode=0755,nosuid harness-dev "$R/dev"
    for n in null zero full random urandom tty console; do
        touch "$R/dev/$n"
    done
    for n in null zero full random urandom tty; do
        mount --bind "/dev/$n" "$R/dev/$n"
    done
    mount --bind "$console" "$R/dev/console"
    mkdir "$R/dev/pts" "$R/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$R/dev/pts"
    mount -t tmpfs -o mode=1777,nosuid,nodev harness-shm "$R/dev/shm"
    ln -s pts/ptmx "$R/dev/ptmx"
    ln -s /proc/self/fd "$R/dev/fd"
    ln -s /proc/self/fd/0 "$R/dev/stdin"
    ln -s /proc/self/fd/1 "$R/dev/stdout"
    ln -s /proc/self/fd/2 "$R/dev/stderr"
    mount -t tmpfs -o mode=0755,nosuid,nodev harness-run "$R/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev harness-tmp "$R/tmp"
    # The checkout or its Python may live under /tmp or /run (a CI clone): keep them
    # visible, read-only, above the fresh tmpfs.
    IFS=: read -ra keep <<< "${HARNESS_KEEP:-}"
    for k in "${keep[@]}"; do
        mkdir -p "$R$k"
        mount --bind "$k" "$R$k"
        mount -o remount,bind,ro "$R$k"
    done

    units="$R/etc/systemd/system"
    printf '%s\n' '[Unit]' 'Description=rkllmd test harness' \
        'Wants=systemd-journald.socket systemd-journald.service dbus.socket' \
        > "$units/$HARNESS_TARGET"
    for t in /lib/systemd/system/*.timer /etc/systemd/system/timers.target.wants/*.timer; do
        if [ -e "$t" ]; then ln -sfn /dev/null "$units/${t##*/}"; fi
    done

    cd "$R"
    pivot_root . .
    umount -l .
    cd /
    exec env -i container=rkllmd-harness PATH="$HARNESS_PATH" \
        "$HARNESS_MANAGER" --system --unit="$HARNESS_TARGET"
    ;;
esac
"""


def _hidden_by_fresh_mounts() -> list[str]:
    """This checkout and its Python, where the fresh /tmp and /run inside would hide them."""
    roots = {Path(__file__).resolve().parent.parent, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    fresh = (Path("/tmp"), Path("/run"))
    return sorted({str(p) for p in roots if any(p.is_relative_to(f) for f in fresh)})


def unavailable_reason() -> str | None:
    """Why a namespace-booted systemd cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    for tool in ("unshare", "nsenter", "setpriv", "mount", "pivot_root"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(MANAGER, os.X_OK):
        return f"no systemd manager binary at {MANAGER}"
    if not (CGROUP2 / "cgroup.procs").exists():
        return "no cgroup2 hierarchy is mounted"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--cgroup", "true"],
        capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


class BootError(RuntimeError):
    """The namespace systemd did not come up; the message carries its console output."""


class SystemdUnderTest:
    """A systemd booted in private namespaces, driven from the host through nsenter."""

    def __init__(self, boot_timeout: float = 20.0, command_timeout: float = 60.0):
        self.boot_timeout = boot_timeout
        self.command_timeout = command_timeout
        self.pid1: int | None = None
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._cgroup: Path | None = None
        self._dir: Path | None = None
        self._console_fd: int | None = None
        self._console = bytearray()
        self._console_reader: threading.Thread | None = None

    def __enter__(self) -> SystemdUnderTest:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- boot and teardown ------------------------------------------------------------

    def boot(self) -> None:
        """Start the manager and return once it reports running (or degraded).

        The namespaces die with the thread that calls this (PR_SET_PDEATHSIG), so boot
        from a thread that outlives the tests, as fixtures do.
        """
        start = time.monotonic()
        _sweep_leftovers()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        (self._dir / "root").mkdir()
        self._cgroup = CGROUP2 / self._dir.name
        (self._cgroup / "payload").mkdir(parents=True)

        # The manager's console is a pty whose other end we drain, so that writes to
        # /dev/console never block and a failed boot can show what it printed.
        master, slave = os.openpty()
        self._console_fd = master
        env = dict(
            os.environ,
            HARNESS_STAGES=_STAGES, HARNESS_CGROUP=str(self._cgroup),
            HARNESS_DIR=str(self._dir), HARNESS_TARGET=BOOT_TARGET,
            HARNESS_MANAGER=MANAGER, HARNESS_PATH=CONTAINER_PATH,
            HARNESS_KEEP=":".join(_hidden_by_fresh_mounts()),
            # libmount would otherwise create /run/mount/utab on the host.
            LIBMOUNT_UTAB=str(self._dir / "utab"),
        )
        procs = self._cgroup / "cgroup.procs"
        try:
            # setpriv/--kill-child: if the test process dies, the whole namespace dies too.
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL",
                 "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts",
                 "--ipc", "--net", "--propagation", "private",
                 "bash", "-c", _STAGES, "stage2", "stage2"],
                stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                preexec_fn=lambda: procs.write_text("0"))
        finally:
            os.close(slave)
        self._console_reader = threading.Thread(target=self._drain_console, daemon=True)
        self._console_reader.start()

        deadline = start + self.boot_timeout
        self.pid1 = self._wait_for_pid1(deadline)
        while True:
            # Fails at once until the manager listens, then waits for the boot to finish.
            try:
                state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                 timeout=max(0.1, deadline - time.monotonic())).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "still starting"
            if state in ("running", "degraded"):
                break
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BootError(f"systemd did not boot ({state or 'no manager'}); console:\n"
                                f"{self.console()}")
            time.sleep(0.02)
        self.boot_seconds = time.monotonic() - start

    def _stop_manager(self) -> None:
        if self._proc.poll() is None and self.pid1 is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
        if self._proc.poll() is None:
            # unshare's --kill-child then SIGKILLs PID 1, and with it the whole namespace.
            self._proc.kill()
        self._proc.wait(timeout=10)

    def _wait_for_pid1(self, deadline: float) -> int:
        """The host pid of the namespace's PID 1: the only child of unshare."""
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                pids = children.read_text().split()
            except FileNotFoundError:
                pids = []
            if pids:
                return int(pids[0])
            time.sleep(0.005)
        raise BootError(f"namespace setup failed; console:\n{self.console()}")

    def _drain_console(self) -> None:
        while True:
            try:
                chunk = os.read(self._console_fd, 65536)
            except OSError:  # EIO: every process holding the pty has exited
                return
            if not chunk:
                return
            self._console += chunk
            del self._console[:-262144]

    def console(self) -> str:
        """What the manager wrote to /dev/console (the last 256 KiB)."""
        return self._console.decode(errors="replace")

    def close(self) -> None:
        """Power the manager off (kill it if it dawdles) and remove every trace of it."""
        try:
            if self._proc is not None:
                self._stop_manager()
        finally:
            if self._console_reader is not None:
                self._console_reader.join(timeout=5)
            if self._console_fd is not None:
                os.close(self._console_fd)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            cgroup = self._cgroup
            self._proc = self.pid1 = self._cgroup = self._dir = None
            self._console_fd = self._console_reader = None
            if cgroup is not None and cgroup.exists():
                _remove_cgroup(cgroup)

    # -- driving the manager ----------------------------------------------------------

    def _enter(self, cmd, user: str | None, env: dict | None) -> list[str]:
        argv = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                "env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_COLORS=0"]
        argv += [f"{k}={v}" for k, v in (env or {}).items()]
        if user is not None:
            drop = 'exec setpriv --reuid="$0" --regid="$(id -g "$0")" --init-groups "$@"'
            argv += ["sh", "-c", drop, user]
        return argv + list(cmd)

    def run(self, cmd, *, check: bool = True, timeout: float | None = None,
            user: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run cmd inside the namespaces (as user, if given) and wait for it.

        With user, the program is still found with root's rights (setpriv drops them as it
        execs it); everything the program then opens is checked as that user.
        """
        result = subprocess.run(
            self._enter(cmd, user, env), capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=self.command_timeout if timeout is None else timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, list(cmd),
                                                result.stdout, result.stderr)
        return result

    def spawn(self, cmd, *, user: str | None = None, env: dict | None = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start cmd inside the namespaces without waiting; it dies with the namespace, and
        when the returned process (nsenter, its parent) is killed: else it would outlive it,
        and a poweroff would wait for it."""
        return subprocess.Popen(self._enter(["setpriv", "--pdeathsig", "KILL", "--", *cmd], user, env), **popen_kwargs)

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float | None = None) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p` as a dict, e.g. show(u, "MainPID", "StatusText")."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, output: str = "cat") -> str:
        """Everything the journal holds for unit, flushed first so nothing is missed."""
        self.run(["journalctl", "--sync"], check=False)
        return self.run(["journalctl", "--no-pager", "-o", output, "-u", unit]).stdout

    def wait_until(self, predicate, timeout: float = 10.0, interval: float = 0.05,
                   what: str = "condition"):
        """Poll predicate until it returns something truthy; return that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    # -- the overlay root -------------------------------------------------------------

    def path(self, path: str) -> Path:
        """The host's view of path inside the throw-away root."""
        return Path(f"/proc/{self.pid1}/root") / path.lstrip("/")

    def install(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write a file into the throw-away root (its upper layer; the host never sees it)."""
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(mode)


def _sweep_leftovers() -> None:
    """Remove what a harness killed with its test process (SIGKILL skips teardown) left."""
    tmp = Path(tempfile.gettempdir())
    for leftover in [*CGROUP2.glob(f"{_PREFIX}*"), *tmp.glob(f"{_PREFIX}*")]:
        pid = leftover.name[len(_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if leftover.is_relative_to(CGROUP2):
                # Still populated: someone else's, not ours to kill.
                with contextlib.suppress(RuntimeError, OSError):
                    _remove_cgroup(leftover, timeout=0)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _remove_cgroup(root: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup subtree depth-first once its processes are gone."""
    deadline = time.monotonic() + timeout
    while "populated 1" in (root / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive in {root}")
        time.sleep(0.01)
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -w[0].count("/")):
        os.rmdir(dirpath)
