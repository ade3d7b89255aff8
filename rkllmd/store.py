"""The artifact store: every file the daemon derives and keeps on disk, kept one way.

Binary caches, kept dequantized weights and compiled kernels (docs/storage.md) are each a
*kind* of artifact in a folder; an artifact is a *unit* named by a 16-hex *key* that
hashes everything it depends on (its identity and the format's version, as black's
cache file names do), so a changed model, runtime or format makes a new key and the old
unit is *superseded*, never read. This module owns what they share:

- atomic: written to a temporary file in the same folder, fsynced and renamed, so a
  reader (or a kill -9) sees the old file or the new one, never a part;
- locked: processes sharing a folder take turns on its lock file to write, and each
  *holds* (a shared flock) the units it uses, so no one collects them;
- verified: a file is hashed once; while its size and mtime (and inode and ctime) stay
  those it had then, its ledger's word is taken (black's cascade: size, mtime, then hash);
- collected: ``ArtifactStore.collect`` removes superseded units no one holds that went
  unused ``store.superseded_days``, then, over ``store.max_disk_mb``, the least recently
  used superseded ones; the units held (the current identities) are never removed, by
  the collection or anything else: every removal claims its unit first (``_claimed``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import StoreConfig

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
#: Free space under which a failed write is taken for a full disk: writers do not all say
#: ENOSPC (numpy's tofile says "N requested and M written", a vendor runtime an error code).
LOW_SPACE = 1 << 20
#: Modes of the folders the daemon makes, whatever its umask: the text caches are edited by
#: the group (as the systemd unit's StateDirectoryMode), the artifacts are the daemon's.
TEXT_DIR_MODE = 0o770
BINARY_DIR_MODE = 0o750
LOCK_NAME = ".lock"
HOLD_PREFIX = ".hold-"
LEDGER_NAME = ".verified.json"
KEY_RE = "[0-9a-f]{16}"
_CHUNK = 1 << 20


# -- atomic files ---------------------------------------------------------------------


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents with exactly ``mode`` (mkdir's is filtered by
    the umask: under umask 0 it would make them world-writable). Existing folders keep theirs."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue
        os.chmod(folder, mode)


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder (so rename is atomic); removed unless used.
    Its writer holds it (an exclusive flock) until done: ``remove_leftovers`` in another
    process takes only the files of writers that are gone."""
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def commit(tmp: Path, path: Path, mode: int = 0o640) -> None:
    """fsync ``tmp``, give it ``mode``, rename it over ``path`` and fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a write into ``folder`` that raised ``exc`` failed for lack of space; ask
    while the partial file still exists (removing it frees the space again)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < LOW_SPACE


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    with temporary_beside(path) as tmp:
        tmp.write_bytes(data)
        commit(tmp, path, mode)


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files writers that are gone (killed) left behind; return how
    many. A file its writer still holds (``temporary_beside``) is being written: kept."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                removed += _remove_if_unlocked(Path(entry.path))
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    """Unlink ``path`` if no process has it locked (and it is still the file we locked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone, or not ours to open: not ours to remove either
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
            return False
        os.unlink(path)
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (``BINARY_DIR_MODE``) if missing and hold its lock file: processes
    sharing the folder take turns, so one builds what the others then use."""
    make_dirs(folder, BINARY_DIR_MODE)
    lock = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)




# -- keys and verification --------------------------------------------------------------


def identity_key(kind: str, version: int, identity: Mapping[str, Any]) -> str:
    """The key of a unit of ``kind`` in layout ``version`` built for ``identity``."""
    canonical = json.dumps({"kind": kind, "version": version, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    """What changes when a file's content may have: size and mtime (black's cascade), and
    the inode and ctime, which no one can set back (an edit that restores the mtime)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class Ledger:
    """What the files of one folder hashed to, and their stamp (``_stamp``) then, kept in
    the folder (``.verified.json``) so neither this run nor the next hashes them again
    while it stays the same. Losing it (a race between two writers, a corrupt file) only
    costs a hash."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hashes = 0  # files hashed (to show the cascade at work)
        self._lock = threading.Lock()
        self._records: dict[str, list] | None = None

    def matches(self, path: Path, sha256: str) -> bool:
        """Whether ``path`` (in our folder) hashes to ``sha256``; hashed only when its stamp
        differs from the last time it was. ``FileNotFoundError`` if it is gone."""
        stamp = _stamp(os.stat(path))
        with self._lock:
            if self._load().get(path.name) == [*stamp, sha256]:
                return True
        actual = file_sha256(path)
        with self._lock:
            self.hashes += 1
        if actual == sha256:
            self.record(path, sha256, stamp)
        else:
            self.forget(path.name)
        return actual == sha256

    def record(self, path: Path, sha256: str, stamp: list[int] | None = None) -> None:
        """``path`` hashed to ``sha256`` when its stamp was ``stamp`` (None: now; a writer
        that has just hashed what it wrote)."""
        now = _stamp(os.stat(path))
        if stamp is not None and now != stamp:
            return  # changed while it was hashed: nothing is known of it
        with self._lock:
            records = self._load()
            records[path.name] = [*now, sha256]
            self._save(records)

    def forget(self, name: str) -> None:
        """Hash ``name`` again at its next check (a reader found it wrong)."""
        with self._lock:
            records = self._load()
            if records.pop(name, None) is not None:
                self._save(records)

    def _load(self) -> dict[str, list]:
        if self._records is None:
            try:
                loaded = json.loads((self.folder / LEDGER_NAME).read_bytes())
                self._records = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._records = {}
        return self._records

    def _save(self, records: dict[str, list]) -> None:
        with contextlib.suppress(OSError):  # a read-only folder: the cascade lasts this run only
            atomic_write(self.folder / LEDGER_NAME, json.dumps(records, sort_keys=True).encode())


# -- holds and collection -------------------------------------------------------------------


class Hold:
    """A shared lock on one unit (``<folder>/.hold-<key>``) while it is used: a collector,
    in this process or another, removes only the units it can lock exclusively."""

    def __init__(self, folder: Path, key: str):
        self.path = folder / f"{HOLD_PREFIX}{key}"
        while True:
            # Read-only: a file open for writing would keep the folder's filesystem from
            # being remounted read-only (a full or failing disk) for as long as it is held.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:  # not collected while we waited for the lock
                break
            os.close(fd)
        os.utime(fd)  # the unit's last use, for the least-recently-used order
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class Kind:
    """One kind of artifact: its folder, and its units' names (``key`` group: the key)."""

    name: str
    folder: Path
    pattern: str


