"""Hostile files and users (issue 6, item 5).

tests/test_caches.py already covers text caches that are symlinks, FIFOs, 10 GB sparse
files, invalid UTF-8 and control characters in names. Here: other kinds of file in the
text folder, the modes of everything the daemon makes under any umask, a user outside the
daemon's group (refused by the kernel: rkllmctl exits 5), and that no request field can
name a path outside the daemon's folders.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, DaemonProcess, skip_without
from reliability import figures_fixture, poll
from rkllmctl import DaemonError

figures = figures_fixture()


# -- modes under any umask ---------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077], ids=["umask-000", "umask-077"])
def test_socket_folders_and_files_keep_their_modes_under_any_umask(make_daemon, umask: int, figures) -> None:
    proc = make_daemon(start=False)
    text_dir = proc.folder / "state" / "texts"  # made by the daemon, not by the test
    proc.extra = (*proc.extra, "--cache-dir", str(text_dir))
    old = os.umask(umask)
    try:
        proc.start()
    finally:
        os.umask(old)
    with proc.client() as client:
        client.cache_put("modes", "Answer briefly.")
        client.cache_wait("modes", timeout=120)
    [state] = proc.binary_dir.rglob("modes.state")
    modes = {
        "socket folder": (_mode(proc.socket.parent), 0o750),
        "socket": (_mode(proc.socket), 0o660),
        "text folder": (_mode(text_dir), 0o770),
        "text folder's parent": (_mode(text_dir.parent), 0o770),
        "text cache": (_mode(text_dir / "modes.txt"), 0o660),
        "binary folder": (_mode(proc.binary_dir), 0o750),
        "model's binary folder": (_mode(state.parent), 0o750),
        "binary cache": (_mode(state), 0o640),
        "binary meta": (_mode(state.with_name("modes.meta.json")), 0o640),
    }
    wrong = {what: f"{oct(got)} (expected {oct(want)})" for what, (got, want) in modes.items() if got != want}
    assert not wrong, wrong
    figures.record(f"modes-{oct(umask)}", checked=len(modes), wrong=0)


# -- a user outside the group ------------------------------------------------------------------

def _closed_ancestor(path: Path) -> Path | None:
    """The outermost folder above ``path`` that other users cannot pass through (a clone
    under /root, or under a 0700 folder such as ``mktemp -d`` makes), if any."""
    return next((p for p in reversed(path.parents) if p != Path("/") and not p.stat().st_mode & 0o001), None)


def _namespace_script(needed: list[Path], stage: Path, credentials: str, command: list[str]) -> str:
    """Run ``command`` with other credentials in a private mount namespace in which this
    checkout and its Python are reachable wherever they live, and nothing else changes:
    each folder closed to others above them is covered by an open tmpfs into which only
    what is needed is bound back."""
    exposed = {p: top for p in needed if (top := _closed_ancestor(p)) is not None}
    tops = {top for top in exposed.values() if not any(top != t and top.is_relative_to(t) for t in exposed.values())}
    lines = ["set -e", "mount --make-rprivate /"]
    for i, path in enumerate(exposed):
        lines += [f"mkdir -p {stage}/{i}", f"mount --bind {shlex.quote(str(path))} {stage}/{i}"]
    for top in sorted(tops):
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(top))}")
    for i, path in enumerate(exposed):
        lines += [f"mkdir -p {shlex.quote(str(path))}", f"mount --bind {stage}/{i} {shlex.quote(str(path))}"]
    lines.append(f"exec setpriv {credentials} {shlex.join(command)}")
    return "\n".join(lines)


@pytest.fixture
def throwaway_user():
    """A user and a group that exist only for this test: (user name, uid, user's gid, group's gid)."""
    if os.geteuid() != 0:
        skip_without("root, to create a throwaway user and group")
    for tool in ("useradd", "groupadd", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            skip_without(tool)
    tag = f"rkfz{os.getpid() % 100000}"
    user, group = f"{tag}u", f"{tag}g"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True, capture_output=True)
        try:
            import grp
            import pwd

            entry = pwd.getpwnam(user)
            yield user, entry.pw_uid, entry.pw_gid, grp.getgrnam(group).gr_gid
        finally:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def test_a_user_outside_the_group_cannot_connect(make_daemon, throwaway_user, figures) -> None:
    user, uid, user_gid, group_gid = throwaway_user
    proc = make_daemon(start=False)
    proc.folder.chmod(0o755)  # only the daemon's own folder (0750) and socket (0660) guard it
    plain = proc.command
    proc.command = lambda: ["setpriv", f"--regid={group_gid}", "--clear-groups", *plain()]  # root, in the group
    proc.start()
    assert proc.socket.stat().st_gid == group_gid and proc.socket.parent.stat().st_gid == group_gid
    needed = sorted({Path(p) for p in (sys.prefix, sys.base_prefix, ROOT, os.path.dirname(os.path.realpath(sys.executable)))},
                    key=lambda p: len(p.parts))
    needed = [p for p in needed if not any(p != q and p.is_relative_to(q) for q in needed)]
    stage = Path(tempfile.mkdtemp(prefix="rkfz", dir="/tmp"))
    command = [sys.executable, "-m", "rkllmctl", "--socket", str(proc.socket), "status"]

    def run_as(credentials: str) -> subprocess.CompletedProcess:
        script = _namespace_script(needed, stage, credentials, command)
        return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60, cwd="/",
                              env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"})

    try:
        outsider = run_as(f"--reuid={uid} --regid={user_gid} --clear-groups")
        member = run_as(f"--reuid={uid} --regid={user_gid} --groups={group_gid}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if outsider.returncode not in (0, 5) and "Permission denied" not in outsider.stderr:
        pytest.fail(f"could not run rkllmctl as {user}: {outsider.stderr}")
    assert outsider.returncode == 5, outsider.stderr
    assert "permission denied" in outsider.stderr and "group" in outsider.stderr
    assert member.returncode == 0, member.stderr  # the same user, once in the group, is served
    figures.record("outside-user", exit_status=outsider.returncode, member_exit_status=member.returncode)


# -- no path outside the daemon's folders ------------------------------------------------------

PATHLIKE = st.one_of(
    st.sampled_from(["../escape", "../../etc/passwd", "/etc/passwd", "a/../../b", "..", ".", "~", "$HOME", "a/b", "a\\b",
                     "%2e%2e%2f", "x\x00y", "....//", "NUL", "a" * 64, "b" * 65, ".env", "ok-name", "ok.name.v2"]),
    st.text(alphabet=st.sampled_from("ab./\\_-~%$\x00:"), min_size=1, max_size=12),
    st.text(max_size=20),
)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@settings(max_examples=120, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=PATHLIKE)
def test_no_cache_name_reaches_outside_the_folders(daemon: DaemonProcess, name: str) -> None:
    before = _files(daemon.folder)
    with daemon.client() as client:
        try:
            client.cache_put(name, "Be brief.")
        except DaemonError as err:
            assert err.name == "invalid_name", err
            assert _files(daemon.folder) == before
            for verb in (client.cache_show, client.cache_rm, client.cache_rebuild):
                with pytest.raises(DaemonError) as again:
                    verb(name)
                assert again.value.name == "invalid_name"
            with pytest.raises(DaemonError) as again:
                client.generate("Hi", cache=name, max_tokens=1).wait()
            assert again.value.name == "invalid_name"
        else:
            path = daemon.text_dir / f"{name}.txt"
            assert path.resolve().parent == daemon.text_dir.resolve() and path.read_text() == "Be brief."
            assert client.cache_show(name)["path"] == str(daemon.text_dir / f"{name}.txt")
            client.cache_rm(name)
            poll(lambda: (w := client.status()["worker"])["building"] is None and w["builds_queued"] == 0, timeout=60,
                 what="builds settled")
        new = _files(daemon.folder) - before
    assert not {f for f in new if not f.startswith("bin/")}, new  # nothing but binaries (of other tests) appeared
    assert not any(Path(f).name.startswith(f"{name}.") for f in new if f.startswith("bin/")), new  # none left for it


def test_symlinked_text_cache_never_touches_its_target(daemon: DaemonProcess, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = daemon.text_dir / "evil.txt"
    link.symlink_to(secret)
    try:
        with daemon.client() as client:
            shown = client.cache_show("evil")
            assert shown["text"] is None and "symbolic link" in shown["error"]
            client.cache_rm("evil")  # removes the link, not what it points to
            assert not os.path.lexists(link) and secret.read_text() == "top secret"
            link.symlink_to(secret)
            client.cache_put("evil", "overwritten")  # replaces the link by a file of its own
            assert not link.is_symlink() and link.read_text() == "overwritten"
            assert secret.read_text() == "top secret"
            client.cache_rm("evil")
    finally:
        if os.path.lexists(link):
            link.unlink()


def test_other_kinds_of_file_in_the_text_folder_are_refused(make_daemon) -> None:
    proc = make_daemon()
    (proc.text_dir / "folder.txt").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(proc.text_dir / "sock.txt"))
    root = os.geteuid() == 0
    if root:
        os.mknod(proc.text_dir / "device.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    try:
        with proc.client() as client:
            client.cache_rebuild()
            refused = {r["name"]: r for r in client.cache_ls()["caches"]}
            for name in ("folder", "sock") + (("device",) if root else ()):
                assert refused[name]["state"] == "failed", refused[name]
                assert refused[name]["reason"].startswith("text cache refused"), refused[name]
                with pytest.raises(DaemonError):
                    client.generate("Hi", cache=name, max_tokens=1).wait()
            assert client.status()["healthy"] is True
    finally:
        listener.close()
    if not root:  # the rest was checked: say what was not
        skip_without("root, to make a device node in the text folder")
