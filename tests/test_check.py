"""``rkllmd check``: the real command line, on the real machine and on the fake NPU runtime.

Access is judged for the daemon's account. Where a test needs an account that is not root,
it names ``nobody`` with ``--user`` (the check reads its uid and groups from the system).
The NPU device-node tests give the check a /dev of their own: a private mount namespace
(root and unshare(1)) for the command line, and the check's roots for the in-process one.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import private_dev
import pytest
from fake_rkllm.build import foreign_elf, write_model

from conftest import ROOT
from rkllmd.check import SERVICE_GROUP, SERVICE_SUPPLEMENTARY_GROUPS, SERVICE_USER, Account, run_checks
from rkllmd.config import load


def rkllmd_check(*args: str, folder: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """``rkllmd check`` with its socket and caches in ``folder`` (unless ``args`` say otherwise)."""
    places = []
    if "--socket" not in args:
        places += ["--socket", str(folder / "run" / "rkllmd.sock")]
    places += ["--cache-dir", str(folder / "text"), "--binary-cache-dir", str(folder / "bin")]
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "rkllmd", "check", *places, *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60,
    )


def as_json(out: subprocess.CompletedProcess) -> dict:
    assert not out.stderr.strip() or "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def problems(report: dict) -> list[str]:
    return [p["what"] for p in report["problems"]]


@pytest.fixture
def npu_env(fake_runtime, tmp_path) -> dict[str, str]:
    """A supported library and a model it accepts."""
    return {"RKLLMD_RKLLM_LIBRARY": str(fake_runtime["1.2"]),
            "RKLLMD_RKLLM_MODEL": str(write_model(tmp_path / "model.rkllm"))}


# --- the CPU backend --------------------------------------------------------------------------
def test_healthy_cpu_setup(tmp_path):
    out = rkllmd_check("--backend", "cpu", "--json", folder=tmp_path)
    report = as_json(out)
    assert out.returncode == 0 and report["ok"] and report["problems"] == []
    assert report["backend"] == {"kind": "cpu", "reason": "requested by configuration"}
    model = report["cpu"]["model"]
    assert model["exists"] and model["readable"] and model["magic"] == "ok" and model["size_bytes"] > 50 << 20
    assert report["cpu"]["decode_step"]["compiler"] == shutil.which("cc")
    assert report["rkllm"] is None
    assert report["socket"]["path"] == str(tmp_path / "run" / "rkllmd.sock")
    text = report["caches"]["text"]
    assert (text["folder"], text["exists"], text["writable"]) == (str(tmp_path / "text"), False, True)
    assert text["free_bytes"] > 0

    human = rkllmd_check("--backend", "cpu", folder=tmp_path)
    assert human.returncode == 0
    assert human.stdout.startswith("config:\n") and human.stdout.rstrip().endswith("ok: rkllmd would start")
    assert "  kind: cpu\n  reason: requested by configuration\n" in human.stdout


def test_cpu_model_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    report = as_json(rkllmd_check("--backend", "cpu", "--model", str(bogus), "--json", folder=tmp_path))
    assert problems(report) == [f"{bogus} is not a GGUF file: a text file (a Git LFS pointer? run git lfs pull)"]


# --- the NPU library and model --------------------------------------------------------------------
def test_missing_library(npu_env, tmp_path):
    missing = tmp_path / "nowhere" / "librkllmrt.so"
    out = rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path,
                       env={**npu_env, "RKLLMD_RKLLM_LIBRARY": str(missing)})
    report = as_json(out)
    assert out.returncode == 1 and report["rkllm"]["library"] is None and report["rkllm"]["interface"] is None
    [finding] = [p for p in report["problems"] if "librkllmrt.so not found" in p["what"]]
    assert finding["what"].startswith(f"librkllmrt.so not found (looked at {missing})")
    assert "rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so" in finding["fix"]


def test_foreign_architecture_library(npu_env, tmp_path):
    library = foreign_elf(tmp_path / "librkllmrt.so")
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path,
                                  env={**npu_env, "RKLLMD_RKLLM_LIBRARY": str(library)}))
    rk = report["rkllm"]
    assert rk["machine"] != rk["this_machine"]
    expected = f"{library} is built for {rk['machine']} but this machine is {rk['this_machine']}"
    [finding] = [p for p in report["problems"] if p["what"] == expected]
    assert "aarch64 folder, on the board" in finding["fix"]
    if shutil.which("aarch64-linux-gnu-gcc") and rk["this_machine"] == "x86_64":  # the real fake, cross-built
        assert (rk["machine"], rk["release"], rk["interface"]) == ("aarch64", "1.2.3", "1.2")


def test_model_without_the_magic(npu_env, tmp_path):
    model = tmp_path / "notes.rkllm"
    model.write_text("these are notes, not a model\n")
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path,
                                  env={**npu_env, "RKLLMD_RKLLM_MODEL": str(model)}))
    facts = report["rkllm"]["model"]
    assert facts == {"path": str(model), "exists": True, "size_bytes": 29, "readable": True,
                     "magic": "its first bytes are 74 68 65 73, not the magic da ee b3 36"}
    [finding] = [p for p in report["problems"] if str(model) in p["what"]]
    assert finding["what"] == (f"{model} is not a converted .rkllm model: {facts['magic']} (the runtime would say "
                               "\"invalid rknn llm model magic\")")
    assert "rkllm-toolkit" in finding["fix"]


def test_no_model_configured(npu_env, tmp_path):
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path,
                                  env={**npu_env, "RKLLMD_RKLLM_MODEL": ""}))
    assert "no .rkllm model configured" in problems(report)


def test_the_models_tokenizer_is_checked_but_never_stops_a_start(npu_env, tmp_path):
    """[rkllm] tokenizer lets the daemon sample itself (constrained output, logprobs): without
    it those requests are refused, and a file that is not there is a warning, not a failure."""
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path, env=npu_env))
    assert report["rkllm"]["tokenizer"] == {"path": None, "daemon_samples": False}
    missing = tmp_path / "tokenizer.json"
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path, env={**npu_env, "RKLLMD_RKLLM_TOKENIZER": str(missing)}))
    assert report["rkllm"]["tokenizer"] == {"path": str(missing), "daemon_samples": False}
    assert not [p for p in report["problems"] if "tokenizer" in p["what"]]
    [warning] = [w for w in report["warnings"] if "tokenizer" in w["what"]]
    assert "will be refused" in warning["what"]
    missing.write_text("{}")
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path, env={**npu_env, "RKLLMD_RKLLM_TOKENIZER": str(missing)}))
    assert report["rkllm"]["tokenizer"]["daemon_samples"] and not [w for w in report["warnings"] if "tokenizer" in w["what"]]


# --- the NPU device nodes ---------------------------------------------------------------------------
def test_healthy_npu_setup(npu_env, tmp_path):
    out = rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path, env=npu_env, prefix=private_dev.prefix("0660"))
    report = as_json(out)
    assert out.returncode == 0 and report["ok"], report["problems"]
    rk = report["rkllm"]
    assert (rk["release"], rk["interface"], rk["model"]["magic"]) == ("1.2.3", "1.2", "ok")
    assert rk["devices"] == [{"path": "/dev/rknpu", "mode": "crw-rw---- root:root", "character_device": True,
                              "daemon_user_can_open": True, "you_can_open": True}]
    assert rk["driver"] == {"version": "RKNPU driver: v0.9.8", "source": "/sys/kernel/debug/rknpu/version"}
    assert rk["memory"]["available_bytes"] > rk["memory"]["model_bytes"] > 0


def test_device_node_the_daemon_user_cannot_open(npu_env, tmp_path):
    out = rkllmd_check("--backend", "rkllm", "--json", "--user", "nobody", folder=tmp_path, env=npu_env,
                       prefix=private_dev.prefix("0000"))
    report = as_json(out)
    assert out.returncode == 1
    assert report["rkllm"]["devices"][0]["daemon_user_can_open"] is False
    [finding] = [p for p in report["problems"] if "/dev/rknpu" in p["what"]]
    assert finding["what"] == "nobody cannot open /dev/rknpu for reading and writing (c--------- root:root)"
    assert finding["fix"].startswith("add nobody to group root")


def test_device_node_checked_for_the_account_in_process(fake_runtime, tmp_path):
    """The same judgement without a namespace: a DRM render node of the rknpu driver, mode 000."""
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    (dev / "dri").mkdir(parents=True)
    node = dev / "dri" / "renderD129"
    node.touch(mode=0o000)
    os.chmod(node, 0)
    (sysfs / "bus" / "platform" / "drivers" / "RKNPU").mkdir(parents=True)
    (sysfs / "class" / "drm" / "renderD129" / "device").mkdir(parents=True)
    (sysfs / "class" / "drm" / "renderD129" / "device" / "driver").symlink_to(sysfs / "bus/platform/drivers/RKNPU")
    config = load(environ={"RKLLMD_RKLLM_LIBRARY": str(fake_runtime["1.3"]), "RKLLMD_BACKEND": "rkllm",
                           "RKLLMD_RKLLM_MODEL": str(write_model(tmp_path / "m.rkllm")),
                           "RKLLMD_SOCKET": str(tmp_path / "s.sock"), "RKLLMD_CACHE_TEXT_DIR": str(tmp_path / "t"),
                           "RKLLMD_CACHE_BINARY_DIR": str(tmp_path / "b")}, config_file=None)
    nobody = Account.named("nobody", "test")
    report = run_checks(config, nobody, dev=dev, sysfs=sysfs, proc=tmp_path / "no-proc")
    [facts] = report.sections["rkllm"]["devices"]
    assert (facts["path"], facts["mode"][:10], facts["character_device"]) == (str(node), "----------", False)
    assert facts["daemon_user_can_open"] is False and facts["you_can_open"] is (os.geteuid() == 0)
    assert [p.what for p in report.problems if "/dev/" in p.what] == [
        f"nobody cannot open {node} for reading and writing ({facts['mode']})"]
    assert report.sections["rkllm"]["driver"]["version"] is None
    # Root opens anything: the same node is fine for it.
    root = Account("root", 0, frozenset({0}), "test")
    assert run_checks(config, root, dev=dev, sysfs=sysfs, proc=tmp_path / "no-proc").ok


# --- socket and caches ----------------------------------------------------------------------------------
@pytest.fixture
def open_tmp():
    """A folder under /tmp that another user may enter (pytest's own are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="rkcheck-", dir="/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_socket_folder_the_user_cannot_enter(open_tmp):
    """Judged for nobody when we are root (root enters anything; the interpreter under /root
    is not nobody's to run), else for ourselves, refused by a folder of mode 000."""
    locked = open_tmp / "locked"
    locked.mkdir(mode=0o700)
    writable = open_tmp / "open"
    writable.mkdir()
    os.chmod(writable, 0o777)
    user = ("--user", "nobody") if os.geteuid() == 0 else ()
    if not user:
        os.chmod(locked, 0o000)
    name = "nobody" if user else pwd.getpwuid(os.geteuid()).pw_name
    try:
        out = rkllmd_check("--backend", "cpu", "--json", "--socket", str(locked / "run" / "rkllmd.sock"), *user,
                           folder=writable, env={"RKLLMD_MODEL_WEIGHTS_DIR": str(writable / "w"),
                                                            "RKLLMD_MODEL_KERNELS_DIR": str(writable / "k")})
    finally:
        os.chmod(locked, 0o700)
    report = as_json(out)
    assert out.returncode == 1 and report["daemon_user"]["name"] == name
    assert problems(report) == [f"{name} cannot create the socket in {locked / 'run'}: it cannot enter {locked}"]
    assert "choose another --socket" in report["problems"][0]["fix"]


def test_cache_folder_the_user_cannot_write(tmp_path):
    text = tmp_path / "text"
    text.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    report = as_json(rkllmd_check("--backend", "cpu", "--json", "--user", "nobody", "--socket",
                                  str(Path("/tmp") / f"rkcheck-{os.getpid()}" / "s.sock"), folder=tmp_path,
                                  env={"RKLLMD_MODEL_WEIGHTS_DIR": "", "RKLLMD_MODEL_KERNELS_DIR": ""}))
    found = problems(report)  # nobody owns neither the folder nor tmp_path (0755)
    assert f"nobody cannot write the text cache folder {text}" in found
    assert f"nobody cannot write the binary cache folder {tmp_path / 'bin'}" in found


def test_unknown_user(tmp_path):
    out = rkllmd_check("--backend", "cpu", "--user", "no-such-user-here", folder=tmp_path)
    assert out.returncode == 2 and "no user 'no-such-user-here' on this system" in out.stderr


def test_service_identity_is_the_units():
    unit = (ROOT / "systemd" / "rkllmd.service").read_text()
    settings = dict(re.findall(r"^(User|Group|SupplementaryGroups)=(.*)$", unit, re.M))
    assert settings == {"User": SERVICE_USER, "Group": SERVICE_GROUP,
                        "SupplementaryGroups": " ".join(SERVICE_SUPPLEMENTARY_GROUPS)}


def test_check_help_names_the_exit_status():
    out = subprocess.run([sys.executable, "-m", "rkllmd", "check", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "Exit status 0: it would start; 1: it would not." in " ".join(out.stdout.split())
