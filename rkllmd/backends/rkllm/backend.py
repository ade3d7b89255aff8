"""The NPU backend: a model served by the vendor RKLLM runtime.

How the runtime's interface is used, and why:

* The daemon renders chat templates itself (``rkllmd.templates``) and the runtime's own
  template is set empty, so the text a prompt cache was built from is byte-identical to
  the start of every request that should hit it (the runtime matches a loaded cache
  against the templated input).
* Conversations continue the runtime's one KV history (``keep_history=1``). The
  backend records the exact text that history holds (every input sent since the last
  ``rkllm_clear_kv_cache`` and every piece generated); a prompt that starts with it is
  sent as only its new part; any other prompt clears the KV and is sent whole (with the
  best prompt cache loaded). The record is kept only after a run the runtime ended by
  itself: after our stop string, ``max_tokens``, a cancel or an error what the history
  holds is not known for sure, so the next run clears it. (``keep_history=0`` alone
  does not empty the history: users report leftovers without the explicit clear, #272.)
* Tokens reach the sink as their callbacks arrive; the bytes of WAITING callbacks (an
  incomplete UTF-8 character) are joined with the next ones by an incremental decoder.
  The sink may therefore be called on the runtime's callback thread while the model
  worker is blocked inside ``rkllm_run``.
* Stops we decide (stop string, ``max_tokens``) return "pause" from the callback;
  cancellation (``abort()``, or the sink returning False) also calls ``rkllm_abort``.
* Per-request sampling exists only in the 1.3 interface (``RKLLMInferParam.
  sampling_params``/``max_new_tokens``). Under 1.2 the sampling values given at load
  are used for every request and a request's own temperature/top_k/top_p/
  repeat_penalty are ignored; ``max_tokens`` and stop strings are enforced on our side
  in both generations. ``seed`` is never honoured: the runtime takes none.
* ``heartbeat`` runs on every token. The prefill is one opaque native call (about
  4.5 ms a token on RK3588: some 18 s for a full 4096-token context), which the
  daemon's watchdog interval has to allow for.
* Prompt caches are vendor files: ``build_prefix`` runs the prefix with
  ``save_prompt_cache`` into the caller's temporary path; ``generate`` loads a cache
  with ``rkllm_load_prompt_cache`` (releasing the previous one first, and only when a
  different file is asked for) and still sends the FULL prompt.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rkllmd.backends.base import (
    CONVERSATION,
    Backend,
    BackendError,
    BuildCancelled,
    GenerationStats,
    PrefixState,
    Progress,
    Run,
    SamplingParams,
    TextSink,
)
from rkllmd.backends.cpu.tokenizer import END_OF_GENERATION_TEXTS, StreamDecoder
from rkllmd.backends.rkllm import abi as rk
from rkllmd.backends.rkllm.devices import driver_version, npu_nodes
from rkllmd.backends.rkllm.library import RkllmStartupError, check_architecture, find_library, inspect_library
from rkllmd.backends.rkllm.runtime import RkllmRuntime
from rkllmd.backends.stops import StopMatcher, TokenText
from rkllmd.constraints import ConstraintError, Vocabulary
from rkllmd.sampling import Sampler, logprob_entry
from rkllmd.templates import load as load_template

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".rkllm"
# The first bytes of a converted model: the container's "GGUF" magic under the format's
# byte mask, as a public reverse-engineering of the format found on 1.3.1 models
# (docs/npu.md). The runtime refuses other files ("invalid rknn llm model magic"); only
# ``rkllmd check`` looks at them, the runtime stays the judge at load.
MODEL_MAGIC = bytes.fromhex("daeeb336")
_MIB = 1 << 20


def check_model(model_path: Path | None) -> Path:
    """The model path, if it names an existing ``.rkllm`` file; else a startup error."""
    if model_path is None:
        raise RkllmStartupError("no .rkllm model configured (set [rkllm] model)")
    path = Path(model_path)
    if not path.exists():
        raise RkllmStartupError(f"model file {path} does not exist")
    if path.suffix.lower() != MODEL_SUFFIX or not path.is_file():
        raise RkllmStartupError(
            f"model {path} is not an {MODEL_SUFFIX} file; the NPU runtime loads models converted by rkllm-toolkit"
        )
    return path


class RkllmBackend(Backend):
    """One ``.rkllm`` model on the NPU. See the module docstring for the runtime's use."""

    kind = "rkllm"

    def __init__(
        self,
        model_path: Path | None,
        library: Path | None = None,
        runtime: str = "auto",
        template: str = "qwen2.5-instruct",
        context_length: int = 4096,
        max_new_tokens: int = 1024,
        n_keep: int = -1,
        cpu_mask: int = 0,
        base_domain_id: int = 0,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tokenizer: Path | None = None,
    ):
        """Configure; nothing is opened until ``load()``.

        ``cpu_mask`` 0 keeps the runtime's default CPU set; the sampling values are the
        init values (the only ones a 1.2 runtime uses). ``tokenizer``: the model's
        ``tokenizer.json``, with which the daemon samples itself (constrained output,
        logprobs) from the runtime's logits.
        """
        super().__init__()
        if runtime not in ("auto", *rk.GENERATIONS):
            raise ValueError(f"rkllm runtime must be auto, 1.2 or 1.3, not {runtime!r}")
        self.model_path = Path(model_path) if model_path is not None else None
        self.library = Path(library) if library is not None else None
        self.runtime = runtime
        self.template = load_template(template)
        self.context_length = context_length
        self.max_new_tokens = max_new_tokens
        self.n_keep = n_keep
        self.cpu_mask = cpu_mask
        self.base_domain_id = base_domain_id
        self.default_sampling = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty
        )
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self._rt: RkllmRuntime | None = None
        self._loaded_cache: tuple[Any, ...] | None = None  # identity of the loaded prompt cache file
        self._run_lock = threading.Lock()  # orders abort() against the start and end of a run
        self._running = False
        # What the runtime's KV history holds, when known for sure (None: clear it first).
        self._history: PrefixState | None = None
        self.tokenizer = Path(tokenizer) if tokenizer is not None else None
        self._vocabulary: Vocabulary | None = None

    # --- lifecycle --------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] | None = None) -> None:
        progress = progress or (lambda _message: None)
        model = check_model(self.model_path)
        progress("opening the RKLLM runtime library")
        rt = RkllmRuntime.open(self.library, self.runtime)
        param = _zeroed_where_unwritten(rt.default_param())
        param.model_path = str(model).encode()
        param.max_context_len = self.context_length
        param.max_new_tokens = self.max_new_tokens
        param.n_keep = self.n_keep
        for name, value in _sampling_values(self.default_sampling).items():
            setattr(param, name, value)
        param.frequency_penalty = self.frequency_penalty
        param.presence_penalty = self.presence_penalty
        param.skip_special_token = True
        param.is_async = False
        extend = param.extend_param
        extend.base_domain_id = self.base_domain_id
        extend.n_batch = 1  # larger batches are reported to crash the runtime
        if self.cpu_mask:
            extend.enabled_cpus_mask = self.cpu_mask
            extend.enabled_cpus_num = bin(self.cpu_mask).count("1")
        progress(f"loading {model.name} onto the NPU")
        rt.init(param)
        try:
            rt.set_chat_template("", "", "")
        except BackendError:
            rt.destroy()
            raise
        self._rt = rt
        _sha256(rt.info.path)  # hashed here, off the socket loop: identity() finds it memoized
        log.info("rkllm: %s loaded (interface %s, context %d)", model, rt.abi.generation, self.context_length)

    def close(self) -> None:
        self._history = None
        rt, self._rt = self._rt, None
        if rt is None:
            return
        try:
            if self._loaded_cache is not None:
                self._loaded_cache = None
                rt.release_prompt_cache()
        finally:
            rt.destroy()

    # --- facts ------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        info = self._rt.info if self._rt else inspect_library(find_library(self.library), self.runtime)
        release = info.release or "unknown release"
        return {
            "backend": "rkllm",
            "runtime": f"rkllm {release} (interface {info.generation}, librkllmrt sha256 {_sha256(info.path)[:16]})",
            "model": str(self.model_path),
            "model_fingerprint": _model_fingerprint(self.model_path),
            "template": self.template.fingerprint(),
            "context_length": self.context_length,
            "dtype": "rkllm",
        }

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "backend": "rkllm",
            "name": self.model_path.stem,
            "model": self.model_path.stem,
            "path": str(self.model_path),
            "context_length": self.context_length,
            "max_new_tokens": self.max_new_tokens,
            "template": self.template.name,
        }
        if self._rt is not None:
            info = self._rt.info
            facts["library"] = str(info.path)
            facts["runtime"] = f"{info.release or 'unknown release'}, interface {info.generation} ({info.reason})"
            facts["sampling"] = (
                "per request" if self._rt.abi.per_request_sampling
                else "fixed at load (1.2 interface); max_tokens and stop strings per request"
            )
        return facts

    def count_tokens(self, text: str) -> int:
        """An ESTIMATE: one token per 3 bytes of UTF-8, rounded up.

        The runtime exposes no tokenizer to its caller: 1.2 has none, and 1.3's
        tokenizer callback goes the other way (the runtime asks the application to
        tokenize). Byte-level BPE vocabularies of the supported models typically need
        3.5-4.5 bytes per token on prose in English or Chinese, so this over-counts
        slightly: a prompt near the context limit is refused by the daemon rather than
        handed to a runtime whose overflow behaviour is undocumented. Exact counts come
        from the runtime's FINISH statistics (``GenerationStats``, ``build_prefix``).
        """
        return math.ceil(len(text.encode()) / 3)

    # --- prompt caches -----------------------------------------------------------------
    def build_prefix(self, prefix_text: str, dest: Path, progress: Progress | None = None) -> int:
        """Run the prefix once with ``save_prompt_cache`` into ``dest``; stop after one token.
        (One native call: no ``progress``.)

        Returns the prefix's token count as the runtime reported it for the prefill.
        """
        rt = self._require_runtime()
        self._use_prompt_cache(None)  # a loaded cache would be matched into the saved state
        self._history = None
        rt.clear_kv_cache()
        stream = _Stream(lambda _text: True, (), 1, self.heartbeat, self.cancelled.is_set, rt.abort)
        rc = self._run(
            rt, prefix_text, stream, save_prompt_cache=dest, max_new_tokens=1 if rt.abi.per_request_sampling else 0
        )
        if stream.finish_reason == "cancelled":
            dest.unlink(missing_ok=True)
            raise BuildCancelled("building the prompt cache was cancelled")
        _raise_on_failure(rc, stream, "building the prompt cache")
        if not dest.is_file():
            raise BackendError(
                f"the runtime wrote no prompt cache to {dest} (some models refuse to save caches, upstream #517)"
            )
        return stream.perf.prefill_tokens if stream.perf else self.count_tokens(prefix_text)

    def load_prefix(self, path: Path, n_tokens: int) -> tuple[Any, int]:
        """The path itself: the runtime loads the file when a request first uses it.

        Nothing is held in this process, hence 0 bytes.
        """
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"prompt cache {path} does not exist")
        return path, 0

    def kv_cache_size(self) -> int | None:
        """What the runtime says its KV history holds (for bench/npu_board.py)."""
        return self._require_runtime().kv_cache_size()

    def resumable(self, prompt: str) -> PrefixState | None:
        history = self._history
        return history if history is not None and len(prompt) > len(history.text) and prompt.startswith(history.text) else None

    def _use_prompt_cache(self, path: Path | None) -> None:
        """Make ``path`` (or no cache) the loaded one, calling the runtime only on change.

        A file is identified by path, inode, size and mtime: a cache rebuilt in place
        under the same name is a different file and must be loaded again.
        """
        key = _file_key(path) if path is not None else None
        if key == self._loaded_cache:
            return
        rt = self._require_runtime()
        if self._loaded_cache is not None:
            self._loaded_cache = None
            rt.release_prompt_cache()
        if path is not None:
            rt.load_prompt_cache(path)
            self._loaded_cache = key

    # --- generation --------------------------------------------------------------------
    def generate(
        self,
        prompt_text: str,
        params: SamplingParams,
        prefix: PrefixState | None,
        sink: TextSink,
    ) -> GenerationStats:
        rt = self._require_runtime()
        started = time.monotonic()
        sent = self._input_after(prompt_text, prefix)
        limit = min((n for n in (params.max_tokens, self.max_new_tokens) if n > 0), default=0)
        stream = _Stream(sink, params.stop, limit, self.heartbeat, self.cancelled.is_set, rt.abort)
        per_request: dict[str, Any] = {}
        if rt.abi.per_request_sampling:
            sampling = rk.RKLLMSamplingParam(**_sampling_values(params))
            sampling.frequency_penalty = self.frequency_penalty
            sampling.presence_penalty = self.presence_penalty
            per_request = {"sampling": sampling, "max_new_tokens": limit}
        rc = self._run(rt, sent, stream, keep_history=True, **per_request)
        if stream.finish_reason != "cancelled":
            _raise_on_failure(rc, stream, "generation")
        finished = time.monotonic()
        stats = stream.stats(prompt_text, prefix, started, finished, self.count_tokens)
        if stream.finish_reason is None and stream.perf is not None:
            text = prompt_text + stream.generated
            self._history = PrefixState(
                name="", text=text, n_tokens=stats.prompt_tokens + stream.perf.generate_tokens, payload=None, kind=CONVERSATION
            )
        return stats

    def _input_after(self, prompt_text: str, prefix: PrefixState | None) -> str:
        """The runtime made ready for ``prompt_text`` (its history continued, or cleared and
        ``prefix``'s prompt cache loaded); the text to send it: the prompt's new part, or all."""
        if prefix is not None and not prompt_text.startswith(prefix.text):
            raise ValueError(f"the prompt does not start with prefix {prefix.name!r}'s text")
        sent = prompt_text
        if prefix is not None and prefix.kind == CONVERSATION and prefix is self._history:
            sent = prompt_text[len(prefix.text):]  # the runtime holds the rest
        else:
            self._use_prompt_cache(Path(prefix.payload) if prefix is not None else None)
            self._require_runtime().clear_kv_cache()
        self._history = None  # until this run ends as the runtime decides
        return sent

    # --- the daemon samples: the runtime's logits mode -------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The model's tokenizer (``[rkllm] tokenizer``) as the constraint engine sees it:
        the daemon samples only with it. Built at the first request that needs it."""
        if self._vocabulary is None:
            if self.tokenizer is None:
                raise BackendError("no [rkllm] tokenizer configured")
            try:
                text = self.tokenizer.read_text(encoding="utf-8")
                self._vocabulary = Vocabulary.from_tokenizer_json(text, (*END_OF_GENERATION_TEXTS, self.template.tokens.get("eos_token", "")))
            except (OSError, ValueError) as exc:
                raise BackendError(f"[rkllm] tokenizer {self.tokenizer}: {exc}") from None
        return self._vocabulary

    def start(self, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink) -> Run:
        if not params.daemon_samples:
            return super().start(prompt_text, params, prefix, sink)
        return _LogitsRun(self, prompt_text, params, prefix, sink)

    def step(self, runs: Sequence[Run]) -> None:
        for run in runs:
            if isinstance(run, _LogitsRun):
                run.advance()
            else:
                super().step([run])

    def abort(self) -> None:
        super().abort()
        with self._run_lock:
            if self._running and self._rt is not None:
                self._rt.abort()

    def _run(self, rt: RkllmRuntime, prompt: str | list[int], stream: _Stream | _Logits, **kwargs: Any) -> int:
        with self._run_lock:
            self._running = not self.cancelled.is_set()
        if not self._running:  # aborted before the runtime was even called
            rc = 0
        else:
            try:
                rc = rt.run(prompt, stream.on_result, **kwargs)
            finally:
                with self._run_lock:
                    self._running = False
        if self.cancelled.is_set() and stream.finish_reason is None:
            # Aborted where no callback of ours saw it: in the prefill, or between two tokens.
            stream.finish_reason = "cancelled"
        stream.finish()
        return rc

    def _require_runtime(self) -> RkllmRuntime:
        if self._rt is None:
            raise BackendError("the rkllm backend is not loaded")
        return self._rt


def _zeroed_where_unwritten(param: Any) -> Any:
    """``rkllm_createDefaultParam``'s result with every byte it may leave unwritten set.

    A decompiled older release writes the fields one by one and never touches the
    reserved bytes, which later releases carved ``n_batch`` and ``use_cross_attn`` from;
    ctypes hands back a by-value struct's unwritten bytes as they were. Everything
    ``load`` does not set itself and the runtime reads is made defined here.
    """
    extend = param.extend_param
    extend.use_cross_attn = 0
    ctypes.memset(ctypes.addressof(extend.reserved), 0, ctypes.sizeof(extend.reserved))
    for name in ("img_start", "img_end", "img_content"):  # 1.2 only: no image tags
        if hasattr(param, name):
            setattr(param, name, None)
    if hasattr(param, "ignore_eos_token"):  # 1.3 only
        param.ignore_eos_token = False
    return param


@dataclass(frozen=True)
class _Perf:
    """The FINISH callback's statistics, copied out of the runtime's buffer."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int


