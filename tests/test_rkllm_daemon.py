"""The daemon end to end on the NPU backend, with the fake vendor runtime of each interface generation.

The real ``rkllmd --backend rkllm`` runs on tests/fake_rkllm's librkllmrt.so (built for
the 1.2 and the 1.3 interface) and a fake ``.rkllm`` model file; requests go through the
real ``rkllmctl.Client`` and the ``rkllmctl`` command line. The fake logs every call it
receives (FAKE_RKLLM_LOG), so the tests check which runtime calls a request caused, in
which order. The fake's behaviour these tests rely on (tests/fake_rkllm/fake_rkllm.c):
a token is one byte of the prompt; the reply is "echo: " + the last user turn, one word
per token, a multi-byte character split across a WAITING and a NORMAL callback;
"[[fake:error]]" ends the run with an ERROR callback and code -2003; "[[fake:endless]]"
repeats the reply until a limit or an abort; a prompt cache file holds the prompt it
was saved from, and a loaded cache is matched byte by byte against the next prompt
(``matched=`` in the log), so a cache whose content was altered shows up as a short match.

``--backend auto`` needs an NPU device node. The tests that exercise it run the daemon in
a private mount namespace (tests/private_dev.py: ``unshare -m``, root only) whose /dev
holds the usual nodes and, for the NPU case, /dev/rknpu: a character device with the
numbers of /dev/null that ``detect()`` finds and may open, as it would the driver's node
on a board.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import private_dev
import pytest
from fake_rkllm.build import ERRORS, RELEASE, foreign_elf, write_model, write_tokenizer

from conftest import ROOT, DaemonProcess, rkllmctl
from rkllmctl import DaemonError
from rkllmd.backends.rkllm import library as lib_module
from rkllmd.templates import get_template

GENERATIONS = ("1.2", "1.3")
TEMPLATE = get_template("qwen2.5-instruct")  # rkllm.template's default: the daemon renders it
TERSE = "You are terse. Answer in one line."
VERBOSE = "You are verbose. Explain every step at length."


# --- the fake's call log -------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    name: str
    args: dict[str, str]
    failed: bool = False


class CallLog:
    """FAKE_RKLLM_LOG of one daemon: ``mark()`` now, ``since(mark)`` later."""

    def __init__(self, path: Path):
        self.path = path

    def all(self) -> list[Call]:
        calls = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            name, *words = line.split(" ")
            args = dict(w.split("=", 1) for w in words if "=" in w)
            calls.append(Call(name, args, "FAILED" in words))
        return calls

    def mark(self) -> int:
        return len(self.all())

    def since(self, mark: int) -> list[Call]:
        return self.all()[mark:]


def cache_calls(calls: list[Call]) -> list[tuple[str, str]]:
    """The prompt-cache calls and the runs among ``calls``, with the cache path where there is one."""
    wanted = ("rkllm_load_prompt_cache", "rkllm_release_prompt_cache", "rkllm_run")
    return [(c.name, c.args.get("path", "")) for c in calls if c.name in wanted]


def runs(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.name == "rkllm_run"]


def ends(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.name == "rkllm_run_end"]


# --- daemons on the fake runtime ---------------------------------------------------------------
class NpuDaemon(DaemonProcess):
    """``rkllmd --backend rkllm`` on a fake library, with its own fake model and call log.

    ``model_flag=False`` leaves ``--model`` off (configure the model by environment);
    ``namespace`` None runs it directly, True/False in a private /dev with/without /dev/rknpu.
    """

    def __init__(
        self,
        library: Path,
        *extra: str,
        backend: str = "rkllm",
        env: dict[str, str] | None = None,
        model_text: str = "a fake .rkllm model\n",
        model_flag: bool = True,
        namespace: bool | None = None,
        decode_us: int = 0,
        prefill_us: int = 0,
    ):
        folder = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
        self.model = folder / "fake.rkllm"
        write_model(self.model, model_text)
        self.calls = CallLog(folder / "calls.log")
        self.namespace = namespace
        env = {
            "RKLLMD_RKLLM_LIBRARY": str(library),
            "FAKE_RKLLM_LOG": str(self.calls.path),
            "FAKE_RKLLM_DECODE_US": str(decode_us),
            "FAKE_RKLLM_PREFILL_US": str(prefill_us),
            **(env or {}),
        }
        model = ("--model", str(self.model)) if model_flag else ()
        super().__init__("--backend", backend, *model, *extra, env=env, folder=folder)

    def command(self) -> list[str]:
        if self.namespace is None:
            return super().command()
        return [*private_dev.prefix("0666" if self.namespace else None), *super().command()]

    def state_file(self, name: str) -> Path:
        [path] = self.binary_dir.rglob(f"{name}.state")
        return path


@pytest.fixture(scope="module", params=GENERATIONS)
def generation(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def served(fake_runtime, generation) -> NpuDaemon:
    """One daemon per interface generation for the tests that leave it as they found it.

    2 ms per generated token: endless generations are still streaming when cancelled.
    """
    proc = NpuDaemon(fake_runtime[generation], decode_us=2000)
    try:
        yield proc.start()
    finally:
        proc.cleanup()


@pytest.fixture
def make_daemon_on() -> Callable[..., NpuDaemon]:
    """Private daemons: ``make_daemon_on(library, *extra, start=True, **NpuDaemon options)``."""
    made: list[NpuDaemon] = []

    def make(library: Path, *extra: str, start: bool = True, **kwargs) -> NpuDaemon:
        proc = NpuDaemon(library, *extra, **kwargs)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.cleanup()


@pytest.fixture
def make_npu(make_daemon_on, fake_runtime, generation) -> Callable[..., NpuDaemon]:
    """Private daemons on this generation's fake library."""
    return lambda *extra, **kwargs: make_daemon_on(fake_runtime[generation], *extra, **kwargs)


