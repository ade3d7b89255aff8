"""The rkllmctl command line: output, exit codes, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, DaemonProcess, rkllmctl
from reliability import poll


def test_generate_streams_text_and_prints_stats(daemon: DaemonProcess) -> None:
    run = rkllmctl("generate", "--max-tokens", "48", "What is the capital of France?", socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "The capital of France is Paris.\n"
    assert "TTFT" in run.stderr and "prompt 37 tokens" in run.stderr


def test_generate_json_reads_stdin_and_reports_all_stats(daemon: DaemonProcess) -> None:
    run = rkllmctl("generate", "--json", "--max-tokens", "48", "-", input="What is the capital of France?", socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["text"] == "The capital of France is Paris."
    assert out["finish_reason"] == "stop"
    assert set(out["stats"]) >= {"prompt_tokens", "cached_tokens", "completion_tokens", "ttft_ms", "prefill_ms", "decode_tps"}


def test_generate_messages_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    run = rkllmctl("generate", "--json", "--max-tokens", "8", "--messages", str(tmp_path / "chat.json"), socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["stats"]["prompt_tokens"] == 32


def test_status_human_and_json(daemon: DaemonProcess) -> None:
    human = rkllmctl("status", socket=daemon.socket)
    assert human.returncode == 0 and "backend:  cpu" in human.stdout and "SmolLM2" in human.stdout
    status = json.loads(rkllmctl("status", "--json", socket=daemon.socket).stdout)
    assert status["backend"] == "cpu" and status["model"]["context_length"] == 4096
    assert {"requests", "completed", "completion_tokens"} <= set(status["counters"])


def test_unreachable_daemon_has_its_own_exit_code_and_a_hint(tmp_path: Path) -> None:
    run = rkllmctl("status", socket=tmp_path / "none.sock")
    assert run.returncode == 3
    assert "start it with `rkllmd`" in run.stderr


def test_daemon_errors_and_usage_errors_have_their_codes(daemon: DaemonProcess) -> None:
    assert rkllmctl("generate", "--max-tokens", "999999", "hi", socket=daemon.socket).returncode == 1
    assert rkllmctl("cache", "show", "../etc", socket=daemon.socket).returncode == 1
    assert rkllmctl("cache", "rebuild", socket=daemon.socket).returncode == 2
    assert rkllmctl("no-such-verb", socket=daemon.socket).returncode == 2


def interruptible(command: list[str]) -> subprocess.Popen:
    """``command`` started as a shell at a terminal starts it, where Ctrl-C's SIGINT is not
    ignored: a suite run in the background (``&`` in a script, nohup) has it ignored, which
    a child inherits across exec, and Python then never raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handled signal is reset by exec
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_on_the_daemon_and_exits_130(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        before = client.status()["counters"]
    child = interruptible([sys.executable, "-m", "rkllmctl", "--socket", str(daemon.socket), "generate", "--max-tokens", "1000", "Tell me a very long story."])
    assert child.stdout is not None
    child.stdout.read(1)
    child.send_signal(signal.SIGINT)
    assert child.wait(10) == 130
    with daemon.client() as client:  # the daemon stopped it: cancelled, not completed
        poll(lambda: client.status()["counters"]["cancelled"] == before["cancelled"] + 1, 60, "the generation ended as cancelled")
        after = client.status()
    assert after["counters"]["completed"] == before["completed"] and after["worker"]["running"] is None


def test_ctrl_c_leaves_once_the_daemon_took_the_cancel_in(fake_runtime) -> None:
    """rkllmctl generate leaves on Ctrl-C without waiting for the generation's end: that
    comes at the runtime's next step, which a busy machine makes long and a stuck native
    call never reaches (here the fake runtime hangs in rkllm_run, deaf to rkllm_abort)."""
    from test_rkllm_daemon import NpuDaemon

    marker = "HANG-THE-WORKER"
    daemon = NpuDaemon(fake_runtime["1.3"], env={"FAKE_RKLLM_HANG_ON": marker}).start()
    try:
        child = interruptible([sys.executable, "-m", "rkllmctl", "--socket", str(daemon.socket), "generate", f"Please {marker} now."])
        with daemon.client() as client:
            poll(lambda: client.status()["worker"]["running"] is not None, 60, "the generation running")
        child.send_signal(signal.SIGINT)
        assert child.wait(10) == 130, child.stderr.read() if child.stderr else ""
        assert "hanging for good" in daemon.log()
    finally:
        if daemon.proc is not None:
            daemon.proc.kill()  # its worker is stuck for good: SIGTERM would wait for it
            daemon.proc.wait()
        daemon.cleanup()


def test_chat_keeps_history(daemon: DaemonProcess) -> None:
    run = rkllmctl("chat", "--max-tokens", "48", "--stats", input="What is the capital of France?\n/exit\n", socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert "The capital of France is Paris." in run.stdout
    assert "prompt 37 tokens" in run.stderr
