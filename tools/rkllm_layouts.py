#!/usr/bin/env python3
"""Measure the vendor's ``rkllm.h`` of each release and compare (or rewrite) the table
``tests/data/rkllm_layouts.json`` that rkllmd's ctypes structs are tested against.

    python tools/rkllm_layouts.py HEADERS            # compare; exit 1 on any difference
    python tools/rkllm_layouts.py HEADERS --write    # put the measured releases into the table

``HEADERS`` holds one folder per release, named by its tag, each with the release's
``rkllm.h`` somewhere inside (an unpacked SDK works: ``1.2.3/rkllm-runtime/Linux/
librkllm_api/include/rkllm.h``). The headers are the vendor's and stay out of this
repository; only the measurements go in.

For each header the tool runs the C++ preprocessor, lists every ``typedef struct``
named ``RKLLM...`` and its fields in declaration order (members of an anonymous union under their own names; a nested struct under its
member name), writes a C++ program that prints ``sizeof``, ``alignof`` and ``offsetof``
of each, compiles it with the host's C++ compiler ($CXX, else c++ or g++: on an LP64
host, which lays out these structs as aarch64 does) and runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "rkllm_layouts.json"


def structs(text: str) -> dict[str, list[str]]:
    """Every ``typedef struct {...} RKLLM*;`` of preprocessed header text: name -> field names
    in order (the vendor's structs are all named RKLLM...; the system headers' are not)."""
    text = re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)
    found = {}
    for m in re.finditer(r"\btypedef\s+struct\s*\w*\s*\{", text):
        body, end = _braced(text, m.end() - 1)
        name = re.match(r"\s*(\w+)\s*;", text[end:])
        if name and name.group(1).startswith("RKLLM"):
            found[name.group(1)] = _members(body)
    return found


def _braced(text: str, start: int) -> tuple[str, int]:
    """The text inside the braces opening at ``start``, and the index after the closing one."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    raise ValueError("unbalanced braces")


def _members(body: str) -> list[str]:
    names: list[str] = []
    i = 0
    while i < len(body):
        brace, semi = body.find("{", i), body.find(";", i)
        if semi < 0:
            break
        if 0 <= brace < semi:  # a nested union or struct
            inner, end = _braced(body, brace)
            semi = body.find(";", end)
            member = body[end:semi].strip()
            names += [re.sub(r"\[.*", "", member).strip()] if member else _members(inner)
        else:
            declaration = body[i:semi]
            pointer = re.search(r"\(\s*\*\s*(\w+)\s*\)", declaration)  # a function pointer member
            if pointer:
                names.append(pointer.group(1))
            else:
                for part in declaration.split(","):
                    names.append(re.findall(r"\w+", re.sub(r"\[.*?\]", "", part))[-1])
        i = semi + 1
    return names


def program(header: Path, table: dict[str, list[str]]) -> str:
    lines = ["#include <cstddef>", "#include <cstdio>", f'#include "{header}"', "int main() {",
             '  std::printf("{");']
    for n, (name, fields) in enumerate(table.items()):
        sep = ", " if n else ""
        lines.append(f'  std::printf("{sep}\\"{name}\\": {{\\"size\\": %zu, \\"align\\": %zu", '
                     f"sizeof({name}), alignof({name}));")
        for field in fields:
            lines.append(f'  std::printf(", \\"{field}\\": %zu", offsetof({name}, {field}));')
        lines.append('  std::printf("}");')
    lines += ['  std::printf("}\\n");', "  return 0;", "}"]
    return "\n".join(lines) + "\n"


def measure(header: Path, compiler: str) -> dict[str, dict[str, int]]:
    """Sizes, alignments and offsets of every struct of ``header``, in the table's shape."""
    preprocessed = subprocess.run([compiler, "-E", "-P", "-x", "c++", str(header)], capture_output=True, text=True,
                                  check=True).stdout
    table = structs(preprocessed)
    with tempfile.TemporaryDirectory(prefix="rkllm-layouts-") as scratch:
        source, binary = Path(scratch) / "layouts.cpp", Path(scratch) / "layouts"
        source.write_text(program(header.resolve(), table))
        subprocess.run([compiler, "-std=c++11", "-Wno-invalid-offsetof", "-o", str(binary), str(source)],
                       check=True)
        out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def find_headers(folder: Path) -> dict[str, Path]:
    """Release tag -> its rkllm.h, for each release folder in ``folder``."""
    headers = {}
    for release in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = sorted(release.rglob("rkllm.h"))
        if found:
            headers[release.name] = found[0]
    return headers


def differences(release: str, measured: dict, recorded: dict | None) -> list[str]:
    if recorded is None:
        return [f"{release}: not in the table"]
    out = []
    for name in sorted(set(measured) | set(recorded)):
        if name not in recorded:
            out.append(f"{release}: {name} is in the header, not in the table")
        elif name not in measured:
            out.append(f"{release}: {name} is in the table, not in the header")
        elif measured[name] != recorded[name]:
            for key in [*measured[name], *(k for k in recorded[name] if k not in measured[name])]:
                got, want = measured[name].get(key), recorded[name].get(key)
                if got != want:
                    out.append(f"{release}: {name}.{key}: header {got}, table {want}")
            if list(measured[name]) != list(recorded[name]) and measured[name] == recorded[name]:
                out.append(f"{release}: {name}: the fields are listed in another order")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("headers", type=Path, help="a folder of release folders (1.2.3/, 1.3.0/...) holding rkllm.h")
    parser.add_argument("--table", type=Path, default=TABLE, help=f"the table (default: {TABLE})")
    parser.add_argument("--write", action="store_true", help="write the measured releases into the table")
    args = parser.parse_args(argv)

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        sys.stderr.write("no C++ compiler: install g++ or set CXX\n")
        return 2
    headers = find_headers(args.headers)
    if not headers:
        sys.stderr.write(f"no <release>/.../rkllm.h under {args.headers}\n")
        return 2
    document = json.loads(args.table.read_text())
    found = []
    for release, header in headers.items():
        measured = measure(header, compiler)
        found += differences(release, measured, document["releases"].get(release))
        document["releases"][release] = measured
        sys.stdout.write(f"{release}: {len(measured)} structs measured from {header}\n")
    for line in found:
        sys.stdout.write(line + "\n")
    if args.write:
        document["releases"] = dict(sorted(document["releases"].items(), key=lambda kv: _tag_key(kv[0])))
        args.table.write_text(json.dumps(document, indent=1))
        sys.stdout.write(f"wrote {args.table}\n")
        return 0
    sys.stdout.write("the table matches the headers\n" if not found else f"{len(found)} differences\n")
    return 1 if found else 0


def _tag_key(tag: str) -> tuple:
    return tuple(int(n) if n.isdigit() else n for n in re.findall(r"\d+|\D+", tag))


if __name__ == "__main__":
    sys.exit(main())
