"""One runner process per loaded model (issue 23 item 6): a crash in a model's code ends that
model's requests with ``backend``, never the daemon; other models and their streams go on;
the model's next request runs on a new runner.

The crashes are real: a CPU runner (the bundled SmolLM2) killed with SIGKILL in the middle of
a stream, and the fake NPU runtime (tests/fake_rkllm, a real C library) raising SIGSEGV
inside ``rkllm_run`` on a prompt holding "[[fake:segfault]]". Runner pids come from status
(``models.loaded[].pid``).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import DaemonProcess
from gguf_files import tiny_llama
from reliability import poll
from rkllmctl.errors import DaemonError
from test_rkllm_daemon import NpuDaemon

DEFAULT = "smollm2-135m-instruct"


def pids(client) -> dict[str, int]:
    return {model["name"]: model["pid"] for model in client.status()["models"]["loaded"]}


def alive(pid: int) -> bool:
    """Running (not ended, nor a zombie no one has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def crash_of(stream) -> DaemonError:
    """The error a stream ended with (it must end with one)."""
    with pytest.raises(DaemonError) as ended:
        stream.wait()
    return ended.value


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rkllmd.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "alpha.gguf", seed=1)


def test_each_loaded_model_runs_in_a_runner_process_of_its_own(make_daemon, tiny, tmp_path) -> None:
    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny}"\n')))
    with proc.client() as client:
        client.generate("Hi", model="alpha", max_tokens=4, temperature=0).wait()
        runners = pids(client)
    assert set(runners) == {DEFAULT, "alpha"}
    daemon_pid = proc.proc.pid
    assert len({daemon_pid, *runners.values()}) == 3
    for pid in runners.values():  # the daemon's children, running the runner module
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"rkllmd.runner"]
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == daemon_pid
    assert proc.stop() == 0
    for pid in runners.values():  # they end with the daemon
        poll(lambda: not alive(pid), 10, f"runner {pid} ends with the daemon")


def test_a_runner_holds_nothing_of_the_daemons_but_its_link(make_daemon, tmp_path) -> None:
    """No ZeroMQ socket, no systemd notify socket: its one socket is its link to the daemon;
    the daemon alone talks to systemd (here a notify socket the test listens on)."""
    address = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # each datagram says who sent it
    listener.settimeout(30)
    senders: set[int] = set()
    with listener:
        proc = make_daemon(env={"NOTIFY_SOCKET": str(address)})
        while True:  # EXTEND_TIMEOUT_USEC= while the model loads, then READY=1
            data, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(12))
            senders.add(struct.unpack("3i", ancillary[0][2])[0])
            if b"READY=1" in data:
                break
        with proc.client() as client:
            runner = pids(client)[DEFAULT]
    assert senders == {proc.proc.pid}
    links = [os.readlink(f"/proc/{runner}/fd/{fd}") for fd in os.listdir(f"/proc/{runner}/fd")]
    assert len([link for link in links if link.startswith("socket:")]) == 1, links
    environ = Path(f"/proc/{runner}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
    assert f"NOTIFY_SOCKET={address}".encode() in Path(f"/proc/{proc.proc.pid}/environ").read_bytes().split(b"\0")


def test_daemon_runners_thread_runs_the_models_in_the_daemons_process(make_daemon, tiny, tmp_path) -> None:
    """The in-process mode stays available: both models answer, in the daemon's own pid."""
    cfg = config(tmp_path, f'[daemon]\nrunners = "thread"\n[models.alpha]\npath = "{tiny}"\n')
    proc = make_daemon("--config", str(cfg))
    with proc.client() as client:
        assert client.generate("Hi", model="alpha", max_tokens=4, temperature=0).wait().text
        assert client.generate("Hi", max_tokens=4, temperature=0).wait().text
        assert pids(client) == {DEFAULT: proc.proc.pid, "alpha": proc.proc.pid}


def test_runners_die_with_a_daemon_killed_with_sigkill(make_daemon, tiny, tmp_path) -> None:
    """PR_SET_PDEATHSIG: no runner outlives its daemon (a restarted service starts clean)."""
    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny}"\n')))
    with proc.client() as client:
        client.load("alpha")
        runners = poll(lambda: found if len(found := pids(client)) == 2 else None, 30, "two runners")
    proc.signal(signal.SIGKILL)
    proc.wait()
    for pid in runners.values():
        poll(lambda: not alive(pid), 10, f"runner {pid} dies with its daemon")


