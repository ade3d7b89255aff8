"""rkllmd-http under real traffic: disconnects, a restarting daemon, a full queue, concurrency,
API keys, the body limit, CORS, /health and /metrics."""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import reference_cases
from http_gateway import GatewayProcess
from reliability import poll

CAPITAL = next(c for c in reference_cases() if c["messages"][-1]["content"] == "What is the capital of France?")
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]  # greedy SmolLM2 runs on for hundreds of tokens


def openai_client(gateway, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=300, **kwargs)


def open_stream(gateway, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed chat completion, read up to its first content chunk."""
    url = urllib.parse.urlsplit(gateway.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    body = {"model": "smollm2-135m-instruct", "messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    next_piece(response)
    return conn, response


def next_piece(response: http.client.HTTPResponse) -> None:
    while b'"content":"' not in response.readline():
        pass


def wait_idle(daemon, timeout: float = 60) -> float:
    started = time.monotonic()
    with daemon.client() as client:
        while time.monotonic() - started < timeout:
            if client.status()["worker"]["running"] is None:
                return time.monotonic() - started
            time.sleep(0.01)
    raise AssertionError(f"the daemon still generates {timeout} s after the HTTP client left")


def test_a_client_leaving_mid_stream_cancels_its_generation(daemon, gateway) -> None:
    with daemon.client() as client:
        before = client.status()["counters"]
    conn, response = open_stream(gateway, max_tokens=400)
    paced = time.monotonic()
    for _ in range(5):
        next_piece(response)
    step = (time.monotonic() - paced) / 5  # the pace of one decode step
    conn.sock.close()  # the HTTP client goes away without a word
    conn.close()
    idle_after = wait_idle(daemon)
    with daemon.client() as client:
        after = client.status()["counters"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    print(f"disconnect -> daemon idle: {idle_after * 1000:.0f} ms (one decode step: {step * 1000:.0f} ms)")
    # Within a second, plus the decode step the daemon finishes before it looks (a loaded machine slows that).
    assert idle_after < 1.0 + 2 * step


def test_a_client_that_resets_mid_answer_is_no_server_error(make_daemon) -> None:
    """The reset is seen by the write of the answer rather than by aiohttp's reader, as
    happens when a token and the reset arrive together: here the reader is paused by
    pipelined requests (aiohttp stops reading past 32 of them) and the request waits in
    the daemon's queue behind another until after the reset. A client leaving, not a 500
    nor a traceback; its generation cancelled; counted as cancelled."""
    daemon = make_daemon(env={"RKLLMD_MAX_BATCH": "1"})
    gateway = GatewayProcess(daemon.socket).start()
    host, port = urllib.parse.urlsplit(gateway.url).netloc.split(":")
    requests = {
        "/v1/chat/completions": {"model": "smollm2-135m-instruct", "messages": STORY, "max_tokens": 50, "stream": True},
        "/api/chat": {"model": "smollm2-135m-instruct", "messages": STORY, "options": {"num_predict": 50}},
    }
    try:
        with daemon.client() as rk:
            for path, body in requests.items():
                before = rk.status()["counters"]
                blocker = rk.generate(messages=STORY, max_tokens=2000)  # holds the one slot
                next(iter(blocker))
                data = json.dumps(body).encode()
                client = socket.create_connection((host, int(port)))
                client.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 40)
                poll(lambda: rk.status()["worker"]["queued"] == 1, 60, "the request queued behind the other")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # a reset, with the answer's first token still to come
                blocker.cancel()
                counted = poll(lambda: re.findall(f'_total{{route="{path}",status="(\\w+)"}}', metrics(gateway)), 60, f"{path} counted")
                assert counted == ["cancelled"], gateway.log()
                poll(lambda: rk.status()["counters"]["cancelled"] == before["cancelled"] + 2, 60, "its generation cancelled")
                assert rk.status()["counters"]["completed"] == before["completed"]
        log = gateway.log()
        for path in requests:
            assert f"POST {path}: the client left before its answer ended (" in log  # seen by the write
        assert "Traceback" not in log and '" 500 ' not in log and 'status="500"' not in metrics(gateway)
    finally:
        gateway.cleanup()


def metrics(gateway) -> str:
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=30) as reply:
        return reply.read().decode()


def test_concurrent_requests_are_all_served_exactly(daemon, gateway) -> None:
    with openai_client(gateway) as client, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda _: client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=48, temperature=0), range(4)))
    assert [r.choices[0].message.content for r in replies] == [CAPITAL["completion"]] * 4
    assert len({r.id for r in replies}) == 4


def test_a_restarting_daemon_ends_requests_in_flight_clearly_and_serves_new_ones(make_daemon) -> None:
    daemon = make_daemon(env={"RKLLMD_MAX_QUEUE": "1", "RKLLMD_MAX_BATCH": "1"})  # one running, one waiting
    gateway = GatewayProcess(daemon.socket).start()
    try:
        with openai_client(gateway) as client:
            conn, response = open_stream(gateway, max_tokens=400)
            queued = http.client.HTTPConnection(*urllib.parse.urlsplit(gateway.url).netloc.split(":"), timeout=300)
            queued.request("POST", "/v1/chat/completions", json.dumps({"model": "smollm2-135m-instruct", "messages": STORY, "max_tokens": 2}),
                           {"Content-Type": "application/json"})
            with daemon.client() as rk:
                deadline = time.monotonic() + 30
                while rk.status()["worker"]["queued"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as full:  # running one, queued one: max_queue is 1
                client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=2)
            assert full.value.body["code"] == "queue_full" and full.value.response.headers["Retry-After"] == "1"

            daemon.proc.kill()  # no goodbye: the gateway learns it from the connection
            daemon.proc.wait(10)
            rest = response.read().decode()
            assert '"error"' in rest and "closed the connection" in rest and "[DONE]" not in rest
            answer = queued.getresponse()
            assert answer.status == 503 and "closed the connection" in json.loads(answer.read())["error"]["message"]
            with pytest.raises(openai.APIStatusError) as down:
                client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=2)
            assert down.value.status_code == 503 and down.value.body["code"] == "daemon_unavailable"

            daemon.start()  # the same socket: the gateway reconnects by itself
            reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=48, temperature=0)
            assert reply.choices[0].message.content == CAPITAL["completion"]
            conn.close()
            queued.close()
    finally:
        gateway.cleanup()


@pytest.fixture(scope="module")
def guarded(daemon, tmp_path_factory):
    """A gateway with API keys, CORS for one origin and a small body limit."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# one key a line\nfirst-key\n\nsecond-key\n")
    proc = GatewayProcess(daemon.socket, "--api-key-file", str(keys), "--cors-origins", "https://app.example",
                          env={"RKLLMD_HTTP_MAX_BODY_BYTES": "4096"}).start()
    yield proc
    proc.cleanup()


