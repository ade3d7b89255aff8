"""Release detection on every fake library (tests/fake_rkllm: the real library's strings, one
release marker each), through ``rkllmd check --json`` and through a daemon start.

The libraries: 1.2.3 and 1.3.0 (supported), 1.3.1 (a later patch: runs, with a warning),
1.2.1b1 and 1.2.0 (pre-release layouts: refused), 1.4.0 (an unknown line: refused unless
``[rkllm] runtime`` forces an interface), and one without any marker (refused under auto).
There is no NPU device node on this machine, so every ``check`` here also reports that one
problem; the device-node checks themselves are in tests/test_check.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_rkllm.build import write_model
from test_rkllm_daemon import NpuDaemon, startup_failure

from conftest import ROOT

SUPPORTED = "supported releases: 1.2.1, 1.2.2, 1.2.3, 1.3.0"
BUILD = "target: Linux | build: 27637c95 2025-05-02 17:46:07)"


@dataclass(frozen=True)
class Case:
    library: str  # a key of fake_rkllm.build.LIBRARIES
    runtime: str  # [rkllm] runtime
    release: str | None
    interface: str | None  # None: refused
    says: str  # the refusal, or the warning of an accepted one ("" for none)


CASES = [
    Case("1.2", "auto", "1.2.3", "1.2", ""),
    Case("1.3", "auto", "1.3.0", "1.3", ""),
    Case("1.3.1", "auto", "1.3.1", "1.3", "RKLLM runtime 1.3.1 is newer than the releases rkllmd was checked "
                                           "against (1.3.0); using the 1.3 interface"),
    Case("1.2.1b1", "auto", "1.2.1b1", None, f"release 1.2.1b1 is a pre-release, whose structs differ from the "
                                             f"release's; {SUPPORTED}"),
    Case("1.2.0", "auto", "1.2.0", None, f"release 1.2.0: its structs and callback differ from 1.2.1's "
                                         f"(a pre-release layout); {SUPPORTED}"),
    Case("1.4.0", "auto", "1.4.0", None, f"release 1.4.0 is of a line rkllmd has no struct layouts for; {SUPPORTED}"),
    Case("1.4.0", "1.3", "1.4.0", "1.3", "[rkllm] runtime = 1.3 is forced on release 1.4.0"),
    Case("no marker", "auto", None, None, "no release marker (\"RKLLM SDK (version: ...\") in the library; "
                                          "rkllmd does not guess an interface: set [rkllm] runtime"),
    Case("no marker", "1.2", None, "1.2", "[rkllm] runtime = 1.2 is forced on a library without a release marker"),
]


def case_id(case: Case) -> str:
    return f"{case.library}-{case.runtime}".replace(" ", "-")


def check_json(library: Path, model: Path, runtime: str, folder: Path) -> tuple[int, dict]:
    env = {"RKLLMD_RKLLM_LIBRARY": str(library), "RKLLMD_RKLLM_MODEL": str(model), "RKLLMD_RKLLM_RUNTIME": runtime}
    out = subprocess.run(
        [sys.executable, "-m", "rkllmd", "check", "--json", "--backend", "rkllm", "--socket", str(folder / "s.sock"),
         "--cache-dir", str(folder / "text"), "--binary-cache-dir", str(folder / "bin")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60,
    )
    return out.returncode, json.loads(out.stdout)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_check_reports_the_release_and_interface(fake_runtime, tmp_path, case):
    library = fake_runtime[case.library]
    rc, report = check_json(library, write_model(tmp_path / "m.rkllm"), case.runtime, tmp_path)
    rk = report["rkllm"]
    assert (rk["library"], rk["release"], rk["interface"]) == (str(library), case.release, case.interface)
    marker = f"RKLLM SDK (version: {case.release} | {BUILD}" if case.release else None
    assert rk["release_text"] == marker
    assert rc == 1 and not report["ok"]
    others = [p for p in report["problems"] if not p["what"].startswith("no NPU device node")]
    if case.interface is None:
        [refusal] = others
        assert refusal["what"].startswith(f"{library}: {case.says}") and refusal["fix"]
    else:
        assert others == [] and rk["interface_reason"]
        assert [w["what"] for w in report["warnings"]] == ([case.says] if case.says else [])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_daemon_start_on_each_library(fake_runtime, case):
    proc = NpuDaemon(fake_runtime[case.library], env={"RKLLMD_RKLLM_RUNTIME": case.runtime})
    try:
        if case.interface is None:
            log = startup_failure(proc)
            assert f"cannot start: {fake_runtime[case.library]}: {case.says}" in log
            assert "fake-rkllm:" not in log and "rkllm_init" not in log  # refused before any call
            return
        proc.start()
        with proc.client() as client:
            assert client.generate("which release?").wait().text == "echo: which release?"
            runtime = client.status()["model"]["runtime"]
        assert runtime.startswith(f"{case.release or 'unknown release'}, interface {case.interface}")
        if case.says:
            assert f"WARNING rkllmd.backends.rkllm.runtime: {case.says}" in proc.log()
        assert proc.calls.all()[0].name == "rkllm_createDefaultParam"
    finally:
        proc.cleanup()


def test_the_daemon_logs_the_check_report_at_start(fake_runtime):
    proc = NpuDaemon(fake_runtime["1.3.1"])
    try:
        proc.start()
        log = proc.log()
    finally:
        proc.cleanup()
    assert 'INFO rkllmd.check: backend: {"kind": "rkllm", "reason": "requested by configuration"}' in log
    assert f'"release": "1.3.1", "release_text": "RKLLM SDK (version: 1.3.1 | {BUILD}"' in log
    assert "ERROR rkllmd.check: problem: no NPU device node" in log  # the fake needs none; a board would
    assert "WARNING rkllmd.check: RKLLM runtime 1.3.1 is newer than" in log
    assert log.index("rkllmd.check: backend") < log.index("listening on")
