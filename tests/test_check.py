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
from fake_rkllm.build import foreign_elf, write_model, write_tokenizer

from conftest import ROOT, skip_without
from gguf_files import tiny_llama
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
                     "magic": "its first bytes are 74 68 65 73, not the magic da ee b3 36", "platform_in_name": None}
    [finding] = [p for p in report["problems"] if str(model) in p["what"]]
    assert finding["what"] == (f"{model} is not a converted .rkllm model: {facts['magic']} (the runtime would say "
                               "\"invalid rknn llm model magic\")")
    assert "rkllm-toolkit" in finding["fix"]


def test_no_model_configured(npu_env, tmp_path):
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path,
                                  env={**npu_env, "RKLLMD_RKLLM_MODEL": ""}))
    assert "no .rkllm model configured" in problems(report)


@pytest.mark.parametrize("case", ["unset", "loads", "missing", "not a tokenizer", "unreadable"])
def test_the_tokenizer_file(npu_env, tmp_path, case):
    """``[rkllm] tokenizer``: unset, counts are bounded; set, the file must exist, be readable by
    the daemon's account and load as the daemon loads it (else its start fails)."""
    path = tmp_path / "tokenizer.json"
    if case in ("loads", "unreadable"):
        write_tokenizer(path)
    elif case == "not a tokenizer":
        path.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    if case == "unreadable":
        path.chmod(0o600)
    user = ["--user", "nobody"] if case == "unreadable" else []
    env = {**npu_env, "RKLLMD_RKLLM_TOKENIZER": "" if case == "unset" else str(path)}
    report = as_json(rkllmd_check("--backend", "rkllm", "--json", *user, folder=tmp_path, env=env))
    facts = report["rkllm"]["tokenizer"]
    found = [p for p in report["problems"] if str(path) in p["what"] or "[rkllm] tokenizer" in p["what"]]
    if case == "unset":
        assert facts == {"path": None, "token_counts": "bounded: UTF-8 bytes + 2"} and not found
    elif case == "loads":
        assert facts == {"path": str(path), "exists": True, "size_bytes": path.stat().st_size, "readable": True,
                         "token_counts": "exact", "loads": True} and not found
    elif case == "missing":
        assert facts["exists"] is False and "loads" not in facts
        assert [(f["what"], f["fix"]) for f in found] == [
            (f"tokenizer file {path} does not exist", "set [rkllm] tokenizer to the tokenizer file's path")]
    elif case == "not a tokenizer":
        assert facts["readable"] is True and facts["loads"] is False
        [finding] = found
        assert finding["what"].startswith(f"[rkllm] tokenizer {path} cannot be loaded: ")
        assert "tokenizer.json of the Hugging Face model the .rkllm was converted from" in finding["fix"]
    else:
        assert facts["readable"] is False and "loads" not in facts
        assert [f["what"] for f in found] == [f"nobody cannot read {path}"]


# --- the NPU device nodes ---------------------------------------------------------------------------
def test_healthy_npu_setup(npu_env, tmp_path):
    out = rkllmd_check("--backend", "rkllm", "--json", folder=tmp_path, env=npu_env, prefix=private_dev.prefix("0660"))
    report = as_json(out)
    assert out.returncode == 0 and report["ok"], report["problems"]
    rk = report["rkllm"]
    assert (rk["release"], rk["interface"], rk["model"]["magic"]) == ("1.2.3", "1.2", "ok")
    assert rk["devices"] == [{"path": "/dev/rknpu", "mode": "crw-rw---- root:root", "character_device": True,
                              "daemon_user_can_open": True, "you_can_open": True}]
    assert rk["driver"] == {"version": "0.9.8", "text": "RKNPU driver: v0.9.8", "source": "/sys/kernel/debug/rknpu/version",
                            "why_unreadable": None, "mainline_driver": None}
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


