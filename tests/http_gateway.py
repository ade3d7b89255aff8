"""The real rkllmd-http, started as a subprocess on a free port in front of a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """``rkllmd-http --listen 127.0.0.1:0``: the port it bound is read from its log."""

    def __init__(self, socket: Path, *extra: str, env: dict[str, str] | None = None):
        self.socket = socket
        self.extra = extra
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="rkllmd-http-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "rkllmd_http", "--listen", "127.0.0.1:0", "--socket", str(self.socket), "--log-level", "debug", *self.extra]

    def start(self, timeout: float = 60) -> GatewayProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rkllmd-http exited with {self.proc.returncode}:\n{self.log()}")
            found = re.search(r"listening on (http://\S+?:\d+)", self.log())
            if found:
                self.url = found.group(1)
                return self
            time.sleep(0.05)
        raise TimeoutError(f"rkllmd-http not listening after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            self.log_path.unlink(missing_ok=True)
