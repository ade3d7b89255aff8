"""Driving ``librkllmrt.so``: one opened library, a runtime handle per loaded model.

Nothing here runs at import time: the library is opened only when the NPU backend is
chosen, and only after ``library.inspect_library`` has read from the file which
interface generation it speaks. It is opened once per process (``_bound``): every model
loaded beside another is one more ``rkllm_init`` handle of the same library, as the
vendor's runtime allows (its only limit is the NPU's memory).

``RkllmRuntime`` wraps one handle: every call's return code is checked, and the result
callback (and, under 1.3, the ``RKLLMCallback`` struct holding it) lives exactly as long
as the object, so the runtime never calls into freed memory. Each handle has its own
callback object and its own userdata value (in the 1.3 struct and every ``rkllm_run``);
a callback that arrives with another handle's userdata is refused, never handed to the
wrong model's stream.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from rkllmd.backends.base import BackendError
from rkllmd.backends.rkllm import abi as rk
from rkllmd.backends.rkllm.abi import Abi
from rkllmd.backends.rkllm.library import (
    LibraryInfo,
    RkllmStartupError,
    check_architecture,
    find_library,
    inspect_library,
)
from rkllmd.backends.rkllm.vendor_log import captured


log = logging.getLogger(__name__)

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


# --- the library, once per process -------------------------------------------------------
#: (path, id of the Abi) -> (that Abi, kept alive so its id stays its own; the bound library)
_libraries: dict[tuple[str, int], tuple[Abi, ctypes.CDLL]] = {}
_libraries_lock = threading.Lock()
_userdata = itertools.count(1)  # each handle's own callback userdata


def _bound(info: LibraryInfo, abi: Abi) -> ctypes.CDLL:
    """The library at ``info.path`` with ``abi``'s prototypes bound: opened and checked at the
    first handle, shared by the later ones (its function objects carry the prototypes)."""
    key = (str(info.path), id(abi))
    with _libraries_lock:
        if key in _libraries:
            return _libraries[key][1]
        try:
            lib = ctypes.CDLL(str(info.path))
        except OSError as exc:
            raise RkllmStartupError(f"cannot load {info.path}: {exc}") from exc
        missing = [name for name in REQUIRED_FUNCTIONS if not hasattr(lib, name)]
        if missing:
            raise RkllmStartupError(f"{info.path} lacks {', '.join(missing)}: not a supported RKLLM runtime")
        for name, (restype, argtypes) in abi.prototypes().items():
            if hasattr(lib, name):
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
        _libraries[key] = (abi, lib)
        return lib


# --- the handle -------------------------------------------------------------------------
# Called for every result callback during a run: (state, result) -> callback return value.
ResultHandler = Callable[[int, rk.RKLLMResult], int]


class RkllmRuntime:
    """The opened library and one runtime handle (at most).

    All methods except ``abort`` run on the model worker thread. ctypes releases the GIL
    during foreign calls, so ``abort`` from another thread reaches the runtime while
    ``run`` is blocked inside ``rkllm_run``.
    """

    def __init__(self, info: LibraryInfo, abi: Abi):
        self.info = info
        self.abi = abi
        self._lib = _bound(info, abi)
        self._handle = rk.LLMHandle()
        self._param = None  # the init parameters, alive as long as the handle
        self._handler: ResultHandler | None = None
        self._callback_error: BaseException | None = None
        self.userdata = next(_userdata)  # what this handle's callbacks must arrive with
        self._callback = rk.ResultCallback(self._dispatch)
        self._callback_struct = (
            rk.RKLLMCallback(result_callback=self._callback, result_userdata=self.userdata) if abi.generation == "1.3" else None
        )

    @classmethod
    def open(cls, library: Path | None, runtime: str = "auto") -> RkllmRuntime:
        """Find, check and load the library; log which interface was chosen and why."""
        path = find_library(library)
        check_architecture(path)
        info = inspect_library(path, runtime)
        if info.warning:
            log.warning("%s", info.warning)
        log.info("librkllmrt %s: using the %s interface (%s)", path, info.generation, info.reason)
        return cls(info, rk.ABI[info.generation])

    # -- lifecycle
    def default_param(self) -> ctypes.Structure:
        """The vendor's defaults (``rkllm_createDefaultParam``), to be adjusted before init."""
        return self._lib.rkllm_createDefaultParam()

    def init(self, param: ctypes.Structure) -> None:
        """``rkllm_init``; a failure raises with what the runtime said on stderr about it."""
        callback = ctypes.pointer(self._callback_struct) if self._callback_struct is not None else self._callback
        with captured() as log_lines:
            rc = self._lib.rkllm_init(ctypes.byref(self._handle), ctypes.byref(param), callback)
        if rc != 0:
            self._handle = rk.LLMHandle()
            said = log_lines.said()
            why = f": the runtime said: {said}" if said else " (the runtime said nothing on stderr; check NPU memory and the model's target platform)"
            if "malloc npu memory" in said or "Cannot allocate memory" in said:
                why += (" (the NPU's memory is taken: by the models loaded beside it, or other programs; "
                        "daemon.models_memory_mb makes the daemon unload idle models first)")
            raise RkllmStartupError(f"rkllm_init failed with code {rc} for model {param.model_path.decode()}{why}", code=rc)
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

    def kv_cache_size(self) -> int | None:
        """Positions the KV cache holds, as the runtime counts them; None when the library
        lacks ``rkllm_get_kv_cache_size`` (it writes one count per batch; we run one)."""
        if not hasattr(self._lib, "rkllm_get_kv_cache_size"):
            return None
        sizes = (ctypes.c_int * 8)()
        self._check(self._lib.rkllm_get_kv_cache_size(self._handle, sizes), "rkllm_get_kv_cache_size")
        return sizes[0]

    def load_prompt_cache(self, path: Path) -> None:
        self._check(self._lib.rkllm_load_prompt_cache(self._handle, str(path).encode()), "rkllm_load_prompt_cache")

    def release_prompt_cache(self) -> None:
        self._check(self._lib.rkllm_release_prompt_cache(self._handle), "rkllm_release_prompt_cache")

    # -- generation
    def run(
        self,
        prompt: str | Sequence[int],
        handler: ResultHandler,
        *,
        mode: int = rk.RKLLM_INFER_GENERATE,
        save_prompt_cache: Path | None = None,
        sampling: rk.RKLLMSamplingParam | None = None,
        max_new_tokens: int = 0,
        keep_history: bool = False,
    ) -> int:
        """One blocking ``rkllm_run`` of a text prompt, or of token ids (token input)
        (``keep_history``: the runtime keeps this run's input and output in its KV cache for
        the next run to continue). ``mode`` GET_LOGITS: the run prefills its input and
        hands the logits to ``handler`` instead of generating.

        ``handler`` sees every callback; an exception it raises pauses the run and is
        re-raised here. ``sampling`` and ``max_new_tokens`` exist only in the 1.3
        interface (None / 0 keep the init values). Returns ``rkllm_run``'s code: the
        caller decides what a failure means next to the states it saw.
        """
        if not self.abi.per_request_sampling and (sampling is not None or max_new_tokens > 0):
            raise ValueError("the 1.2 interface has no per-request sampling or max_new_tokens")
        inp = self.abi.RKLLMInput(role=b"user", enable_thinking=False)
        if isinstance(prompt, str):
            text = prompt.encode()
            inp.input_type, inp.prompt_input = rk.RKLLM_INPUT_PROMPT, text
        else:
            ids = (ctypes.c_int32 * len(prompt))(*prompt)  # alive until the call returns
            inp.input_type = rk.RKLLM_INPUT_TOKEN
            inp.token_input = rk.RKLLMTokenInput(ctypes.cast(ids, ctypes.POINTER(ctypes.c_int32)), len(prompt))
        infer = self.abi.RKLLMInferParam(mode=mode, keep_history=int(keep_history))
        if save_prompt_cache is not None:
            cache = rk.RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=str(save_prompt_cache).encode())
            infer.prompt_cache_params = ctypes.pointer(cache)
        if self.abi.per_request_sampling:
            if sampling is not None:
                infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = max_new_tokens
        self._handler, self._callback_error = handler, None
        try:
            rc = self._lib.rkllm_run(self._handle, ctypes.byref(inp), ctypes.byref(infer), self.userdata)
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
        if userdata != self.userdata:
            self._callback_error = BackendError(
                f"the runtime called handle {self.userdata}'s callback with userdata {userdata}: another handle's result"
            )
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
