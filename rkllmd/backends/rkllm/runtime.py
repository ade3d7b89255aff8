"""Finding, checking and driving ``librkllmrt.so``: one library, one runtime handle.

Nothing here runs at import time: the library is opened only when the NPU backend is
chosen. Before ``dlopen`` the file itself is inspected, for two reasons:

* the ELF header's machine field turns "wrong ELF class" noise from the dynamic loader
  into "librkllmrt.so is aarch64 but this machine is x86_64";
* the interface generation ("1.2" or "1.3") must be known before any struct is built,
  because passing a struct of the other generation corrupts memory instead of failing.
  The vendor library embeds its release in the banner it logs at init
  (``rkllm-runtime version: 1.2.3``); "auto" reads that string from the file.

``RkllmRuntime`` wraps the handle: every call's return code is checked, and the result
callback (and, under 1.3, the ``RKLLMCallback`` struct holding it) lives exactly as long
as the object, so the runtime never calls into freed memory.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rkllmd.backends.base import BackendError
from rkllmd.backends.rkllm import abi as rk
from rkllmd.backends.rkllm.abi import Abi

log = logging.getLogger(__name__)

DEFAULT_LIBRARY_PATHS = (
    Path("/usr/lib/librkllmrt.so"),
    Path("/usr/local/lib/librkllmrt.so"),
    Path("/usr/lib/aarch64-linux-gnu/librkllmrt.so"),
)

# Functions rkllmd calls; the rest of the prototype table is bound when present.
REQUIRED_FUNCTIONS = (
    "rkllm_createDefaultParam",
    "rkllm_init",
    "rkllm_destroy",
    "rkllm_run",
    "rkllm_abort",
    "rkllm_clear_kv_cache",
    "rkllm_set_chat_template",
    "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
)

# Releases whose headers were measured (layouts.json) or lie inside a measured range.
VERIFIED_RELEASES = ("1.2.1", "1.2.2", "1.2.3", "1.3.0")

_VERSION_BANNER = re.compile(
    rb"(?:rkllm[-_ ]?runtime|librkllmrt|rkllm)[-_ ]?version[:=]?\s*v?(\d+)\.(\d+)\.(\d+)", re.IGNORECASE
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
class LibraryInfo:
    """What the library file says about itself, and which interface we will use."""

    path: Path
    release: str | None  # e.g. "1.2.3", from the embedded version banner
    generation: str  # "1.2" or "1.3"
    reason: str  # why this generation (shown in logs and status)


# --- the library file -----------------------------------------------------------------
def find_library(library: Path | None) -> Path:
    """The configured library path, or the first default install location that exists."""
    candidates = (Path(library),) if library is not None else DEFAULT_LIBRARY_PATHS
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise RkllmStartupError(
        f"librkllmrt.so not found (looked at {where}); install the vendor runtime there "
        "or set [rkllm] library"
    )


def _elf_target(path: Path) -> tuple[int, int]:
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


def _describe_target(target: tuple[int, int]) -> str:
    ei_class, machine = target
    return _ELF_NAMES.get(target, f"ELF machine {machine} ({32 * ei_class}-bit)")


def _host_target() -> tuple[int, int]:
    """The running interpreter's own target: what a library must match to be loadable.

    Reading the interpreter's ELF header (not just ``platform.machine()``) catches a
    32-bit userland on a 64-bit kernel.
    """
    try:
        return _elf_target(Path(sys.executable).resolve())
    except RkllmStartupError:
        ei_class = 2 if struct.calcsize("P") == 8 else 1
        return _HOST_MACHINES.get(platform.machine().lower(), (ei_class, -1))


def check_architecture(path: Path) -> None:
    """Raise if ``path`` was built for another machine than this interpreter's."""
    target, host = _elf_target(path), _host_target()
    if target != host:
        raise RkllmStartupError(
            f"{path.name} is {_describe_target(target)} but this machine is {_describe_target(host)} "
            f"({path}); the vendor runtime runs on the board itself"
        )


