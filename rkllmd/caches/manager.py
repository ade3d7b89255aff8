"""The cache manager: what each text cache's binary state is, and which prefix a prompt can reuse.

Threads: ``refresh``/``forget``/``listing``/``move`` may be called from any thread (the
socket loop, the file watcher, the disk thread); ``build``, ``due_build``, ``choose`` and
``serve`` run only on the model worker, the single owner of the backend. A lock guards the
table, never a build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..backends.base import CONVERSATION, TEXT_CACHE, Backend, BackendError, BuildCancelled, PrefixState, Run, common_prefix
from ..config import CacheConfig
from ..templates import RenderError
from .binary import BinaryCacheInvalid, BinaryStore
from .text import TextCacheError, TextStore, system_text

log = logging.getLogger(__name__)

READY, STALE, QUEUED, BUILDING, FAILED = "ready", "stale", "queued", "building", "failed"


@dataclass
class Entry:
    name: str
    state: str = STALE
    reason: str | None = None
    text_sha256: str | None = None  # of the text file as last read and its rendered prefix
    text_bytes: int = 0
    text: str | None = None  # the text file as last read (a request's ``cache`` takes it from here)
    prefix: str | None = None  # rendered prefix of that text
    built_sha256: str | None = None  # text the ready binary was built from
    built_prefix: str | None = None
    n_tokens: int | None = None
    built_at: float | None = None
    build_ms: float | None = None
    binary_bytes: int | None = None
    build_progress: tuple[int, int] | None = None  # (tokens done, total) of the build running

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "text_bytes": self.text_bytes,
            "tokens": self.n_tokens,
            "built_at": self.built_at,
            "build_ms": self.build_ms,
            "binary_bytes": self.binary_bytes,
            "build": self.build_report(),
        }

    def build_report(self) -> dict[str, int] | None:
        """``build`` of the wire entry: tokens done of total while building, when the backend says."""
        if self.state != BUILDING or self.build_progress is None:
            return None
        done, total = self.build_progress
        return {"done": done, "total": total}


class PrefixLRU:
    """Prefix states kept in memory within one byte budget, least recently used evicted first:
    text caches' states (by name) and conversation states (see ``keep``) alike."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[tuple[str, str], PrefixState] = OrderedDict()
        self.used = 0
        self.conversation_hits = 0
        self.conversation_evictions = 0
        self._kept = 0  # conversation states ever kept (names them)

    def get(self, name: str, built_sha: str) -> PrefixState | None:
        state = self._items.get((TEXT_CACHE, name))
        if state is None or state.built_sha256 != built_sha:
            return None
        self._items.move_to_end((TEXT_CACHE, name))
        return state

    def put(self, state: PrefixState) -> None:
        key = (state.kind, state.name)
        self._remove(key)
        if state.nbytes > self.budget:
            return
        self.shrink(self.budget - state.nbytes)
        self._items[key] = state
        self.used += state.nbytes

    def keep(self, state: PrefixState) -> None:
        """Keep a conversation state; states whose tokens all start it are dropped (this one
        restores at least as much of any prompt as they would)."""
        assert state.tokens is not None
        for key, old in list(self._items.items()):
            if old.tokens is not None and len(old.tokens) <= len(state.tokens) and common_prefix(old.tokens, state.tokens) == len(old.tokens):
                self._remove(key)
        self._kept += 1
        state.name = f"conversation-{self._kept}"
        self.put(state)

    def best_conversation(self, prompt_ids: list[int]) -> tuple[PrefixState | None, int]:
        """The conversation state sharing the longest token prefix with the prompt, and its length."""
        best, best_n = None, 0
        for state in self._items.values():
            if state.tokens is not None:
                n = common_prefix(state.tokens, prompt_ids)
                if n > best_n:
                    best, best_n = state, n
        return best, best_n

    def touch(self, state: PrefixState) -> None:
        """A conversation state was restored: it becomes the most recently used."""
        key = (state.kind, state.name)
        if key in self._items:
            self._items.move_to_end(key)
            self.conversation_hits += 1

    def shrink(self, budget: int) -> None:
        """Evict the least recently used states until at most ``budget`` bytes are held."""
        while self._items and self.used > budget:
            (kind, _), old = self._items.popitem(last=False)
            self.used -= old.nbytes
            self.conversation_evictions += kind == CONVERSATION

    def drop(self, name: str) -> None:
        self._remove((TEXT_CACHE, name))

    def drop_conversations(self) -> None:
        for key in [k for k in self._items if k[0] == CONVERSATION]:
            self._remove(key)

    def has_conversations(self) -> bool:
        return any(kind == CONVERSATION for kind, _ in self._items)

    def _remove(self, key: tuple[str, str]) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= old.nbytes

    def names(self) -> list[str]:
        """Names of the text caches held."""
        return [name for kind, name in self._items if kind == TEXT_CACHE]

    def conversations(self) -> dict[str, int]:
        states = [s for s in self._items.values() if s.kind == CONVERSATION]
        return {
            "kept": len(states),
            "tokens": sum(s.n_tokens for s in states),
            "bytes": sum(s.nbytes for s in states),
            "hits": self.conversation_hits,
            "evictions": self.conversation_evictions,
        }

    def __len__(self) -> int:
        return len(self._items)


