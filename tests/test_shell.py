"""rkllmctl in a shell: JSON errors, exit codes, a daemon stopping mid-answer, help with
defaults, completion scripts, the man page, no escapes where no terminal reads them."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProcess, rkllmctl, running_in_ci
from rkllmctl.cli import EXIT_CODES, ExitCode, build_parser
from rkllmctl.client import Piece
from rkllmctl.commands.generate import Printer
from rkllmd.config import Config
from rkllmd.protocol import ErrorCode
from rkllmd.schema import OPERATIONS

ESC = "\x1b"
LONG = ("generate", "--max-tokens", "1000", "Tell me a very long story about a dragon.")


def tool(name: str) -> str:
    """A program the tests need: .ci/setup installs it; only a machine without it skips (never CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is needed (.ci/setup installs it with apt-get)"
        if running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def error_of(run: subprocess.CompletedProcess) -> dict:
    """The one JSON object a failed --json run prints; nothing on stderr."""
    assert run.stderr == "", run.stderr
    return json.loads(run.stdout)["error"]


# -- errors and exit codes -------------------------------------------------------------------


def test_json_errors_are_json_on_stdout_with_the_same_exit_codes(daemon: DaemonProcess, tmp_path: Path) -> None:
    cases = [  # the command, its exit code, the error's name and wire code
        (("generate", "--max-tokens", "999999", "hi"), ExitCode.DAEMON_ERROR, "invalid_field", ErrorCode.INVALID_FIELD),
        (("cache", "show", "../etc"), ExitCode.DAEMON_ERROR, "invalid_name", ErrorCode.INVALID_NAME),
        (("cache", "show", "no-such-cache"), ExitCode.DAEMON_ERROR, "not_found", ErrorCode.NOT_FOUND),
        (("generate", "--temperature", "warm", "hi"), ExitCode.USAGE, "usage", None),
        (("generate", "--messages", str(tmp_path / "absent.json")), ExitCode.USAGE, "usage", None),
    ]
    for args, code, name, wire in cases:
        plain = rkllmctl(*args, socket=daemon.socket)
        assert plain.returncode == code and plain.stdout == "" and plain.stderr, (args, plain)
        run = rkllmctl(*args, "--json", socket=daemon.socket)
        assert run.returncode == code, (args, run)
        error = error_of(run)
        assert (error["name"], error["code"]) == (name, None if wire is None else int(wire)), (args, error)
        assert error["message"] and isinstance(error["details"], dict)
    assert error_of(rkllmctl("generate", "--json", "--max-tokens", "999999", "hi", socket=daemon.socket))["details"] == {"field": "max_tokens"}


def test_json_error_when_no_daemon_listens(tmp_path: Path) -> None:
    run = rkllmctl("status", "--json", socket=tmp_path / "none.sock")
    assert run.returncode == ExitCode.UNREACHABLE
    error = error_of(run)
    assert error["name"] == "unreachable" and error["code"] is None and "start it with `rkllmd`" in error["message"]


def test_json_before_the_command_means_the_same(daemon: DaemonProcess, tmp_path: Path) -> None:
    """``rkllmctl --json status`` as scripts write it: the command's JSON output, and errors as JSON."""
    first = rkllmctl("--json", "status", socket=daemon.socket)
    after = rkllmctl("status", "--json", socket=daemon.socket)
    assert first.returncode == after.returncode == 0
    assert json.loads(first.stdout)["protocol"] == json.loads(after.stdout)["protocol"]
    assert error_of(rkllmctl("--json", "cache", "show", "no-such-cache", socket=daemon.socket))["name"] == "not_found"
    run = rkllmctl("--json", "status", socket=tmp_path / "none.sock")
    assert run.returncode == ExitCode.UNREACHABLE and error_of(run)["name"] == "unreachable"


def start_generation(socket: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rkllmctl", "--socket", str(socket), *LONG, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def wait_running(proc: DaemonProcess) -> None:
    with proc.client() as client:
        deadline = time.monotonic() + 60
        while not client.status()["requests"]["running"]:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.05)


def test_a_daemon_stopped_mid_answer_exits_non_zero_with_its_reason(make_daemon) -> None:
    proc = make_daemon()
    child = start_generation(proc.socket)
    assert child.stdout is not None and child.stdout.read(1)  # the answer is streaming
    proc.signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == ExitCode.DAEMON_ERROR, err
    assert "rkllmctl: the daemon cut the generation short: shutting down" in err
    assert proc.wait() == 0


def test_a_daemon_stopped_mid_answer_with_json(make_daemon) -> None:
    proc = make_daemon()
    child = start_generation(proc.socket, "--json")
    wait_running(proc)
    proc.signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == ExitCode.DAEMON_ERROR, err
    assert err == ""
    error = json.loads(out)["error"]
    assert error["name"] == "cut_short" and error["details"]["reason"] == "shutting down"
    assert isinstance(error["details"]["text"], str)


def test_a_queued_generation_of_a_stopping_daemon_exits_non_zero(make_daemon) -> None:
    """Queued behind another when the daemon stops: its error is shutting_down, exit 1."""
    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "1"})
    running = start_generation(proc.socket)
    assert running.stdout is not None and running.stdout.read(1)
    queued = start_generation(proc.socket, "--json")
    with proc.client() as client:
        deadline = time.monotonic() + 60
        while not client.status()["requests"]["queued"]:
            assert time.monotonic() < deadline, "the second generation never queued"
            time.sleep(0.05)
    proc.signal(signal.SIGTERM)
    out, err = queued.communicate(timeout=30)
    assert queued.returncode == ExitCode.DAEMON_ERROR and err == ""
    error = json.loads(out)["error"]
    assert (error["name"], error["code"]) == ("shutting_down", int(ErrorCode.SHUTTING_DOWN))
    assert running.wait(30) == ExitCode.DAEMON_ERROR