def test_a_cpu_runner_killed_mid_stream_fails_only_its_requests(make_daemon, tiny, tmp_path) -> None:
    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny}"\n')))
    with proc.client() as client, proc.client() as other:
        reference = other.generate("Tell me a story", model="alpha", max_tokens=200, temperature=0).wait()
        before = pids(client)
        doomed = client.generate("Write a long poem about the sea.", max_tokens=400, temperature=0)
        first = next(iter(doomed))  # mid-stream: it has produced text
        assert first
        alongside = client.generate("And another one.", max_tokens=50, temperature=0)
        beside = other.generate("Tell me a story", model="alpha", max_tokens=200, temperature=0)
        os.kill(before[DEFAULT], signal.SIGKILL)
        for stream in (doomed, alongside):
            error = crash_of(stream)
            assert error.name == "backend", error
            assert f"the runner of model {DEFAULT} died: signal 9 (SIGKILL)" in error.message
        # The other model's stream, running meanwhile in its own runner, is untouched.
        assert beside.wait().text == reference.text
        # The default model (never unloaded) has a new runner; its next request succeeds.
        after = poll(lambda: pids(client).get(DEFAULT), 120, "a new runner for the default model")
        assert after != before[DEFAULT] and not alive(before[DEFAULT])
        again = client.generate("Say hello.", max_tokens=8, temperature=0).wait()
        assert again.text and again.finish_reason in ("stop", "length")
        assert pids(client)["alpha"] == before["alpha"]
    assert proc.proc.poll() is None  # the daemon never went down
    log = proc.log()
    assert f"the runner of model {DEFAULT} (pid {before[DEFAULT]}) died: signal 9 (SIGKILL)" in log


def test_an_embed_request_on_a_runner_that_dies_ends_with_backend_and_the_next_one_is_answered(make_daemon) -> None:
    proc = make_daemon()
    with proc.client() as client, proc.client() as watcher:
        expected = client.embed("the tide is high")["embeddings"]
        before = pids(client)[DEFAULT]
        long = client.send("embed", input=["the tide is high and the ships sail at dawn " * 300])  # ~3,000 tokens: seconds of passes
        poll(lambda: watcher.status()["worker"]["running"] == "embed", 60, "the embedding running", interval=0.005)
        os.kill(before, signal.SIGKILL)
        with pytest.raises(DaemonError) as ended:
            client.result_of(long, 60)
        assert ended.value.name == "backend" and f"the runner of model {DEFAULT} died: signal 9 (SIGKILL)" in ended.value.message
        assert client.embed("the tide is high")["embeddings"] == expected  # on a new runner, the same bits
        assert pids(client)[DEFAULT] != before


def test_another_models_runner_killed_is_unloaded_and_loads_again_on_its_next_request(make_daemon, tiny, tmp_path) -> None:
    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny}"\n')))
    with proc.client() as client:
        expected = client.generate("Hi there", model="alpha", max_tokens=16, temperature=0).wait().text
        before = pids(client)
        os.kill(before["alpha"], signal.SIGKILL)
        poll(lambda: "alpha" not in pids(client), 30, "the model whose runner died is unloaded")
        assert client.generate("Hi there", model="alpha", max_tokens=16, temperature=0).wait().text == expected
        after = pids(client)
        assert after["alpha"] != before["alpha"] and after[DEFAULT] == before[DEFAULT]
    assert proc.proc.poll() is None