def inspect_library(path: Path, runtime: str = "auto") -> LibraryInfo:
    """Decide the interface generation for ``path``.

    Rule for "auto": the release in the embedded version banner decides (1.2.x -> "1.2",
    1.3.x -> "1.3"); a release of another series is refused rather than guessed, since a
    wrong layout corrupts memory. With no banner (or contradictory ones) nothing decides
    and "1.2" is assumed, the generation RK3588 boards run; the reason says so and a
    warning is logged. An explicit "1.2"/"1.3" is honoured, with a warning when the
    banner disagrees.
    """
    if runtime not in ("auto", *rk.GENERATIONS):
        raise ValueError(f"rkllm runtime must be auto, 1.2 or 1.3, not {runtime!r}")
    releases = _embedded_releases(path)
    release = releases[0] if len(releases) == 1 else None
    found = f"found version banner {release!r} in {path.name}" if release else ""
    if runtime != "auto":
        if release and not release.startswith(runtime + "."):
            log.warning("rkllm.runtime = %s is configured, but %s says it is release %s", runtime, path, release)
        reason = "; ".join(filter(None, [f"configured rkllm.runtime = {runtime}", found]))
        return LibraryInfo(path, release, runtime, reason)
    if len(releases) > 1:
        reason = f"{path.name} has contradictory version banners {releases}; assuming 1.2 (set [rkllm] runtime)"
        log.warning("%s", reason)
        return LibraryInfo(path, None, "1.2", reason)
    if not release:
        reason = f"no version banner in {path.name}; nothing decides, assuming 1.2 (set [rkllm] runtime to be sure)"
        log.warning("%s", reason)
        return LibraryInfo(path, None, "1.2", reason)
    series = ".".join(release.split(".")[:2])
    if series not in rk.GENERATIONS:
        raise RkllmStartupError(
            f"{path} is RKLLM runtime {release}; rkllmd has struct layouts for 1.2.x and 1.3.x only "
            "(set [rkllm] runtime = \"1.2\" or \"1.3\" to force one at your own risk)"
        )
    if release not in VERIFIED_RELEASES:
        log.warning("RKLLM runtime %s has not been checked against its header; using the %s layout", release, series)
    return LibraryInfo(path, release, series, found)


def _embedded_releases(path: Path) -> list[str]:
    """Distinct releases named by version banners in the file, in order of appearance."""
    if path.stat().st_size == 0:  # mmap refuses empty files
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = [".".join(v.decode() for v in m.groups()) for m in _VERSION_BANNER.finditer(data)]
    return list(dict.fromkeys(found))


# --- the handle -------------------------------------------------------------------------
# Called for every result callback during a run: (state, result) -> callback return value.
ResultHandler = Callable[[int, rk.RKLLMResult], int]