# --- the NPU driver, the board and what a model file says -----------------------------------------------
# The kernel's files as they are on a board (formats from the vendor's driver source, rknn-llm's
# rknpu_driver_0.9.8: MODULE_VERSION("0.9.8") in rknpu_drv.c, seq_printf("%s: v%d.%d.%d\n") in
# rknpu_debugger.c; /proc/self/mounts and the device tree's NUL-separated compatible strings),
# in a tree given to ``rkllmd check --root``.
DEBUGFS_MOUNT = "debugfs /sys/kernel/debug debugfs rw,nosuid,nodev,noexec,relatime 0 0\n"
RK3588_BOARD = b"radxa,rock-5b\0rockchip,rk3588\0"


def board(root: Path, *, module: str | None = None, debugfs: str | None = None, mounts: str = DEBUGFS_MOUNT,
          compatible: bytes | None = RK3588_BOARD, rknpu_module: bool = False, rocket: str | None = None) -> Path:
    """A board's dev/, sys/ and proc/ under ``root``: what the rknpu driver shows, or mainline's
    rocket (``rocket``: "module" or "accel"), with /dev/rknpu present."""
    (root / "dev").mkdir(parents=True)
    (root / "dev" / "rknpu").touch(mode=0o666)
    if module is not None or rknpu_module:
        (root / "sys" / "module" / "rknpu").mkdir(parents=True)
    if module is not None:
        (root / "sys" / "module" / "rknpu" / "version").write_text(module)
    if debugfs is not None:
        (root / "sys" / "kernel" / "debug" / "rknpu").mkdir(parents=True)
        (root / "sys" / "kernel" / "debug" / "rknpu" / "version").write_text(debugfs)
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "mounts").write_text("sysfs /sys sysfs rw 0 0\nproc /proc proc rw 0 0\n" + mounts)
    (root / "proc" / "meminfo").write_text("MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n")
    if compatible is not None:
        (root / "sys" / "firmware" / "devicetree" / "base").mkdir(parents=True)
        (root / "sys" / "firmware" / "devicetree" / "base" / "compatible").write_bytes(compatible)
    if rocket == "module":
        (root / "sys" / "module" / "rocket").mkdir(parents=True)
    elif rocket == "accel":
        (root / "sys" / "bus" / "platform" / "drivers" / "rocket").mkdir(parents=True)
        (root / "sys" / "class" / "accel" / "accel0" / "device").mkdir(parents=True)
        (root / "sys" / "class" / "accel" / "accel0" / "device" / "driver").symlink_to(root / "sys/bus/platform/drivers/rocket")
        (root / "dev" / "accel").mkdir()
        (root / "dev" / "accel" / "accel0").touch()
    return root


def check_board(npu_env, tmp_path, root: Path, model: Path | None = None) -> tuple[int, dict]:
    """The check of ``root`` in process (the command line's --root: test_check_reads_a_boards_tree)."""
    env = {**npu_env, **({"RKLLMD_RKLLM_MODEL": str(model)} if model else {}), "RKLLMD_BACKEND": "rkllm",
           "RKLLMD_SOCKET": str(tmp_path / "run" / "s.sock"), "RKLLMD_CACHE_TEXT_DIR": str(tmp_path / "text"),
           "RKLLMD_CACHE_BINARY_DIR": str(tmp_path / "bin")}
    report = run_checks(load(environ=env, config_file=None), Account.current(), dev=root / "dev", sysfs=root / "sys", proc=root / "proc")
    return (0 if report.ok else 1), json.loads(json.dumps(report.as_json()))