class PromptCaches:
    """Every prompt cache: its text cache's state, its binary cache's, and the prefix states
    held in memory (see docs/glossary.md)."""

    def __init__(
        self,
        texts: TextStore,
        binaries: BinaryStore,
        backend: Backend,
        memory_budget: int,
        schedule_build: Callable[[str], None],
        on_change: Callable[[str], None] = lambda name: None,
        on_stored: Callable[[], None] = lambda: None,
        keep_conversations: bool = True,
    ):
        self.texts = texts
        self.binaries = binaries
        self.backend = backend
        self.lru = PrefixLRU(memory_budget)
        self.keep_conversations = keep_conversations
        self._schedule_build = schedule_build
        self._on_change = on_change
        self._on_stored = on_stored  # what is on disk changed: the artifact store counts and collects
        self._lock = threading.Lock()
        self._closed = False  # its model was unloaded
        self._entries: dict[str, Entry] = {}
        self.builds = 0  # builds that ran (requests deduplicated away are not counted)
        self._verified_files: dict[str, tuple[int, ...] | None] = {}  # state file identity when last verified

    def configure(self, config: CacheConfig) -> None:
        """Apply a reloaded [cache] section: the memory budget, the largest text read."""
        with self._lock:
            self.lru.budget = config.memory_budget_mb << 20
            self.lru.shrink(self.lru.budget)
            self.texts.max_bytes = config.max_text_bytes
            self.keep_conversations = config.conversations
            if not config.conversations:
                self.lru.drop_conversations()

    # -- any thread ---------------------------------------------------------------

    def scan(self) -> None:
        """Check every text cache against its binary cache; queue the stale ones."""
        self.binaries.prepare()
        for name in self.texts.names():
            self.refresh(name)

    def rescan(self) -> None:
        """Refresh every name known or present (the text folder was replaced); nothing is deleted
        on disk but the binaries of texts that are gone, and no build in progress is disturbed."""
        with self._lock:
            known = set(self._entries)
        for name in sorted(known | set(self.texts.names())):
            self.refresh(name)

    def refresh(self, name: str, *, force: bool = False) -> Entry | None:
        """Bring ``name``'s entry up to date with its file; queue a build if needed.

        Deduplicated by content: a save that changes nothing builds nothing.
        Returns None when the text cache does not exist (its binaries are then deleted).
        """
        try:
            text = self.texts.read(name)
            if text is not None:
                prefix = self.backend.template.cacheable_prefix(system_text(text.text))
        except (TextCacheError, RenderError) as exc:
            reason = f"text cache refused: {exc}"
            with self._lock:
                entry = self._entries.setdefault(name, Entry(name))
                changed = (entry.state, entry.reason) != (FAILED, reason)
                entry.state, entry.reason = FAILED, reason
                entry.text_sha256 = entry.prefix = entry.text = None
                self.lru.drop(name)
            if changed:
                self._on_change(name)
            return entry
        if text is None:
            self.forget(name)
            return None
        # The binary cache is keyed by the text and its rendering: a template whose prefix
        # holds the date (Llama 3.2) builds a new one when the date changes.
        source_sha = hashlib.sha256(f"{text.sha256}\0{prefix}".encode()).hexdigest()
        with self._lock:
            entry = self._entries.setdefault(name, Entry(name))
            unchanged = entry.text_sha256 == source_sha
            entry.text_sha256, entry.text_bytes, entry.prefix, entry.text = source_sha, text.size, prefix, text.text
            if not force and unchanged and entry.state in (READY, QUEUED, BUILDING, FAILED):
                return entry
            if not force and entry.state == READY and entry.built_sha256 == source_sha:
                return entry
        if not force and self._adopt_from_disk(entry, source_sha, prefix):
            self._on_change(name)
            return entry
        with self._lock:
            if entry.state != BUILDING:
                entry.state = QUEUED
        self._schedule_build(name)
        self._on_change(name)
        return entry

    def _adopt_from_disk(self, entry: Entry, text_sha: str, prefix: str) -> bool:
        """Use an existing, fully verified binary cache for this text; False if there is none."""
        try:
            meta = self.binaries.verify(entry.name, text_sha)
        except BinaryCacheInvalid as exc:
            log.warning("binary cache %s refused: %s; rebuilding", entry.name, exc)
            with self._lock:
                entry.reason = f"binary cache refused ({exc}); rebuilding"
            return
        if meta is None:
            return
        with self._lock:
            entry.state, entry.reason = READY, None
            entry.built_sha256, entry.built_prefix = text_sha, prefix
            entry.n_tokens, entry.built_at, entry.build_ms = meta.n_tokens, meta.built_at, meta.build_ms
            entry.binary_bytes = meta.payload_bytes
        return True

    def move(self, texts: TextStore, binary_root: Path) -> None:
        """Serve caches from other folders (a reload changed them): forget all, scan again.
        Nothing once closed (the model was unloaded before the disk thread got to it)."""
        with self._lock:
            if self._closed:
                return
            binaries = BinaryStore(binary_root, self.backend.identity())
            binaries.prepare()  # held before the old one is let go: no collector between
            self.binaries.release()
            self.texts, self.binaries = texts, binaries
            self._entries.clear()
            self.lru = PrefixLRU(self.lru.budget)
        self.scan()
        self._on_stored()

    def close(self) -> None:
        """The model is unloaded: its binary caches are let go (a collection may now remove
        them once superseded: ``on_stored`` asks for one)."""
        with self._lock:
            self._closed = True
            self.binaries.release()
        self._on_stored()

    def forget(self, name: str) -> None:
        """The text cache is gone: delete its binary caches everywhere."""
        with self._lock:
            self._entries.pop(name, None)
            self.lru.drop(name)
        self.binaries.remove(name)
        self._on_change(name)

    def entry(self, name: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else Entry(**entry.__dict__)

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = [e.public() for e in sorted(self._entries.values(), key=lambda e: e.name)]
            in_memory = set(self.lru.names())
        for row in rows:
            row["in_memory"] = row["name"] in in_memory
        for shown, reason in self.texts.refused():
            rows.append({"name": shown, "state": FAILED, "reason": reason})
        return rows

    def text_of(self, name: str) -> tuple[str | None, str | None]:
        """A text cache as last read, from memory: (text, None); (None, why) when it cannot
        be used; (None, None) when there is none."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None, None
            return entry.text, None if entry.text is not None else entry.reason or "not read yet"

    def memory(self) -> dict[str, int]:
        with self._lock:
            return {"used_bytes": self.lru.used, "budget_bytes": self.lru.budget, "states": len(self.lru)}

    def conversations(self) -> dict[str, Any]:
        """Kept conversation states for status: how many, their tokens and bytes, hits, evictions."""
        with self._lock:
            return {"enabled": self.keep_conversations, **self.lru.conversations()}

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for entry in self._entries.values():
                counts[entry.state] = counts.get(entry.state, 0) + 1
            return counts

    def building(self) -> dict[str, Any] | None:
        """The build in progress for status: its name, tokens done and total (None when the
        backend reports no progress: the NPU's build is one native call)."""
        with self._lock:
            entry = next((e for e in self._entries.values() if e.state == BUILDING), None)
            if entry is None:
                return None
            done, total = entry.build_progress or (None, None)
            return {"name": entry.name, "done": done, "total": total}

    def settled(self, name: str) -> tuple[bool, str | None]:
        """For ``cache wait``: (done, error). Done when the binary matches the text as last
        read, or when it cannot get there (error says why). Reads nothing from disk."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return True, "no such text cache"
            if entry.state == FAILED:
                return True, entry.reason
            return entry.state == READY and entry.built_sha256 == entry.text_sha256, None

    # -- model worker only ------------------------------------------------------

    def build(self, name: str, released: Callable[[], None] = lambda: None) -> None:
        """Build ``name``'s binary cache for its current text, unless it is already current.

        ``released`` is called once, however the build ends, before its outcome is announced:
        the worker frees its build slot there. A client told "ready" asks at once; announced
        first, its request heard it waited for a build that had ended."""
        try:
            changed, stored = self._build(name)
        finally:
            released()
        if changed:
            self._on_change(name)
        if stored:
            self._on_stored()

    def _build(self, name: str) -> tuple[bool, bool]:
        """``build`` up to its outcome: whether the entry changed, whether the store did."""
        entry = self.refresh(name)
        if entry is None:
            return False, False
        with self._lock:
            if entry.state == READY and entry.built_sha256 == entry.text_sha256:
                return False, False
            if entry.text_sha256 is None or entry.prefix is None:
                return False, False
            text_sha, prefix = entry.text_sha256, entry.prefix
            entry.state, entry.reason, entry.build_progress = BUILDING, None, None
            self.builds += 1
            binaries = self.binaries
        self._on_change(name)
        log.info("building binary cache %s", name)

        def progress(done: int, total: int) -> None:
            with self._lock:
                entry.build_progress = (done, total)

        try:
            meta = binaries.build(name, text_sha, lambda tmp: self.backend.build_prefix(prefix, tmp, progress))
        except BuildCancelled:
            # The request that needed it was cancelled: nothing is wrong with the cache.
            log.info("building binary cache %s was interrupted; it is queued again", name)
            with self._lock:
                entry.state = QUEUED
            self._schedule_build(name)
            return True, False
        except Exception as exc:  # a failed build must not take the worker down
            if isinstance(exc, (BackendError, OSError)):  # the model or the disk refused it: the reason says all
                log.error("building binary cache %s failed: %s", name, exc)
            else:  # a bug: its traceback
                log.exception("building binary cache %s failed", name)
            with self._lock:
                entry.state, entry.reason = FAILED, f"build failed: {exc}"
            return True, False
        with self._lock:
            entry.built_sha256, entry.built_prefix = text_sha, prefix
            entry.n_tokens, entry.built_at, entry.build_ms = meta.n_tokens, meta.built_at, meta.build_ms
            entry.binary_bytes, entry.reason = meta.payload_bytes, None
            self.lru.drop(name)
            still_current = entry.text_sha256 == text_sha
            entry.state = READY if still_current else QUEUED
            deleted = self._entries.get(name) is not entry and binaries is self.binaries
        if deleted:  # the text was removed while we built: what we wrote belongs to nothing
            log.info("text cache %s was deleted during its build; deleting the binary cache too", name)
            binaries.remove(name)
            return True, False
        log.info("binary cache %s ready: %d tokens in %.0f ms", name, meta.n_tokens, meta.build_ms)
        return True, True

    def choose(self, prompt: str, wanted: str | None = None, prompt_ids: Sequence[int] | None = None) -> PrefixState | None:
        """The prefix state to restore for ``prompt`` (whose token ids are ``prompt_ids``, when
        the caller has them): the text cache or the conversation state that supplies more of
        its tokens (a text cache on a tie: its state is the one built for exactly that prefix)."""
        text_state = self.prefix_for(prompt, wanted)
        with self._lock:
            if not self.keep_conversations:
                return text_state
        held = self.backend.resumable(prompt)
        if held is not None and held.n_tokens >= (text_state.n_tokens if text_state is not None else 0):
            with self._lock:
                self.lru.conversation_hits += 1
            return held
        with self._lock:
            if not self.lru.has_conversations():
                return text_state
        if prompt_ids is None:
            prompt_ids = self.backend.tokenize(prompt)
        if not prompt_ids:
            return text_state
        with self._lock:
            state, agreed = self.lru.best_conversation(prompt_ids)
            usable = min(agreed, len(prompt_ids) - 1)
            if state is None or usable <= (text_state.n_tokens if text_state is not None else 0):
                return text_state
            self.lru.touch(state)
        return state

    def keep_conversation(self, run: Run) -> None:
        """Keep the state a finished generation left for the conversation's next turn (memory only)."""
        with self._lock:
            if not self.keep_conversations:
                return
            budget = self.lru.budget
        state = self.backend.kept_state(run, budget)
        if state is not None:
            with self._lock:
                self.lru.keep(state)

    def due_build(self, prompt: str, wanted: str | None = None) -> str | None:
        """The text cache to build before ``prompt`` runs, instead of prefilling the same tokens
        twice: the one of the longest prefix it starts with (``wanted`` only), when it is
        queued or stale; None when that one is ready (or every one failed)."""
        for entry in self._candidates(prompt, wanted):
            with self._lock:
                if entry.state == FAILED:
                    continue
                return entry.name if entry.state != READY or entry.built_sha256 != entry.text_sha256 else None
        return None

    def longest_prefix(self, prompt: str, wanted: str | None = None) -> str | None:
        """The name of the text cache ``prompt`` starts with, the longest (``wanted`` only), whatever its state."""
        candidates = self._candidates(prompt, wanted)
        return candidates[0].name if candidates else None

    def prefix_for(self, prompt: str, wanted: str | None = None) -> PrefixState | None:
        """The longest ready prefix state of ``prompt`` (or the named cache's)."""
        for entry in self._candidates(prompt, wanted):
            state = self._load(entry.name, prompt)
            if state is not None:
                return state
        return None

    def _candidates(self, prompt: str, wanted: str | None) -> list[Entry]:
        """The text caches whose prefix ``prompt`` starts with, the longest first. With a template
        that reads the clock, every prefix is rendered again first: a cache of yesterday's is
        rebuilt."""
        if self.backend.template.reads_clock:
            self.rescan()
        with self._lock:
            candidates = [
                e for e in self._entries.values() if (wanted is None or e.name == wanted) and e.prefix and prompt.startswith(e.prefix)
            ]
        return sorted(candidates, key=lambda e: len(e.prefix or ""), reverse=True)

    def _load(self, name: str, prompt: str) -> PrefixState | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state != READY or not entry.built_prefix or not prompt.startswith(entry.built_prefix):
                return None
            built_sha, prefix, n_tokens = entry.built_sha256, entry.built_prefix, entry.n_tokens
            hot = self.lru.get(name, built_sha)
        path = self.binaries.state_path(name)
        if hot is not None and (hot.nbytes or self._verified_files.get(name) == _file_key(path)):
            # In memory; or read by the backend from a file that has not changed (not even
            # its ctime, which no one can set back) since it was verified.
            return hot
        started = time.monotonic()
        try:
            self._verified_files[name] = _file_key(path)
            if self.binaries.verify(name, built_sha) is None:
                raise BinaryCacheInvalid("replaced on disk")
            payload, nbytes = self.backend.load_prefix(path, n_tokens)
        except (BinaryCacheInvalid, BackendError, OSError, ValueError) as exc:
            log.warning("binary cache %s refused at load: %s; rebuilding", name, exc)
            self.binaries.ledger.forget(path.name)  # its size and mtime may not tell what is wrong
            with self._lock:
                entry.state, entry.reason = STALE, f"binary cache refused ({exc}); rebuilding"
            self._schedule_build(name)
            self._on_change(name)
            return None
        state = PrefixState(name=name, text=prefix, n_tokens=n_tokens, payload=payload, nbytes=nbytes, built_sha256=built_sha)
        with self._lock:
            self.lru.put(state)
        log.debug("loaded binary cache %s from disk in %.1f ms", name, (time.monotonic() - started) * 1000)
        return state


def _file_key(path: Path) -> tuple[int, ...] | None:
    """What changes whenever a file's content may have changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
