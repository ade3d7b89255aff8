"""The vendor library file, read before anyone loads it: where it is, which machine it was
built for, which release it is, and so which interface generation rkllmd may use with it.

Both questions must be answered from the file, not by ``dlopen``:

* the ELF header's machine field turns "wrong ELF class" noise from the dynamic loader
  into "librkllmrt.so is aarch64 but this machine is x86_64";
* the interface generation ("1.2" or "1.3") must be known before any struct is built,
  because passing a struct of the other generation corrupts memory instead of failing.

The release is read from the vendor's own marker, the one string in the file that
carries it (docs/npu.md quotes a real one)::

    RKLLM SDK (version: 1.2.1b1 | target: Linux | build: 27637c95 2025-05-02 17:46:07)

and from nothing else: the same file holds the printf format of the runtime's log line
(``rkllm-runtime version: %s, ...``), the version of the NPU runtime it embeds
(``rknn llm lib version: 2.3.3b0``, another numbering) and the texts of model-version
errors. The release then picks the interface from ``abi.RELEASES``; see ``choose_interface``.
"""

from __future__ import annotations

import functools
import mmap
import os
import platform
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from rkllmd.backends.base import BackendError
from rkllmd.backends.rkllm import abi as rk

DEFAULT_LIBRARY_PATHS = (
    Path("/usr/lib/librkllmrt.so"),
    Path("/usr/local/lib/librkllmrt.so"),
    Path("/usr/lib/aarch64-linux-gnu/librkllmrt.so"),
)

# Known to differ from the interface of their line: 1.2.0 has 1.2.1b1's pre-release
# layouts (RKLLMInput without role, a 48-byte RKLLMResult, a void callback).
INCOMPATIBLE = {"1.2.0": "its structs and callback differ from 1.2.1's (a pre-release layout)"}

# The marker's version: X.Y.Z and an optional pre-release suffix ("1.2.1b1"), kept.
_MARKER = re.compile(
    rb"RKLLM SDK \(version: (\d+)\.(\d+)\.(\d+)([A-Za-z][0-9A-Za-z.]*)? \| target: [^|\x00\n]{0,64}\|"
    rb" build: [^)\x00\n]{0,80}\)"
)

# (ELF class, e_machine) -> name; class 1 is 32-bit, 2 is 64-bit.
_ELF_NAMES = {
    (2, 183): "aarch64",
    (2, 62): "x86_64",
    (1, 40): "32-bit ARM (armhf)",
    (1, 3): "i386",
    (2, 243): "riscv64",
}
_HOST_MACHINES = {
    "aarch64": (2, 183), "arm64": (2, 183), "x86_64": (2, 62), "amd64": (2, 62),
    "armv7l": (1, 40), "armv8l": (1, 40), "i686": (1, 3), "riscv64": (2, 243),
}


class RkllmStartupError(BackendError):
    """The NPU backend cannot start: library missing or unusable, init failed, bad model."""


@dataclass(frozen=True)
class Marker:
    """The release marker found in a library file."""

    release: str  # "1.2.3", "1.2.1b1"
    text: str  # the whole marker, as found


@dataclass(frozen=True)
class LibraryInfo:
    """What the library file says about itself, and which interface we will use."""

    path: Path
    release: str | None  # from the marker; None without one
    generation: str  # "1.2" or "1.3"
    reason: str  # why this generation (shown in logs and status)
    release_text: str | None = None  # the marker it was read from
    warning: str | None = None  # said once at load: an unverified patch release, a forced interface


@dataclass(frozen=True)
class Choice:
    """``choose_interface``'s answer: an interface and why, or why none."""

    generation: str | None  # None: refused
    reason: str
    warning: str | None = None


# --- where -------------------------------------------------------------------------------
def find_library(library: Path | None) -> Path:
    """The configured library path, or the first default install location that exists."""
    candidates = (Path(library),) if library is not None else DEFAULT_LIBRARY_PATHS
    for candidate in candidates:
        if os.path.isfile(candidate):  # False, not an error, where we may not look
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise RkllmStartupError(
        f"librkllmrt.so not found (looked at {where}); install the vendor runtime there "
        "or set [rkllm] library"
    )


# --- which machine ------------------------------------------------------------------------
def elf_target(path: Path) -> tuple[int, int]:
    """(ELF class, e_machine) from the file header, without loading the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as exc:
        raise RkllmStartupError(f"cannot read {path}: {exc}") from exc
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise RkllmStartupError(f"{path} is not an ELF shared library")
    order = "<" if head[5] == 1 else ">"
    return head[4], struct.unpack(order + "H", head[18:20])[0]


def describe_target(target: tuple[int, int]) -> str:
    ei_class, machine = target
    return _ELF_NAMES.get(target, f"ELF machine {machine} ({32 * ei_class}-bit)")


def host_target() -> tuple[int, int]:
    """The running interpreter's own target: what a library must match to be loadable.

    Reading the interpreter's ELF header (not just ``platform.machine()``) catches a
    32-bit userland on a 64-bit kernel.
    """
    try:
        return elf_target(Path(sys.executable).resolve())
    except RkllmStartupError:
        ei_class = 2 if struct.calcsize("P") == 8 else 1
        return _HOST_MACHINES.get(platform.machine().lower(), (ei_class, -1))


def check_architecture(path: Path) -> None:
    """Raise if ``path`` was built for another machine than this interpreter's."""
    target, host = elf_target(path), host_target()
    if target != host:
        raise RkllmStartupError(
            f"{path.name} is {describe_target(target)} but this machine is {describe_target(host)} "
            f"({path}); the vendor runtime runs on the board itself"
        )