def poll(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` is true; fail after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def prompt_of(user: str, system: str | None = None) -> bytes:
    """The prompt the daemon sends the runtime (the fake counts a token per byte)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return TEMPLATE.render(messages).encode()


def prefix_of(system: str) -> bytes:
    return TEMPLATE.cacheable_prefix(system).encode()


def flip_byte_of_the_prefix(state: Path) -> None:
    """Alter one byte of the cached prompt text, keeping the size and the fake's header valid:
    a runtime given this file would accept it (and match fewer bytes)."""
    data = bytearray(state.read_bytes())
    assert data.startswith(b"FAKE-RKLLM-PROMPT-CACHE ")
    data[-4] ^= 0x20  # the "d" of the final "<|im_end|>\n" becomes "D"
    state.write_bytes(bytes(data))


# --- streaming -----------------------------------------------------------------------------------
def test_stream_is_exact_ordered_and_ends_with_the_runtime_stats(served, generation):
    user = "héllo wörld ☃!"
    prompt = prompt_of(user)
    mark = served.calls.mark()
    with served.client() as client:
        request_id = client.send("generate", prompt=user)
        messages = [client.receive(request_id, timeout=10)]
        while messages[-1]["type"] not in ("done", "error"):
            messages.append(client.receive(request_id, timeout=10))
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    kinds = [m["type"] for m in messages]
    assert kinds[:3] == ["queued", "started", "progress"] and kinds[-1] == "done" and set(kinds[3:-1]) == {"token"}
    # The NPU's prefill is one native call: one progress message, as it ends.
    assert messages[2]["phase"] == "prefill" and messages[2]["done"] == messages[2]["total"] > 0
    texts = [m["text"] for m in messages[3:-1]]
    assert "".join(texts) == "echo: héllo wörld ☃!"
    # Tokens as the fake sends them, the WAITING byte held back until its character is whole;
    # token messages may join several (coalescing), never split one.
    pieces = ["echo: ", "h", "éllo ", "w", "örld ", "☃!"]
    boundaries = {sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces) + 1)}
    assert {sum(len(t) for t in texts[:i]) for i in range(1, len(texts) + 1)} <= boundaries

    done = messages[-1]
    assert (done["finish_reason"], done["cache"], done["reason"]) == ("stop", None, None)
    stats = done["stats"]
    calls = served.calls.since(mark)
    assert [c.name for c in calls] == ["rkllm_clear_kv_cache", "rkllm_run", "rkllm_run_end", "rkllm_get_kv_cache_size"]
    [run], [end] = runs(calls), ends(calls)
    assert run.args["prompt_len"] == str(len(prompt)) and run.args["keep_history"] == "1"
    assert run.args["save_prompt_cache"] == "0" and run.args["kv_before"] == "0"
    if generation == "1.3":  # the request's limit and (greedy) sampling travel with the run
        assert run.args["limit"] == "256" and run.args["sampling"].startswith("top_k:1,")
    else:  # 1.2 has neither: the runtime's cap from init; the daemon stops at max_tokens itself
        assert run.args["limit"] == "1024" and "sampling" not in run.args
    # The FINISH callback's numbers: 7 callbacks (the WAITING one counts), every byte prefilled.
    assert (end.args["reason"], end.args["tokens"], end.args["prefill_tokens"]) == ("eos", "7", str(len(prompt)))
    assert stats["prompt_tokens"] == len(prompt) and stats["cached_tokens"] == 0
    assert stats["completion_tokens"] == 7
    assert stats["decode_ms"] >= 6 * 2.0  # 2 ms per token, measured by the runtime
    assert stats["decode_tps"] > 0 and stats["total_ms"] >= stats["ttft_ms"] > 0


def test_cli_generate_and_status(served, generation):
    out = rkllmctl("generate", "héllo wörld ☃!", socket=served.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "echo: héllo wörld ☃!\n"
    prompt_tokens = len(prompt_of("héllo wörld ☃!"))
    assert f"finish: stop; prompt {prompt_tokens} tokens; completion 7 tokens" in out.stderr
    out = rkllmctl("status", socket=served.socket)
    assert out.returncode == 0, out.stderr
    assert "backend:  rkllm (requested by configuration)" in out.stdout
    assert f"model:    fake  context 4096  {served.model}" in out.stdout
    with served.client() as client:
        model = client.status()["model"]
    assert model["runtime"].startswith(f"{RELEASE[generation]}, interface {generation} (release {RELEASE[generation]} from its marker")


def test_max_tokens_and_stop_strings(served):
    with served.client() as client:
        result = client.generate("one two [[fake:endless]]", max_tokens=5).wait()
        assert (result.text, result.finish_reason) == ("echo: one two [[fake:endless]] echo: ", "length")
        assert result.stats["completion_tokens"] == 5
        result = client.generate("alpha beta STOP gamma", stop=["STOP"]).wait()
        assert (result.text, result.finish_reason) == ("echo: alpha beta ", "stop")


# --- errors ------------------------------------------------------------------------------------------
def test_runtime_error_ends_the_stream_with_a_backend_error(served):
    mark = served.calls.mark()
    with served.client() as client:
        before = client.status()["counters"]
        stream = client.generate("boom [[fake:error]]")
        texts = []
        with pytest.raises(DaemonError) as err:
            for text in stream:
                texts.append(text)
        assert (err.value.name, err.value.code) == ("backend", 301)
        assert err.value.details == {"runtime_code": ERRORS["GENERATION"]}
        assert "ERROR" in err.value.message
        assert texts == ["echo: "]  # what came before the ERROR callback was streamed
        # The daemon keeps serving, on the same runtime handle.
        assert client.generate("still here").wait().text == "echo: still here"
        after = client.status()
    assert after["counters"]["errors"] == before["errors"] + 1
    assert after["counters"]["completed"] == before["completed"] + 1
    assert after["healthy"] and after["worker"]["running"] is None
    assert [c.args["rc"] for c in ends(served.calls.since(mark))] == [str(ERRORS["GENERATION"]), "0"]
    # The command line reports it and exits 1.
    out = rkllmctl("generate", "[[fake:error]]", socket=served.socket)
    assert out.returncode == 1
    assert f"rkllm_run returned {ERRORS['GENERATION']}" in out.stderr and "(backend, 301)" in out.stderr


# --- cancel and client disappearance --------------------------------------------------------------------
def test_cancel_aborts_the_runtime_quickly(served):
    with served.client() as client:
        mark = served.calls.mark()
        stream = client.generate("on and on [[fake:endless]]", max_tokens=4096)
        assert next(iter(stream)) == "echo: "  # streaming
        started = time.monotonic()
        assert client.cancel(stream.request_id)["was"] == "running"
        result = stream.wait()
        assert time.monotonic() - started < 1.0
        assert (result.finish_reason, result.reason) == ("cancelled", "cancelled")
        assert 0 < result.stats["completion_tokens"] < 4096
        calls = served.calls.since(mark)
        assert "rkllm_abort" in [c.name for c in calls]
        [end] = ends(calls)
        assert end.args["reason"] in ("abort", "pause") and end.args["rc"] == "0"
        # The abort does not leak into the next run.
        assert client.generate("next").wait().finish_reason == "stop"


def test_killed_client_aborts_within_a_second(served):
    out = served.folder / "child.out"
    with served.client() as observer, open(out, "wb") as sink:
        before = observer.status()["counters"]["clients_gone"]
        child = subprocess.Popen(
            [sys.executable, "-m", "rkllmctl", "--socket", str(served.socket), "generate", "--max-tokens", "4096",
             "never ending [[fake:endless]]"],
            stdout=sink, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        try:
            poll(lambda: out.stat().st_size > 0, 10, "the child's stream")
            mark = served.calls.mark()
        finally:
            child.kill()
            child.wait()
        took = poll(lambda: observer.status()["worker"]["running"] is None, 1.0, "worker idle after kill -9")
        status = observer.status()
    assert took < 1.0
    assert status["counters"]["clients_gone"] == before + 1
    calls = served.calls.since(mark)
    assert "rkllm_abort" in [c.name for c in calls]
    assert ends(calls)[-1].args["reason"] in ("abort", "pause")
    assert "is gone; aborting its generation" in served.log()


def test_cancel_during_the_prefill_is_cancelled(make_npu):
    proc = make_npu(prefill_us=2000)  # about 0.35 s of prefill: rkllm_abort lands inside it
    with proc.client() as client:
        stream = client.generate("slow to start")
        poll(lambda: runs(proc.calls.all()), 10, "the run starting")
        assert client.cancel(stream.request_id)["was"] == "running"
        result = stream.wait()
    assert (result.text, result.finish_reason, result.reason) == ("", "cancelled", "cancelled")
    assert result.stats["completion_tokens"] == 0
    calls = proc.calls.all()
    assert Call("rkllm_abort", {"running": "1"}) in calls
    assert ends(calls)[-1].args["reason"] == "abort" and ends(calls)[-1].args["tokens"] == "0"


# --- prompt caches --------------------------------------------------------------------------------------
def test_cache_build_load_reuse_switch_release(make_npu, generation):
    proc = make_npu()
    with proc.client() as client:
        client.cache_put("terse", TERSE)
        put = rkllmctl("cache", "put", "verbose", VERBOSE, socket=proc.socket)
        assert put.returncode == 0, put.stderr
        terse = client.cache_wait("terse", timeout=30)
        verbose = client.cache_wait("verbose", timeout=30)
        assert terse["state"] == verbose["state"] == "ready"
        assert terse["tokens"] == len(prefix_of(TERSE)) and verbose["tokens"] == len(prefix_of(VERBOSE))

        # Each build: one run of the prefix alone, saving into a temporary file beside the
        # final one, stopped after the first token; the file was then renamed into place.
        state = {"terse": proc.state_file("terse"), "verbose": proc.state_file("verbose")}
        builds = {Path(r.args["path"]).name.removeprefix(".tmp-").split(".state.")[0]: r
                  for r in runs(proc.calls.all()) if r.args["save_prompt_cache"] == "1"}
        assert sorted(builds) == ["terse", "verbose"]
        for name, build in builds.items():
            tmp = Path(build.args["path"])
            assert tmp.parent == state[name].parent and tmp.name.startswith(f".tmp-{name}.state.")
            assert not tmp.exists()
            assert build.args["prompt_len"] == str(len(prefix_of(TERSE if name == "terse" else VERBOSE)))
        assert [e.args["tokens"] for e in ends(proc.calls.all())] == ["1", "1"]
        assert not [p for p in proc.binary_dir.rglob("*") if p.name.startswith(".tmp-")]
        abi = generation.replace(".", "")
        assert state["terse"].read_bytes() == (
            f"FAKE-RKLLM-PROMPT-CACHE abi={abi} len={len(prefix_of(TERSE))}\n".encode() + prefix_of(TERSE)
        )
        assert terse["binary_bytes"] == state["terse"].stat().st_size

        def ask(user: str, **fields):
            mark = proc.calls.mark()
            result = client.generate(user, **fields).wait()
            calls = proc.calls.since(mark)
            return result, cache_calls(calls), runs(calls)[0], ends(calls)[0]

        # cache=NAME: the file is loaded, then the FULL prompt is sent; only the tail is prefilled.
        full = prompt_of("hi there", system=TERSE)
        result, calls, run, end = ask("hi there", cache="terse")
        assert calls == [("rkllm_load_prompt_cache", str(state["terse"])), ("rkllm_run", "")]
        assert run.args["prompt_len"] == str(len(full)) and run.args["matched"] == str(terse["tokens"])
        assert end.args["prefill_tokens"] == str(len(full) - terse["tokens"])
        assert result.text == "echo: hi there" and result.cache == "terse"
        assert result.stats["cached_tokens"] == terse["tokens"] > 0
        assert result.stats["prompt_tokens"] == len(full)
        # The same cache again: already loaded, no calls.
        result, calls, run, _ = ask("again", cache="terse")
        assert calls == [("rkllm_run", "")] and run.args["matched"] == str(terse["tokens"])
        assert result.stats["cached_tokens"] == terse["tokens"]
        # Another cache (found by its prefix, without cache=): release, then load.
        result, calls, run, _ = ask("and now?", system=VERBOSE)
        assert calls == [("rkllm_release_prompt_cache", ""), ("rkllm_load_prompt_cache", str(state["verbose"])),
                         ("rkllm_run", "")]
        assert result.cache == "verbose" and run.args["matched"] == str(verbose["tokens"])
        # No cache: release; then nothing more to release.
        result, calls, run, end = ask("plain")
        assert calls == [("rkllm_release_prompt_cache", ""), ("rkllm_run", "")]
        assert run.args["matched"] == "0" and end.args["prefill_tokens"] == str(len(prompt_of("plain")))
        assert result.cache is None and result.stats["cached_tokens"] == 0
        result, calls, _, _ = ask("plain again")
        assert calls == [("rkllm_run", "")]
        # no_cache: the named cache's text, prefilled in full.
        result, calls, run, _ = ask("measure", cache="terse", no_cache=True)
        assert calls == [("rkllm_run", "")] and run.args["matched"] == "0"
        assert result.cache is None and result.stats["prompt_tokens"] == len(prompt_of("measure", system=TERSE))

    out = rkllmctl("generate", "--cache", "terse", "via the cli", socket=proc.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "echo: via the cli\n"
    assert f"{terse['tokens']} from cache terse" in out.stderr


def loads_are_verified(calls: list[Call], name: str, prefix: bytes) -> list[Call]:
    """The loads of ``name``'s cache among ``calls``: each after a rebuild of it, each matched in full."""
    loads = [i for i, c in enumerate(calls)
             if c.name == "rkllm_load_prompt_cache" and c.args["path"].endswith(f"/{name}.state")]
    rebuilt = [i for i, c in enumerate(calls)
               if c.name == "rkllm_run" and f"/.tmp-{name}.state." in c.args.get("path", "")]
    for i in loads:
        assert rebuilt and rebuilt[0] < i, f"{name}.state was loaded before it was rebuilt"
        run = next(c for c in calls[i:] if c.name == "rkllm_run")
        assert int(run.args["matched"]) == len(prefix), "the runtime got a cache that does not match its text"
    return [calls[i] for i in loads]


def test_tampered_cache_file_while_stopped_is_rebuilt_not_loaded(make_npu):
    proc = make_npu()
    with proc.client() as client:
        client.cache_put("t", TERSE)
        good = client.cache_wait("t", timeout=30)
    proc.stop()
    original = proc.state_file("t").read_bytes()
    flip_byte_of_the_prefix(proc.state_file("t"))
    mark = proc.calls.mark()
    proc.start()
    with proc.client() as client:
        ready = client.cache_wait("t", timeout=30)
        result = client.generate("q", cache="t").wait()
    assert ready["built_at"] > good["built_at"]  # rebuilt, not adopted
    assert result.cache == "t" and result.stats["cached_tokens"] == good["tokens"]
    assert loads_are_verified(proc.calls.since(mark), "t", prefix_of(TERSE))
    assert proc.state_file("t").read_bytes() == original
    assert "binary cache t refused: state file checksum mismatch; rebuilding" in proc.log()


def test_cache_file_changed_between_build_and_use_is_rebuilt_not_loaded(make_npu):
    proc = make_npu()
    with proc.client() as client:
        client.cache_put("t", TERSE)
        good = client.cache_wait("t", timeout=30)
        flip_byte_of_the_prefix(proc.state_file("t"))
        mark = proc.calls.mark()
        first = client.generate("q", cache="t").wait()  # refused at load: prefilled in full
        assert first.text == "echo: q" and first.cache is None and first.stats["cached_tokens"] == 0
        ready = client.cache_wait("t", timeout=30)
        second = client.generate("q", cache="t").wait()
    assert ready["built_at"] > good["built_at"]
    assert second.cache == "t" and second.stats["cached_tokens"] == good["tokens"]
    assert len(loads_are_verified(proc.calls.since(mark), "t", prefix_of(TERSE))) == 1
    assert "binary cache t refused at load: state file checksum mismatch" in proc.log()


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["modified", "modified-keeping-mtime"])
def test_cache_file_changed_after_use_is_not_loaded_again(make_npu, keep_mtime):
    proc = make_npu()
    with proc.client() as client:
        client.cache_put("a", TERSE)
        client.cache_put("b", VERBOSE)
        good = client.cache_wait("a", timeout=30)
        client.cache_wait("b", timeout=30)
        assert client.generate("q", cache="a").wait().cache == "a"  # verified and loaded
        assert client.generate("q", cache="b").wait().cache == "b"  # a is released
        state = proc.state_file("a")
        before = state.stat()
        flip_byte_of_the_prefix(state)
        if keep_mtime:
            os.utime(state, ns=(before.st_atime_ns, before.st_mtime_ns))
        mark = proc.calls.mark()
        client.generate("q", cache="a").wait()
        client.cache_wait("a", timeout=30)
        result = client.generate("q", cache="a").wait()
    assert result.cache == "a" and result.stats["cached_tokens"] == good["tokens"]
    assert loads_are_verified(proc.calls.since(mark), "a", prefix_of(TERSE))


# --- --backend auto --------------------------------------------------------------------------------------
def test_auto_without_an_npu_device_chooses_the_cpu_backend(make_daemon_on, fake_runtime):
    private_dev.needs_namespaces()
    proc = make_daemon_on(fake_runtime["1.2"], backend="auto", model_flag=False, namespace=False, start=False)
    proc.env["RKLLMD_RKLLM_MODEL"] = str(proc.model)  # configured, as the library is
    proc.start()
    with proc.client() as client:
        status = client.status()
    out = rkllmctl("status", socket=proc.socket)
    assert status["backend"] == "cpu"
    assert status["backend_reason"] == (
        "auto: NPU backend not usable (no NPU device: neither /dev/rknpu nor a /dev/dri node of the rknpu "
        "driver); using the CPU reference backend"
    )
    assert f"backend:  cpu ({status['backend_reason']})" in out.stdout
    assert not proc.calls.all()  # the library was inspected, never loaded


def test_auto_with_an_npu_device_chooses_the_npu_backend(make_daemon_on, fake_runtime, generation):
    private_dev.needs_namespaces()
    proc = make_daemon_on(fake_runtime[generation], backend="auto", namespace=True)
    with proc.client() as client:
        status = client.status()
        result = client.generate("on the npu").wait()
    out = rkllmctl("status", socket=proc.socket)
    assert status["backend"] == "rkllm"
    assert status["backend_reason"] == (
        f"auto: librkllmrt at {fake_runtime[generation]}, model {proc.model}, "
        "NPU device /dev/rknpu (RKNPU driver: v0.9.8)"
    )
    assert f"backend:  rkllm ({status['backend_reason']})" in out.stdout
    assert status["model"]["runtime"].startswith(f"{RELEASE[generation]}, interface {generation}")
    assert result.text == "echo: on the npu"
    assert not Path("/dev/rknpu").exists()  # the node lived in the daemon's namespace only


# --- startup errors -----------------------------------------------------------------------------------------
def startup_failure(proc: NpuDaemon) -> str:
    """Start, expect exit status 1 without the socket ever bound; return the log."""
    proc.start(wait=False)
    assert proc.wait(30) == 1
    log = proc.log()
    assert not proc.socket.exists() and "listening on" not in log and "Traceback" not in log
    return log


@pytest.mark.parametrize("case", ["library missing", "wrong architecture"])
def test_library_startup_errors(make_daemon_on, tmp_path, case):
    host = lib_module.describe_target(lib_module.host_target())
    if case == "library missing":
        library = tmp_path / "nowhere" / "librkllmrt.so"
        expected = f"cannot start: librkllmrt.so not found (looked at {library}); install the vendor runtime"
    else:
        library = foreign_elf(tmp_path / "librkllmrt.so")
        other = "x86_64" if host == "aarch64" else "aarch64"
        expected = f"cannot start: librkllmrt.so is {other} but this machine is {host} ({library})"
    log = startup_failure(make_daemon_on(library, start=False))
    assert expected in log


@pytest.mark.parametrize("case", ["init failure", "no model", "model missing", "model not .rkllm", "no magic"])
def test_model_startup_errors(make_npu, tmp_path, case):
    if case == "init failure":
        proc = make_npu(start=False, model_text="FAKE_INIT_FAIL\n")
        expected = f"cannot start: rkllm_init failed with code {ERRORS['INIT']} for model {proc.model}"
    elif case == "no model":
        proc = make_npu(start=False, model_flag=False)
        expected = "cannot start: no .rkllm model configured (set [rkllm] model)"
    elif case == "no magic":
        proc = make_npu(start=False)
        proc.model.write_text("a text file named .rkllm\n")
        expected = f"cannot start: rkllm_init failed with code {ERRORS['MODEL_MAGIC']} for model {proc.model}"
    elif case == "model missing":
        gone = tmp_path / "gone.rkllm"
        proc = make_npu("--model", str(gone), start=False)
        expected = f"cannot start: model file {gone} does not exist"
    elif case == "model not .rkllm":
        gguf = tmp_path / "model.gguf"
        gguf.write_bytes(b"GGUF")
        proc = make_npu(start=False, model_flag=False, env={"RKLLMD_RKLLM_MODEL": str(gguf)})
        expected = f"cannot start: model {gguf} is not an .rkllm file"
    log = startup_failure(proc)
    assert expected in log
    if case == "init failure":
        assert "fake-rkllm: rkllm_init: model" in log  # the runtime's own words come first
    if case == "no magic":
        assert "E RKNN: invalid rknn llm model magic" in log


def test_an_unknown_template_stops_the_start(make_npu):
    """A template that names no family nor file is refused before the runtime is touched."""
    proc = make_npu(start=False, env={"RKLLMD_RKLLM_TEMPLATE": "llama9"})
    log = startup_failure(proc)
    assert "cannot start: [rkllm] unknown chat template 'llama9'; known: chatml," in log


# --- conversations on the runtime's history -------------------------------------------------
def chat_messages(users: list[str], answers: list[str]) -> list[dict[str, str]]:
    messages = []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def test_interleaved_conversations_never_see_each_others_history(make_npu):
    """Two clients take turns, then one goes on alone. The fake answers "[[fake:recall]]"
    with every user turn its KV history and input hold, so a leak would show in the text."""
    proc = make_npu()
    apples = ["[[fake:recall]] apples", "pears", "plums", "figs", "dates"]
    cars = ["[[fake:recall]] cars", "bikes", "boats"]
    answers: dict[str, list[str]] = {"apples": [], "cars": []}

    def turn(client, name: str, users: list[str], **fields):
        said = answers[name]
        prompt = TEMPLATE.render(chat_messages(users, said))
        mark = proc.calls.mark()
        result = client.generate(messages=chat_messages(users, said), **fields).wait()
        said.append(result.text)
        calls = proc.calls.since(mark)
        assert result.text == "recall: " + " | ".join(users), "the runtime saw another conversation"
        return result, calls, prompt

    with proc.client() as client:
        for n in range(1, 4):  # taking turns: each switch clears the history and sends all
            for name, users in (("apples", apples), ("cars", cars)):
                result, calls, prompt = turn(client, name, users[:n])
                assert [c.name for c in calls if c.name not in ("rkllm_run_end", "rkllm_get_kv_cache_size")] == ["rkllm_clear_kv_cache", "rkllm_run"]
                [run] = runs(calls)
                assert run.args["keep_history"] == "1" and run.args["kv_before"] == "0"
                assert run.args["prompt_len"] == str(len(prompt.encode()))
                assert result.stats["cached_tokens"] == 0 and result.stats["cache_source"] is None
        # Back to the first one (cleared again), then its next turn continues the history:
        # only the new part is sent.
        result, calls, _ = turn(client, "apples", apples[:4])
        assert calls[0].name == "rkllm_clear_kv_cache" and result.stats["cached_tokens"] == 0
        held = result.stats["prompt_tokens"] + result.stats["completion_tokens"]  # the fake's tokens
        before = TEMPLATE.render(chat_messages(apples[:4], answers["apples"][:3])) + answers["apples"][3]
        result, calls, prompt = turn(client, "apples", apples)
        assert [c.name for c in calls if c.name not in ("rkllm_run_end", "rkllm_get_kv_cache_size")] == ["rkllm_run"]
        [run] = runs(calls)
        assert run.args["kv_before"] == str(held)
        assert run.args["prompt_len"] == str(len(prompt.encode()) - len(before.encode()))
        assert result.stats["cache_source"] == {"kind": "conversation"} and result.stats["cached_tokens"] > 0
        assert result.stats["prompt_tokens"] == result.stats["cached_tokens"] + len(prompt.encode()) - len(before.encode())
        # no_cache neither continues it: clear, all.
        answers["apples"].pop()
        result, calls, _ = turn(client, "apples", apples, no_cache=True)
        assert [c.name for c in calls if c.name not in ("rkllm_run_end", "rkllm_get_kv_cache_size")] == ["rkllm_clear_kv_cache", "rkllm_run"]
        assert result.stats["cached_tokens"] == 0
        status = client.status()["caches"]["conversations"]
        assert status["hits"] == 1, status


# --- shutdown ------------------------------------------------------------------------------------------
def test_sigterm_aborts_the_run_and_the_worker_releases_the_runtime_after_it(make_npu):
    proc = make_npu(decode_us=2000)
    with proc.client() as client:
        stream = client.generate("on and on [[fake:endless]]", max_tokens=4096)
        assert next(iter(stream)) == "echo: "
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    names = [c.name for c in proc.calls.all()]
    assert names[-3:] == ["rkllm_abort", "rkllm_run_end", "rkllm_destroy"] or names[-2:] == ["rkllm_run_end", "rkllm_destroy"], names


def test_shutdown_never_destroys_the_runtime_while_a_run_is_in_it(make_npu):
    """SIGTERM while rkllm_run hangs, deaf to rkllm_abort (FAKE_RKLLM_HANG_ON): the worker
    cannot stop; the daemon waits for it a while, says so, and exits without rkllm_destroy,
    which would free what the run still uses (the fake aborts the process if it comes)."""
    proc = make_npu(env={"FAKE_RKLLM_HANG_ON": "hang here", "RKLLMD_STOP_TIMEOUT": "1.5"})
    with proc.client() as client:
        client.send("generate", prompt="please hang here")
        poll(lambda: runs(proc.calls.all()), 10, "the run starting")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "rkllm_destroy" not in [c.name for c in proc.calls.all()]
    log = proc.log()
    assert "the worker of model fake did not stop within 1.5 s" in log and "exiting without releasing the model" in log
    assert "fake-rkllm: rkllm_destroy" not in log


# --- the context ------------------------------------------------------------------------------------
@pytest.mark.parametrize("counting", ["bounded", "tokenizer"])
def test_a_conversation_grows_until_refused_and_the_runtime_never_shifts(make_npu, counting):
    """A chat sent whole each turn, as clients do, on a 600-token context: each turn continues
    the runtime's history and the model sees every earlier turn (the fake's recall), until one
    cannot fit: context_overflow, before the runtime gets it. Never a shift of the runtime's
    window (silently wrong), never an input longer than it (a crash). With the model's own
    tokenizer configured the counts are exact (the fake's tokens are bytes); without, bounded."""
    env = {"RKLLMD_MODEL_CONTEXT_LENGTH": "600"}
    proc = make_npu(env=env, start=False)
    if counting == "tokenizer":
        env["RKLLMD_RKLLM_TOKENIZER"] = str(write_tokenizer(proc.folder / "tokenizer.json"))
    proc.env.update(env)
    proc.start()
    users, answers = ["[[fake:recall]] a"], []
    with proc.client() as client:
        while True:
            messages = chat_messages(users, answers)
            rendered = client.render(messages)
            try:
                result = client.generate(messages=messages).wait()
            except DaemonError as exc:
                error = exc
                break
            recall = "recall: " + " | ".join(users)  # the answer ends where the context does
            assert result.text == recall or result.finish_reason == "length" and recall.startswith(result.text), "a turn was lost"
            answers.append(result.text)
            users.append(str(len(users)))
        assert client.status()["model"]["token_counts"].startswith("exact" if counting == "tokenizer" else "bounded")
    assert len(answers) > 5 and error.name == "context_overflow"
    tokens = len(TEMPLATE.render(messages).encode())
    assert rendered["tokens"] == (tokens if counting == "tokenizer" else tokens + 2)
    assert error.details["context_length"] == 600 and error.details["prompt_tokens"] + 1 > 600
    assert ("at most" in error.message) == (counting == "bounded")
    calls = proc.calls.all()
    assert not [c for c in calls if c.name == "rkllm_context_shift" or "CRASH" in c.args]
    assert "fake-rkllm: rkllm_run: context full" not in proc.log()


def test_a_turn_the_history_cannot_take_is_resent_whole_on_a_cleared_history(make_npu):
    """The fake's vocabulary of words (FAKE_RKLLM_TOKENS=words), and the daemon has a
    tokenizer.json that counts as it does. The user's words are Cyrillic: the model generates
    each as seven tokens (cut inside its characters), while it is one when sent again; the
    turns' boundary cuts a word as well. So the runtime's history holds more tokens than the
    same conversation sent fresh, and when the user pastes a long message the continuation
    would overflow the context while the whole conversation fits: the daemon clears the history
    and sends the conversation whole (the model's recall shows it saw every turn, once), then
    continues that history; it never lets the runtime shift, and refuses only what cannot fit.
    Each turn's way is predicted before it is sent, from the runtime's own count of its history
    (its call log) and the tokenizer's count of the rest."""
    from tokenizers import Tokenizer

    context = 150
    env = {"RKLLMD_MODEL_CONTEXT_LENGTH": str(context), "FAKE_RKLLM_TOKENS": "words"}
    proc = make_npu(env=env, start=False)
    words = write_tokenizer(proc.folder / "tokenizer.json", "words")
    proc.env["RKLLMD_RKLLM_TOKENIZER"] = str(words)
    proc.start()
    tokenizer = Tokenizer.from_file(str(words))

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    def user_turn(n: int) -> str:
        return " ".join(f"w{i}" for i in range(20)) if n == 5 else f"привет{n}"

    users, answers, ways = ["[[fake:recall]] привет0"], [], []
    held: tuple[str, int] | None = None  # the text the runtime's history holds, and its tokens
    with proc.client() as client:
        for _ in range(40):
            messages = chat_messages(users, answers)
            prompt = TEMPLATE.render(messages)
            whole = count(prompt)
            assert client.render(messages)["tokens"] == whole
            rest = count(prompt[len(held[0]):]) if held and prompt.startswith(held[0]) else None
            if rest is not None and held[1] + rest + 1 <= context:
                way, sent, before = "continued", rest, held[1]
            elif whole + 1 <= context:
                way, sent, before = "resent" if held else "whole", whole, 0
            else:
                way = "refused"
            mark = proc.calls.mark()
            try:
                result = client.generate(messages=messages).wait()
            except DaemonError as exc:
                assert (way, exc.name) == ("refused", "context_overflow") and exc.details["prompt_tokens"] == whole
                assert not runs(proc.calls.since(mark))
                break
            calls = proc.calls.since(mark)
            [run], [end] = runs(calls), ends(calls)
            shown = [c.name for c in calls if c.name not in ("rkllm_run_end", "rkllm_get_kv_cache_size")]
            assert shown == (["rkllm_run"] if way == "continued" else ["rkllm_clear_kv_cache", "rkllm_run"]), way
            assert (int(run.args["prompt_len"]), int(run.args["kv_before"])) == (sent, before), way
            recall = "recall: " + " | ".join(users)  # every turn the model holds, each once
            # An answer cut where the context ends may end inside a character: U+FFFD.
            assert result.text == recall or result.finish_reason == "length" and recall.startswith(result.text.removesuffix("\ufffd"))
            ways.append((way, result.finish_reason))
            answers.append(result.text)
            users.append(user_turn(len(users)))
            # The runtime's history now, kept after an answer it ended itself: its count.
            held = (prompt + result.text, before + sent + int(end.args["tokens"])) if result.finish_reason == "stop" else None
        else:
            raise AssertionError(f"never refused: {ways}")
    resent = ways.index(("resent", "stop"))  # the long message
    assert ways[0] == ("whole", "stop") and set(ways[1:resent]) == {("continued", "stop")} and resent == 5, ways
    assert ways[resent + 1][0] == "continued", ways  # the history sent whole is continued in turn
    calls = proc.calls.all()
    assert not [c for c in calls if c.name == "rkllm_context_shift" or "CRASH" in c.args]
    assert "fake-rkllm: rkllm_run: context full" not in proc.log()