class RkllmRuntime:
    """The opened library and at most one runtime handle.

    All methods except ``abort`` run on the model worker thread. ctypes releases the GIL
    during foreign calls, so ``abort`` from another thread reaches the runtime while
    ``run`` is blocked inside ``rkllm_run``.
    """

    def __init__(self, info: LibraryInfo, abi: Abi):
        self.info = info
        self.abi = abi
        try:
            self._lib = ctypes.CDLL(str(info.path))
        except OSError as exc:
            raise RkllmStartupError(f"cannot load {info.path}: {exc}") from exc
        missing = [name for name in REQUIRED_FUNCTIONS if not hasattr(self._lib, name)]
        if missing:
            raise RkllmStartupError(f"{info.path} lacks {', '.join(missing)}: not a supported RKLLM runtime")
        for name, (restype, argtypes) in abi.prototypes().items():
            if hasattr(self._lib, name):
                function = getattr(self._lib, name)
                function.restype, function.argtypes = restype, argtypes
        self._handle = rk.LLMHandle()
        self._param = None  # the init parameters, alive as long as the handle
        self._handler: ResultHandler | None = None
        self._callback_error: BaseException | None = None
        self._callback = rk.ResultCallback(self._dispatch)
        self._callback_struct = rk.RKLLMCallback(result_callback=self._callback) if abi.generation == "1.3" else None

    @classmethod
    def open(cls, library: Path | None, runtime: str = "auto") -> RkllmRuntime:
        """Find, check and load the library; log which interface was chosen and why."""
        path = find_library(library)
        check_architecture(path)
        info = inspect_library(path, runtime)
        log.info("librkllmrt %s: using the %s interface (%s)", path, info.generation, info.reason)
        return cls(info, rk.ABI[info.generation])

    # -- lifecycle
    def default_param(self) -> ctypes.Structure:
        """The vendor's defaults (``rkllm_createDefaultParam``), to be adjusted before init."""
        return self._lib.rkllm_createDefaultParam()

    def init(self, param: ctypes.Structure) -> None:
        callback = ctypes.pointer(self._callback_struct) if self._callback_struct is not None else self._callback
        rc = self._lib.rkllm_init(ctypes.byref(self._handle), ctypes.byref(param), callback)
        if rc != 0:
            self._handle = rk.LLMHandle()
            raise RkllmStartupError(
                f"rkllm_init failed with code {rc} for model {param.model_path.decode()} "
                "(see the runtime's log lines above; check NPU memory and the model's target platform)",
                code=rc,
            )
        self._param = param

    def destroy(self) -> None:
        if self._handle:
            handle, self._handle = self._handle, rk.LLMHandle()
            self._check(self._lib.rkllm_destroy(handle), "rkllm_destroy")

    # -- per-handle settings
    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None:
        rc = self._lib.rkllm_set_chat_template(self._handle, system_prompt.encode(), prefix.encode(), postfix.encode())
        self._check(rc, "rkllm_set_chat_template")

    def clear_kv_cache(self) -> None:
        self._check(self._lib.rkllm_clear_kv_cache(self._handle, 0, None, None), "rkllm_clear_kv_cache")

    def load_prompt_cache(self, path: Path) -> None:
        self._check(self._lib.rkllm_load_prompt_cache(self._handle, str(path).encode()), "rkllm_load_prompt_cache")

    def release_prompt_cache(self) -> None:
        self._check(self._lib.rkllm_release_prompt_cache(self._handle), "rkllm_release_prompt_cache")

    # -- generation
    def run(
        self,
        prompt: str,
        handler: ResultHandler,
        *,
        save_prompt_cache: Path | None = None,
        sampling: rk.RKLLMSamplingParam | None = None,
        max_new_tokens: int = 0,
    ) -> int:
        """One blocking ``rkllm_run`` of a text prompt with ``keep_history=0``.

        ``handler`` sees every callback; an exception it raises pauses the run and is
        re-raised here. ``sampling`` and ``max_new_tokens`` exist only in the 1.3
        interface (None / 0 keep the init values). Returns ``rkllm_run``'s code: the
        caller decides what a failure means next to the states it saw.
        """
        if not self.abi.per_request_sampling and (sampling is not None or max_new_tokens > 0):
            raise ValueError("the 1.2 interface has no per-request sampling or max_new_tokens")
        text = prompt.encode()
        inp = self.abi.RKLLMInput(role=b"user", enable_thinking=False, input_type=rk.RKLLM_INPUT_PROMPT)
        inp.prompt_input = text
        infer = self.abi.RKLLMInferParam(mode=rk.RKLLM_INFER_GENERATE, keep_history=0)
        if save_prompt_cache is not None:
            cache = rk.RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=str(save_prompt_cache).encode())
            infer.prompt_cache_params = ctypes.pointer(cache)
        if self.abi.per_request_sampling:
            if sampling is not None:
                infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = max_new_tokens
        self._handler, self._callback_error = handler, None
        try:
            rc = self._lib.rkllm_run(self._handle, ctypes.byref(inp), ctypes.byref(infer), None)
        finally:
            self._handler = None
        if self._callback_error is not None:
            raise self._callback_error
        return rc

    def abort(self) -> None:
        """Ask a running ``rkllm_run`` to stop between decode steps. Any thread."""
        if self._handle:
            rc = self._lib.rkllm_abort(self._handle)
            if rc != 0:
                log.warning("rkllm_abort returned %d", rc)

    def _dispatch(self, result: Any, userdata: int | None, state: int) -> int:
        """The C callback. It must never raise: ctypes would print and return garbage."""
        handler = self._handler
        if handler is None or self._callback_error is not None:
            return rk.CALLBACK_PAUSE
        try:
            return handler(state, result.contents)
        except BaseException as exc:  # re-raised by run() once the runtime returns
            self._callback_error = exc
            return rk.CALLBACK_PAUSE

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise BackendError(f"{what} failed with code {rc}", code=rc)
