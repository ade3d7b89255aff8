"""The suite's own rules, checked on a throwaway test file run by a second pytest: under
CI=true a test skipped for want of a capability (a systemd test, or any skip_without:
root, mounts, namespaces, tools) fails the run while other skips stay skips, and a test
that hangs fails on its timeout; in one pytest process and in two (pytest-xdist), as
.ci/test runs the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import threading
import pytest
from conftest import skip_without

@pytest.mark.systemd
def test_systemd_skipped():
    pytest.skip("no systemd here")

def test_other_skipped():
    pytest.skip("not a systemd test")

def test_without_root():
    skip_without("root, to mount a tmpfs")

@pytest.fixture
def namespace():
    skip_without("unshare(1)")

def test_without_a_fixtures_capability(namespace):
    pass

@pytest.mark.timeout(1)
def test_hangs():
    threading.Event().wait()
'''


def run_sample(tmp_path: Path, ci: str | None, *options: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-q",
         "--rootdir", str(tmp_path), "-c", str(TESTS.parent / "pyproject.toml"), *options, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def outcomes(run: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split(" ")[1].split("::")[-1]: line.split(" ")[0]
            for line in run.stdout.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))}


@pytest.mark.parametrize("workers", [[], ["--numprocesses", "2", "--dist", "loadfile"]], ids=["one process", "as .ci/test runs it"])
def test_under_ci_a_test_skipped_for_want_of_a_capability_fails_the_run(tmp_path, workers):
    run = run_sample(tmp_path, "true", *workers)
    assert run.returncode == 1, run.stdout
    found = outcomes(run)
    assert found["test_systemd_skipped"] == "FAILED", run.stdout
    assert "CI=true, and this test was skipped for want of a capability CI must have: no systemd here" in run.stdout
    assert found["test_without_root"] == "FAILED" and "capability CI must have: needs root, to mount a tmpfs" in run.stdout, run.stdout
    assert found["test_without_a_fixtures_capability"] == "ERROR" and "needs unshare(1)" in run.stdout, run.stdout
    assert "SKIPPED [1] test_sample.py:" in run.stdout and "not a systemd test" in run.stdout, run.stdout
    # And the hanging test failed on its own timeout instead of holding the run.
    assert found["test_hangs"] == "FAILED" and "Timeout (>1.0s)" in run.stdout, run.stdout


def test_outside_ci_it_is_a_skip(tmp_path):
    run = run_sample(tmp_path, ci=None)
    found = outcomes(run)
    for name in ("test_systemd_skipped", "test_without_root", "test_without_a_fixtures_capability"):
        assert name not in found or found[name] == "SKIPPED", run.stdout
    for reason in ("test_sample.py:8: no systemd here", "test_sample.py:14: needs root, to mount a tmpfs", "test_sample.py:20: needs unshare(1)"):
        assert f"SKIPPED [1] {reason}" in run.stdout, run.stdout

