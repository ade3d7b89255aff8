"""The artifact store (rkllmd/store.py) on its own: atomic under kill -9, locked between
processes, verified by the size-mtime-hash cascade, and collected by its policy.

Writers and holders are real processes (``python -c``), killed or released through files
they and the test watch, never through sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import in_order
from reliability import poll
from rkllmd.caches.binary import BinaryCacheInvalid, BinaryStore
from rkllmd.config import StoreConfig
from rkllmd.store import (
    HOLD_PREFIX, LEDGER_NAME, TEMP_PREFIX, ArtifactStore, Hold, Kind, Ledger, file_sha256, identity_key, locked_folder,
    remove_leftovers,
)

PATTERN = "(?P<key>[0-9a-f]{16})\\.bin"
MIB = 1 << 20


def python(code: str) -> subprocess.Popen:
    """A real process running ``code`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env)


def test_a_writer_killed_mid_write_leaves_the_old_artifact_whole(tmp_path):
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"old" * 1000)
    writer = python(f"""
        import time
        from pathlib import Path
        from rkllmd.store import commit, temporary_beside
        target = Path({str(target)!r})
        with temporary_beside(target) as tmp:
            with open(tmp, "wb") as f:
                while True:  # never finishes: killed while writing
                    f.write(b"new" * 4096)
                    f.flush()
                    time.sleep(0.01)
            commit(tmp, target)
    """)
    try:
        poll(lambda: any(p.name.startswith(TEMP_PREFIX) and p.stat().st_size > 64 * 1024 for p in tmp_path.iterdir()),
             30, "the writer's temporary file growing")
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old" * 1000
    assert remove_leftovers(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]


def test_a_killed_build_is_never_served_and_is_cleaned_at_the_next_start(tmp_path):
    """Through BinaryStore: a build killed mid-write leaves no state, meta nor ledger entry."""
    identity = {"model": "m"}
    writer = python(f"""
        import time
        from pathlib import Path
        from rkllmd.caches.binary import BinaryStore
        store = BinaryStore(Path({str(tmp_path)!r}), {identity!r})
        store.prepare()
        def write_state(tmp):
            with open(tmp, "wb") as f:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
                    time.sleep(0.01)
        store.build("rules", "a" * 64, write_state)
    """)
    store = BinaryStore(tmp_path, identity)
    try:
        poll(lambda: any(p.name.startswith(TEMP_PREFIX) for p in store.folder.glob("*")), 30, "a build under way")
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    assert store.verify("rules", "a" * 64) is None
    store.prepare()
    assert sorted(p.name for p in store.folder.iterdir()) == []


def test_a_build_under_way_in_another_process_is_no_leftover(tmp_path):
    """A second daemon of the same identity starts while the first writes a binary cache:
    it removes the leftovers of writers that are gone, never the file of one at work."""
    identity = {"model": "m"}
    writer = python(f"""
        import time
        from pathlib import Path
        from rkllmd.caches.binary import BinaryStore
        folder = Path({str(tmp_path)!r})
        store = BinaryStore(folder, {identity!r})
        store.prepare()
        def write_state(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 65536)
                f.flush()
                while not (folder / "finish").exists():
                    time.sleep(0.01)
            return 3
        store.build("rules", "a" * 64, write_state)
    """)
    store = BinaryStore(tmp_path, identity)
    try:
        poll(lambda: any(p.name.startswith(TEMP_PREFIX) and p.stat().st_size for p in store.folder.glob("*")), 30, "a build under way")
        killed = store.folder / f"{TEMP_PREFIX}rules.state.killed"
        killed.write_bytes(b"left by a writer that is gone")
        store.prepare()
        assert [p.name for p in store.folder.iterdir() if p.name.startswith(TEMP_PREFIX)] != [], "the live one stays"
        assert not killed.exists()
        (tmp_path / "finish").touch()
        assert writer.wait(30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert store.verify("rules", "a" * 64).n_tokens == 3


def test_two_processes_take_turns_on_a_folder(tmp_path):
    folder = tmp_path / "shared"
    first = python(f"""
        import time
        from pathlib import Path
        from rkllmd.store import locked_folder
        folder = Path({str(folder)!r})
        with locked_folder(folder):
            (folder / "first-in").touch()
            while not (folder / "release").exists():
                time.sleep(0.01)
    """)
    second = None
    try:
        poll(lambda: (folder / "first-in").exists(), 30, "the first process holding the lock")
        second = python(f"""
            from pathlib import Path
            from rkllmd.store import locked_folder
            folder = Path({str(folder)!r})
            with locked_folder(folder):
                (folder / "second-in").write_text(str((folder / "release").exists()))
        """)
        # The second waits as long as the first holds the lock (a second is ample to see it would not).
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(1.0)
        assert not (folder / "second-in").exists()
        (folder / "release").touch()
        assert second.wait(30) == 0 and first.wait(30) == 0
        assert (folder / "second-in").read_text() == "True"  # it entered only after the release
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_cascade_hashes_once_while_the_file_stays(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"\1" * MIB)
    digest = file_sha256(path)
    ledger = Ledger(tmp_path)
    assert ledger.matches(path, digest) and ledger.hashes == 1
    assert ledger.matches(path, digest) and ledger.hashes == 1
    assert Ledger(tmp_path).matches(path, digest), "the next run takes the kept ledger's word"
    assert (tmp_path / LEDGER_NAME).exists()

    # A forgotten record (a backend refused the file) forces a hash, even of a file unchanged.
    ledger.forget(path.name)
    assert ledger.matches(path, digest) and ledger.hashes == 2

    # A changed byte, same size, mtime set back: size and mtime cannot tell, the ctime
    # (which no one can set back) does: hashed, refused.
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(12345)
        f.write(b"\2")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not ledger.matches(path, digest) and ledger.hashes == 3
    assert not Ledger(tmp_path).matches(path, digest), "a mismatch is not kept as verified"


def test_same_size_with_another_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"\1" * 4096)
    digest = file_sha256(path)
    ledger = Ledger(tmp_path)
    assert ledger.matches(path, digest) and ledger.hashes == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert ledger.matches(path, digest) and ledger.hashes == 2
    path.write_bytes(b"\3" * 4096)  # same size, new content, new mtime
    assert not ledger.matches(path, digest) and ledger.hashes == 3


def test_a_binary_cache_verified_once_is_not_hashed_at_every_check(tmp_path):
    store = BinaryStore(tmp_path, {"model": "m"})
    store.prepare()
    store.build("rules", "t" * 64, lambda tmp: tmp.write_bytes(b"\5" * MIB) and 7)
    assert store.verify("rules", "t" * 64).n_tokens == 7
    assert store.ledger.hashes == 0, "the build's own hash is recorded"
    state = store.state_path("rules")
    with open(state, "r+b") as f:
        f.write(b"\6")  # a new mtime: hashed, refused
    with pytest.raises(BinaryCacheInvalid, match="checksum"):
        store.verify("rules", "t" * 64)
    assert store.ledger.hashes == 1


# -- collection ------------------------------------------------------------------------


def unit(folder: Path, name: str, size: int, age_s: float = 0.0) -> Path:
    """A unit of the test kind, ``age_s`` seconds old."""
    path = folder / f"{identity_key('test', 1, {'name': name})}.bin"
    path.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def store_of(folder: Path, **config) -> ArtifactStore:
    return ArtifactStore([Kind("test", folder, PATTERN)], StoreConfig(**config))


def key_of(path: Path) -> str:
    return path.name.split(".")[0]


def test_superseded_units_are_removed_and_held_ones_kept(tmp_path):
    current, old = unit(tmp_path, "current", 1000, age_s=3 * 86400), unit(tmp_path, "old", 2000, age_s=2 * 86400)
    recent = unit(tmp_path, "recent", 500)
    hold = Hold(tmp_path, key_of(current))
    store = store_of(tmp_path, superseded_days=1.0)
    store.collect()
    assert current.exists() and recent.exists() and not old.exists()
    report = store.report()
    assert report["kinds"]["test"] == {"folder": str(tmp_path), "bytes": 1500, "units": 2, "held": 1}
    assert (report["evictions"], report["evicted_bytes"]) == (1, 2000)
    assert report["last_gc"] is not None and not report["over_budget"]
    assert not (tmp_path / f"{HOLD_PREFIX}{key_of(old)}").exists()
    hold.release()
    store.configure(StoreConfig(superseded_days=0.0), store.kinds)
    store.collect()
    assert not current.exists() and not recent.exists()


def test_the_budget_evicts_least_recently_used_superseded_first_never_a_held_one(tmp_path):
    held = unit(tmp_path, "held", 3 * MIB, age_s=100)
    oldest, older, newest = (unit(tmp_path, name, MIB, age_s=age) for name, age in (("a", 90), ("b", 50), ("c", 10)))
    hold = Hold(tmp_path, key_of(held))
    os.utime(tmp_path / f"{HOLD_PREFIX}{key_of(held)}", (0, 0))  # its hold is older than every unit: held counts, not age
    store = store_of(tmp_path, max_disk_mb=5, superseded_days=30.0)
    store.collect()
    assert held.exists() and not oldest.exists() and older.exists() and newest.exists()
    store.configure(StoreConfig(max_disk_mb=1, superseded_days=30.0), store.kinds)
    store.collect()
    assert held.exists() and not older.exists() and not newest.exists()
    report = store.report()
    assert report["over_budget"] and report["evictions"] == 3 and report["kinds"]["test"]["held"] == 1
    hold.release()


def test_a_unit_held_by_another_process_is_never_collected(tmp_path):
    used = unit(tmp_path, "used", 100, age_s=10 * 86400)
    holder = python(f"""
        import time
        from pathlib import Path
        from rkllmd.store import Hold
        folder = Path({str(tmp_path)!r})
        hold = Hold(folder, {key_of(used)!r})
        (folder / "holding").touch()
        while not (folder / "release").exists():
            time.sleep(0.01)
    """)
    try:
        poll(lambda: (tmp_path / "holding").exists(), 30, "the other process holding the unit")
        store = store_of(tmp_path, max_disk_mb=0, superseded_days=0.0)
        store.collect()
        assert used.exists() and store.report()["kinds"]["test"]["held"] == 1
        (tmp_path / "release").touch()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    store.collect()
    assert not used.exists()


def test_a_folder_being_written_is_skipped_not_waited_for(tmp_path):
    old = unit(tmp_path, "old", 100, age_s=10 * 86400)
    store = store_of(tmp_path, superseded_days=0.0)
    with locked_folder(tmp_path):
        store.collect()  # returns at once
        assert old.exists()
    store.collect()
    assert not old.exists()


# -- two daemons on one folder ----------------------------------------------------------------


def test_a_second_daemon_never_removes_what_the_first_holds(tmp_path, make_daemon):
    """Two installs share one binary-cache folder (and so its weights folder), each with its
    own copy of a model file of the same name: the second's kept weights supersede the
    first's name for name, and its ``cache rm`` names a cache the first serves too. Neither
    removes what the first holds; once the first stops, the collector does."""
    from conftest import rkllmctl
    from gguf_files import tiny_llama

    shared = tmp_path / "shared"
    env = {"RKLLMD_MODEL_WEIGHTS_DIR": str(shared / "weights"), "RKLLMD_STORE_SUPERSEDED_DAYS": "0"}

    def install(name: str, seed: int):
        (tmp_path / name).mkdir()
        model = tiny_llama(tmp_path / name / "tiny.F32.gguf", seed=seed)
        daemon = make_daemon("--model", str(model), "--binary-cache-dir", str(shared / "bin"), env=env, start=False)
        daemon.text_dir.mkdir(parents=True)
        (daemon.text_dir / "notes.txt").write_text(f"Notes of the {name} install.")
        daemon.start()
        with daemon.client() as client:
            assert client.cache_wait("notes", timeout=120)["state"] == "ready"
            return daemon, Path(client.status()["model"]["weights"].split(" kept in ")[-1])

    first, held_weights = install("first", 0)
    [held_binary] = (shared / "bin").glob("*/notes.state")
    second, weights = install("second", 1)
    assert weights != held_weights and weights.parent == held_weights.parent
    assert rkllmctl("cache", "rm", "notes", socket=second.socket).returncode == 0

    assert held_weights.exists() and held_binary.exists()
    assert [line for line in second.log().splitlines() if "removed" in line] == []
    with first.client() as client:
        [row] = client.cache_ls()["caches"]
        assert row["state"] == "ready"
        result = client.generate("the thin hen", max_tokens=4, temperature=0, cache="notes").wait()
        assert result.cache == "notes" and result.stats["cached_tokens"] > 0

    assert first.stop() == 0  # nothing holds them any more: superseded, unused for 0 days
    mark = len(second.log())
    second.signal(signal.SIGHUP)
    poll(lambda: in_order(second.log()[mark:], "store: removed"), 60, "a collection after the reload")
    poll(lambda: not held_weights.exists() and not held_binary.exists(), 60, "the first's units collected")
