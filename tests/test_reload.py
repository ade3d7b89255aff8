"""SIGHUP outside systemd: the real daemon, its config file rewritten, then signalled.

A changed model is loaded beside the running one and then serves the default model's name
in a new runner process (requests received before that are answered by the old one, which
then ends), a model that fails to load leaves the old one serving, binary caches made for
the old model's identity are never used by the new one, and changed cache folders are
scanned and watched. Swaps go between tiny random models (tests/gguf_files.py) where the
real model is not the point: they load in milliseconds, and two seeds make two models
of the same shape and name whose weights, so identities, differ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import DaemonProcess, in_order, reference_cases, rkllmctl
from rkllmctl import DaemonError, DaemonUnreachable
from gguf_files import tiny_llama
from reliability import poll

CAPITAL = next(c for c in reference_cases() if c["messages"][-1]["content"] == "What is the capital of France?")
STORY = "Write a long story about a dragon."
RULES = "Answer in one word."


class ConfiguredDaemon(DaemonProcess):
    """rkllmd whose model and cache folders come from its config file, which a reload rereads."""

    def __init__(self, **settings: str):
        super().__init__()
        # Its weights in its own binary folder (tiny models: milliseconds), where its store
        # counts and collects them, not in the suite's shared folder.
        self.env.pop("RKLLMD_MODEL_WEIGHTS_DIR", None)
        self.config = self.folder / "rkllmd.toml"
        self.configure(**settings)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "rkllmd", "--socket", str(self.socket), "--config", str(self.config),
                "--backend", "cpu", "--log-level", "debug"]

    def configure(self, model: str = "", text_dir: Path | None = None, binary_dir: Path | None = None, store: str = "", conversations: bool = True,
                  chat_template: str = "", daemon: str = "") -> None:
        """``store``, ``daemon``: the [store] and [daemon] sections' lines."""
        self.text_dir = text_dir or self.text_dir
        self.binary_dir = binary_dir or self.binary_dir
        self.config.write_text(f'[daemon]\n{daemon}\n[model]\npath = "{model}"\nchat_template = "{chat_template}"\n'
                               f'[cache]\ntext_dir = "{self.text_dir}"\nbinary_dir = "{self.binary_dir}"\n'
                               f'conversations = {str(conversations).lower()}\n'
                               f'[store]\n{store}\n')

    def reload(self, *expected_lines: str, timeout: float = 120) -> str:
        """SIGHUP, then the log it caused once it holds ``expected_lines`` (in order)."""
        mark = len(self.log())
        self.signal(signal.SIGHUP)
        return poll(lambda: in_order(text := self.log()[mark:], *expected_lines) and text, timeout,
                    f"{expected_lines} in the log after SIGHUP")


@pytest.fixture
def configured():
    made: list[ConfiguredDaemon] = []

    def make(**settings) -> ConfiguredDaemon:
        made.append(ConfiguredDaemon(**settings))
        return made[-1].start()

    yield make
    for proc in made:
        proc.cleanup()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    (folder / "a").mkdir(), (folder / "b").mkdir()
    return tiny_llama(folder / "a" / "tiny.gguf", seed=0), tiny_llama(folder / "b" / "tiny.gguf", seed=1)


def model_of(proc: DaemonProcess) -> dict:
    with proc.client() as client:
        return client.status()["model"]


def test_a_changed_model_answers_the_requests_received_once_it_is_loaded(configured, tiny_models):
    proc = configured()
    assert model_of(proc)["name"] == "SmolLM2-135M-Instruct"
    with proc.client() as first, proc.client() as second, proc.client() as third:
        running = first.generate(STORY, max_tokens=8)
        next(iter(running))  # it streams
        queued = second.generate(messages=CAPITAL["messages"], max_tokens=CAPITAL["max_tokens"])
        second.wait_queued(queued)  # taken in before the signal (it may run beside the first)
        proc.configure(model=str(tiny_models[0]))
        proc.reload("reload: the model configuration changed; loading it beside the running one", "reload: now serving tiny")
        after = third.generate(messages=CAPITAL["messages"], max_tokens=4)
        # Both requests queued before the signal are answered by the old model, in full.
        done = running.wait()
        assert (done.finish_reason, done.stats["completion_tokens"]) == ("length", 8)
        assert queued.wait().text == CAPITAL["completion"]
        # The one sent after it, by the new model (byte-level vocabulary: many more tokens).
        assert after.wait().stats["prompt_tokens"] > 2 * CAPITAL["prompt_tokens"]
    assert "reload: now serving tiny" in proc.log()
    assert model_of(proc)["path"] == str(tiny_models[0])


