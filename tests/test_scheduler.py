"""The scheduler above the runners (issue 23, item 6): one queue for every model.

Admission counts what waits for any model; a model whose clients keep it busy is drained
when another model waits for its room, so it cannot keep that model out; a request whose
prompt starts with the text cache being built waits for the build (``queued`` says so) and
holds no place in the batch meanwhile. Real daemons, real clients, real weights: the
bundled SmolLM2 and its copy (long generations), tiny random llama files (fast ones).
One test drives a model worker in process instead: it holds a build's announcement, so
that the moment it guards comes every time.
"""

from __future__ import annotations

import threading
import time

import pytest

from reliability import poll
from rkllmctl.errors import DaemonError
from test_models import config, loaded_names, pirate_gguf, tiny_files  # noqa: F401 (fixtures)
from test_progress import BIG_TEXT

DEFAULT = "smollm2-135m-instruct"


def first_token(client, stream) -> None:
    """Wait until ``stream`` decodes (it holds its runner's one place)."""
    while (message := client.receive(stream, 120))["type"] != "token":
        assert message["type"] in ("queued", "started", "progress"), message


def test_max_queue_counts_what_waits_for_every_model(make_daemon, pirate_gguf, tmp_path) -> None:
    """Two models, each runner busy with one generation: with max_queue = 2, one request
    waiting for each model fills the daemon's queue; a third is refused whichever model
    it names (a queue per runner would have taken two per model)."""
    proc = make_daemon("--config", str(config(tmp_path, f'[daemon]\nmax_queue = 2\nmax_batch = 1\n[models.pirate]\npath = "{pirate_gguf}"\n')))
    with proc.client() as busy, proc.client() as waiting, proc.client() as late:
        long = dict(max_tokens=400, no_cache=True, temperature=0.0)
        runs = [busy.send("generate", prompt="Tell me a long story about a ship.", model=name, **long) for name in (DEFAULT, "pirate")]
        for run in runs:
            first_token(busy, run)
        queued = [waiting.send("generate", prompt="Say hi.", model=name, max_tokens=2, no_cache=True) for name in (DEFAULT, "pirate")]
        assert [waiting.receive(q, 60) for q in queued] == [
            {"v": 1, "id": q, "type": "queued", "seq": 0, "position": 1} for q in queued]
        status = late.status()
        assert status["models"]["waiting"] == {DEFAULT: 1, "pirate": 1}
        assert [(q["id"], q["model"]) for q in status["requests"]["queued"]] == list(zip(queued, (DEFAULT, "pirate")))
        for name in (DEFAULT, "pirate"):
            with pytest.raises(DaemonError) as full:
                late.generate("Say hi.", model=name, max_tokens=2).wait()
            assert full.value.name == "queue_full" and "the limit is 2" in str(full.value)
        for run in runs:
            assert busy.cancel(run)["was"] == "running"
        for q in queued:
            while (message := waiting.receive(q, 120))["type"] not in ("done", "error"):
                pass
            assert message["type"] == "done" and message["stats"]["completion_tokens"] == 2, message


def test_a_busy_model_is_drained_for_one_that_waits_for_its_room(make_daemon, tiny_files, tmp_path) -> None:
    """One place beside the default model: a client keeps alpha busy with requests always
    queued behind the running one; a request for beta gets its turn while that client is
    still sending (alpha takes nothing received after it, goes idle, is unloaded), and the
    requests sent after it are answered by alpha loaded again."""
    tables = "".join(f'[models.{name}]\npath = "{tiny_files[name]}"\n' for name in ("alpha", "beta"))
    proc = make_daemon("--config", str(config(tmp_path, f"[daemon]\nmax_loaded_models = 2\nmax_batch = 1\n{tables}")))
    beta_done = threading.Event()
    sent_after_beta: list[int] = []
    outcomes: list[dict] = []

    def keep_alpha_busy() -> None:
        with proc.client() as client:
            pending = [client.send("generate", prompt="Count on.", model="alpha", max_tokens=200, temperature=0.0) for _ in range(3)]
            for _ in range(400):  # at most; it stops soon after beta's answer
                while (message := client.receive(pending[0], 120))["type"] not in ("done", "error"):
                    pass
                outcomes.append(message)
                pending.pop(0)
                if beta_done.is_set() and len(sent_after_beta) >= 3:
                    break
                pending.append(client.send("generate", prompt="Count on.", model="alpha", max_tokens=200, temperature=0.0))
                if beta_asked.is_set():
                    sent_after_beta.append(pending[-1])
            for request in pending:
                while (message := client.receive(request, 120))["type"] not in ("done", "error"):
                    pass
                outcomes.append(message)

    beta_asked = threading.Event()
    alpha = threading.Thread(target=keep_alpha_busy)
    alpha.start()
    try:
        with proc.client() as client:
            poll(lambda: "alpha" in loaded_names(client) and len(outcomes) >= 3, 60, "alpha serving a steady stream")
            beta_asked.set()
            answer = client.generate("Say hi.", model="beta", max_tokens=4, temperature=0.0).wait()
            beta_done.set()
            assert answer.stats["completion_tokens"] == 4
    finally:
        beta_done.set()
        alpha.join(180)
    assert not alpha.is_alive()
    assert len(sent_after_beta) >= 3 and len(outcomes) < 400, "beta waited until alpha's client stopped"
    assert all(o["type"] == "done" and o["stats"]["completion_tokens"] > 0 for o in outcomes), outcomes
    log = proc.log()
    assert "model alpha takes no new requests until it is unloaded: model beta waits for room" in log
    assert "unloading model alpha: to make room for beta" in log
    assert "unloading model beta: to make room for alpha" in log  # alpha's later requests loaded it again


