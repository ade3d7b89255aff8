"""The load mix: client threads, each with one generation at a time, of the kinds users send
(plain, with a text cache, cancelled right after sending), and the figures of a run.

tests/test_load.py runs it with a fixed number of requests; bench/soak.py for as long as
asked. Here, beside the tests, so tests import nothing from bench/.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reliability import fd_count, rss_kb
from rkllmctl import Client, DaemonError

PROMPTS = [
    "Say hi.", "Name a colour.", "What is 2+2?", "Name a planet.", "Is ice cold?", "Say yes or no.",
    "Name a fruit.", "What is a CPU?", "Spell 'dog'.", "Name a month.", "Give me a number.", "What is Linux?",
]
CACHES = {
    "soak-brief": "Answer in one or two words.",
    "soak-polite": "You are a polite assistant. Answer very briefly.",
}
#: Weights of the request kinds: plain, with a text cache, cancelled right after sending.
KINDS = (("plain", 0.55), ("cache", 0.30), ("cancel", 0.15))


@dataclass
class Outcome:
    client: int
    kind: str
    request_id: Any
    position: int | None
    queue_ms: float | None  # None: cancelled before it started
    service_ms: float | None  # from its start to its end, on the daemon
    finish_reason: str
    cached_tokens: int
    ended: float  # time.monotonic()


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # exceptions and protocol surprises
    strays: int = 0  # messages for requests that had already ended (duplicates)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, answered, rss_kb, fds)
    started: float = 0.0
    ended: float = 0.0
    counters_before: dict[str, int] = field(default_factory=dict)
    counters_after: dict[str, int] = field(default_factory=dict)
    # Bytes of prefix states (text caches' and conversations') the daemon held, by its status:
    # they grow up to [cache] memory_budget_mb by design, and are not a leak.
    states_before: int = 0
    states_after: int = 0
    sent: int = 0


class Mix:
    """``clients`` threads, each with its own Client, each with one generation at a time."""

    def __init__(self, socket: Path, clients: int = 16, per_client: int | None = None, duration_s: float | None = None, seed: int = 6):
        assert (per_client is None) != (duration_s is None), "give per_client or duration_s"
        self.socket = socket
        self.clients = clients
        self.per_client = per_client
        self.duration_s = duration_s
        self.seed = seed
        self.report = Report()
        self._lock = threading.Lock()
        self._done = threading.Event()

    def prepare(self) -> list[int]:
        """Put the text caches and wait for their binaries; return the daemon's pid and its
        model's runner process's (whose memory and files count with the daemon's)."""
        with Client(self.socket, timeout=30) as client:
            for name, text in CACHES.items():
                client.cache_put(name, text)
            for name in CACHES:
                client.cache_wait(name, timeout=300)
            status = client.status()
            return sorted({status["pid"], *(model["pid"] for model in status["models"]["loaded"])})

    def run(self, progress_every: float | None = None) -> Report:
        pids = self.prepare()
        report = self.report
        with Client(self.socket, timeout=30) as client:
            status = client.status()
            report.counters_before = status["counters"]
            report.states_before = status["caches"]["memory"]["used_bytes"]
        sampler = threading.Thread(target=self._sample, args=(pids, progress_every), daemon=True)
        threads = [threading.Thread(target=self._client, args=(i,), name=f"client-{i}") for i in range(self.clients)]
        report.started = time.monotonic()
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.ended = time.monotonic()
        self._done.set()
        sampler.join()
        report.samples.append((report.ended, len(report.outcomes), *_usage(pids)))
        with Client(self.socket, timeout=30) as client:
            status = client.status()
            report.counters_after = status["counters"]
            report.states_after = status["caches"]["memory"]["used_bytes"]
        return report

    def _sample(self, pids: list[int], progress_every: float | None) -> None:
        last_print = time.monotonic()
        while not self._done.wait(0.25):
            now = time.monotonic()
            with self._lock:
                answered = len(self.report.outcomes)
            self.report.samples.append((now, answered, *_usage(pids)))
            if progress_every and now - last_print >= progress_every:
                last_print = now
                print(progress_line(self.report), flush=True)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        deadline = None if self.duration_s is None else time.monotonic() + self.duration_s
        sent = 0
        try:
            with Client(self.socket, timeout=120) as client:
                while (sent < self.per_client) if self.per_client is not None else (time.monotonic() < deadline):
                    sent += 1
                    with self._lock:
                        self.report.sent += 1
                    outcome = self._one(client, index, rng)
                    with self._lock:
                        self.report.outcomes.append(outcome)
                client.ping()  # anything still arriving for ended requests is now in the client's pending map
                strays = sum(len(q) for q in client._pending.values())
                with self._lock:
                    self.report.strays += strays
        except Exception as exc:  # recorded, and the run fails: nothing may be lost silently
            with self._lock:
                self.report.failures.append(f"client {index}: {exc.__class__.__name__}: {exc}")

    def _one(self, client: Client, index: int, rng: random.Random) -> Outcome:
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        prompt = rng.choice(PROMPTS)
        if kind == "plain":
            stream = client.generate(prompt, max_tokens=rng.choice((1, 2)))
        elif kind == "cache":
            stream = client.generate(prompt, cache=rng.choice(sorted(CACHES)), max_tokens=rng.choice((1, 2)))
        else:
            stream = client.generate(prompt, max_tokens=32)
            try:
                client.cancel(stream.request_id)
            except DaemonError as exc:
                if exc.name != "not_found":  # it had already ended: fine
                    raise
        result = stream.wait()
        stats = result.stats or {}
        if kind != "cancel" and result.finish_reason not in ("stop", "length"):
            raise AssertionError(f"request {stream.request_id} of client {index} ended {result.finish_reason}")
        service = stats["total_ms"] - stats["queue_ms"] if stats else None
        return Outcome(index, kind, stream.request_id, stream.position, stats.get("queue_ms"), service, result.finish_reason,
                       stats.get("cached_tokens", 0), time.monotonic())


def _usage(pids: list[int]) -> tuple[int, int]:
    """RSS (KiB) and open files of these processes together."""
    return sum(rss_kb(pid) for pid in pids), sum(fd_count(pid) for pid in pids)


def progress_line(report: Report) -> str:
    now, answered, rss, fds = report.samples[-1]
    elapsed = now - report.started
    return f"[{elapsed:7.0f} s] {answered} answered ({answered / max(elapsed, 1e-9):.1f}/s), RSS {rss / 1024:.1f} MiB, {fds} fds"


def summarize(report: Report) -> dict[str, Any]:
    """The figures of a run (what docs/reliability.md records)."""
    outcomes = report.outcomes
    waits = [o.queue_ms for o in outcomes if o.queue_ms is not None]
    services = [o.service_ms for o in outcomes if o.service_ms is not None]
    per_client: dict[int, list[float]] = {}
    for o in outcomes:
        if o.queue_ms is not None:
            per_client.setdefault(o.client, []).append(o.queue_ms)
    client_means = [statistics.fmean(v) for v in per_client.values() if v]
    by_kind: dict[str, int] = {}
    for o in outcomes:
        by_kind[o.kind] = by_kind.get(o.kind, 0) + 1
    before, after = report.counters_before, report.counters_after
    ended_on_daemon = sum(after.get(k, 0) - before.get(k, 0) for k in ("completed", "cancelled", "errors"))
    first_hundred = next((s for s in report.samples if s[1] >= 100), report.samples[-1])
    last = report.samples[-1]
    ids = [(o.client, o.request_id) for o in outcomes]
    elapsed = report.ended - report.started
    return {
        "clients": len({o.client for o in outcomes}),
        "sent": report.sent,
        "answered": len(outcomes),
        "lost": report.sent - len(outcomes),
        "duplicated": report.strays + len(ids) - len(set(ids)),
        "failures": len(report.failures),
        "daemon_ended": ended_on_daemon,
        "by_kind": by_kind,
        "cancelled": sum(o.finish_reason == "cancelled" for o in outcomes),
        "cache_hits": sum(o.kind == "cache" and o.cached_tokens > 0 for o in outcomes),
        "seconds": round(elapsed, 1),
        "per_second": round(len(outcomes) / elapsed, 2) if elapsed else 0,
        "queue_ms_avg": round(statistics.fmean(waits), 1) if waits else None,
        "queue_ms_p99": round(sorted(waits)[int(0.99 * (len(waits) - 1))], 1) if waits else None,
        "queue_ms_worst": round(max(waits), 1) if waits else None,
        "worst_over_avg": round(max(waits) / statistics.fmean(waits), 2) if waits and statistics.fmean(waits) > 0 else None,
        "client_mean_spread": round(max(client_means) / min(client_means), 2) if client_means and min(client_means) > 0 else None,
        "max_position": max((o.position for o in outcomes if o.position is not None), default=None),
        "service_ms_avg": round(statistics.fmean(services), 1) if services else None,
        "service_ms_max": round(max(services), 1) if services else None,
        "rss_mb_after_100": round(first_hundred[2] / 1024, 1),
        "rss_mb_end": round(last[2] / 1024, 1),
        "rss_growth_kb": last[2] - first_hundred[2],
        "states_growth_kb": (report.states_after - report.states_before) // 1024,
        "rss_mb_max": round(max(s[2] for s in report.samples) / 1024, 1),
        "fds_after_100": first_hundred[3],
        "fds_end": last[3],
    }