@dataclass
class Unit:
    kind: str
    key: str
    paths: list[Path]
    bytes: int
    used: float  # last use: its newest file, or when last held


def _size_and_time(path: Path) -> tuple[int, float]:
    """Bytes and newest mtime of a file, or of a folder's files."""
    st = os.stat(path, follow_symlinks=False)
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    for entry in os.scandir(path):
        with contextlib.suppress(FileNotFoundError):
            info = entry.stat(follow_symlinks=False)
            size += info.st_size
            newest = max(newest, info.st_mtime)
    return size, newest


# -- removal: only of units claimed --------------------------------------------------------
# Nothing leaves the store but through ``_claimed`` and ``_delete``: the collection
# (``ArtifactStore.collect``), a writer's removal of the versions it supersedes
# (``remove_superseded``) and a text cache's binary caches (``remove_from_units``).


@contextlib.contextmanager
def _claimed(folder: Path, key: str) -> Iterator[bool]:
    """Whether the unit is ours to remove: its hold file locked exclusively, so no process
    holds it and none can begin to until we leave. False: held (by any process, this one
    too), or a folder we cannot write, from which nothing can be removed either."""
    try:
        fd = os.open(folder / f"{HOLD_PREFIX}{key}", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _delete(folder: Path, unit: Unit, why: str) -> bool:
    """Remove a unit this process has claimed (``_claimed``), its hold file last: a process
    waiting to hold it then finds it gone and makes it again."""
    try:
        for path in unit.paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / f"{HOLD_PREFIX}{unit.key}")
    except OSError as exc:
        log.warning("store: cannot remove %s %s: %s", unit.kind, unit.key, exc)
        return False
    log.info("store: removed %s %s (%d bytes): %s", unit.kind, unit.key, unit.bytes, why)
    return True


def find_units(kind: Kind) -> list[Unit]:
    """The units of ``kind`` in its folder, their size and last use."""
    matcher = re.compile(kind.pattern)
    found: dict[str, Unit] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(kind.folder):
            match = matcher.fullmatch(entry.name)
            if match is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                size, used = _size_and_time(Path(entry.path))
                unit = found.setdefault(match["key"], Unit(kind.name, match["key"], [], 0, 0.0))
                unit.paths.append(Path(entry.path))
                unit.bytes += size
                unit.used = max(unit.used, used)
    for unit in found.values():
        with contextlib.suppress(FileNotFoundError):
            unit.used = max(unit.used, os.stat(kind.folder / f"{HOLD_PREFIX}{unit.key}").st_mtime)
    return list(found.values())


