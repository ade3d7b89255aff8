"""Faults (issue 6, item 4): kill -9, a full disk, read-only and vanished folders, a broken model,
the socket file deleted or taken over.

Binary cache folders on a tmpfs of a few MB need root (mount); without it those tests
are skipped, saying so. kill -9 during a cache build is tests/test_caches.py's.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEXT_CACHES_ONLY, DaemonProcess, rkllmctl, skip_without
from reliability import figures_fixture, poll, remount_read_only, tmpfs
from rkllmctl import DaemonError
from rkllmd.backends.cpu.backend import bundled_model_path

figures = figures_fixture()

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
SHORT_TEXT = "Answer briefly."
LONG_TEXT = " ".join(f"Rule {i}: keep every answer short, precise and polite." for i in range(40))  # ~500 tokens: ~23 MB


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def binary_files(proc: DaemonProcess) -> dict[str, str]:
    return {str(p.relative_to(proc.binary_dir)): sha(p) for p in sorted(proc.binary_dir.rglob("*")) if p.is_file()}


def rows(client) -> dict[str, dict]:
    return {r["name"]: r for r in client.cache_ls()["caches"]}


def assert_serving(proc: DaemonProcess) -> None:
    with proc.client() as client:
        assert client.status()["healthy"] is True
        assert client.generate(messages=FRANCE, max_tokens=48, temperature=0).wait().text == PARIS


# -- kill -9 -----------------------------------------------------------------------------------

def test_kill_9_during_a_generation_loses_only_that_generation(make_daemon, figures) -> None:
    proc = make_daemon()
    with proc.client() as client:
        client.cache_put("kept", SHORT_TEXT)
        client.cache_wait("kept", timeout=120)
    cached = binary_files(proc)
    child = subprocess.Popen([sys.executable, "-m", "rkllmctl", "--socket", str(proc.socket), "generate", "--cache", "kept", "--max-tokens", "2000",
                              "Write a very long story about a lighthouse keeper."], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.read(1)  # streaming
        proc.signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    # What a crash leaves: the socket file and the lock (nobody listens), complete caches.
    assert proc.socket.exists() and binary_files(proc) == cached
    started = time.monotonic()
    proc.start()
    restart_s = time.monotonic() - started
    with proc.client() as client:
        status = client.status()
        kept = rows(client)["kept"]
        result = client.generate("Hello!", cache="kept", max_tokens=2).wait()
    assert kept["state"] == "ready" and status["caches"]["builds"] == 0  # adopted whole, not rebuilt
    assert result.stats["cached_tokens"] == kept["tokens"]
    assert binary_files(proc) == cached
    assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o660
    assert_serving(proc)
    figures.record("kill-9-generation", restart_s=round(restart_s, 1), caches_rebuilt=0, caches_kept=1)


# -- disks -------------------------------------------------------------------------------------

def test_disk_full_while_writing_a_binary_cache(make_daemon, figures) -> None:
    proc = make_daemon(start=False, env=TEXT_CACHES_ONLY)
    with tmpfs(proc.binary_dir, "6m"):
        proc.start()
        with proc.client() as client:
            client.cache_put("notes", SHORT_TEXT)
            old = client.cache_wait("notes", timeout=120)
            old_files = binary_files(proc)
            builds = client.status()["caches"]["builds"]
            client.cache_put("notes", LONG_TEXT)  # ~23 MB of state: cannot fit in 6 MB
            with pytest.raises(DaemonError) as err:
                client.cache_wait("notes", timeout=300)
            assert err.value.name == "cache_build_failed"
            row = rows(client)["notes"]
            assert row["state"] == "failed" and "no space left on device" in row["reason"], row
            listing = rkllmctl("cache", "ls", socket=proc.socket)
            assert listing.returncode == 0 and "no space left on device" in listing.stdout, listing
            # The old cache is untouched, nothing half-written is left, and the daemon serves:
            assert binary_files(proc) == old_files
            assert_serving(proc)
            result = client.generate("Hi", cache="notes", max_tokens=1).wait()  # prefilled in full
            assert result.stats["cached_tokens"] == 0
            # ... and the old text's cache is adopted from disk again, not rebuilt.
            client.cache_put("notes", SHORT_TEXT)
            again = client.cache_wait("notes", timeout=120)
            assert again["built_at"] == old["built_at"] and client.status()["caches"]["builds"] == builds + 1
        proc.stop()
    figures.record("disk-full", reason=row["reason"], old_cache_kept=True, partial_files=0)


def test_read_only_cache_folders(make_daemon, figures) -> None:
    proc = make_daemon(start=False, env=TEXT_CACHES_ONLY)
    with tmpfs(proc.binary_dir, "64m"):
        proc.start()
        with proc.client() as client:
            client.cache_put("old", SHORT_TEXT)
            old = client.cache_wait("old", timeout=120)
            remount_read_only(proc.binary_dir)
            client.cache_put("new", "Answer in French.")
            with pytest.raises(DaemonError) as err:
                client.cache_wait("new", timeout=120)
            assert err.value.name == "cache_build_failed" and "Read-only file system" in err.value.message
            assert "Read-only file system" in rows(client)["new"]["reason"]
            used = client.generate("Hi", cache="old", max_tokens=1).wait()
            assert used.stats["cached_tokens"] == old["tokens"]  # the cache still serves
        assert_serving(proc)
        # Restarted on the read-only folder: it starts, adopts what is there, serves.
        proc.stop()
        proc.start()
        with proc.client() as client:
            assert rows(client)["old"]["state"] == "ready"
            assert client.generate("Hi", cache="old", max_tokens=1).wait().stats["cached_tokens"] == old["tokens"]
        assert_serving(proc)
        proc.stop()
    figures.record("read-only-binary-folder", build_error="Read-only file system", old_cache_served=True, restart_ok=True)


def test_text_folder_read_only(make_daemon) -> None:
    if os.geteuid() != 0:
        skip_without("root, for a read-only bind mount (root ignores file modes)")
    proc = make_daemon()
    with proc.client() as client:
        client.cache_put("kept", SHORT_TEXT)
        client.cache_wait("kept", timeout=120)
    subprocess.run(["mount", "--bind", str(proc.text_dir), str(proc.text_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(proc.text_dir)], check=True)
        with proc.client() as client:
            with pytest.raises(DaemonError) as err:
                client.cache_put("new", "x")
            assert (err.value.code, err.value.name) == (303, "storage")
            assert "Read-only file system" in err.value.message and err.value.details == {"errno": errno.EROFS}
            with pytest.raises(DaemonError) as err:
                client.cache_rm("kept")
            assert (err.value.code, err.value.details) == (303, {"errno": errno.EROFS})
            assert rows(client)["kept"]["state"] == "ready"
            assert client.generate("Hi", cache="kept", max_tokens=1).wait().stats["cached_tokens"] > 0
        assert_serving(proc)
    finally:
        subprocess.run(["umount", "-l", str(proc.text_dir)], check=False)


def removed_tree(path: Path) -> bool:
    try:
        shutil.rmtree(path)
    except OSError:  # a file appeared in it meanwhile (ENOTEMPTY): again
        return False
    return True


def test_vanished_cache_folders_are_made_again(make_daemon, figures) -> None:
    proc = make_daemon(env={"RKLLMD_CACHE_DEBOUNCE_MS": "100", **TEXT_CACHES_ONLY})
    with proc.client() as client:
        client.cache_put("one", SHORT_TEXT)
        one = client.cache_wait("one", timeout=120)
        # The store's collection after a build may still be writing its lock file there (the
        # model's runner and the daemon's disk thread work apart): remove until it is gone.
        poll(lambda: removed_tree(proc.binary_dir), timeout=10, what="the binary folder removed")  # the binary folder goes
        client.cache_put("two", "Answer in French.")
        assert client.cache_wait("two", timeout=120)["state"] == "ready"  # built into a new folder
        # "one"'s binary went with the folder: refused at use, rebuilt, used again.
        client.generate("Hi", cache="one", max_tokens=1).wait()
        assert client.cache_wait("one", timeout=120)["state"] == "ready"
        assert client.generate("Hi", cache="one", max_tokens=1).wait().stats["cached_tokens"] == one["tokens"]
        shutil.rmtree(proc.text_dir)  # the text folder goes: its caches with it
        poll(lambda: not rows(client), timeout=10, what="caches of deleted texts forgotten")
        poll(lambda: proc.text_dir.is_dir(), timeout=10, what="the text folder made again")
        assert stat.S_IMODE(proc.text_dir.stat().st_mode) == 0o770
        (proc.text_dir / "three.txt").write_text("Answer in German.")  # as an editor would, not over the socket
        poll(lambda: "three" in rows(client), timeout=10, what="a file saved in the new text folder noticed")
        assert client.cache_wait("three", timeout=120)["state"] == "ready"
    assert_serving(proc)
    assert "watching it again" in proc.log()
    figures.record("vanished-folders", binary_folder="made again at the next build", text_folder="made again and watched within 1 s")


# -- the model ---------------------------------------------------------------------------------

def _model_variants(tmp: Path) -> dict[str, Path]:
    model = bundled_model_path()
    assert model is not None
    data = model.read_bytes()
    variants = {"missing": tmp / "missing.gguf", "empty": tmp / "empty.gguf", "header-cut": tmp / "header.gguf",
                "data-cut": tmp / "data.gguf", "end-cut": tmp / "end.gguf", "not-gguf": tmp / "text.gguf"}
    variants["empty"].write_bytes(b"")
    variants["header-cut"].write_bytes(data[:1000])
    variants["data-cut"].write_bytes(data[: 10 << 20])
    variants["end-cut"].write_bytes(data[:-1000])
    variants["not-gguf"].write_text("this is not a model\n" * 100)
    return variants


@pytest.mark.parametrize("variant", ["missing", "empty", "header-cut", "data-cut", "end-cut", "not-gguf"])
def test_missing_or_broken_model_fails_clearly_without_binding(make_daemon, tmp_path: Path, variant: str, figures) -> None:
    path = _model_variants(tmp_path)[variant]
    proc = make_daemon("--model", str(path), start=False)
    proc.start(wait=False)
    deadline = time.monotonic() + 120
    bound = False
    while proc.proc.poll() is None:  # the socket must never appear, not even for a moment
        bound |= proc.socket.exists()
        assert time.monotonic() < deadline, "the daemon neither served nor exited"
        time.sleep(0.005)
    assert proc.proc.returncode == 1
    assert not bound and not proc.socket.exists()
    log = proc.log()
    assert "cannot start" in log and str(path) in log, log
    message = next(line for line in log.splitlines() if "cannot start" in line)
    assert "Traceback" not in log
    figures.record(f"model-{variant}", exit_status=1, socket_bound=False, message=message.split("cannot start: ", 1)[1][:120])


# -- the socket file ---------------------------------------------------------------------------

def test_socket_file_deleted_is_bound_again(make_daemon, figures) -> None:
    proc = make_daemon()
    pid = proc.proc.pid
    with proc.client() as connected:
        stream = connected.generate("Count from one to ten.", max_tokens=12)
        next(iter(stream))
        proc.socket.unlink()
        t0 = time.monotonic()
        poll(lambda: proc.socket.exists(), timeout=5, what="the socket file bound again")
        rebound_s = time.monotonic() - t0
        assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o660
        assert stream.wait().finish_reason in ("stop", "length")  # the connected client never noticed
        assert connected.ping()["pong"] is True
        with proc.client() as newcomer:
            assert newcomer.status()["pid"] == pid
        # The whole folder, lock file included: made again (0750), locked again, bound again.
        shutil.rmtree(proc.socket.parent)
        poll(lambda: proc.socket.exists(), timeout=5, what="the socket folder and file made again")
        assert stat.S_IMODE(proc.socket.parent.stat().st_mode) == 0o750
        assert proc.socket.with_name("rkllmd.sock.lock").exists()
        assert connected.ping()["pong"] is True
    assert_serving(proc)
    assert proc.proc.poll() is None and "was deleted; bound it again" in proc.log()
    # While it runs, no second daemon can take the path over.
    intruder = DaemonProcess("--backend", "cpu")
    intruder.socket = proc.socket
    try:
        intruder.start(wait=False)
        assert intruder.wait(60) == 1 and "another rkllmd" in intruder.log()
    finally:
        intruder.cleanup()
    assert proc.stop() == 0 and not proc.socket.exists()
    figures.record("socket-deleted", rebound_within_s=round(rebound_s, 2), connected_clients_kept=True, folder_deleted_too="made again")


def test_socket_path_taken_over_stops_the_daemon_with_an_error(make_daemon, figures) -> None:
    proc = make_daemon()
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        aside = proc.socket.with_name("foreign.sock")
        foreign.bind(str(aside))
        foreign.listen()
        os.rename(aside, proc.socket)  # atomically: the daemon never sees the path empty
        inode = proc.socket.stat().st_ino
        assert proc.wait(10) == 1
        log = proc.log()
        assert "replaced by another process" in log
        assert proc.socket.exists() and proc.socket.stat().st_ino == inode  # the other's socket is left alone
    finally:
        foreign.close()
    figures.record("socket-taken-over", exit_status=1, other_socket_left_alone=True)