def test_a_request_waiting_for_its_prefix_build_says_so_and_frees_its_place(make_daemon) -> None:
    """max_batch 1: a request whose prompt starts with a text cache being built waits for the
    build (``queued`` with ``cache_build``) instead of prefilling the same tokens beside it,
    and a request arriving meanwhile runs in the build's pauses: the waiting one holds no
    place. It then starts from the built cache."""
    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "1"})
    with proc.client() as builder, proc.client() as needs, proc.client() as other:
        builder.cache_put("big", BIG_TEXT)
        poll(lambda: next(e for e in builder.cache_ls()["caches"] if e["name"] == "big")["build"], 60, "the build under way", interval=0.005)
        wanting = needs.send("generate", prompt="Which rule is 7?", cache="big", max_tokens=4)
        while "cache_build" not in (message := needs.receive(wanting, 60)):
            assert message["type"] == "queued", message
        assert message["cache_build"] == "big"
        hi = other.generate("Say hi.", max_tokens=4, no_cache=True).wait()
        assert next(e for e in builder.cache_ls()["caches"] if e["name"] == "big")["state"] == "building", "it ran in the build's pauses"
        while (message := needs.receive(wanting, 120))["type"] != "done":
            pass
    assert hi.stats["completion_tokens"] == 4
    assert message["cache"] == "big" and message["stats"]["cached_tokens"] > 1000


def test_a_request_sent_on_news_of_its_cache_built_does_not_wait_for_that_build(tmp_path) -> None:
    """cache.wait answers when a build's outcome is announced, and a client then asks at once.
    The worker announced it while it still held the build, so a request prepared in that
    moment heard ``queued`` with ``cache_build`` for a build that had ended (once in 31
    fresh runs of the suite: test_message_spec). The build is released first. A model worker
    in process, with a real tiny model: the announcement is held here until the request is
    prepared, so the moment that was rare comes every time."""
    from gguf_files import tiny_llama
    from rkllmd.backends.cpu.backend import CpuBackend
    from rkllmd.caches.binary import BinaryStore
    from rkllmd.caches.manager import READY, PromptCaches
    from rkllmd.caches.text import TextStore
    from rkllmd.config import DaemonConfig
    from rkllmd.outbox import Chat, Generation, Outbox
    from rkllmd.sampling import SamplingParams
    from rkllmd.worker import ModelWorker

    backend = CpuBackend(tiny_llama(tmp_path / "tiny.gguf"))
    backend.load()
    worker = ModelWorker(backend, Outbox(), DaemonConfig())
    rules = "Answer in one word."
    gen = Generation(b"client", 1, SamplingParams(max_tokens=2), "rules", True, time.monotonic(),
                     chat=Chat([{"role": "system", "content": rules}, {"role": "user", "content": "Hi?"}]))
    heard_ready = threading.Event()

    def told(name: str) -> None:  # what the runner sends the daemon: cache.wait answers on it
        entry = caches.entry(name)
        if entry is not None and entry.state == READY and not heard_ready.is_set():
            heard_ready.set()
            worker.submit(gen)  # the client that waited asks at once
            poll(lambda: gen.prepared_for is not None, 30, "the request prepared")

    (tmp_path / "texts").mkdir()
    caches = worker.caches = PromptCaches(TextStore(tmp_path / "texts", 1 << 16), BinaryStore(tmp_path / "binaries", backend.identity()),
                                          backend, memory_budget=1 << 24, schedule_build=worker.schedule_build, on_change=told)
    worker.start()
    try:
        caches.texts.write("rules", rules)
        caches.refresh("rules")
        poll(lambda: gen.ended, 60, "the request answered")
    finally:
        worker.shutdown()
        assert worker.join(30)
    kinds = [(m["type"], m.get("cache_build")) for m in gen.messages]
    assert kinds[0] == ("started", None) and kinds[-1] == ("done", None), kinds
    assert gen.messages[-1]["cache"] == "rules", gen.messages[-1]