def test_api_keys_are_required_when_configured(guarded) -> None:
    for key in ("first-key", "second-key"):
        with openai_client(guarded, api_key=key) as client:
            assert client.models.list().data
    for key in ("wrong", "first-key2", "first-ke"):
        with openai_client(guarded, api_key=key) as client, pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
        assert refused.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as ollama_refused:
        urllib.request.urlopen(guarded.url + "/api/tags", timeout=30)
    assert ollama_refused.value.code == 401 and "error" in json.loads(ollama_refused.value.read())
    with urllib.request.urlopen(guarded.url + "/health", timeout=30) as health:  # probes need no key
        assert json.loads(health.read())["status"] == "ok"


def test_bodies_over_the_limit_are_refused(guarded) -> None:
    with openai_client(guarded, api_key="first-key") as client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "x" * 5000}])
    assert refused.value.status_code == 413


def test_cors_only_for_configured_origins(gateway, guarded) -> None:
    def headers(proc, origin: str, method: str = "GET") -> dict:
        request = urllib.request.Request(proc.url + "/v1/models", method=method, headers={
            "Origin": origin, "Authorization": "Bearer first-key", "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return {"status": response.status, **response.headers}

    assert headers(guarded, "https://app.example")["Access-Control-Allow-Origin"] == "https://app.example"
    preflight = headers(guarded, "https://app.example", "OPTIONS")
    assert preflight["status"] == 204 and "POST" in preflight["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Origin" not in headers(guarded, "https://evil.example")
    assert "Access-Control-Allow-Origin" not in headers(gateway, "https://app.example")  # off by default


def test_health_and_metrics(gateway) -> None:
    with openai_client(gateway) as client:
        for _ in range(2):  # the second restores the first's conversation state
            client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=3, temperature=0)
    with urllib.request.urlopen(gateway.url + "/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["daemon"]["protocol"][0] == 1
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['rkllmd_http_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert samples["rkllmd_http_ttft_seconds_count"] >= 1 and samples["rkllmd_http_time_per_output_token_seconds_count"] >= 1
    assert samples['rkllmd_http_tokens_total{kind="completion"}'] >= 3
    assert samples['rkllmd_http_prompt_cache_total{result="conversation"}'] >= 1
    assert samples["rkllmd_up"] == 1 and samples["rkllmd_queue_depth"] == 0
    assert 'rkllmd_http_generations_total{api="openai",finish_reason="length"}' in samples


def test_health_says_when_the_daemon_is_gone(tmp_path) -> None:
    proc = GatewayProcess(tmp_path / "absent.sock").start()
    try:
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(proc.url + "/health", timeout=30)
        assert down.value.code == 503 and "no rkllmd socket" in json.loads(down.value.read())["error"]
    finally:
        proc.cleanup()