class _Stream:
    """One run's callbacks turned into sink text, a token count and the reason it ended."""

    def __init__(
        self,
        sink: TextSink,
        stops: tuple[str, ...],
        limit: int,
        heartbeat: Callable[[], None],
        cancelled: Callable[[], bool],
        abort: Callable[[], None],
    ):
        self._sink = sink
        self._stops = StopMatcher(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._limit = limit  # 0: none
        self._heartbeat = heartbeat
        self._cancelled = cancelled
        self._abort = abort
        self.tokens = 0
        self.generated = ""  # every piece's text, as the runtime's history holds it
        self.finish_reason: str | None = None  # set when we end the run ourselves
        self.error_state = False
        self.perf: _Perf | None = None
        self.first_token_at: float | None = None

    def on_result(self, state: int, result: rk.RKLLMResult) -> int:
        if state == rk.RKLLM_RUN_FINISH:
            p = result.perf
            self.perf = _Perf(p.prefill_time_ms, p.prefill_tokens, p.generate_time_ms, p.generate_tokens)
            return rk.CALLBACK_CONTINUE
        if state == rk.RKLLM_RUN_ERROR:
            self.error_state = True
            return rk.CALLBACK_CONTINUE
        if self.finish_reason is not None:  # a token the runtime produced before seeing our stop
            return rk.CALLBACK_PAUSE
        self._heartbeat()
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens += 1
        text = self._decoder.decode(result.text or b"")
        self.generated += text
        if self._cancelled() or not self._emit(self._stops.feed(text)):
            return self._stop("cancelled")
        if self._stops.stopped:
            return self._stop("stop")
        if self._limit and self.tokens >= self._limit:
            return self._stop("length")
        return rk.CALLBACK_CONTINUE

    def finish(self) -> None:
        """After the run: emit what the decoder and the stop matcher still hold."""
        if self.finish_reason in ("cancelled", "stop") or self.error_state:
            return
        tail = self._decoder.decode(b"", final=True)
        self.generated += tail
        text = self._stops.feed(tail)
        if not self._stops.stopped:
            text += self._stops.flush()
        if not self._emit(text):
            self.finish_reason = "cancelled"
        elif self._stops.stopped:
            self.finish_reason = "stop"

    def stats(
        self,
        prompt_text: str,
        prefix: PrefixState | None,
        started: float,
        finished: float,
        estimate: Callable[[str], int],
    ) -> GenerationStats:
        first = self.first_token_at or finished
        cached = prefix.n_tokens if prefix is not None else 0
        if self.perf is not None:
            # The runtime counts only what it prefilled: with a cache hit, the tail.
            prompt_tokens = self.perf.prefill_tokens + cached
            prefill_ms, decode_ms = self.perf.prefill_time_ms, self.perf.generate_time_ms
        else:  # no FINISH callback (aborted): estimates and our own clock
            prompt_tokens = estimate(prompt_text)
            prefill_ms, decode_ms = (first - started) * 1e3, (finished - first) * 1e3
        return GenerationStats(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            completion_tokens=self.tokens,
            ttft_ms=(first - started) * 1e3,
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
            finish_reason=self.finish_reason or "stop",
        )

    def _emit(self, text: str) -> bool:
        return not text or self._sink(text) is not False

    def _stop(self, reason: str) -> int:
        self.finish_reason = reason
        if reason == "cancelled":
            self._abort()  # pausing alone would do; the abort also covers a lagging runtime
        return rk.CALLBACK_PAUSE


class _Logits:
    """One logits-mode run's callbacks: the last row of its logits block (the next token's;
    whether the block holds a row per input position is not documented: shared/rkllm-abi),
    copied before the runtime frees it, and the FINISH statistics."""

    def __init__(self) -> None:
        self.row: np.ndarray | None = None
        self.perf: _Perf | None = None
        self.error_state = False
        self.finish_reason: str | None = None  # "cancelled" when aborted where no callback saw it

    def on_result(self, state: int, result: rk.RKLLMResult) -> int:
        if state == rk.RKLLM_RUN_FINISH:
            p = result.perf
            self.perf = _Perf(p.prefill_time_ms, p.prefill_tokens, p.generate_time_ms, p.generate_tokens)
        elif state == rk.RKLLM_RUN_ERROR:
            self.error_state = True
        else:
            block = result.logits
            if block.logits and block.vocab_size > 0 and block.num_tokens > 0:
                size = block.vocab_size
                rows = np.ctypeslib.as_array(block.logits, shape=(block.num_tokens * size,))
                self.row = rows[(block.num_tokens - 1) * size :].copy()
        return rk.CALLBACK_CONTINUE

    def finish(self) -> None:
        """Nothing is held back: a logits run produces no text."""


class _LogitsRun(Run):
    """A generation whose tokens the daemon samples (a constraint, logprobs): the runtime in
    its logits mode, one ``rkllm_run`` a step, ``keep_history`` on, as public code drives it
    (shared/rkllm-abi): the prompt's run prefills it and yields the first logits; each
    chosen token goes back as token input, whose run yields the next. The runtime's history
    then holds our tokens, not text: it is not resumed by the next turn (cleared instead).

    The repeat penalty's window sees the prompt as the tokenizer cuts it (the runtime's own
    cut is not visible) and the tokens chosen."""

    def __init__(self, backend: RkllmBackend, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink):
        super().__init__(backend.count_tokens(prompt_text))
        if backend.tokenizer is None:
            raise ConstraintError(
                params.constraint.field if params.constraint is not None else "logprobs",
                "constrained output and logprobs on the NPU need the model's tokenizer: set [rkllm] tokenizer "
                "to the tokenizer.json the .rkllm model was converted from",
            )
        vocabulary = backend.vocabulary
        guide = vocabulary.guide(params.constraint) if params.constraint is not None else None
        self.backend = backend
        self.sampler = Sampler(params, guide=guide)
        self.vocabulary = vocabulary
        self.prefix = prefix
        self.text = TokenText(StreamDecoder(vocabulary.token_bytes), params.stop, sink)
        self.limit = min((n for n in (params.max_tokens, backend.max_new_tokens) if n > 0), default=params.max_tokens)
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.recent = vocabulary.encode(prompt_text)[-64:] if params.repeat_penalty != 1.0 else []
        self.next_input: str | list[int] = backend._input_after(prompt_text, prefix)
        self.to_prefill = self.stats.prompt_tokens
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()
        self.backend.abort()

    def advance(self) -> None:
        """One run of the runtime, one token sampled from its logits (or the end)."""
        backend, rt = self.backend, self.backend._require_runtime()
        if self.aborted.is_set():
            self.finish("cancelled")
            return
        logits = _Logits()
        per_request = {"max_new_tokens": 1} if rt.abi.per_request_sampling else {}
        rc = backend._run(rt, self.next_input, logits, mode=rk.RKLLM_INFER_GET_LOGITS, keep_history=True, **per_request)
        if self.aborted.is_set() or logits.finish_reason == "cancelled":
            self.finish("cancelled")
            return
        _raise_on_failure(rc, logits, "generation (logits mode)")
        if logits.row is None:
            raise BackendError("the runtime's logits mode gave no logits (GET_LOGITS is not supported by this runtime?)")
        stats = self.stats
        if self.phase == "prefill":
            self.phase, self.prefilled = "decode", self.to_prefill
            cached = self.prefix.n_tokens if self.prefix is not None else 0
            stats.cached_tokens = cached
            if logits.perf is not None:
                stats.prompt_tokens, stats.prefill_ms = logits.perf.prefill_tokens + cached, logits.perf.prefill_time_ms
        self.sample(logits.row)

    def sample(self, row: np.ndarray) -> None:
        stats, sampler = self.stats, self.sampler
        try:
            token = sampler.sample(row, self.recent)
        except ConstraintError as exc:  # the engine failed: this answer ends
            log.error("generation ended: %s", exc)
            self.finish("error")
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            stats.ttft_ms = (self.first_token_at - self.started) * 1e3
        if token in self.vocabulary.end_ids:
            self.finish("stop")
            return
        if sampler.logprob is not None:
            self.logprobs.append(logprob_entry(self.vocabulary.token_bytes, token, sampler.logprob))
        stats.completion_tokens += 1
        self.recent = [*self.recent[1:], token] if len(self.recent) >= 64 else [*self.recent, token]
        full = stats.completion_tokens >= self.limit or stats.prompt_tokens + stats.completion_tokens >= self.backend.context_length
        ended = self.text.feed(token) or sampler.ended(full)
        if ended:
            self.finish(ended)
        else:
            self.next_input = [token]

    def finish(self, reason: str) -> None:
        """End with ``reason``; what the decoder and the stop matcher held back goes out."""
        stats = self.stats
        stats.finish_reason = self.text.finish(reason)
        now = time.monotonic()
        if self.first_token_at is None:
            stats.ttft_ms = stats.prefill_ms = stats.prefill_ms or (now - self.started) * 1e3
        else:
            stats.decode_ms = (now - self.first_token_at) * 1e3
        self.done = True


def _raise_on_failure(rc: int, stream: _Stream | _Logits, what: str) -> None:
    if rc != 0:
        state = " after an ERROR callback" if stream.error_state else ""
        raise BackendError(f"{what} failed: rkllm_run returned {rc}{state}", code=rc)
    if stream.error_state:
        raise BackendError(f"{what} failed: the runtime reported an ERROR state (rkllm_run returned 0)")


def _sampling_values(params: SamplingParams) -> dict[str, Any]:
    """Sampling fields shared by RKLLMParam and RKLLMSamplingParam.

    Temperature 0 means greedy in rkllmd; the runtime has no such switch, so greedy is
    top_k = 1 (with a neutral temperature, avoiding a division by zero inside).
    """
    if params.temperature <= 0:
        return {"top_k": 1, "top_p": 1.0, "temperature": 1.0, "repeat_penalty": params.repeat_penalty, "mirostat": 0}
    return {
        "top_k": params.top_k,
        "top_p": params.top_p,
        "temperature": params.temperature,
        "repeat_penalty": params.repeat_penalty,
        "mirostat": 0,
    }


def _file_key(path: Path) -> tuple[Any, ...]:
    try:
        st = path.stat()
    except OSError as exc:
        raise BackendError(f"prompt cache {path} is not readable: {exc}") from exc
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(path: Path) -> str:
    """Size, mtime and a hash of the first and last MiB: cheap on multi-GB models."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if st.st_size > 2 * _MIB:
            f.seek(-_MIB, os.SEEK_END)
        digest.update(f.read(_MIB))
    return f"{st.st_size}-{st.st_mtime_ns}-{digest.hexdigest()[:16]}"


# --- --backend auto ---------------------------------------------------------------------
def detect(
    library: Path | None,
    model_path: Path | None,
    *,
    dev: Path = Path("/dev"),
    sysfs: Path = Path("/sys"),
) -> tuple[bool, str]:
    """Whether the NPU backend can run here, and why (shown by ``rkllmctl status``).

    True only when a loadable library (right architecture) exists, an ``.rkllm`` model is
    configured and exists, and an NPU device node this user can open exists. Nothing is
    loaded. ``dev`` and ``sysfs`` are the roots to look under (tests point them elsewhere).
    """
    try:
        lib = find_library(library)
        check_architecture(lib)
        model = check_model(model_path)
    except RkllmStartupError as exc:
        return False, str(exc)
    nodes = npu_nodes(dev, sysfs)
    if not nodes:
        return False, f"no NPU device: neither {dev}/rknpu nor a {dev}/dri node of the rknpu driver"
    node = nodes[0]
    if not os.access(node, os.R_OK | os.W_OK):
        return False, f"NPU device {node} exists but this user cannot open it (add it to group render or video)"
    version, _ = driver_version(sysfs)
    return True, f"librkllmrt at {lib}, model {model}, NPU device {node} ({version or 'driver version unreadable'})"