def test_check_reads_a_boards_tree(npu_env, tmp_path):
    """``rkllmd check --root DIR``: the kernel's files of a board copied to DIR, judged as on the board."""
    root = board(tmp_path / "board", debugfs="RKNPU driver: v0.9.7\n")
    out = rkllmd_check("--backend", "rkllm", "--json", "--root", str(root), folder=tmp_path, env=npu_env)
    report = as_json(out)
    assert out.returncode == 0 and report["rkllm"]["devices"][0]["path"] == str(root / "dev" / "rknpu")
    assert report["rkllm"]["driver"]["version"] == "0.9.7" and report["rkllm"]["board"] == "rk3588"
    assert report["rkllm"]["memory"]["available_bytes"] == 12000000 * 1024
    human = rkllmd_check("--backend", "rkllm", "--root", str(root), folder=tmp_path, env=npu_env).stdout
    assert "  driver:\n    version: 0.9.7\n    text: RKNPU driver: v0.9.7\n" in human
    assert "NPU driver 0.9.7 is older than 0.9.8" in human


@pytest.mark.parametrize("files, version, source, warning", [
    ({"module": "0.9.8\n"}, "0.9.8", "sys/module/rknpu/version", None),
    ({"module": "0.9.8\n", "debugfs": "RKNPU driver: v0.9.8\n"}, "0.9.8", "sys/module/rknpu/version", None),
    ({"debugfs": "RKNPU driver: v0.9.7\n"}, "0.9.7", "sys/kernel/debug/rknpu/version", "NPU driver 0.9.7 is older than 0.9.8, which the RKLLM SDK user guide asks for"),
    ({"debugfs": "RKNPU driver: v0.9.6\n"}, "0.9.6", "sys/kernel/debug/rknpu/version", "NPU driver 0.9.6 is older than 0.9.7: the runtime warns"),
    ({"debugfs": "RKNPU driver: v0.8.2\n"}, "0.8.2", "sys/kernel/debug/rknpu/version", "NPU driver 0.8.2 is older than 0.9.7"),
], ids=["module", "module-first", "0.9.7", "0.9.6", "0.8.2"])
def test_driver_version_and_what_the_sdk_asks(npu_env, tmp_path, files, version, source, warning):
    root = board(tmp_path / "board", **files)
    code, report = check_board(npu_env, tmp_path, root)
    driver = report["rkllm"]["driver"]
    assert (driver["version"], driver["source"], driver["why_unreadable"]) == (version, str(root / source), None)
    found = [w for w in report["warnings"] if w["what"].startswith("NPU driver")]
    assert [w["what"][:len(warning)] for w in found] == ([warning] if warning else [])
    assert all("docs/npu.md" in w["fix"] and "kernel" in w["fix"] for w in found)
    assert code == 0 and report["ok"]  # an old driver is a warning: the runtime decides
    assert report["rkllm"]["board"] == "rk3588"


@pytest.mark.parametrize("files, why", [
    ({"mounts": ""}, "no rknpu driver is loaded; debugfs is not mounted (sudo mount -t debugfs none {root}/sys/kernel/debug)"),
    ({}, "no rknpu driver is loaded"),
    ({"rknpu_module": True, "mounts": ""}, "the driver declares no module version (older ones show it only in debugfs); "
                                            "debugfs is not mounted (sudo mount -t debugfs none {root}/sys/kernel/debug)"),
    ({"rknpu_module": True}, "the driver shows no version: no module version, no {root}/sys/kernel/debug/rknpu/version "
                             "(built without CONFIG_ROCKCHIP_RKNPU_DEBUG_FS)"),
], ids=["nothing", "nothing-mounted", "no-module-version", "no-debugfs-file"])
def test_why_the_driver_version_cannot_be_read(npu_env, tmp_path, files, why):
    root = board(tmp_path / "board", **files)
    _, report = check_board(npu_env, tmp_path, root)
    driver = report["rkllm"]["driver"]
    assert (driver["version"], driver["source"], driver["why_unreadable"]) == (None, None, why.format(root=root))