@pytest.fixture
def npu_pair(fake_runtime, tmp_path):
    """A daemon on the fake NPU runtime serving two .rkllm models, each in its runner."""
    other = tmp_path / "other.rkllm"
    from fake_rkllm.build import write_model

    write_model(other, "another fake .rkllm model\n")
    proc = NpuDaemon(fake_runtime["1.3"], "--config", str(config(tmp_path, f'[models.other]\npath = "{other}"\n')), decode_us=20_000)
    try:
        yield proc.start()
    finally:
        proc.cleanup()


def test_a_segfault_in_the_npu_runtime_fails_only_that_models_requests(npu_pair: DaemonProcess) -> None:
    proc = npu_pair
    with proc.client() as client, proc.client() as other:
        beside = other.generate("[[fake:endless]] keep going", model="other", max_tokens=60, temperature=0)
        assert next(iter(beside))
        before = pids(client)
        default = client.status()["models"]["default"]
        doomed = client.generate("[[fake:segfault]] this prompt crashes the runtime", max_tokens=50)
        error = crash_of(doomed)
        assert error.name == "backend", error
        assert f"the runner of model {default} died: signal 11 (SIGSEGV)" in error.message
        assert doomed.result is None
        ended = beside.wait()  # the other model's runner went on streaming
        assert ended.finish_reason == "length" and ended.stats["completion_tokens"] == 60
        after = poll(lambda: pids(client).get(default), 60, "a new runner for the default model")
        assert after != before[default] and pids(client)["other"] == before["other"]
        assert client.generate("are you back?", max_tokens=20).wait().text == "echo: are you back?"
    assert proc.proc.poll() is None
    log = proc.log()
    assert "fake-rkllm: rkllm_run: the prompt asked for a segfault" in log
    assert "Fatal Python error: Segmentation fault" in log  # the runner's faulthandler said where
    assert f"the runner of model {default} (pid {before[default]}) died: signal 11 (SIGSEGV)" in log


def test_a_segfault_in_another_npu_model_unloads_it_and_its_next_request_loads_it_again(npu_pair: DaemonProcess) -> None:
    proc = npu_pair
    with proc.client() as client:
        assert client.generate("first", model="other", max_tokens=10).wait().text == "echo: first"
        before = pids(client)
        error = crash_of(client.generate("[[fake:segfault]] now", model="other", max_tokens=10))
        assert error.name == "backend" and "the runner of model other died: signal 11 (SIGSEGV)" in error.message
        poll(lambda: "other" not in pids(client), 30, "the model whose runner died is unloaded")
        assert client.generate("second", model="other", max_tokens=10).wait().text == "echo: second"
        assert client.generate("default still", max_tokens=10).wait().text == "echo: default still"
        after = pids(client)
        assert after["other"] != before["other"] and after[client.status()["models"]["default"]] == before[client.status()["models"]["default"]]


def test_a_default_runner_that_dies_twice_as_it_starts_waits_for_the_next_request(npu_pair: DaemonProcess) -> None:
    """A runtime that crashes a runner soon after each start (a cache build that segfaults,
    say) must not be restarted in a loop: after two quick deaths in a row, the next request
    starts the new runner."""
    proc = npu_pair
    with proc.client() as client:
        default = client.status()["models"]["default"]
        for _ in range(2):  # the first runner (just started), then its quick replacement
            poll(lambda: pids(client).get(default), 60, "a runner for the default model")
            error = crash_of(client.generate("[[fake:segfault]] again", max_tokens=10))
            assert error.name == "backend" and "died: signal 11 (SIGSEGV)" in error.message
        time.sleep(1)
        assert pids(client)[default] is None  # none was started
        assert client.status()["healthy"] is True
        assert client.generate("back on request", max_tokens=10).wait().text == "echo: back on request"
        assert pids(client)[default] is not None
    assert "it and the one before lived under 10 s: the next request starts a new one" in proc.log()


