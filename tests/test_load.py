"""Load (issue 6, item 2): 16 clients at once, 25 short generations each, nothing lost, fair, flat memory.

The mix is tests/load_mix.py's (class Mix), which bench/soak.py runs for half an hour: generations
of 1-2 tokens, about a third with a text cache, some cancelled right after sending.
"""

from __future__ import annotations

import pytest

from conftest import DaemonProcess
from load_mix import Mix, summarize
from reliability import figures_fixture

figures = figures_fixture()

CLIENTS, PER_CLIENT = 16, 25
RSS_GROWTH_LIMIT_KB = 4 * 1024


@pytest.fixture
def load_daemon():
    proc = DaemonProcess("--backend", "cpu", "--log-level", "warning").start()
    yield proc
    proc.cleanup()


def test_sixteen_clients_all_answered_in_fair_order_with_flat_memory(load_daemon: DaemonProcess, figures) -> None:
    report = Mix(load_daemon.socket, clients=CLIENTS, per_client=PER_CLIENT).run()
    s = summarize(report)
    figures.record("load", **{k: s[k] for k in (
        "clients", "sent", "answered", "lost", "duplicated", "failures", "cancelled", "cache_hits", "seconds",
        "queue_ms_avg", "queue_ms_worst", "worst_over_avg", "client_mean_spread", "max_position", "service_ms_avg", "service_ms_max",
        "rss_mb_after_100", "rss_growth_kb", "states_growth_kb", "fds_after_100", "fds_end")})
    print(f"\nqueue wait: worst {s['queue_ms_worst']} ms against an average of {s['queue_ms_avg']} ms "
          f"({s['worst_over_avg']}x); clients' mean waits within {s['client_mean_spread']}x of each other")
    assert report.failures == []
    assert s["sent"] == s["answered"] == CLIENTS * PER_CLIENT and s["lost"] == 0 and s["duplicated"] == 0
    assert s["daemon_ended"] == s["answered"]  # the daemon's own count: one ending per request
    assert s["by_kind"].keys() == {"plain", "cache", "cancel"} and s["cancelled"] > 0 and s["cache_hits"] > 0
    # Fair order: one generation per client at a time and a FIFO queue, so nobody ever waits
    # behind more than the 15 others, nor longer than those 15 generations take (no
    # starvation), and no client is served systematically later than another. (The worst
    # wait against the average is reported; it also measures how steady the machine was.)
    assert s["max_position"] <= CLIENTS - 1
    assert s["queue_ms_worst"] <= (s["max_position"] + 1) * s["service_ms_max"]
    assert s["client_mean_spread"] <= 2.0
    # Flat beyond the conversation states kept, which grow up to the memory budget by design.
    assert s["rss_growth_kb"] <= RSS_GROWTH_LIMIT_KB + s["states_growth_kb"], s
    assert s["fds_end"] <= s["fds_after_100"]
    with load_daemon.client() as client:
        status = client.status()
    assert status["worker"]["running"] is None and status["worker"]["queued"] == 0
    assert status["caches"]["memory"]["used_bytes"] <= status["caches"]["memory"]["budget_bytes"]
    assert status["counters"]["replies_dropped"] == 0 and status["counters"]["clients_gone"] == 0