def test_debugfs_is_for_root_only(open_tmp):
    """As any user but root (here nobody, after the imports), debugfs refuses: the check says so."""
    root = board(open_tmp / "board", debugfs="RKNPU driver: v0.9.8\n")
    os.chmod(root / "sys" / "kernel" / "debug", 0o700)  # debugfs' own mode
    script = ("import os, sys; from pathlib import Path; from rkllmd.backends.rkllm.devices import read_driver; "
              "os.setgid(65534); os.setuid(65534); root = Path(sys.argv[1]); "
              "print(read_driver(root / 'sys', root / 'proc', root / 'dev').why)")
    if os.geteuid() != 0:
        skip_without("root, to drop to nobody")
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.stdout == f"{root}/sys/kernel/debug/rknpu/version is readable by root only (debugfs): run rkllmd check with sudo\n", out.stderr


@pytest.mark.parametrize("how", ["module", "accel"])
def test_the_mainline_rocket_driver_is_named_and_refused(npu_env, tmp_path, how):
    root = board(tmp_path / "board", rocket=how)
    code, report = check_board(npu_env, tmp_path, root)
    shown = str(root / "sys/module/rocket") if how == "module" else str(root / "dev/accel/accel0")
    assert report["rkllm"]["driver"]["mainline_driver"] == shown
    assert report["rkllm"]["driver"]["why_unreadable"] == f"the NPU is driven by mainline Linux's rocket driver ({shown}), not the vendor's rknpu"
    [finding] = [p for p in report["problems"] if "rocket" in p["what"]]
    assert finding["what"] == f"the NPU is driven by mainline Linux's rocket driver ({shown}): librkllmrt.so speaks only to Rockchip's rknpu driver"
    assert "vendor's rknpu driver" in finding["fix"] and code == 1


FOOTER = "rkllm-toolkit version: {}"


@pytest.mark.parametrize("name, toolkit, compatible, warnings", [
    ("qwen2.5-1.5b-w8a8_rk3588.rkllm", "1.2.1b1", RK3588_BOARD, []),
    ("Qwen2.5-3B-Instruct-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm", "1.2.3", b"xunlong,orangepi-5\0rockchip,rk3588s\0", []),
    ("DeepSeek-R1-Distill-Qwen-7B-RK3588S-RKLLM1.1.4.rkllm", "1.1.4", RK3588_BOARD, []),
    ("qwen2.5-vl-3b-w4a16_level1_rk3576.rkllm", "1.2.1", RK3588_BOARD,
     ["the model's file name says rk3576, but this board is rk3588"]),
    ("gemma4-e2b_w8a8_rk3588.rkllm", "1.3.0", RK3588_BOARD,
     ["the model was converted with rkllm-toolkit 1.3.0, newer than the runtime 1.2.3"]),
    ("qwen-chat-1_8B.rkllm", "1.0.1", RK3588_BOARD, ["the model was converted with rkllm-toolkit 1.0.1, whose models runtimes from 1.1.0 refuse"]),
    ("model.rkllm", None, None, []),
])
def test_what_a_model_file_says_about_itself(npu_env, tmp_path, name, toolkit, compatible, warnings):
    """The toolkit release a converted model ends with ("rkllm-toolkit version: 1.1.4", its last
    bytes), against the runtime's; the platform its file name names, against the board's SoC."""
    root = board(tmp_path / "board", module="0.9.8\n", compatible=compatible)
    model = write_model(tmp_path / name, "weights and NPU programs\x00\x01" + (FOOTER.format(toolkit) if toolkit else ""))
    code, report = check_board(npu_env, tmp_path, root, model=model)
    facts = report["rkllm"]["model"]
    assert (facts["magic"], facts["toolkit"]) == ("ok", toolkit)
    assert [w["what"][:len(e)] for w, e in zip(report["warnings"], warnings)] == warnings and len(report["warnings"]) == len(warnings)
    assert code == 0  # the runtime stays the judge


