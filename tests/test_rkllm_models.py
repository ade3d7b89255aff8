"""Several .rkllm models at once (issue 23, "The NPU side"): one library, a handle per model.

The fake runtime (tests/fake_rkllm/fake_rkllm.c) counts its live handles and the NPU memory
each holds (its model file's size: the files here are sparse, so "600 MiB" models cost no
disk), and fails ``rkllm_init`` as the vendor's 1.2.x runtimes do when FAKE_RKLLM_NPU_MB is
exceeded: "failed to malloc npu memory" on stderr and -1. A model file's ``says=WORD`` makes
its replies start "WORD: ", so each model's answers are its own. Both in process (the
backend's handles side by side) and through the real daemon and client: models served by
name at once, the runtime's memory running out (a ``backend`` error in the runtime's words,
the other models serving on), the daemon's budget unloading the least recently used idle
model first, and ``rkllmd check`` listing every configured model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from fake_rkllm.build import write_model, write_tokenizer

from conftest import ROOT, DaemonProcess
from rkllmctl.errors import DaemonError
from rkllmd.backends.rkllm.backend import RkllmBackend
from rkllmd.backends.rkllm.library import RkllmStartupError
from rkllmd.backends.rkllm.runtime import RkllmRuntime
from rkllmd.sampling import SamplingParams

MIB = 1 << 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def sparse_model(path: Path, says: str, mib: int, footer: str = "") -> Path:
    """A model file the fake accepts, ``mib`` MiB large (sparse), whose replies start "says: "."""
    write_model(path, f"a fake .rkllm model says={says}\n")
    with open(path, "r+b") as f:
        f.truncate(mib * MIB - len(footer))
        f.seek(0, os.SEEK_END)
        f.write(footer.encode())
    return path


def calls(log: Path, name: str) -> list[dict[str, str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [dict(w.split("=", 1) for w in line.split(" ")[1:] if "=" in w) for line in lines if line.split(" ")[0] == name]


def answer(backend: RkllmBackend, text: str) -> str:
    pieces: list[str] = []
    backend.generate(backend.render([{"role": "user", "content": text}]), GREEDY, None, lambda piece: pieces.append(piece) or True)
    return "".join(pieces)


# --- in process: handles side by side ------------------------------------------------------------
@pytest.mark.parametrize("generation", ("1.2", "1.3"))
def test_two_handles_of_one_library_answer_each_as_its_model(fake_runtime, tmp_path, monkeypatch, generation):
    """Two backends, one library opened once, two handles: each handle's callbacks carry its own
    userdata and reach its own stream, also while both run at once on two threads."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_RKLLM_LOG", str(log))
    monkeypatch.setenv("FAKE_RKLLM_DECODE_US", "2000")
    alpha = RkllmBackend(sparse_model(tmp_path / "alpha.rkllm", "alpha", 3), library=fake_runtime[generation])
    beta = RkllmBackend(sparse_model(tmp_path / "beta.rkllm", "beta", 5), library=fake_runtime[generation])
    alpha.load()
    beta.load()
    try:
        assert alpha._rt._lib is beta._rt._lib  # one library, bound once
        assert alpha._rt.userdata != beta._rt.userdata
        # Counted by the library, for the whole process (other tests' handles may still be alive in it).
        (first, second) = [(int(c["handles"]), int(c["npu_used_mb"])) for c in calls(log, "rkllm_init")]
        assert second[0] == first[0] + 1 and second[1] - first[1] == 5  # beta holds its 5 MiB
        answers: dict[str, str] = {}
        threads = [threading.Thread(target=lambda b=b, n=n: answers.__setitem__(n, answer(b, f"hello from {n} " * 8)))
                   for n, b in (("alpha", alpha), ("beta", beta))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == {n: f"{n}: " + f"hello from {n} " * 8 for n in ("alpha", "beta")}

        # An abort reaches only its own handle: alpha's endless run is cut, beta's run beside it ends by itself.
        pieces: list[str] = []
        cut = threading.Event()

        def endless_alpha() -> None:
            def sink(piece: str) -> bool:
                pieces.append(piece)
                if len(pieces) == 5:
                    cut.set()
                return True

            params = SamplingParams(temperature=0.0, max_tokens=4000)  # the runtime's limit (1024 tokens) is far
            stats = alpha.generate(alpha.render([{"role": "user", "content": "[[fake:endless]] go"}]), params, None, sink, cancelled=stop)
            answers["alpha-endless"] = stats.finish_reason

        stop = threading.Event()
        runner = threading.Thread(target=endless_alpha)
        runner.start()
        assert cut.wait(30)
        before = len(calls(log, "rkllm_abort"))
        stop.set()
        alpha.interrupt(stop)
        assert answer(beta, "on my own") == "beta: on my own"
        runner.join(30)
        assert answers["alpha-endless"] == "cancelled" and len(calls(log, "rkllm_abort")) > before
        # alpha's run ended by our pause or the abort, whichever the runtime saw first; beta's by itself.
        ends = sorted(c["reason"] for c in calls(log, "rkllm_run_end")[-2:])
        assert ends in (["abort", "eos"], ["eos", "pause"])
    finally:
        beta.close()
        alpha.close()
    assert [(int(c["handles"]), int(c["npu_used_mb"])) for c in calls(log, "rkllm_destroy")] == [(first[0], first[1]), (first[0] - 1, first[1] - 3)]


def test_a_callback_with_another_handles_userdata_is_refused(fake_runtime, tmp_path):
    """The 1.2 interface passes rkllm_run's userdata to the callback: a runtime that mixed up
    handles would hand one model's tokens to another's stream. The binding refuses them."""
    backend = RkllmBackend(sparse_model(tmp_path / "m.rkllm", "m", 1), library=fake_runtime["1.2"])
    backend.load()
    try:
        rt: RkllmRuntime = backend._rt
        seen: list[str] = []
        # The callback as the C side calls it, with the userdata of some other handle.
        rt._handler = lambda state, result: seen.append("reached") or 0
        assert rt._dispatch(None, rt.userdata + 1, 0) == 1 and seen == []
        assert "another handle's result" in str(rt._callback_error)
    finally:
        backend._rt._handler, backend._rt._callback_error = None, None
        backend.close()


def test_the_npu_memory_running_out_fails_init_in_the_runtimes_words(fake_runtime, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FAKE_RKLLM_NPU_MB", "10")
    monkeypatch.setenv("FAKE_RKLLM_LOG", str(tmp_path / "calls.log"))
    first = RkllmBackend(sparse_model(tmp_path / "a.rkllm", "a", 6), library=fake_runtime["1.2"])
    first.load()
    try:
        second = RkllmBackend(sparse_model(tmp_path / "b.rkllm", "b", 6), library=fake_runtime["1.2"])
        with pytest.raises(RkllmStartupError) as refused:
            second.load()
        message = str(refused.value)
        assert refused.value.runtime_code == -1
        assert "the runtime said: failed to allocate handle, ret: -1, errno: 12, errstr: Cannot allocate memory; " \
               f"failed to malloc npu memory, size: {6 * MIB}, flags: 0x2; load model file error!; rkllm_init failed" in message
        assert "daemon.models_memory_mb" in message
        assert "E RKNN:" in capfd.readouterr().err  # still on stderr (the journal) as the runtime wrote it
        assert answer(first, "still here") == "a: still here"
    finally:
        first.close()
    again = RkllmBackend(tmp_path / "b.rkllm", library=fake_runtime["1.2"])
    again.load()  # the first handle's memory is back
    again.close()


def test_the_130_runtime_crashes_where_12x_returns_an_error(fake_runtime, tmp_path):
    """rknn-llm #522: a second rkllm_init that runs out of NPU memory segfaults in 1.3.0. The
    fake does too, so what runs a 1.3.0 model must survive its process dying."""
    script = (
        "import sys; from pathlib import Path; from rkllmd.backends.rkllm.backend import RkllmBackend\n"
        "a = RkllmBackend(Path(sys.argv[2]), library=Path(sys.argv[1])); a.load()\n"
        "b = RkllmBackend(Path(sys.argv[3]), library=Path(sys.argv[1])); b.load()\n"
    )
    a, b = sparse_model(tmp_path / "a.rkllm", "a", 6), sparse_model(tmp_path / "b.rkllm", "b", 6)
    out = subprocess.run([sys.executable, "-c", script, str(fake_runtime["1.3"]), str(a), str(b)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "FAKE_RKLLM_NPU_MB": "10"}, timeout=60)
    assert out.returncode == -11, out.stderr
    assert "failed to malloc npu memory" in out.stderr and "Segmentation fault" in out.stderr


# --- the daemon -----------------------------------------------------------------------------------
class NpuModels(DaemonProcess):
    """``rkllmd`` on the fake 1.2 runtime: a default .rkllm model and [models.NAME] ones."""

    def __init__(self, library: Path, models: dict[str, int], *, npu_mb: int, budget_mb: int = 0, tokenizers: tuple[str, ...] = ()):
        folder = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
        self.calls_log = folder / "calls.log"
        self.files = {name: sparse_model(folder / f"{name}.rkllm", name, mib) for name, mib in models.items()}
        default, *others = self.files
        self.tokenizers = {name: write_tokenizer(folder / f"{name}.tokenizer.json") for name in tokenizers}
        tables = "".join(f'[models.{name}]\npath = "{self.files[name]}"\n'
                         + (f'tokenizer = "{self.tokenizers[name]}"\n' if name in self.tokenizers else "") for name in others)
        config = folder / "rkllmd.toml"
        config.write_text(f'[daemon]\nmodels_memory_mb = {budget_mb}\nmax_loaded_models = 8\n[model]\nname = "{default}"\n'
                          f'[rkllm]\nmodel = "{self.files[default]}"\n{tables}')
        self.config = config
        # The NPU is one device for the daemon's runner processes (one per model): its memory
        # is counted across them, as the driver counts it (FAKE_RKLLM_NPU_DEVICE).
        env = {"RKLLMD_RKLLM_LIBRARY": str(library), "FAKE_RKLLM_LOG": str(self.calls_log), "FAKE_RKLLM_NPU_MB": str(npu_mb),
               "FAKE_RKLLM_NPU_DEVICE": str(folder / "npu.device")}
        super().__init__("--backend", "rkllm", "--config", str(config), env=env, folder=folder)

    def handles(self) -> int:
        """Live handles, as the fake's last successful rkllm_init or rkllm_destroy counted them."""
        lines = self.calls_log.read_text().splitlines()
        last = [line for line in lines if line.startswith(("rkllm_init ", "rkllm_destroy")) and " handles=" in line]
        return int(last[-1].split(" handles=")[1].split(" ")[0])


@pytest.fixture
def npu_models(fake_runtime):
    made: list[NpuModels] = []

    def make(models: dict[str, int], **kwargs) -> NpuModels:
        proc = NpuModels(fake_runtime["1.2"], models, **kwargs)
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.cleanup()


def ask(client, model: str, text: str) -> str:
    return client.generate(text, model=model, max_tokens=16, temperature=0).wait().text


def loaded(client) -> list[str]:
    return sorted(m["name"] for m in client.models()["loaded"])


def token_counts(client) -> dict[str, str]:
    return {m["name"]: m["describe"]["token_counts"] for m in client.models()["loaded"]}


def test_models_served_by_name_at_once_until_the_npu_memory_runs_out(npu_models):
    """Three 400 MiB models and 1000 MiB of NPU memory: two load beside each other (two
    handles), the third's rkllm_init fails; its requests end with ``backend`` in the runtime's
    words, and the two loaded models keep answering, each as its file says."""
    proc = npu_models({"alpha": 400, "beta": 400, "gamma": 400}, npu_mb=1000, tokenizers=("beta",))
    with proc.client() as client:
        assert ask(client, "alpha", "hi") == "alpha: hi"
        assert ask(client, "beta", "hi") == "beta: hi"
        assert ask(client, "alpha", "again") == "alpha: again"  # the default: its own handle still
        assert loaded(client) == ["alpha", "beta"] and proc.handles() == 2
        # Each model counts with its own tokenizer, never the default's.
        assert token_counts(client) == {"alpha": "bounded: UTF-8 bytes + 2 (no [rkllm] tokenizer)",
                                        "beta": f"exact (tokenizer {proc.tokenizers['beta']})"}
        with pytest.raises(DaemonError) as refused:
            ask(client, "gamma", "hi")
        assert refused.value.name == "backend"
        assert refused.value.message.startswith("cannot load model gamma: rkllm_init failed with code -1 for model "
                                                f"{proc.files['gamma']}: the runtime said: ")
        assert f"failed to malloc npu memory, size: {400 * MIB}, flags: 0x2" in refused.value.message
        assert proc.handles() == 2 and loaded(client) == ["alpha", "beta"]
        assert ask(client, "beta", "still") == "beta: still" and ask(client, "alpha", "still") == "alpha: still"
        with pytest.raises(DaemonError) as again:  # not a broken state: the next try fails the same way
            ask(client, "gamma", "hi")
        assert again.value.name == "backend" and "failed to malloc npu memory" in again.value.message
        with pytest.raises(DaemonError) as embedding:  # an embed request waiting for it hears the same
            client.embed("hi", model="gamma")
        assert embedding.value.name == "backend" and "failed to malloc npu memory" in embedding.value.message
        assert len(client.embed("hi", model="beta")["embeddings"][0]) == 64  # the fake's hidden layer width
    assert "E RKNN:" in proc.log() and "cannot load model gamma" in proc.log()


def test_the_budget_unloads_the_least_recently_used_idle_model_so_the_next_fits(npu_models):
    """The same NPU with daemon.models_memory_mb = 1000: before gamma's rkllm_init the pool
    unloads beta (idle, least recently used), its handle destroyed, and gamma loads."""
    proc = npu_models({"alpha": 400, "beta": 400, "gamma": 400}, npu_mb=1000, budget_mb=1000)
    with proc.client() as client:
        assert ask(client, "beta", "hi") == "beta: hi"
        assert proc.handles() == 2
        assert ask(client, "gamma", "hi") == "gamma: hi"
        assert loaded(client) == ["alpha", "gamma"] and proc.handles() == 2
        assert "unloading model beta: to make room for gamma" in proc.log()
        assert ask(client, "beta", "back") == "beta: back"  # gamma goes in turn
        assert loaded(client) == ["alpha", "beta"] and proc.handles() == 2
        # Each unload destroyed its handle before the next rkllm_init: only the default's memory was left.
        assert [(c["handles"], c["npu_used_mb"]) for c in calls(proc.calls_log, "rkllm_destroy")] == [("1", "400")] * 2


def test_check_lists_every_configured_model(fake_runtime, tmp_path):
    footer = "rkllm-toolkit version: 1.2.1"
    models = {"alpha": sparse_model(tmp_path / "alpha_w8a8_rk3588.rkllm", "alpha", 2, footer),
              "beta": sparse_model(tmp_path / "beta_w8a8_rk3576.rkllm", "beta", 3, footer)}
    missing = tmp_path / "gone.rkllm"
    tokenizer = write_tokenizer(tmp_path / "beta.tokenizer.json")
    config = tmp_path / "rkllmd.toml"
    config.write_text(f'[model]\nname = "alpha"\n[rkllm]\nmodel = "{models["alpha"]}"\n'
                      f'[models.beta]\npath = "{models["beta"]}"\ntokenizer = "{tokenizer}"\n[models.gone]\npath = "{missing}"\n'
                      '[models.terse]\nfrom = "beta"\nsystem = "Be terse."\n')

    def check(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rkllmd", "check", *flags, "--config", str(config), "--backend", "rkllm",
             "--socket", str(tmp_path / "run" / "s.sock"), "--cache-dir", str(tmp_path / "t"), "--binary-cache-dir", str(tmp_path / "b")],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RKLLMD_RKLLM_LIBRARY": str(fake_runtime["1.2"])}, timeout=60,
        )

    out = check("--json")
    report = json.loads(out.stdout)
    listed = {m["name"]: m for m in report["models"]}
    assert sorted(listed) == ["alpha", "beta", "gone", "terse"]
    alpha, beta = listed["alpha"], listed["beta"]
    assert (alpha["default"], alpha["kind"], alpha["path"], alpha["size_bytes"]) == (True, "rkllm", str(models["alpha"]), 2 * MIB)
    assert (alpha["readable"], alpha["magic"], alpha["toolkit"], alpha["platform_in_name"]) == (True, "ok", "1.2.1", "rk3588")
    assert (beta["default"], beta["kind"], beta["toolkit"], beta["platform_in_name"]) == (False, "rkllm", "1.2.1", "rk3576")
    assert (beta["tokenizer"]["path"], beta["tokenizer"]["token_counts"], beta["tokenizer"]["loads"]) == (str(tokenizer), "exact", True)
    assert listed["gone"]["exists"] is False
    assert (listed["terse"]["kind"], listed["terse"]["from"], listed["terse"]["weights"]) == ("derived", "beta", "beta")
    assert f"model gone: model file {missing} does not exist" in [p["what"] for p in report["problems"]]
    assert report["unloadable_models"] == ["gone"]
    assert out.returncode == 1
    human = check()
    assert human.returncode == 1 and "  - name: beta\n    default: False\n    kind: rkllm\n" in human.stdout
    assert not any("rknn-llm #522" in w["what"] for w in report["warnings"])  # 1.2.3 fails cleanly
    # On 1.3.0 two .rkllm models without daemon.models_memory_mb: a second init may crash the process.
    on_130 = subprocess.run(
        [sys.executable, "-m", "rkllmd", "check", "--json", "--config", str(config), "--backend", "rkllm", "--socket",
         str(tmp_path / "run" / "s.sock"), "--cache-dir", str(tmp_path / "t"), "--binary-cache-dir", str(tmp_path / "b")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RKLLMD_RKLLM_LIBRARY": str(fake_runtime["1.3"])}, timeout=60)
    [crash] = [w for w in json.loads(on_130.stdout)["warnings"] if "rknn-llm #522" in w["what"]]
    assert "alpha, beta" in crash["what"] and "daemon.models_memory_mb" in crash["fix"]
    assert (alpha["memory_bytes"], beta["memory_bytes"]) == (2 * MIB, 3 * MIB)  # the NPU maps the file whole
    # A budget beta can never fit in beside the default: a warning (the daemon would refuse it).
    config.write_text("[daemon]\nmodels_memory_mb = 4\n" + config.read_text())
    [budget] = [w["what"] for w in json.loads(check("--json").stdout)["warnings"] if "models_memory_mb" in w["what"]]
    assert budget == "model beta (3.0 MiB) cannot load beside the default model (2.0 MiB) within daemon.models_memory_mb = 4: every request for it fails"
    board = report["rkllm"]["board"]
    # Whether the platform matches is known only where the board's SoC is (an rk3588 here: none).
    assert alpha["platform_matches"] == (None if board is None else board == "rk3588")
