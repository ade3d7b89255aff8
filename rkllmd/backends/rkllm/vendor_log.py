"""The vendor runtime's own words: its error lines on the process's stderr, kept while it works.

``librkllmrt.so`` says why a call failed only in its log (``E RKNN: [09:40:45.140] failed to
malloc npu memory, size: 3085697024, flags: 0x2`` ... ``E rkllm: rkllm_init failed``, rknn-llm
#335); the call itself returns a bare -1. ``captured()`` points file descriptor 2 at a pipe
for the length of a call; a small copier process passes every byte on to where fd 2 went
before (the journal, a test's log) and into a temporary file, whose runtime error lines the
caller gets, so a failed load can tell the client what the runtime said. The copier is a
process, not a thread, because the runtime may crash inside the call (1.3.0 does when the
NPU's memory runs out, rknn-llm #522): a thread would die with it and its last words with
it, the copier still delivers them. Python's own log lines written meanwhile pass through
unkept. One capture at a time (a process has one fd 2); the daemon loads models one at a time.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: A vendor error line: "E RKNN: [hh:mm:ss.mmm] what" or "E rkllm: what" (F: fatal).
ERROR_LINE = re.compile(r"^[EF] (?:RKNN|rkllm)\s*:\s*(?:\[[0-9:.]+\]\s*)?(.+?)\s*$", re.M)
#: How long the copier gets to drain the pipe once the call returned (a child process started
#: meanwhile may hold the pipe open: it is then copied on until that child exits).
DRAIN_S = 2.0
#: The copier: standard input to standard output and to the file descriptor argv[1].
COPIER = """
import os, sys
keep = int(sys.argv[1])
while True:
    data = os.read(0, 65536)
    if not data:
        break
    for fd in (1, keep):
        rest = data
        while rest:
            try:
                rest = rest[os.write(fd, rest):]
            except OSError:
                break
"""
_one_at_a_time = threading.Lock()
log = logging.getLogger(__name__)


class Capture:
    """The runtime's error lines seen during one call, in order (without their prefix and time)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def said(self) -> str:
        """The error lines joined, "" if the runtime said nothing."""
        return "; ".join(self.errors)


@contextmanager
def captured() -> Iterator[Capture]:
    """Capture the runtime's error lines on fd 2 during the ``with`` block (see the module)."""
    capture = Capture()
    with _one_at_a_time, tempfile.TemporaryFile() as kept:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        copier: subprocess.Popen | None = None
        try:
            copier = subprocess.Popen([sys.executable, "-I", "-S", "-c", COPIER, str(kept.fileno())], stdin=read_end,
                                      stdout=2, pass_fds=(kept.fileno(),))
        except OSError as exc:  # the call runs all the same, its words only in the journal
            log.warning("cannot keep the runtime's log lines (no copier process: %s)", exc)
        finally:
            os.close(read_end)
        if copier is None:
            os.close(write_end)
            yield capture
            return
        original = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield capture
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)  # the pipe's last write end closes: the copier sees its end
            os.close(original)
            try:
                copier.wait(DRAIN_S)
            except subprocess.TimeoutExpired:
                pass  # it exits once that child does; what it copied so far is read below
            kept.seek(0)
            capture.errors = [m.group(1) for m in ERROR_LINE.finditer(kept.read().decode("utf-8", "replace"))]