# --- every configured model ---------------------------------------------------------------------
def test_every_configured_model_is_listed_with_what_its_file_says(fake_runtime, tmp_path):
    """The default on the CPU; [models.NAME]: a GGUF, a broken GGUF, a .rkllm (for which the NPU's
    needs are checked, the default not being on it) and a derived model. A model that cannot load
    is a problem of its own: the daemon would start, requests for it would fail, exit 1."""
    tiny = tiny_llama(tmp_path / "tiny.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(12))  # the magic, then a truncated header
    coder = write_model(tmp_path / "coder_w8a8_rk3588.rkllm", "weights\x00" + FOOTER.format("1.2.3"))
    config = tmp_path / "rkllmd.toml"
    config.write_text(f'[models.tiny]\npath = "{tiny}"\n[models.broken]\npath = "{broken}"\n'
                      f'[models.coder]\npath = "{coder}"\n[models.terse]\nfrom = "coder"\nsystem = "Be brief."\n')
    root = board(tmp_path / "board", module="0.9.8\n")
    flags = ("--backend", "cpu", "--config", str(config), "--root", str(root))
    env = {"RKLLMD_RKLLM_LIBRARY": str(fake_runtime["1.2"])}
    out = rkllmd_check(*flags, "--json", folder=tmp_path, env=env)
    report = as_json(out)
    listed = {m["name"]: m for m in report["models"]}
    assert list(listed) == ["smollm2-135m-instruct", "tiny", "broken", "coder", "terse"]
    default = listed["smollm2-135m-instruct"]
    assert (default["default"], default["kind"], default["magic"], default["architecture"]) == (True, "gguf", "ok", "llama")
    assert (listed["tiny"]["kind"], listed["tiny"]["architecture"], listed["tiny"]["size_bytes"]) == ("gguf", "llama", tiny.stat().st_size)
    assert (listed["coder"]["kind"], listed["coder"]["toolkit"], listed["coder"]["platform_matches"]) == ("rkllm", "1.2.3", True)
    assert listed["coder"]["tokenizer"] == {"path": None, "token_counts": "bounded: UTF-8 bytes + 2"}
    assert (listed["terse"]["kind"], listed["terse"]["from"], listed["terse"]["weights"]) == ("derived", "coder", "coder")
    assert report["rkllm"]["interface"] == "1.2" and report["rkllm"]["devices"][0]["path"] == str(root / "dev" / "rknpu")
    [finding] = report["problems"]
    assert finding["what"].startswith(f"model broken: {broken} cannot be parsed as GGUF")
    assert report["unloadable_models"] == ["broken"] and out.returncode == 1
    human = rkllmd_check(*flags, folder=tmp_path, env=env)
    assert human.returncode == 1
    assert human.stdout.rstrip().endswith("NOT OK: rkllmd would start, but requests for broken would fail (1 problem)")

    # Without the NPU's device node, the .rkllm model cannot load either (the default still could).
    (root / "dev" / "rknpu").unlink()
    report = as_json(rkllmd_check(*flags, "--json", folder=tmp_path, env=env))
    assert report["unloadable_models"] == ["broken", "coder"]
    assert any(p["what"].startswith("model coder (.rkllm): no NPU device node") for p in report["problems"])


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
    is not nobody's to run), else for ourselves, refused by a folder of mode 000. The model
    is one nobody can read: the bundled one lies in the checkout's venv, which nobody may
    not be able to enter (a clone in a 0700 folder), and that would be a second problem."""
    locked = open_tmp / "locked"
    locked.mkdir(mode=0o700)
    writable = open_tmp / "open"
    writable.mkdir()
    os.chmod(writable, 0o777)
    model = tiny_llama(writable / "tiny.gguf")
    os.chmod(model, 0o644)
    user = ("--user", "nobody") if os.geteuid() == 0 else ()
    if not user:
        os.chmod(locked, 0o000)
    name = "nobody" if user else pwd.getpwuid(os.geteuid()).pw_name
    try:
        out = rkllmd_check("--backend", "cpu", "--json", "--model", str(model), "--socket", str(locked / "run" / "rkllmd.sock"), *user,
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
    assert out.returncode == 0 and "Exit status 0: it would start; 1: it would not, or a configured model could not load." in " ".join(out.stdout.split())