def test_a_request_the_scheduler_holds_at_the_switch_is_answered_by_the_model_it_arrived_for(configured, tiny_models):
    """One generation at a time: a request waiting in the scheduler (not yet given to the
    old runner) when the new model takes over still runs on the old model, in full."""
    proc = configured(daemon="max_batch = 1")
    with proc.client() as first, proc.client() as second, proc.client() as third:
        running = first.generate(STORY, max_tokens=48)
        next(iter(running))
        held = second.generate(messages=CAPITAL["messages"], max_tokens=CAPITAL["max_tokens"])
        assert second.wait_queued(held) == 1
        assert third.status()["models"]["waiting"] == {"smollm2-135m-instruct": 1}
        proc.configure(model=str(tiny_models[0]), daemon="max_batch = 1")
        proc.reload("reload: now serving tiny")
        after = third.generate(messages=CAPITAL["messages"], max_tokens=4)
        assert running.wait().stats["completion_tokens"] == 48
        assert held.wait().text == CAPITAL["completion"]
        assert after.wait().stats["prompt_tokens"] > 2 * CAPITAL["prompt_tokens"]


def test_each_request_is_rendered_by_the_model_that_runs_it(configured):
    """Here the same weights with another template: a request received before the new
    model serves is rendered with the old template and run by the old model, one received
    after with the new one (and ``render`` follows the default model too), while the old
    model still streams its answer."""
    proc = configured()
    with proc.client() as first, proc.client() as second:
        running = first.generate(STORY, max_tokens=64)
        next(iter(running))  # it streams on the old model
        old = second.render(CAPITAL["messages"])
        before = second.generate(messages=CAPITAL["messages"], max_tokens=2)
        proc.configure(chat_template="chatml")
        proc.reload("reload: the model configuration changed; loading it beside the running one", "reload: now serving")
        after = second.generate(messages=CAPITAL["messages"], max_tokens=2)
        result = after.wait()
        new = second.render(CAPITAL["messages"])
        assert running.wait().stats["completion_tokens"] == 64
        assert before.wait().stats["prompt_tokens"] == old["tokens"]
    assert new["text"] != old["text"] and new["text"].startswith("<|im_start|>user\n")
    assert result.stats["prompt_tokens"] == new["tokens"] != old["tokens"]


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(configured, tmp_path):
    proc = configured()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    proc.configure(model=str(broken))
    proc.reload("reload: the model configuration changed",
                "reload: cannot load the new model, keeping the running one")
    assert model_of(proc)["name"] == "SmolLM2-135M-Instruct"
    with proc.client() as client:
        assert client.generate(messages=CAPITAL["messages"], max_tokens=48).wait().text == CAPITAL["completion"]
        assert client.status()["healthy"]


def test_a_model_that_failed_to_load_is_tried_again_at_the_next_reload(configured, tiny_models, tmp_path):
    # A model still being copied when the signal came: the reload after the copy ends,
    # with the same settings, must load it (the running model is still the old one).
    proc = configured(model=str(tiny_models[0]))
    copying = tmp_path / "tiny.gguf"
    copying.write_bytes(tiny_models[1].read_bytes()[:100])
    proc.configure(model=str(copying))
    proc.reload("reload: cannot load the new model, keeping the running one")
    assert model_of(proc)["path"] == str(tiny_models[0])
    copying.write_bytes(tiny_models[1].read_bytes())
    proc.reload("reload: now serving tiny")
    assert model_of(proc)["path"] == str(copying)


def binary_caches(proc: DaemonProcess) -> dict[str, set[str]]:
    """The state files in the binary folder: identity folder -> cache names."""
    found: dict[str, set[str]] = {}
    for state in proc.binary_dir.glob("*/*.state"):
        found.setdefault(state.parent.name, set()).add(state.stem)
    return found


