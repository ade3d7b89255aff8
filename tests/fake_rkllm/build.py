"""Build the fake RKLLM runtime (fake_rkllm.c) once per interface generation and release.

The library is compiled by the test session with the system C compiler, so the tests
exercise the real ctypes calling path (struct passing, by-value returns, callbacks from
C) rather than a Python stand-in. tests/conftest.py wraps it in the session fixture
``fake_runtime`` (``build_for_session``); each library is built when a test first asks
for it, and kept per output directory.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("fake_rkllm.c")

# The fake's FAKE_E_* return codes, read from the C source so there is one definition.
ERRORS: dict[str, int] = {
    name: int(value)
    for name, value in re.findall(r"#define FAKE_E_(\w+) \((-\d+)\)", SOURCE.read_text())
}

# Every library the tests build: name -> (interface the fake speaks, release in its marker).
# "1.2" and "1.3" are the supported releases rkllmd runs on; the others exist to test
# release detection (see rkllmd/backends/rkllm/library.py for what each must lead to).
LIBRARIES: dict[str, tuple[int, str | None]] = {
    "1.2": (12, "1.2.3"),
    "1.3": (13, "1.3.0"),
    "1.3.1": (13, "1.3.1"),  # a later patch: runs with a warning
    "1.2.1b1": (12, "1.2.1b1"),  # a pre-release: refused
    "1.2.0": (12, "1.2.0"),  # pre-release layouts: refused
    "1.4.0": (13, "1.4.0"),  # an unknown line: refused unless forced
    "no marker": (12, None),  # refused under auto
}
RELEASE = {name: release for name, (_, release) in LIBRARIES.items() if name in ("1.2", "1.3")}

# The first bytes of a .rkllm model file, read from the C source (RKLLM_MODEL_MAGIC).
MODEL_MAGIC = bytes(
    int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", re.search(r'#define RKLLM_MODEL_MAGIC "([^"]+)"', SOURCE.read_text())[1])
)


def write_model(path: Path, text: str = "a fake .rkllm model\n") -> Path:
    """A model file the fake accepts: the magic, then ``text`` (which may ask for FAKE_INIT_FAIL, or
    say "says=WORD": its replies start "WORD: "). The fake counts the file's size as the NPU memory
    its handle holds (FAKE_RKLLM_NPU_MB bounds the sum): truncate it larger, sparse, to model a big one."""
    path.write_bytes(MODEL_MAGIC + text.encode())
    return path


def write_tokenizer(path: Path, tokens: str = "bytes") -> Path:
    """The fake model's own tokenizer, as a Hugging Face tokenizer.json, counting as the fake
    counts its prompts: one token per byte of UTF-8 (a byte-level BPE without merges), or with
    ``tokens="words"`` (the fake under FAKE_RKLLM_TOKENS=words) one per word and its trailing
    spaces, or per run of spaces before a text's first word (a word-level model: every word
    outside its one-entry vocabulary is its unknown token, which counts as well as any)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if tokens == "words":
        tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[^ ]+ *| +"), behavior="isolated")
    else:
        vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))
    return path


@dataclass(frozen=True)
class FakeRuntime:
    """The libraries, built on first use into ``out_dir``: ``fake["1.2"]``, ``fake["1.4.0"]``..."""

    out_dir: Path

    def __getitem__(self, name: str) -> Path:
        return _build(self.out_dir, name)


def _build(out_dir: Path, name: str) -> Path:
    """Compile library ``name`` into ``out_dir/<name>/librkllmrt.so`` unless it is up to date."""
    abi, release = LIBRARIES[name]
    target = out_dir / name.replace(" ", "-") / "librkllmrt.so"
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("the fake RKLLM runtime needs a C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    marker = [f'-DFAKE_RELEASE="{release}"'] if release else []
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # concurrent builds never see a partial file
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra", f"-DRKLLM_ABI={abi}", *marker,
             "-o", str(built), str(SOURCE), "-lpthread"],
            check=True,
        )
        built.replace(target)
    return target


def build_for_session(tmp_path_factory: pytest.TempPathFactory) -> FakeRuntime:
    """For a session fixture: builds under the session's base temp dir, shared by all modules."""
    return FakeRuntime(tmp_path_factory.getbasetemp() / "fake_rkllm")


def foreign_elf(path: Path) -> Path:
    """A library file for a machine this one is not (x86-64 on arm boards, else aarch64):
    the fake itself cross-compiled when aarch64-linux-gnu-gcc is here, else a bare ELF
    header with that machine number."""
    from rkllmd.backends.rkllm.library import host_target

    native_arm = host_target() == (2, 183)
    cross = None if native_arm else shutil.which("aarch64-linux-gnu-gcc")
    if cross:
        subprocess.run([cross, "-shared", "-fPIC", "-O1", "-std=c11", "-DRKLLM_ABI=12", '-DFAKE_RELEASE="1.2.3"',
                        "-o", str(path), str(SOURCE), "-lpthread"], check=True)
        return path
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 3, 62 if native_arm else 183, 1)
    path.write_bytes(header + bytes(64 - len(header)))
    return path
