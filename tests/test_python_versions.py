"""rkllmd on the Pythons it supports besides the suite's own: 3.10 (Ubuntu 22.04's, the
vendor's reference OS for RK3588 boards) and 3.13.

The suite runs on .venv's Python; this module installs the project as a board owner does,
``make install-python PYTHON=...`` (staged with DESTDIR), into a venv of each other
interpreter, and proves there what a first hour needs: the three commands linked, ``rkllmd
check``, a generation through the daemon with rkllmctl, and one OpenAI request through the
gateway. The project's wheel is built once; pip installs its dependencies from its cache.
Interpreters are looked up on PATH and in pyenv's versions; under CI=true a missing one
fails the run instead of skipping.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from conftest import DaemonProcess, reference_cases, running_in_ci
from http_gateway import GatewayProcess
from rkllmd.backends.cpu.backend import bundled_model_path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("3.10", "3.13")
PREFIX = "/opt/rkllmd"
BINDIR = "/usr/local/bin"
COMMANDS = ("rkllmd", "rkllmd-http", "rkllmctl")
CAPITAL = next(c for c in reference_cases() if c["messages"][-1]["content"] == "What is the capital of France?")
#: What the wheel is built from (a copy: an in-tree build leaves build/ behind, whose stale
#: files a later build would pack).
SOURCES = ("pyproject.toml", "README.md", "rkllmd", "rkllmctl", "rkllmd_http")


def pyenv_roots() -> list[Path]:
    roots = []
    if shutil.which("pyenv"):
        found = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        if found:
            roots.append(Path(found))
    roots += [Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser(), Path("/root/.pyenv")]
    return list(dict.fromkeys(roots))


def find_python(version: str) -> Path | None:
    """``pythonX.Y`` on PATH (pyenv's shims excepted: they answer for whatever is selected),
    else the newest pyenv build of that version."""
    on_path = shutil.which(f"python{version}")
    if on_path and "shims" not in Path(on_path).parts:
        return Path(on_path)
    for root in pyenv_roots():
        builds = sorted(glob.glob(str(root / "versions" / f"{version}.*" / "bin" / f"python{version}")),
                        key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
        if builds:
            return Path(builds[-1])
    return None


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, source / name, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (built,) = out.glob("rkllmd-*.whl")
    return built


class Installed:
    """A staged ``make install-python`` of one interpreter: DESTDIR/opt/rkllmd and the links."""

    def __init__(self, stage: Path, version: str):
        self.stage = stage
        self.version = version
        self.venv = stage / PREFIX.lstrip("/")
        self.python = self.venv / "bin" / "python"
        # Neither this checkout nor the suite's venv may leak in: the installed copy runs.
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}, "PYTHONUNBUFFERED": "1"}

    def command(self, name: str) -> list[str]:
        """The console script as installed (its #! names PREFIX, where it is not: run it with the venv's python)."""
        return [str(self.python), str(self.venv / "bin" / name)]

    def run(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command(name), *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.stage)


@pytest.fixture(scope="session", params=VERSIONS, ids=lambda v: f"python{v}")
def installed(request, wheel, tmp_path_factory) -> Installed:
    version = request.param
    python = find_python(version)
    if python is None:
        message = f"no Python {version} found (python{version} on PATH, or a pyenv build under {', '.join(map(str, pyenv_roots()))})"
        if running_in_ci():
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    stage = tmp_path_factory.mktemp(f"stage{version}")
    # --no-compile: pip byte-compiles every installed file otherwise (numpy's thousands), seconds
    # of CPU for modules these tests never import.
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "install-python", f"PYTHON={python}", f"DESTDIR={stage}", f"PREFIX={PREFIX}",
                          f"BINDIR={BINDIR}", "MODEL_WHEEL=", f"PACKAGE={wheel}", "PIP_FLAGS=--no-compile"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return Installed(stage, version)


def test_make_install_links_the_three_commands_and_uninstall_removes_them(installed: Installed, tmp_path: Path) -> None:
    bindir = installed.stage / BINDIR.lstrip("/")
    assert sorted(p.name for p in bindir.iterdir()) == sorted(COMMANDS)
    for name in COMMANDS:
        assert os.readlink(bindir / name) == f"{PREFIX}/bin/{name}"
        assert (installed.venv / "bin" / name).is_file()
    version = subprocess.run([str(installed.python), "-c", "import sys, rkllmd; print(sys.version_info[:2], rkllmd.__file__)"],
                             capture_output=True, text=True, env=installed.env, cwd=tmp_path).stdout
    assert version.startswith(str(tuple(int(x) for x in installed.version.split(".")))) and str(installed.venv) in version
    # Uninstalling a copy of the stage leaves the session's stage for the other tests.
    copy = tmp_path / "stage"
    shutil.copytree(installed.stage, copy, symlinks=True)
    other = copy / BINDIR.lstrip("/") / "other-tool"
    other.symlink_to("/usr/bin/true")
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "uninstall", f"DESTDIR={copy}", f"PREFIX={PREFIX}", f"BINDIR={BINDIR}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in other.parent.iterdir()] == ["other-tool"]
    assert not (copy / PREFIX.lstrip("/")).exists()


def _daemon_flags(folder: Path) -> list[str]:
    return ["--backend", "cpu", "--model", str(bundled_model_path()), "--socket", str(folder / "run" / "rkllmd.sock"),
            "--cache-dir", str(folder / "text"), "--binary-cache-dir", str(folder / "bin")]


def test_check_generation_and_gateway(installed: Installed, tmp_path: Path) -> None:
    """``rkllmd check``, then the daemon, rkllmctl and rkllmd-http, all of this interpreter."""
    check = installed.run("rkllmd", "check", *_daemon_flags(tmp_path), "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["ok"] is True

    class Daemon(DaemonProcess):
        def command(self) -> list[str]:
            return [*installed.command("rkllmd"), *_daemon_flags(self.folder), "--log-level", "debug"]

    class Gateway(GatewayProcess):
        def command(self) -> list[str]:
            return [*installed.command("rkllmd-http"), "--listen", "127.0.0.1:0", "--socket", str(self.socket)]

    daemon = Daemon()
    daemon.env = installed.env
    daemon.start()
    gateway = None
    try:
        generated = installed.run("rkllmctl", "--socket", str(daemon.socket), "generate", "--json", "--temperature", "0", "--max-tokens", "6",
                                  CAPITAL["messages"][-1]["content"])
        assert generated.returncode == 0, generated.stderr
        answer = json.loads(generated.stdout)
        assert answer["stats"]["completion_tokens"] == 6 and CAPITAL["completion"].startswith(answer["text"]) and answer["text"]
        status = installed.run("rkllmctl", "--socket", str(daemon.socket), "status", "--json")
        assert json.loads(status.stdout)["pid"] == daemon.proc.pid
        gateway = Gateway(daemon.socket)
        gateway.env = installed.env
        gateway.start()
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == answer["text"]
    finally:
        if gateway is not None:
            gateway.cleanup()
        daemon.cleanup()