# --- which release -------------------------------------------------------------------------
def read_markers(path: Path) -> list[Marker]:
    """The distinct release markers in the file, in order of appearance.

    The file (about 6 MB) is mapped, not read: the pages scanned are the page cache's.
    Cached per path, size and mtime, since the start-up check and the load both ask.
    """
    st = path.stat()
    return list(_markers(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _markers(path: str, size: int, mtime_ns: int) -> tuple[Marker, ...]:
    if size == 0:  # mmap refuses empty files
        return ()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = {}
        for m in _MARKER.finditer(data):
            release = ".".join(v.decode() for v in m.groups()[:3]) + (m.group(4) or b"").decode()
            found.setdefault(release, Marker(release, m.group(0).decode("ascii", "replace")))
    return tuple(found.values())


def _supported() -> str:
    return ", ".join(rk.RELEASES)


def choose_interface(markers: list[Marker], runtime: str = "auto") -> Choice:
    """The interface for a library with these markers under ``[rkllm] runtime``.

    Under "auto": a release of ``abi.RELEASES`` speaks its interface; a later patch of a
    known line (1.3.1) speaks its line's, with a warning; a pre-release (any suffix:
    "1.2.1b1"), an ``INCOMPATIBLE`` release, an earlier patch or an unknown line (1.4.0),
    no marker or contradictory markers are refused, since a wrong guess corrupts memory.
    A forced "1.2"/"1.3" overrides what is unknown (no marker, a new line), never what
    is known to be incompatible; it warns when the marker names another line.
    """
    if runtime not in ("auto", *rk.GENERATIONS):
        raise ValueError(f"rkllm runtime must be auto, 1.2 or 1.3, not {runtime!r}")
    forced = runtime != "auto"
    if len(markers) > 1:
        releases = ", ".join(m.release for m in markers)
        if not forced:
            return Choice(None, f"the library names several releases ({releases}); set [rkllm] runtime to the one it is")
        return Choice(runtime, f"[rkllm] runtime = {runtime} (the library names several releases: {releases})",
                      f"[rkllm] runtime = {runtime} is forced on a library naming releases {releases}")
    if not markers:
        if not forced:
            return Choice(None, "no release marker (\"RKLLM SDK (version: ...\") in the library; rkllmd does not "
                                "guess an interface: set [rkllm] runtime = \"1.2\" or \"1.3\" to the release you installed")
        return Choice(runtime, f"[rkllm] runtime = {runtime} (the library has no release marker)",
                      f"[rkllm] runtime = {runtime} is forced on a library without a release marker")
    release = markers[0].release
    found = f"release {release} from its marker"
    major, minor, patch, suffix = _parse(release)
    line = f"{major}.{minor}"
    known_patches = [int(r.split(".")[2]) for r, g in rk.RELEASES.items() if g == line and r.startswith(line + ".")]
    if suffix:
        return Choice(None, f"release {release} is a pre-release, whose structs differ from the release's; "
                            f"supported releases: {_supported()}")
    if release in INCOMPATIBLE:
        return Choice(None, f"release {release}: {INCOMPATIBLE[release]}; supported releases: {_supported()}")
    if known_patches and patch < min(known_patches):
        return Choice(None, f"release {release} predates the measured {line} releases and may differ from them; "
                            f"supported releases: {_supported()}")
    if forced:
        if known_patches and line != runtime:
            return Choice(None, f"[rkllm] runtime = {runtime} contradicts the library's {found} "
                                f"(interface {line}); remove the setting")
        warning = None if release in rk.RELEASES else f"[rkllm] runtime = {runtime} is forced on release {release}"
        return Choice(runtime, f"[rkllm] runtime = {runtime}, {found}", warning)
    if release in rk.RELEASES:
        return Choice(rk.RELEASES[release], found)
    if known_patches:  # a later patch of a known line
        verified = ", ".join(r for r, g in rk.RELEASES.items() if g == line)
        return Choice(line, f"{found}, a later patch of the {line} line",
                      f"RKLLM runtime {release} is newer than the releases rkllmd was checked against "
                      f"({verified}); using the {line} interface")
    return Choice(None, f"release {release} is of a line rkllmd has no struct layouts for; supported releases: "
                        f"{_supported()} (set [rkllm] runtime = \"1.2\" or \"1.3\" to force one at your own risk)")


def _parse(release: str) -> tuple[int, int, int, str]:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(.*)", release)
    assert m is not None  # the marker pattern allows nothing else
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)


def inspect_library(path: Path, runtime: str = "auto") -> LibraryInfo:
    """The interface to use with the library at ``path``; ``RkllmStartupError`` when refused."""
    markers = read_markers(path)
    choice = choose_interface(markers, runtime)
    if choice.generation is None:
        raise RkllmStartupError(f"{path}: {choice.reason}")
    marker = markers[0] if len(markers) == 1 else None
    return LibraryInfo(
        path=path,
        release=marker.release if marker else None,
        generation=choice.generation,
        reason=choice.reason,
        release_text=marker.text if marker else None,
        warning=choice.warning,
    )