def test_a_daemon_killed_mid_answer_is_unreachable(make_daemon) -> None:
    proc = make_daemon()
    child = start_generation(proc.socket)
    assert child.stdout is not None and child.stdout.read(1)
    proc.signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert child.returncode == ExitCode.UNREACHABLE, err
    assert "closed the connection" in err


def test_every_exit_code_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert set(EXIT_CODES) == set(ExitCode)
    for code in ExitCode:
        assert f"\n| {int(code)} | " in readme, code


# -- help ---------------------------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words: {"generate": ..., "cache ls": ...}."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(subparsers(sub, prefix + name + " "))
    return found


def test_every_sampling_flag_shows_the_daemons_default() -> None:
    built_in = Config()
    for command in ("generate", "chat"):
        parser = subparsers(build_parser(whole=True))[command]
        flags = {action.dest: action for action in parser._actions}
        for field in OPERATIONS["generate"].fields:
            action = flags.get(field.name)
            if action is None or field.kind not in ("int", "float", "stops"):
                continue
            assert "default: " in action.help, (command, field.name)
            if field.default is not None and hasattr(field.default, "key"):
                assert f"default: {built_in[field.default.key]} (rkllmd.toml {field.default.key})" in action.help
    help_text = rkllmctl("generate", "--help").stdout
    assert "default: 0.95 (rkllmd.toml sampling.top_p)" in " ".join(help_text.split())
    assert "default: random" in help_text


# -- what the command line imports ------------------------------------------------------------