def test_a_load_that_cannot_fit_fails_what_waits_for_it_and_the_queue_goes_on(make_daemon, tiny_files, tmp_path) -> None:
    """A model that can never fit beside the default: its waiting requests end with
    ``backend`` saying why, and the scheduler keeps serving the default model."""
    proc = make_daemon("--config", str(config(tmp_path, f'[daemon]\nmax_loaded_models = 1\n[models.alpha]\npath = "{tiny_files["alpha"]}"\n')))
    with proc.client() as client:
        streams = [client.generate("hello", model="alpha", max_tokens=2) for _ in range(2)]
        for stream in streams:
            with pytest.raises(DaemonError) as refused:
                stream.wait()
            assert refused.value.name == "backend" and "cannot fit beside the default model" in str(refused.value)
        assert client.generate("Say hi.", max_tokens=2, no_cache=True).wait().stats["completion_tokens"] == 2
        assert client.status()["models"]["waiting"] == {}


def test_people_a_connection_asks_for_take_turns(make_daemon) -> None:
    """One connection asking for two people (``on_behalf_of``): their turns alternate, as
    two connections' would; status names them."""
    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "2"})
    with proc.client() as gateway, proc.client() as observer:
        alice = [gateway.send("generate", prompt=f"Count to {n}.", max_tokens=30, no_cache=True, on_behalf_of="alice") for n in (30, 40, 50, 60)]
        poll(lambda: len(observer.status()["requests"]["running"]) == 2, 60, "two of alice's running")
        bob = gateway.send("generate", prompt="Say hi.", max_tokens=4, no_cache=True, on_behalf_of="bob")
        assert gateway.receive(bob, 60)["position"] == 2  # behind the two running, before alice's other two
        queued = observer.status()["requests"]["queued"]
        assert [q["id"] for q in queued] == [bob, *alice[2:]]
        assert queued[0]["client"].endswith(" for bob") and queued[1]["client"].endswith(" for alice")
        for request in (*alice, bob):
            while (message := gateway.receive(request, 120))["type"] not in ("done", "error"):
                pass
            assert message["type"] == "done", message
        for bad in ("", "x" * 129):
            with pytest.raises(DaemonError) as refused:
                gateway.generate("hi", max_tokens=1, on_behalf_of=bad).wait()
            assert refused.value.name == "invalid_field" and refused.value.details["field"] == "on_behalf_of"


def test_the_gateways_users_take_turns(make_daemon) -> None:
    """Through rkllmd-http with the official openai client: the gateway is one connection,
    yet a user's burst does not hold up another user (OpenAI's ``user`` names them)."""
    import openai
    from http_gateway import GatewayProcess

    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "2"})
    gateway = GatewayProcess(proc.socket).start()
    try:
        api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

        def ask(user: str, n: int, tokens: int) -> str:
            reply = api.chat.completions.create(model=DEFAULT, messages=[{"role": "user", "content": f"Count to {n}."}],
                                                max_tokens=tokens, temperature=0.0, user=user)
            return reply.choices[0].finish_reason

        answers: dict[str, str] = {}
        threads = [threading.Thread(target=lambda n=n: answers.__setitem__(f"alice{n}", ask("alice", n, 40))) for n in (30, 40, 50, 60)]
        with proc.client() as observer:
            for thread in threads:
                thread.start()
                time.sleep(0.05)  # in this order
            poll(lambda: (s := observer.status()["requests"]) and len(s["running"]) == 2 and len(s["queued"]) == 2, 60, "alice's burst in")
            bob = threading.Thread(target=lambda: answers.__setitem__("bob", ask("bob", 3, 2)))
            bob.start()
            queued = poll(lambda: q if len(q := observer.status()["requests"]["queued"]) == 3 else None, 60, "bob's request in")
            assert [q["client"].split(" for ", 1)[1] for q in queued] == ["user bob", "user alice", "user alice"]
            for thread in (*threads, bob):
                thread.join(180)
        assert sorted(answers) == ["alice30", "alice40", "alice50", "alice60", "bob"] and all(answers.values())
    finally:
        gateway.cleanup()


def test_another_models_generation_comes_before_a_cache_build(make_daemon, pirate_gguf, tmp_path) -> None:
    """While one model generates, another model's cache build waits for it (its chunks would
    take the cores from that stream) within build_max_wait_ms, and runs once it ends."""
    proc = make_daemon("--config", str(config(tmp_path, f'[daemon]\nbuild_max_wait_ms = 600000\n[models.pirate]\npath = "{pirate_gguf}"\n')))
    with proc.client() as streaming, proc.client() as editor:
        run = streaming.send("generate", prompt="Tell me a long story about a ship.", model="pirate", max_tokens=400, no_cache=True)
        first_token(streaming, run)

        def default_state() -> str:
            return next(e for e in editor.cache_ls(model=DEFAULT)["caches"] if e["name"] == "rules")["state"]

        editor.cache_put("rules", BIG_TEXT)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # a build would be under way within a fraction of this
            assert default_state() == "queued"
            time.sleep(0.1)
        assert streaming.cancel(run)["was"] == "running"
        ready = editor.cache_wait("rules", model=DEFAULT, timeout=180)
        assert ready["state"] == "ready"