def remove_superseded(kind: Kind, keep: str) -> int:
    """Remove the units of ``kind`` but ``keep`` (a key) that no process holds: the
    versions a writer's new unit supersedes (call it with the folder's lock held). One in
    use stays, for the collection to remove once it is not. Returns how many went."""
    removed = 0
    for unit in find_units(kind):
        if unit.key != keep:
            with _claimed(kind.folder, unit.key) as ours:
                removed += ours and _delete(kind.folder, unit, f"superseded by {keep}")
    return removed


def remove_from_units(folder: Path, own: str | None, names: list[str]) -> None:
    """Remove the files ``names`` from each unit of ``folder`` (one folder per key: binary
    caches) that is ``own`` (held by this process, whose files they are) or that no
    process holds: another process's unit in use keeps its files, which its own owner
    removes when it must."""
    matcher = re.compile(KEY_RE)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not (matcher.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            with contextlib.ExitStack() as stack:
                if entry.name != own and not stack.enter_context(_claimed(folder, entry.name)):
                    log.debug("store: %s is in use by another process; its files stay", entry.path)
                    continue
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(entry.path, name))


@contextlib.contextmanager
def _writers_away(folder: Path) -> Iterator[bool]:
    """The folder's lock if no writer has it (True), else False: a folder being written
    (weights dequantized, a kernel compiled) is collected next time, not waited for."""
    try:
        lock = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError:  # a read-only folder: nothing can be removed from it either
        yield False
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        yield False
        return
    try:
        yield True
    finally:
        os.close(lock)


class ArtifactStore:
    """The kinds of artifacts this daemon keeps, their garbage collection, and what status
    says of them. ``collect`` reads and deletes files: run it off the socket loop."""

    def __init__(self, kinds: list[Kind], config: StoreConfig):
        self.kinds = kinds
        self.config = config
        self.last_gc: float | None = None
        self.evictions = 0
        self.evicted_bytes = 0
        self._usage: dict[str, dict[str, int]] = {}
        self._over_budget = False
        self._lock = threading.Lock()  # one collection at a time; guards the figures

    def configure(self, config: StoreConfig, kinds: list[Kind]) -> None:
        """Apply a reloaded [store] section and the folders of a reloaded configuration."""
        with self._lock:
            self.config, self.kinds = config, kinds

    def collect(self) -> None:
        """Remove superseded units as the policy says (module docstring); count what is kept."""
        with self._lock, contextlib.ExitStack() as stack:
            units: list[tuple[Unit, Kind, bool]] = []  # each unit, its kind, whether we claimed it
            counted: set[str] = set()
            for kind in self.kinds:
                if os.path.isdir(kind.folder) and stack.enter_context(_writers_away(kind.folder)):
                    counted.add(kind.name)
                    for unit in find_units(kind):
                        units.append((unit, kind, stack.enter_context(_claimed(kind.folder, unit.key))))
            self._collect(units, counted)

    def _collect(self, units: list[tuple[Unit, Kind, bool]], counted: set[str]) -> None:
        budget = self.config.max_disk_mb << 20
        stale_before = time.time() - self.config.superseded_days * 86400
        total = sum(u.bytes for u, _, _ in units)
        superseded = sorted((entry for entry in units if entry[2]), key=lambda entry: entry[0].used)
        removed: set[int] = set()
        for unit, kind, _ in superseded:
            if unit.used < stale_before or total > budget:
                why = "unused since its identity was superseded" if unit.used < stale_before else "over the disk budget"
                if _delete(kind.folder, unit, why):
                    self.evictions += 1
                    self.evicted_bytes += unit.bytes
                    total -= unit.bytes
                    removed.add(id(unit))
        # A kind skipped this time (being written) keeps the figures of the last time.
        usage = {k.name: {"bytes": 0, "units": 0, "held": 0} for k in self.kinds if k.name in counted}
        usage.update({k.name: self._usage[k.name] for k in self.kinds if k.name not in counted and k.name in self._usage})
        for unit, _, claimed in units:
            if id(unit) not in removed:
                row = usage[unit.kind]
                row["bytes"] += unit.bytes
                row["units"] += 1
                row["held"] += not claimed
        self._usage, self._over_budget, self.last_gc = usage, total > budget, time.time()

    def report(self) -> dict[str, Any]:
        """The figures of the last collection (status must not read the disk)."""
        empty = {"bytes": 0, "units": 0, "held": 0}
        return {
            "kinds": {k.name: {"folder": str(k.folder), **self._usage.get(k.name, empty)} for k in self.kinds},
            "budget_bytes": self.config.max_disk_mb << 20,
            "superseded_days": self.config.superseded_days,
            "over_budget": self._over_budget,
            "last_gc": self.last_gc,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
        }
