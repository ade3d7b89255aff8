"""What the HTTP gateway adds: TTFT and decode rate through rkllmd-http vs through the socket.

One daemon, one gateway in front of it; the same greedy generation through the socket
with the real client and through HTTP (OpenAI's streamed /v1/chat/completions, read as
server-sent events with the standard library so the client's own cost stays small),
interleaved, in one run. Run: python bench/http_overhead.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import ROOT, print_overhead, running_daemon, words  # noqa: E402

from rkllmctl import Client  # noqa: E402


def through_socket(client: Client, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT ms as the caller sees it, decode tokens/s, completion tokens)."""
    started = time.perf_counter()
    stream = client.generate(messages=messages, max_tokens=max_tokens, temperature=0)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    ended = time.perf_counter()
    n = stream.result.stats["completion_tokens"]
    return (first - started) * 1000, (n - 1) / (ended - first), n


def through_http(url: urllib.parse.SplitResult, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, n = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
            first = time.perf_counter()
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
            ended = time.perf_counter()
    conn.close()
    return (first - started) * 1000, (n - 1) / (ended - first), n


def start_gateway(socket: Path) -> tuple[subprocess.Popen, urllib.parse.SplitResult, Path]:
    log = Path(tempfile.mkstemp(prefix="rkllmd-http-bench-", suffix=".log")[1])
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rkllmd_http", "--listen", "127.0.0.1:0", "--socket", str(socket), "--log-level", "info"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+?:\d+)", log.read_text())
        if found:
            return proc, urllib.parse.urlsplit(found.group(1)), log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"rkllmd-http did not start:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    messages = [{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}]

    sock_runs, http_runs = [], []
    with running_daemon() as daemon, Client(daemon.socket, timeout=60) as client:
        gateway, url, log = start_gateway(daemon.socket)
        try:
            through_socket(client, messages, 4)  # warm-up of both paths
            through_http(url, messages, 4)
            for _ in range(args.repeat):
                sock_runs.append(through_socket(client, messages, args.max_tokens))
                http_runs.append(through_http(url, messages, args.max_tokens))
        finally:
            gateway.terminate()
            gateway.wait(20)
            log.unlink()
    print_overhead("through the socket", "through HTTP", "HTTP", sock_runs, http_runs, args.prompt_tokens)


if __name__ == "__main__":
    main()
