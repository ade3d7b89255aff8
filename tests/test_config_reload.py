"""SIGHUP with a changed configuration file: each component applies its own section, and a
file with one invalid value is refused whole (nothing of it applied, the running
configuration kept, the daemon serving)."""

from __future__ import annotations

import signal
from pathlib import Path

from reliability import poll


def write(path: Path, max_queue: int, max_tokens: int, budget_mb: int, slow_client_timeout: float = 10.0) -> None:
    path.write_text(
        f"[daemon]\nmax_queue = {max_queue}\nslow_client_timeout = {slow_client_timeout}\n"
        f"[sampling]\nmax_tokens = {max_tokens}\n[cache]\nmemory_budget_mb = {budget_mb}\n"
    )


def reload(daemon, marker: str) -> None:
    """SIGHUP, then wait for the log line that says how it went."""
    seen = daemon.log().count(marker)
    daemon.signal(signal.SIGHUP)
    poll(lambda: daemon.log().count(marker) > seen, 60, f"log line {marker!r} after SIGHUP")


def limits(daemon) -> tuple[int, int]:
    with daemon.client() as client:
        status = client.status()
    return status["limits"]["max_queue"], status["caches"]["memory"]["budget_bytes"]


def test_reload_applies_each_section_and_refuses_an_invalid_file_whole(make_daemon, tmp_path: Path) -> None:
    config = tmp_path / "rkllmd.toml"
    write(config, max_queue=5, max_tokens=6, budget_mb=128)
    daemon = make_daemon("--config", str(config))
    assert limits(daemon) == (5, 128 << 20)

    write(config, max_queue=7, max_tokens=2, budget_mb=64)
    reload(daemon, "configuration reloaded")
    assert limits(daemon) == (7, 64 << 20)
    with daemon.client() as client:  # the new sampling default, without max_tokens in the request
        result = client.generate("Tell me a story about a dragon.").wait()
    assert result.finish_reason == "length" and result.stats["completion_tokens"] == 2

    # One bad value among good ones: none of them applies.
    write(config, max_queue=-1, max_tokens=3, budget_mb=32)
    reload(daemon, "reload refused")
    assert "daemon.max_queue" in daemon.log().rsplit("reload refused", 1)[1].splitlines()[0]
    assert limits(daemon) == (7, 64 << 20)
    with daemon.client() as client:
        assert client.generate("Tell me a story about a dragon.").wait().stats["completion_tokens"] == 2

    # A cross-section rule: a default above the limit requests are held to.
    config.write_text("[daemon]\nmax_tokens_limit = 100\n[sampling]\nmax_tokens = 200\n")
    reload(daemon, "reload refused")
    assert limits(daemon) == (7, 64 << 20)
    with daemon.client() as client:
        assert client.ping()["pong"] is True