#: What rkllmctl never needs: the daemon's template machinery (Jinja), its backends, the gateway's server.
DAEMON_ONLY = ("jinja2", "rkllmd.templates", "rkllmd.backends", "numpy", "aiohttp", "rkllmd_http")
#: What ``rkllmctl --help`` does not need either: the socket client and the verbs' own modules.
CLIENT = ("zmq", "msgpack", "rkllmctl.client", "rkllmd.config", "rkllmd.schema", "shtab", "rkllmctl.commands.generate")
IMPORTS_OF = """
import json, sys
from rkllmctl.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def imported_by(*args: str, socket: Path | None = None) -> set[str]:
    """The modules a run of ``rkllmctl ARGS`` imported (its exit code checked to be 0)."""
    argv = [*(["--socket", str(socket)] if socket else []), *args]
    run = subprocess.run([sys.executable, "-c", IMPORTS_OF, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads(run.stderr.splitlines()[-1])
    assert report["code"] == 0, run.stderr
    return {m for m in report["modules"] if m.split(".")[0] in ("rkllmd", "rkllmctl", "rkllmd_http") or "." not in m}


def loaded(modules: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in modules for name in names if m == name or m.startswith(name + ".")}


def test_help_imports_neither_the_client_nor_the_daemons_templates() -> None:
    """``rkllmctl --help`` lists the verbs without importing them (bench/cli_startup.py times it)."""
    modules = imported_by("--help")
    assert loaded(modules, DAEMON_ONLY + CLIENT) == set()
    assert "rkllmctl.commands" in modules


def test_commands_never_import_the_daemons_templates(daemon: DaemonProcess) -> None:
    """The client path: rkllmd/schema.py is light (no Jinja), the verbs import what their run needs."""
    for args in (("generate", "--help"), ("cache", "ls"), ("status",), ("generate", "--max-tokens", "1", "Hi")):
        modules = imported_by(*args, socket=daemon.socket)
        assert loaded(modules, DAEMON_ONLY) == set(), args
        assert ("zmq" in modules) == (args[-1] != "--help"), args


# -- completion and the man page ------------------------------------------------------------


def every_word() -> set[str]:
    """The subcommands' names and every option string of the command line."""
    parser = build_parser(whole=True)
    words = {word for name in subparsers(parser) for word in name.split()}
    for sub in [parser, *subparsers(parser).values()]:
        words |= {option for action in sub._actions for option in action.option_strings}
    return words


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_know_every_command_and_flag(shell: str) -> None:
    run = rkllmctl("completion", shell)
    assert run.returncode == 0, run.stderr
    missing = {word for word in every_word() if word not in run.stdout}
    assert not missing