def test_binary_caches_of_the_old_model_are_never_used_after_a_swap(configured, tiny_models):
    old, new = tiny_models
    # Text caches alone: a conversation state of the same "Hi" would supply more of it.
    proc = configured(model=str(old), conversations=False)
    with proc.client() as client:
        client.cache_put("rules", RULES)
        client.cache_wait("rules", timeout=60)
        [old_identity] = binary_caches(proc)
        assert client.generate("Hi", cache="rules", max_tokens=6).wait().stats["cached_tokens"] > 0
        proc.configure(model=str(new), conversations=False)
        proc.reload("reload: now serving tiny")
        # The new model's answers, with the cache and without it, are the same: its own
        # state was built for it, the old one never read.
        with_cache = client.generate("Hi", cache="rules", max_tokens=6).wait()
        without = client.generate("Hi", cache="rules", no_cache=True, max_tokens=6).wait()
        assert (with_cache.text, with_cache.stats["completion_tokens"]) == (without.text, without.stats["completion_tokens"])
        ready = client.cache_wait("rules", timeout=60)
        assert ready["state"] == "ready"
        rebuilt = client.generate("Hi", cache="rules", max_tokens=6).wait()
        assert (rebuilt.text, rebuilt.cache) == (without.text, "rules") and rebuilt.stats["cached_tokens"] > 0
        status = client.status()["caches"]
    states = binary_caches(proc)
    new_identity = Path(status["binary_dir"]).name
    assert new_identity != old_identity and states[new_identity] == {"rules"}
    # The old model's answer differs: had its state been used, the outputs above would show it.
    with proc.client() as client:
        proc.configure(model=str(old))
        proc.reload("reload: now serving tiny")
        assert client.generate("Hi", cache="rules", no_cache=True, max_tokens=6).wait().text != without.text


def test_changed_cache_folders_are_scanned_and_watched(configured, tiny_models, tmp_path):
    proc = configured(model=str(tiny_models[0]))
    old_texts = proc.text_dir
    texts, binaries = tmp_path / "texts", tmp_path / "binaries"
    texts.mkdir()
    (texts / "first.txt").write_text(RULES)
    proc.configure(model=str(tiny_models[0]), text_dir=texts, binary_dir=binaries)
    proc.reload(f"reload: caches now in {texts} and {binaries}", "configuration reloaded")
    with proc.client() as client:
        # Scanned: the file already there is listed and built into the new binary folder.
        assert client.cache_wait("first", timeout=60)["state"] == "ready"
        assert list(binaries.glob("*/first.state"))
        # Watched: a file saved there afterwards is found and built by itself; one saved
        # in the old folder (no longer watched) is not.
        (old_texts / "stale.txt").write_text(RULES)
        (texts / "second.txt").write_text("Be brief.")
        poll(lambda: "second" in names(client), 30, "second.txt listed")
        assert client.cache_wait("second", timeout=60)["state"] == "ready"
        assert names(client) == {"first", "second"}
        assert client.status()["caches"]["text_dir"] == str(texts)


def test_one_reload_that_moves_the_folders_and_swaps_the_model_serves_the_new_models_caches(configured, tiny_models, tmp_path):
    """The folder move of a reload runs on the disk thread, the new model loads on a thread of
    its own (with the new folders), in either order. Here the disk thread has a queue of puts
    to write first, so the new model serves before the old one's caches are moved: the old
    one, unloaded meanwhile, moves nothing, and the binary caches in the new folder are the
    new model's alone."""
    old, new = tiny_models
    proc = configured(model=str(old), conversations=False)
    texts, binaries = tmp_path / "texts", tmp_path / "binaries"
    texts.mkdir()
    (texts / "rules.txt").write_text(RULES)
    with proc.client() as client:
        puts = [client.send("cache.put", name=f"filler{i}", text=f"{i} " + "x" * 65536) for i in range(150)]
        client.ping()  # the socket loop has handed every put to the disk thread
        proc.configure(model=str(new), text_dir=texts, binary_dir=binaries, conversations=False)
        proc.reload(f"reload: caches now in {texts} and {binaries}", "reload: now serving tiny")
        with pytest.raises(DaemonUnreachable):  # swapped while the puts, then the move, wait
            client.receive(puts[-1], 0.001)
        for put in puts:
            client.result_of(put, 120)
        ready = client.cache_wait("rules", timeout=60)
        status = client.status()["caches"]
    [meta] = binaries.glob("*/rules.meta.json")
    assert ready["state"] == "ready" and json.loads(meta.read_text())["identity"]["model"] == str(new)
    assert status["binary_dir"] == str(meta.parent) and status["text_dir"] == str(texts)


def names(client) -> set[str]:
    return {row["name"] for row in client.cache_ls()["caches"]}


def store_of(proc: DaemonProcess) -> dict:
    with proc.client() as client:
        return client.status()["store"]


