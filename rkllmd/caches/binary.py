"""Binary caches: a prefix's model state on disk, with the identity it depends on beside it.

For each model identity there is one folder, ``<binary_dir>/<model key>/``, holding per
cache name ``NAME.state`` (the backend's payload, opaque here: our KV arrays or the
vendor's prompt-cache file) and ``NAME.meta.json`` (format version, identity, sha256 of
the text, token count, size and sha256 of the payload). Both are replaced atomically,
payload first: after a crash between the two renames the checksum no longer matches,
so the pair reads as corrupt and is rebuilt, never half-used.

The folder is a unit of the artifact store (rkllmd/store.py): held while its identity
is served, collected once superseded; its payloads are hashed once, then taken on the
ledger's word while their size and mtime stay the same.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..backends.base import BackendError, BuildCancelled
from ..store import (
    BINARY_DIR_MODE, KEY_RE, Hold, Ledger, atomic_write, commit, disk_full, file_sha256, identity_key, make_dirs, remove_from_units,
    remove_leftovers, temporary_beside,
)
from .names import check_name

log = logging.getLogger(__name__)

#: Bump when the layout of the meta file or the meaning of its keys changes.
FORMAT_VERSION = 1
STATE_SUFFIX = ".state"
META_SUFFIX = ".meta.json"
KIND = "binary"
#: The store's units of this kind: one folder per model identity.
PATTERN = f"(?P<key>{KEY_RE})"


class BinaryCacheInvalid(Exception):
    """A binary cache exists but must not be loaded; the message says why (shown in ``cache ls``)."""


@dataclass(frozen=True)
class BinaryMeta:
    text_sha256: str
    n_tokens: int
    payload_bytes: int
    payload_sha256: str
    built_at: float
    build_ms: float


def model_key(identity: dict[str, Any]) -> str:
    return identity_key(KIND, FORMAT_VERSION, identity)


class BinaryStore:
    def __init__(self, root: Path, identity: dict[str, Any]):
        self.root = root
        self.identity = identity
        self.key = model_key(identity)
        self.folder = root / self.key
        self.ledger = Ledger(self.folder)
        self._hold: Hold | None = None

    def state_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{STATE_SUFFIX}"

    def meta_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{META_SUFFIX}"

    def prepare(self) -> None:
        """Create our folder, hold it (no collector removes it while we serve this
        identity) and drop whatever a killed build left half-written."""
        make_dirs(self.folder, BINARY_DIR_MODE)
        if self._hold is None:
            try:
                self._hold = Hold(self.root, self.key)
            except OSError as exc:  # a read-only folder: no collector can remove anything either
                log.warning("cannot hold binary caches %s: %s", self.folder, exc)
        remove_leftovers(self.folder)

    def release(self) -> None:
        """This identity is no longer served here: a collector may remove it once superseded."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    def build(self, name: str, text_sha256: str, write_state: Callable[[Path], int]) -> BinaryMeta:
        """Run ``write_state(tmp_path) -> n_tokens`` and install the result atomically."""
        started = time.monotonic()
        state = self.state_path(name)
        make_dirs(self.folder, BINARY_DIR_MODE)  # deleted while we ran: make it again
        with temporary_beside(state) as tmp:
            try:
                n_tokens = write_state(tmp)
            except BuildCancelled:
                raise
            except (OSError, BackendError) as exc:
                if disk_full(exc, self.folder):
                    raise OSError(errno.ENOSPC, f"no space left on device for the binary cache in {self.folder} ({exc})") from exc
                raise
            payload_bytes = tmp.stat().st_size
            meta = BinaryMeta(
                text_sha256=text_sha256,
                n_tokens=n_tokens,
                payload_bytes=payload_bytes,
                payload_sha256=file_sha256(tmp),
                built_at=time.time(),
                build_ms=round((time.monotonic() - started) * 1000, 1),
            )
            commit(tmp, state)
        self.ledger.record(state, meta.payload_sha256)
        document = {"format": FORMAT_VERSION, "identity": self.identity, **meta.__dict__}
        atomic_write(self.meta_path(name), json.dumps(document, indent=1, sort_keys=True).encode())
        return meta

    def read_meta(self, name: str) -> BinaryMeta | None:
        """The meta of an existing cache, checked against our identity; None if there is none."""
        try:
            raw = self.meta_path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BinaryCacheInvalid(f"cannot read meta: {exc.strerror}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != FORMAT_VERSION:
                raise BinaryCacheInvalid(f"format {document.get('format')!r}, expected {FORMAT_VERSION}")
            if document.get("identity") != self.identity:
                raise BinaryCacheInvalid("built for another model, runtime or template")
            meta = BinaryMeta(**{k: document[k] for k in BinaryMeta.__dataclass_fields__})
        except BinaryCacheInvalid:
            raise
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BinaryCacheInvalid("meta file is corrupt") from None
        return meta

    def verify(self, name: str, text_sha256: str) -> BinaryMeta | None:
        """Check a cache completely before any byte of it may reach a backend.

        None: no cache (or one built from other text: stale). Raises BinaryCacheInvalid
        for a cache that is corrupt, truncated or foreign.
        """
        meta = self.read_meta(name)
        if meta is None or meta.text_sha256 != text_sha256:
            return None
        state = self.state_path(name)
        try:
            size = state.stat().st_size
        except FileNotFoundError:
            raise BinaryCacheInvalid("state file is missing") from None
        if size != meta.payload_bytes:
            raise BinaryCacheInvalid(f"state file is {size} bytes; its meta says {meta.payload_bytes}")
        if not self.ledger.matches(state, meta.payload_sha256):
            raise BinaryCacheInvalid("state file checksum mismatch")
        return meta

    def remove(self, name: str) -> None:
        """Delete this name's binary caches (the text is gone): ours, and those of the
        models no process serves; another daemon's in use are its own text's to decide."""
        check_name(name)
        self.ledger.forget(name + STATE_SUFFIX)
        remove_from_units(self.root, self.key, [name + STATE_SUFFIX, name + META_SUFFIX])
