"""Build the fake RKLLM runtime (fake_rkllm.c) once per interface generation.

The library is compiled by the test session with the system C compiler, so the tests
exercise the real ctypes calling path (struct passing, by-value returns, callbacks from
C) rather than a Python stand-in. tests/conftest.py wraps it in the session fixture
``fake_runtime`` (``build_for_session``), built only when a test asks for it; the
build is cached per output directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("fake_rkllm.c")

# The fake's FAKE_E_* return codes, read from the C source so there is one definition.
ERRORS: dict[str, int] = {
    name: int(value)
    for name, value in re.findall(r"#define FAKE_E_(\w+) \((-\d+)\)", SOURCE.read_text())
}

# The release each build pretends to be (its embedded version banner).
RELEASE = {"1.2": "1.2.3", "1.3": "1.3.0"}


@dataclass(frozen=True)
class FakeRuntime:
    """The built libraries: ``libraries["1.2"]`` and ``libraries["1.3"]``."""

    libraries: dict[str, Path]

    def __getitem__(self, generation: str) -> Path:
        return self.libraries[generation]


def build(out_dir: Path) -> FakeRuntime:
    """Compile both generations into ``out_dir/<generation>/librkllmrt.so`` (once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("the fake RKLLM runtime needs a C compiler (cc or gcc) on PATH")
    libraries = {}
    for generation in RELEASE:
        target = out_dir / generation / "librkllmrt.so"
        if not target.exists() or target.stat().st_mtime < SOURCE.stat().st_mtime:
            target.parent.mkdir(parents=True, exist_ok=True)
            abi = generation.replace(".", "")
            subprocess.run(
                [compiler, "-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra",
                 f"-DRKLLM_ABI={abi}", "-o", str(target), str(SOURCE), "-lpthread"],
                check=True,
            )
        libraries[generation] = target
    return FakeRuntime(libraries)


def build_for_session(tmp_path_factory: pytest.TempPathFactory) -> FakeRuntime:
    """For a session fixture: one build under the session's base temp dir, shared by all modules."""
    return build(tmp_path_factory.getbasetemp() / "fake_rkllm")