def test_status_reports_the_store(configured, tiny_models):
    proc = configured(model=str(tiny_models[0]))
    with proc.client() as client:
        client.cache_put("rules", RULES)
        client.cache_wait("rules", timeout=60)
    # Counted by the collection that follows each build, off the socket loop.
    store = poll(lambda: (s := store_of(proc))["kinds"]["binary"]["bytes"] > 0 and s, 60, "the build counted")
    [identity] = binary_caches(proc)
    state = proc.binary_dir / identity / "rules.state"
    assert store["kinds"]["binary"]["bytes"] >= state.stat().st_size and store["kinds"]["binary"]["held"] == 1
    assert store["kinds"]["weights"]["folder"] == str(proc.binary_dir / "weights") and store["kinds"]["weights"]["bytes"] > 0
    assert set(store["kinds"]) == {"binary", "weights", "kernels"}
    assert (store["budget_bytes"], store["superseded_days"], store["evictions"]) == (4096 << 20, 7.0, 0)
    shown = rkllmctl("status", socket=proc.socket).stdout
    assert re.search(r"^store: +binary \d+\.\d MiB, weights \d+\.\d MiB, kernels \d+\.\d MiB; budget 4096 MiB; "
                     r"collected \d+ s ago, 0 removed$", shown, re.M), shown


def test_a_swap_leaves_the_old_models_binary_caches_to_collection(configured, tiny_models):
    old, new = tiny_models
    proc = configured(model=str(old), store="superseded_days = 0")
    with proc.client() as client:
        client.cache_put("rules", RULES)
        client.cache_wait("rules", timeout=60)
        [old_identity] = binary_caches(proc)
        proc.configure(model=str(new), store="superseded_days = 0")
        proc.reload("reload: now serving tiny")
        client.cache_wait("rules", timeout=60)
    # The collector removes a unit's files, then its folder, then logs: wait for all of it
    # (under load, the state files were seen gone while the folder was still there).
    poll(lambda: not (proc.binary_dir / old_identity).exists() and len(binary_caches(proc)) == 1, 60, "the old identity collected")
    poll(lambda: "store: removed binary " + old_identity in proc.log(), 30, "the removal logged")
    assert poll(lambda: store_of(proc)["evictions"] >= 1, 30, "the eviction reported")


def test_a_budget_set_low_evicts_what_is_not_in_use(configured, tiny_models):
    old, new = tiny_models
    proc = configured(model=str(old))
    with proc.client() as client:
        client.cache_put("rules", RULES)
        client.cache_wait("rules", timeout=60)
        proc.configure(model=str(new))
        proc.reload("reload: now serving tiny")
        client.cache_wait("rules", timeout=60)
    assert len(binary_caches(proc)) == 2, "superseded a moment ago, within the budget: kept"
    proc.configure(model=str(new), store="max_disk_mb = 0")
    proc.reload("configuration reloaded")
    store = poll(lambda: (s := store_of(proc))["evictions"] >= 1 and s, 60, "the budget applied")
    [kept] = binary_caches(proc)
    with proc.client() as client:
        assert Path(client.status()["caches"]["binary_dir"]).name == kept  # the one in use
    assert store["budget_bytes"] == 0 and store["over_budget"] and store["kinds"]["binary"]["units"] == 1


def default_runner(client) -> dict:
    """The default model's row in status (``models.loaded``), with its runner's pid."""
    status = client.status()
    [row] = [row for row in status["models"]["loaded"] if row["name"] == status["models"]["default"]]
    return row