def test_a_runner_that_does_not_answer_holds_up_neither_the_socket_nor_other_clients(make_daemon) -> None:
    """status and models ask each runner (a bounded wait each) off the socket loop: with the
    default model's runner stopped (SIGSTOP), a status request waits, yet ping is answered
    at once meanwhile; once the runner goes on, status answers."""
    proc = make_daemon()
    with proc.client() as asking, proc.client() as pinging:
        runner = pids(asking)[DEFAULT]
        os.kill(runner, signal.SIGSTOP)
        try:
            status = asking.send("status")
            listing = asking.send("models")
            time.sleep(0.3)  # both are waiting for the runner
            for _ in range(5):
                started = time.monotonic()
                pinging.ping()
                assert time.monotonic() - started < 0.5
        finally:
            os.kill(runner, signal.SIGCONT)
        assert asking.result_of(status, 120)["models"]["loaded"][0]["pid"] == runner
        assert asking.result_of(listing, 120)["default"] == DEFAULT


def test_a_workers_summary_holds_while_its_backend_closes(tiny) -> None:
    """A runner's summary thread sums the worker up after every change, the last ones while
    the runner stops and the worker closes its backend: it named the model by asking the
    backend, which raised "the CPU backend's model is not loaded" (an ERROR with a traceback
    in the journal at each stop)."""
    from rkllmd.backends.cpu.backend import CpuBackend
    from rkllmd.config import DaemonConfig
    from rkllmd.outbox import Outbox
    from rkllmd.worker import ModelWorker

    backend = CpuBackend(tiny)
    backend.load()
    worker = ModelWorker(backend, Outbox(), DaemonConfig())
    before = worker.summary()
    backend.close()
    assert worker.summary() == before
    assert before["model"] == "alpha on cpu"


def test_a_runners_token_frames_are_paced_and_the_held_text_goes_before_the_end() -> None:
    """A runner sent a frame per token between two decode steps: pickled and sent from a
    cold cache, it cost 140 us of the 400 us between steps. Token text is paced as the
    daemon paces it: the first piece at once, later text joined until due, and whatever is
    held goes, in order, before the message that ends the stream."""
    from rkllmd.outbox import Generation
    from rkllmd.runner.channel import Channel
    from rkllmd.runner.child import ForwardingOutbox, SummaryPusher
    from rkllmd.sampling import SamplingParams

    ours, theirs = socket.socketpair()
    channel, daemon_end = Channel(ours), Channel(theirs)
    outbox = ForwardingOutbox(channel, SummaryPusher(channel))
    gen = Generation(b"client", 7, SamplingParams(), None, True, time.monotonic())
    outbox.stream(gen, "token", text="Hel")
    outbox.stream(gen, "token", text="lo", logprobs=[{"token": "lo"}])
    outbox.stream(gen, "token", text=" world", logprobs=[{"token": " world"}])
    outbox.stream(gen, "done", finish_reason="stop")
    frames = [daemon_end.receive() for _ in range(3)]
    assert frames == [
        ("stream", 7, "token", {"text": "Hel"}),
        ("stream", 7, "token", {"text": "lo world", "logprobs": [{"token": "lo"}, {"token": " world"}]}),
        ("stream", 7, "done", {"finish_reason": "stop"}),
    ]
    ours.close()
    theirs.close()


def test_a_runners_paced_token_text_wakes_the_socket_loop_at_once() -> None:
    """The daemon paced a runner's token frames again: a frame that came a little under an
    interval after the loop's last wake waited for the next one, so text reached the client
    80 ms apart instead of 40. A runner's frames (``forward``) wake the loop at once; text
    the worker thread streams itself (``stream``) is paced as before."""
    import select

    from rkllmd.outbox import Generation, Outbox
    from rkllmd.sampling import SamplingParams

    def woken(outbox: Outbox) -> bool:
        readable = bool(select.select([outbox], [], [], 0)[0])
        outbox.take()  # what the loop does on a wake: the pipe empties
        return readable

    for forwarded in (True, False):
        outbox = Outbox()
        gen = Generation(b"client", 1, SamplingParams(), None, True, time.monotonic())
        wakes = []
        for text in ("a", "b", "c"):
            if forwarded:
                outbox.forward(gen, "token", {"text": text})
            else:
                outbox.stream(gen, "token", text=text)
            wakes.append(woken(outbox))
        assert wakes == ([True, True, True] if forwarded else [True, False, False])
        outbox.close()