def test_bash_sources_the_completion_and_completes(tmp_path: Path) -> None:
    script = tmp_path / "rkllmctl.bash"
    script.write_text(rkllmctl("completion", "bash").stdout)
    complete = (
        f"source {script}; complete -p rkllmctl; "
        "COMP_WORDS=(rkllmctl ca); COMP_CWORD=1; _shtab_rkllmctl; echo \"words: ${COMPREPLY[*]}\"; "
        "COMP_WORDS=(rkllmctl generate --top); COMP_CWORD=2; _shtab_rkllmctl; echo \"words: ${COMPREPLY[*]}\"; "
        "COMP_WORDS=(rkllmctl cache w); COMP_CWORD=2; _shtab_rkllmctl; echo \"words: ${COMPREPLY[*]}\""
    )
    run = subprocess.run([tool("bash"), "-c", complete], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("complete ") and lines[0].endswith(" rkllmctl")
    assert lines[1:] == ["words: cache", "words: --top-k --top-p", "words: wait"]


def test_zsh_loads_the_completion(tmp_path: Path) -> None:
    (tmp_path / "_rkllmctl").write_text(rkllmctl("completion", "zsh").stdout)
    zsh = tool("zsh")
    syntax = subprocess.run([zsh, "-n", str(tmp_path / "_rkllmctl")], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    load = f"fpath=({tmp_path} $fpath); autoload -U compinit && compinit -u -D; print -r -- ${{_comps[rkllmctl]}}"
    run = subprocess.run([zsh, "-fc", load], capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.strip() == "_rkllmctl", (run.stdout, run.stderr)


def test_the_man_page_is_valid_roff_listing_every_command(tmp_path: Path) -> None:
    page = tmp_path / "rkllmctl.1"
    page.write_text(rkllmctl("manpage").stdout)
    assert page.read_text().startswith(".TH RKLLMCTL 1 ") or page.read_text().startswith('.TH RKLLMCTL "1" ')
    check = subprocess.run([tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    shown = subprocess.run([tool("man"), "-l", str(page)], capture_output=True, text=True, timeout=30, env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat"})
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for command in subparsers(build_parser(whole=True)):
        assert f"COMMAND 'rkllmctl {command}'" in text or f"rkllmctl {command}" in text, command
    for code in ExitCode:
        assert f" {int(code)} " in text.split("EXIT STATUS")[1]
    assert "NO_COLOR" in text and "RKLLMD_SOCKET" in text


# -- escapes ------------------------------------------------------------------------------


def test_no_escape_bytes_in_pipes(daemon: DaemonProcess) -> None:
    runs = [
        rkllmctl("generate", "--max-tokens", "16", "What is the capital of France?", socket=daemon.socket),
        rkllmctl("status", socket=daemon.socket),
        rkllmctl("cache", "ls", socket=daemon.socket),
        rkllmctl("cache", "show", "no-such-cache", socket=daemon.socket),
        rkllmctl("generate", "--help"),
        rkllmctl("generate", "--temperature", "warm", "hi"),
    ]
    for run in runs:
        assert run.stdout or run.stderr
        assert ESC not in run.stdout, run.args
        assert ESC not in run.stderr, run.args


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("no_color", ["", "1"])
def test_reasoning_is_dimmed_on_a_terminal_unless_no_color(monkeypatch, no_color: str) -> None:
    """The one escape rkllmctl writes: its reasoning dimmed, on a terminal, without NO_COLOR."""
    monkeypatch.setenv("NO_COLOR", no_color)
    monkeypatch.setenv("TERM", "xterm")
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    printer = Printer(show_reasoning=True)
    printer.write(Piece("", "Let me think."))
    printer.write(Piece("Paris.", ""))
    printer.end()
    assert out.getvalue().replace("\x1b[2m", "").replace("\x1b[22m", "") == "Let me think.\nParis.\n"
    assert (ESC in out.getvalue()) == (not no_color)


def test_make_installs_the_man_page_and_completions(tmp_path: Path) -> None:
    rkllmctl_cmd = f"{sys.executable} -m rkllmctl"
    run = subprocess.run([tool("make"), "-s", "-C", str(ROOT), "install-shell", f"DESTDIR={tmp_path}", f"RKLLMCTL={rkllmctl_cmd}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    installed = {
        "usr/local/share/man/man1/rkllmctl.1": ("manpage",),
        "usr/local/share/bash-completion/completions/rkllmctl": ("completion", "bash"),
        "usr/local/share/zsh/site-functions/_rkllmctl": ("completion", "zsh"),
    }
    for path, args in installed.items():
        made = rkllmctl(*args).stdout
        assert made and (tmp_path / path).read_text().split("\n")[1:] == made.split("\n")[1:], path  # the man page's date may differ


def test_completion_offers_the_daemons_cache_names(daemon: DaemonProcess, tmp_path: Path) -> None:
    """NAME and --cache NAME complete from `rkllmctl cache ls --names`, asked at TAB time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rkllmctl").write_text(f'#!/bin/sh\nexec {sys.executable} -m rkllmctl "$@"\n')
    (bin_dir / "rkllmctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RKLLMD_SOCKET": str(daemon.socket), "HOME": str(tmp_path)}
    for shell in ("bash", "zsh"):
        (tmp_path / f"rkllmctl.{shell}").write_text(rkllmctl("completion", shell).stdout)
    with daemon.client() as client:
        client.cache_put("zz-tab-one", "One.")
        client.cache_put("zz-tab-two", "Two.")
        try:
            assert rkllmctl("cache", "ls", "--names", socket=daemon.socket).stdout.split().count("zz-tab-one") == 1
            bash = (
                f"source {tmp_path}/rkllmctl.bash; "
                "COMP_WORDS=(rkllmctl cache show zz-tab-); COMP_CWORD=3; _shtab_rkllmctl; echo \"${COMPREPLY[*]}\"; "
                "COMP_WORDS=(rkllmctl generate --cache zz-tab-o); COMP_CWORD=3; _shtab_rkllmctl; echo \"${COMPREPLY[*]}\""
            )
            run = subprocess.run([tool("bash"), "-c", bash], capture_output=True, text=True, timeout=60, env=env)
            assert run.stdout.splitlines() == ["zz-tab-one zz-tab-two", "zz-tab-one"], (run.stdout, run.stderr)
            # zsh: the preamble's function hands the names to compadd (here a stand-in that prints them).
            zsh = (
                f"autoload -U compinit && compinit -u -D; source {tmp_path}/rkllmctl.zsh; "
                'compadd() { print -rl -- ${(P)${@[-1]}}; }; _rkllmctl_caches'
            )
            run = subprocess.run([tool("zsh"), "-fc", zsh], capture_output=True, text=True, timeout=60, env=env)
            assert {"zz-tab-one", "zz-tab-two"} <= set(run.stdout.split()), (run.stdout, run.stderr)
        finally:
            client.cache_rm("zz-tab-one")
            client.cache_rm("zz-tab-two")
