"""tools/rkllm_layouts.py on headers made here: the vendor structs of 1.2.3 and 1.3.0 as
declared by the fake runtime (preprocessor conditions, enums, callback typedefs, an
anonymous union, nested structs), and an altered copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "rkllm_layouts.json"

FAKE = ROOT / "tests" / "fake_rkllm" / "fake_rkllm.c"


def header(abi: int) -> str:
    """A header declaring the structs of one interface generation, in C++-compatible C: the fake
    runtime's declarations (themselves pinned to the table by static asserts), conditions and all."""
    source = FAKE.read_text()
    section = source[source.index("/* ---- the vendor interface"):source.index("/* Pinned to the sizes")]
    return f"#include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\n#define RKLLM_ABI {abi}\n{section}"


HEADER_1_2_3, HEADER_1_3_0 = header(12), header(13)
SWAPPED = HEADER_1_2_3.replace(
    "    int save_prompt_cache;\n    const char *prompt_cache_path;",
    "    const char *prompt_cache_path;\n    int save_prompt_cache;",
)
assert SWAPPED != HEADER_1_2_3


@pytest.fixture(autouse=True)
def needs_a_cxx_compiler():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.fail("the layouts tool needs a C++ compiler (g++)")


def headers(folder: Path, releases: dict[str, str]) -> Path:
    """``folder/<release>/include/rkllm.h`` for each release."""
    for release, text in releases.items():
        path = folder / release / "include" / "rkllm.h"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return folder


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "rkllm_layouts.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_documented_headers_match_the_table(tmp_path):
    out = tool(str(headers(tmp_path, {"1.2.3": HEADER_1_2_3, "1.3.0": HEADER_1_3_0})))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "the table matches the headers"
    assert "1.2.3: 15 structs measured from" in out.stdout and "1.3.0: 17 structs measured from" in out.stdout


def test_a_header_that_differs_is_reported_field_by_field(tmp_path):
    out = tool(str(headers(tmp_path, {"1.2.3": SWAPPED})))
    assert out.returncode == 1
    assert "1.2.3: RKLLMPromptCacheParam.save_prompt_cache: header 8, table 0" in out.stdout
    assert "1.2.3: RKLLMPromptCacheParam.prompt_cache_path: header 0, table 8" in out.stdout
    assert out.stdout.splitlines()[-1] == "2 differences"


def test_write_adds_a_release_and_keeps_the_rest(tmp_path):
    table = tmp_path / "layouts.json"
    shutil.copy(TABLE, table)
    out = tool(str(headers(tmp_path / "h", {"1.2.3": HEADER_1_2_3, "1.2.9": SWAPPED})), "--table", str(table), "--write")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1.2.9: not in the table" in out.stdout
    written = json.loads(table.read_text())
    original = json.loads(TABLE.read_text())
    assert list(written["releases"]) == ["1.2.1", "1.2.3", "1.2.9", "1.3.0"]
    assert {k: v for k, v in written["releases"].items() if k != "1.2.9"} == original["releases"]
    assert written["releases"]["1.2.9"]["RKLLMPromptCacheParam"] == {
        "size": 16, "align": 8, "prompt_cache_path": 0, "save_prompt_cache": 8}
    assert table.read_text() == json.dumps(written, indent=1)  # the table's own format

    rewritten = tmp_path / "again.json"
    shutil.copy(TABLE, rewritten)
    assert tool(str(headers(tmp_path / "h2", {"1.2.3": HEADER_1_2_3})), "--table", str(rewritten), "--write").returncode == 0
    assert rewritten.read_bytes() == TABLE.read_bytes()  # measuring the same header changes nothing


def test_a_folder_without_headers_is_refused(tmp_path):
    out = tool(str(tmp_path))
    assert out.returncode == 2 and "no <release>/.../rkllm.h under" in out.stderr