def runner_alive(pid: int) -> bool:
    """Whether ``pid`` is still a runner process (not reaped, not a zombie, not reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and b"rkllmd.runner" in cmdline


def test_a_changed_model_runs_in_a_new_runner_and_the_old_runner_ends(configured, tiny_models):
    proc = configured(model=str(tiny_models[0]))
    with proc.client() as client:
        old = default_runner(client)
        assert runner_alive(old["pid"])
        proc.configure(model=str(tiny_models[1]))
        proc.reload("reload: the model configuration changed; loading it beside the running one", "reload: now serving tiny",
                    f"unloading model {old['name']}: replaced by a reload")
        new = default_runner(client)
        assert new["name"] == old["name"] and new["pid"] != old["pid"] and runner_alive(new["pid"])
        assert client.status()["model"]["path"] == str(tiny_models[1])
        poll(lambda: not runner_alive(old["pid"]), 30, "the old runner gone")
        assert client.generate("Hi", max_tokens=3).wait().stats["completion_tokens"] == 3
    # Shown by the command line too, as one runner: the new one.
    shown = json.loads(rkllmctl("status", "--json", socket=proc.socket).stdout)
    assert [row["pid"] for row in shown["models"]["loaded"]] == [new["pid"]]


def test_a_generation_streaming_when_the_model_changes_ends_on_the_old_model(configured, tiny_models):
    """The old model (the real one) goes on streaming its answer while the new one (tiny)
    already answers the requests received after it was loaded."""
    proc = configured()
    story = {"max_tokens": 160, "temperature": 0.0}
    with proc.client() as first, proc.client() as second:
        expected = first.generate(STORY, **story).wait()
        assert expected.finish_reason == "length"
        old_pid = default_runner(first)["pid"]
        sent = time.monotonic()
        running = first.generate(STORY, **story)
        next(iter(running))  # it streams on the old model
        proc.configure(model=str(tiny_models[0]))
        proc.reload("reload: now serving tiny")
        switched = time.monotonic()
        after = second.generate(messages=CAPITAL["messages"], max_tokens=4).wait()
        done = running.wait()
        assert default_runner(second)["pid"] != old_pid
    assert (done.text, done.finish_reason) == (expected.text, "length")
    # It was still being generated (received at or after ``sent``) when the new model took over.
    assert sent + done.stats["total_ms"] / 1000 > switched, (done.stats, switched - sent)
    assert after.stats["prompt_tokens"] > 2 * CAPITAL["prompt_tokens"]  # the tiny model's byte-level vocabulary
    poll(lambda: in_order(proc.log(), "reload: now serving tiny", "unloading model smollm2-135m-instruct: replaced by a reload"), 30,
         "the old model unloaded once it answered")


def test_a_model_that_fails_to_load_leaves_the_old_runner_serving(configured, tiny_models, tmp_path):
    proc = configured(model=str(tiny_models[0]))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with proc.client() as client:
        before = default_runner(client)
        answer = client.generate("Hi", max_tokens=4).wait().text
        proc.configure(model=str(broken))
        log = proc.reload("reload: cannot load the new model, keeping the running one")
        assert "replaced by a reload" not in log
        assert default_runner(client)["pid"] == before["pid"] and runner_alive(before["pid"])
        assert client.status()["model"]["path"] == str(tiny_models[0])
        assert client.generate("Hi", max_tokens=4).wait().text == answer
        assert client.status()["healthy"]


def test_with_runners_in_the_daemon_a_changed_model_gets_a_worker_of_its_own(tiny_models):
    """daemon.runners = "thread": the new model runs on a new worker in the daemon's process,
    the old one's is stopped once it answered what it was given."""
    old, new = tiny_models
    proc = ConfiguredDaemon(model=str(old), daemon='runners = "thread"')
    try:
        proc.start()
        with proc.client() as client:
            assert default_runner(client)["pid"] == proc.proc.pid
            answer = client.generate("Hi", max_tokens=6).wait()
            running = client.generate(STORY, max_tokens=400)
            next(iter(running))
            proc.configure(model=str(new), daemon='runners = "thread"')
            proc.reload("reload: now serving tiny", timeout=60)
            after = client.generate("Hi", max_tokens=6).wait()
            assert running.wait().stats["completion_tokens"] == 400
            poll(lambda: "unloading model tiny: replaced by a reload" in proc.log(), 30, "the old worker stopped")
            assert client.status()["model"]["path"] == str(new) and default_runner(client)["pid"] == proc.proc.pid
            assert client.status()["healthy"]
        assert after.text != answer.text  # another model's answer (other weights)
    finally:
        proc.cleanup()


def test_the_runner_of_a_replaced_model_that_dies_fails_its_stream_and_is_not_restarted(configured, tiny_models):
    proc = configured()
    with proc.client() as first, proc.client() as second:
        old_pid = default_runner(first)["pid"]
        doomed = first.generate(STORY, max_tokens=400, temperature=0.0)
        next(iter(doomed))  # it streams on the old model
        proc.configure(model=str(tiny_models[0]))
        proc.reload("reload: now serving tiny")
        new_pid = default_runner(second)["pid"]
        os.kill(old_pid, signal.SIGKILL)  # still streaming: 400 tokens take seconds
        with pytest.raises(DaemonError) as ended:
            doomed.wait()
        assert ended.value.name == "backend" and "died: signal 9 (SIGKILL)" in ended.value.message
        poll(lambda: "unloading model smollm2-135m-instruct: replaced by a reload" in proc.log(), 30, "the dead model unloaded")
        assert second.generate("Hi", max_tokens=3).wait().stats["completion_tokens"] == 3
        assert [row["pid"] for row in second.status()["models"]["loaded"]] == [new_pid]
    log = proc.log()
    assert f"(pid {old_pid}) died: signal 9 (SIGKILL)" in log and "starting a new one" not in log
    assert "starting a new runner" not in log and not runner_alive(old_pid)
