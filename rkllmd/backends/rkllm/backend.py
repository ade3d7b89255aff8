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
* The context is accounted for, since the runtime does not refuse what overflows it: it
  shifts its KV window (keeping ``n_keep`` tokens at the start, vendor header) and the
  continuation is silently wrong, and a prompt longer than the context is reported to crash
  it (upstream #11). Lengths are counted with the model's own tokenizer when
  ``[rkllm] tokenizer`` names its tokenizer.json, else bounded by the text's UTF-8 bytes
  plus two (byte-level BPE and SentencePiece with byte fallback never make more tokens
  than bytes; the two are a BOS and SentencePiece's leading-space marker, which Llama 2's
  tokenizer both adds: "\n" is <s>, "▁", <0x0A>); what the history
  already holds is the runtime's own count (its FINISH statistics, and
  ``rkllm_get_kv_cache_size`` when the library has it). A conversation continues the
  history only while it and the new part fit with room for a token; else it is cleared and
  sent whole; a prompt that cannot fit is refused (``ContextOverflow``); the completion
  is cut ("length") where the context ends.
* Stops we decide (stop string, ``max_tokens``, the context's end) return "pause" from the
  callback; cancellation (the run's own flag, the backend's for a build, or the sink
  returning False) also calls ``rkllm_abort``.
* Per-request sampling exists only in the 1.3 interface (``RKLLMInferParam.
  sampling_params``/``max_new_tokens``). Under 1.2 the sampling values given at load
  are used for every request and a request's own temperature/top_k/top_p and
  penalties are ignored; ``max_tokens`` and stop strings are enforced on our side
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
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rkllmd.backends.base import (
    CONVERSATION,
    Backend,
    BackendError,
    BuildCancelled,
    ContextOverflow,
    GenerationStats,
    PrefixState,
    Progress,
    Run,
    TextSink,
)
from rkllmd.backends.rkllm import abi as rk
from rkllmd.backends.rkllm.devices import npu_nodes, read_driver
from rkllmd.backends.rkllm.library import RkllmStartupError, check_architecture, find_library, inspect_library
from rkllmd.backends.rkllm.runtime import RkllmRuntime
from rkllmd.backends.cpu.tokenizer import END_OF_GENERATION_TEXTS, StreamDecoder
from rkllmd.backends.stops import StopMatcher, TokenText
from rkllmd.constraints import ConstraintError, Vocabulary
from rkllmd.sampling import Sampler, SamplingParams, logprob_entry
from rkllmd.templates import load as load_template

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".rkllm"
# The first bytes of a converted model: the container's "GGUF" magic under the format's
# byte mask, as a public reverse-engineering of the format found on 1.3.1 models
# (docs/npu.md). The runtime refuses other files ("invalid rknn llm model magic"); only
# ``rkllmd check`` looks at them, the runtime stays the judge at load.
MODEL_MAGIC = bytes.fromhex("daeeb336")
# Without the model's tokenizer a text's tokens are bounded by its UTF-8 bytes plus this:
# a BOS and SentencePiece's leading "▁", which Llama 2's tokenizer both adds (module docstring).
BOUND_EXTRA = 2
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
    embeds = True

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
        init values (the only ones a 1.2 runtime uses); ``tokenizer``: the model's
        tokenizer.json, for exact token counts and the daemon's own sampling from the
        runtime's logits (constrained output, logprobs) (None: counts are bounded by UTF-8
        bytes, and the daemon never samples).
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
            temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )
        self.tokenizer_path = Path(tokenizer) if tokenizer is not None else None
        self._tokenizer: Any = None  # a tokenizers.Tokenizer, once loaded
        self._vocabulary: Vocabulary | None = None  # the same file as the constraint engine sees it
        self._rt: RkllmRuntime | None = None
        self._loaded_cache: tuple[Any, ...] | None = None  # identity of the loaded prompt cache file
        self._run_lock = threading.Lock()  # orders interrupt() against the start and end of a run
        self._running: threading.Event | None = None  # the cancel flag of the run in progress
        # What the runtime's KV history holds, when known for sure (None: clear it first).
        self._history: PrefixState | None = None
        self._embedding_size: int | None = None  # the hidden layer's width, once a run told it

    # --- lifecycle --------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] | None = None) -> None:
        progress = progress or (lambda _message: None)
        model = check_model(self.model_path)
        if self.tokenizer_path is not None:
            progress(f"loading the tokenizer {self.tokenizer_path}")
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        progress("opening the RKLLM runtime library")
        rt = RkllmRuntime.open(self.library, self.runtime)
        param = _zeroed_where_unwritten(rt.default_param())
        param.model_path = str(model).encode()
        param.max_context_len = self.context_length
        param.max_new_tokens = self.max_new_tokens
        param.n_keep = self.n_keep
        for name, value in _sampling_values(self.default_sampling).items():
            setattr(param, name, value)
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
            "token_counts": f"exact (tokenizer {self.tokenizer_path})" if self.tokenizer_path else f"bounded: UTF-8 bytes + {BOUND_EXTRA} (no [rkllm] tokenizer)",
        }
        if self._embedding_size is not None:
            facts["embedding_length"] = self._embedding_size
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
        """Tokens ``text`` takes as one input: exact with the model's tokenizer (its special
        tokens included, as the model adds them), else an upper bound, its UTF-8 bytes plus
        ``BOUND_EXTRA`` (module docstring). The runtime offers its caller no tokenizer: 1.2 has none,
        and 1.3's tokenizer callback goes the other way."""
        if self._tokenizer is not None:
            return len(self._encode(text))
        return len(text.encode()) + BOUND_EXTRA if text else 0

    def tokenize(self, text: str) -> list[int] | None:
        return self._encode(text) if self._tokenizer is not None else None

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: a second for a long
        # text, every other thread of the daemon stopped meanwhile).
        return self._tokenizer.encode_batch([text])[0].ids

    def _before_generation(self, prompt_text: str, prefix: PrefixState | None, ids: Sequence[int] | None = None) -> int:
        """What the KV cache holds once ``prompt_text`` (whose ``tokenize`` is ``ids``, if the
        caller has it) is prefilled from ``prefix``: the prefix's tokens as the runtime counted
        them, plus the rest as counted here."""
        if prefix is None:
            return len(ids) if ids is not None else self.count_tokens(prompt_text)
        return prefix.n_tokens + self.count_tokens(prompt_text[len(prefix.text):])

    def _fits(self, prompt_text: str, prefix: PrefixState | None, ids: Sequence[int] | None = None) -> int:
        """``_before_generation``, if that leaves room for a token; else ContextOverflow."""
        tokens = self._before_generation(prompt_text, prefix, ids)
        if tokens + 1 > self.context_length:
            bound = "" if self._tokenizer is not None else f"counted as UTF-8 bytes + {BOUND_EXTRA}: set [rkllm] tokenizer for exact counts"
            raise ContextOverflow(tokens, self.context_length, bound)
        return tokens

    # --- prompt caches -----------------------------------------------------------------
    def build_prefix(self, prefix_text: str, dest: Path, progress: Progress | None = None) -> int:
        """Run the prefix once with ``save_prompt_cache`` into ``dest``; stop after one token.
        (One native call: no ``progress``.)

        Returns the prefix's token count as the runtime reported it for the prefill.
        """
        rt = self._require_runtime()
        self._fits(prefix_text, None)
        self._use_prompt_cache(None)  # a loaded cache would be matched into the saved state
        self._history = None
        rt.clear_kv_cache()
        stream = _Stream(lambda _text: True, (), 1, self.heartbeat, self.cancelled.is_set, rt.abort)
        rc = self._run(
            rt, prefix_text, stream, self.cancelled, save_prompt_cache=dest, max_new_tokens=1 if rt.abi.per_request_sampling else 0
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

    def _kv_cache_size(self) -> int | None:
        """``kv_cache_size``, None if the call fails (the history is then as long as counted)."""
        try:
            return self.kv_cache_size()
        except BackendError as exc:
            log.warning("%s", exc)
            return None

    def resumable(self, prompt: str) -> PrefixState | None:
        """The runtime's history, if ``prompt`` continues it and the history, the new part and
        a token still fit the context; else the history is cleared and the prompt sent whole."""
        history = self._history
        if history is None or len(prompt) <= len(history.text) or not prompt.startswith(history.text):
            return None
        if self._before_generation(prompt, history) + 1 > self.context_length:
            log.info("the conversation would overflow the runtime's history (%d tokens held): sending it whole", history.n_tokens)
            return None
        return history

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
    def start(
        self, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink, ids: Sequence[int] | None = None
    ) -> Run:
        """Refuse what cannot fit (ContextOverflow) before anything runs. A request that needs
        the daemon's sampler (a constraint, logprobs) runs in the runtime's logits mode."""
        self._fits(prompt_text, prefix, ids)
        if params.daemon_samples:
            return _LogitsRun(self, prompt_text, params, prefix, sink)
        return super().start(prompt_text, params, prefix, sink, ids)

    def generate(
        self,
        prompt_text: str,
        params: SamplingParams,
        prefix: PrefixState | None,
        sink: TextSink,
        cancelled: threading.Event | None = None,
    ) -> GenerationStats:
        rt = self._require_runtime()
        cancelled = cancelled or self.cancelled
        started = time.monotonic()
        sent, before = self._ready_for(prompt_text, prefix)
        # The completion ends where the context does (the runtime would shift its window).
        limit = min(n for n in (params.max_tokens, self.max_new_tokens, self.context_length - before) if n > 0)
        stream = _Stream(sink, params.stop, limit, self.heartbeat, cancelled.is_set, rt.abort)
        per_request: dict[str, Any] = {}
        if rt.abi.per_request_sampling:
            sampling = rk.RKLLMSamplingParam(**_sampling_values(params))
            per_request = {"sampling": sampling, "max_new_tokens": limit}
        rc = self._run(rt, sent, stream, cancelled, keep_history=True, **per_request)
        if stream.finish_reason != "cancelled":
            _raise_on_failure(rc, stream, "generation")
        finished = time.monotonic()
        stats = stream.stats(prompt_text, prefix, started, finished, self.count_tokens)
        if stream.finish_reason is None and stream.perf is not None:
            # The runtime's own counts; its KV size as well where it says (it may hold more
            # than the tokens it reported: an end token, say).
            held = max(stats.prompt_tokens + stream.perf.generate_tokens, self._kv_cache_size() or 0)
            self._history = PrefixState(name="", text=prompt_text + stream.generated, n_tokens=held, payload=None, kind=CONVERSATION)
        return stats

    def _ready_for(self, prompt_text: str, prefix: PrefixState | None) -> tuple[str, int]:
        """The runtime made ready for ``prompt_text`` (its history continued, or cleared and
        ``prefix``'s prompt cache loaded): the text to send it (the prompt's new part, or
        all), and the tokens the KV cache will hold once it is prefilled (ContextOverflow
        when that leaves no room for a token)."""
        if prefix is not None and not prompt_text.startswith(prefix.text):
            raise ValueError(f"the prompt does not start with prefix {prefix.name!r}'s text")
        before = self._fits(prompt_text, prefix)
        sent = prompt_text
        if prefix is not None and prefix.kind == CONVERSATION and prefix is self._history:
            sent = prompt_text[len(prefix.text):]  # the runtime holds the rest
        else:
            self._use_prompt_cache(Path(prefix.payload) if prefix is not None else None)
            self._require_runtime().clear_kv_cache()
        self._history = None  # until this run ends as the runtime decides
        return sent, before

    # --- embeddings: the runtime's last hidden layer ----------------------------------------
    def embedding_size(self) -> int | None:
        return self._embedding_size

    def embed(self, inputs: Sequence[Sequence[int] | str], between: Callable[[], None]) -> list[tuple[np.ndarray, int]]:
        """One ``rkllm_run`` per input in GET_LAST_HIDDEN_LAYER mode (one handle runs one input
        at a time), from an empty KV cache with no prompt cache loaded (a loaded one would be
        matched against the input, and only the rest reported), ``keep_history`` off; its block
        (a row per input token) is averaged in the callback, before the runtime frees it.
        The runtime's chat template is empty (``load``): the raw text is what it embeds."""
        rt = self._require_runtime()
        pooled: list[tuple[np.ndarray, int]] = []
        for item in inputs:
            self._use_prompt_cache(None)
            rt.clear_kv_cache()
            self._history = None
            hidden = _Hidden(self.heartbeat)
            per_request = {"max_new_tokens": 1} if rt.abi.per_request_sampling else {}
            prompt = item if isinstance(item, str) else list(item)
            rc = self._run(rt, prompt, hidden, threading.Event(), mode=rk.RKLLM_INFER_GET_LAST_HIDDEN_LAYER, keep_history=False, **per_request)
            _raise_on_failure(rc, hidden, "embedding (last hidden layer mode)")
            if hidden.mean is None:
                raise BackendError("the runtime's last-hidden-layer mode gave no hidden states (GET_LAST_HIDDEN_LAYER is not supported by this runtime?)")
            self._embedding_size = len(hidden.mean)
            pooled.append((hidden.mean, hidden.tokens))
            between()
        return pooled

    # --- the daemon samples: the runtime's logits mode -------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The model's tokenizer (``[rkllm] tokenizer``) as the constraint engine sees it:
        the daemon samples only with it. Built at the first request that needs it."""
        if self._vocabulary is None:
            if self.tokenizer_path is None:
                raise BackendError("no [rkllm] tokenizer configured")
            try:
                text = self.tokenizer_path.read_text(encoding="utf-8")
                self._vocabulary = Vocabulary.from_tokenizer_json(text, (*END_OF_GENERATION_TEXTS, self.template.tokens.get("eos_token", "")))
            except (OSError, ValueError) as exc:
                raise BackendError(f"[rkllm] tokenizer {self.tokenizer_path}: {exc}") from None
        return self._vocabulary

    def step(self, runs: Sequence[Run]) -> None:
        for run in runs:
            if isinstance(run, _LogitsRun):
                run.advance()
            else:
                super().step([run])

    def interrupt(self, cancelled: threading.Event) -> None:
        with self._run_lock:
            if self._running is cancelled and self._rt is not None:
                self._rt.abort()

    def _run(self, rt: RkllmRuntime, prompt: str | list[int], stream: _Stream | _Logits | _Hidden, cancelled: threading.Event, **kwargs: Any) -> int:
        """One ``rkllm_run``, unless ``cancelled`` is set already; ``interrupt(cancelled)``
        reaches it while it runs."""
        with self._run_lock:
            self._running = None if cancelled.is_set() else cancelled
        if self._running is None:  # aborted before the runtime was even called
            rc = 0
        else:
            try:
                rc = rt.run(prompt, stream.on_result, **kwargs)
            finally:
                with self._run_lock:
                    self._running = None
        if cancelled.is_set() and stream.finish_reason is None:
            # Aborted where no callback of ours saw it: in the prefill, or between two tokens.
            stream.finish_reason = "cancelled"
        stream.finish()
        return rc

    def _require_runtime(self) -> RkllmRuntime:
        if self._rt is None:
            raise BackendError("the rkllm backend is not loaded")
        return self._rt


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer.json (Hugging Face ``tokenizers``, the optional ``npu`` extra)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RkllmStartupError(
            f"[rkllm] tokenizer = {path} needs the Python package tokenizers (pip install 'rkllmd[npu]')"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exceptions for missing or bad files
        raise RkllmStartupError(f"[rkllm] tokenizer {path} cannot be loaded: {exc}") from None


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


class _Hidden:
    """One last-hidden-layer run's callbacks: the mean of its block's rows (a row per input
    token, shared/rkllm-abi), taken before the runtime frees the buffer, and their count."""

    def __init__(self, heartbeat: Callable[[], None]) -> None:
        self.mean: np.ndarray | None = None
        self.tokens = 0
        self.error_state = False
        self.finish_reason: str | None = None
        self._heartbeat = heartbeat

    def on_result(self, state: int, result: rk.RKLLMResult) -> int:
        if state == rk.RKLLM_RUN_ERROR:
            self.error_state = True
        elif state != rk.RKLLM_RUN_FINISH and self.mean is None:
            block = result.last_hidden_layer
            if block.hidden_states and block.embd_size > 0 and block.num_tokens > 0:
                rows = np.ctypeslib.as_array(block.hidden_states, shape=(block.num_tokens, block.embd_size))
                self.mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
                self.tokens = block.num_tokens
                self._heartbeat()
        return rk.CALLBACK_CONTINUE

    def finish(self) -> None:
        """Nothing is held back: a hidden-layer run produces no text."""


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
        if backend.tokenizer_path is None:
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
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.recent = vocabulary.encode(prompt_text)[-64:] if params.repeat_penalty != 1.0 else []
        sent, before = backend._ready_for(prompt_text, prefix)
        self.next_input: str | list[int] = sent
        # The completion ends where the context does, as the runtime's own generation does.
        self.limit = min(n for n in (params.max_tokens, backend.max_new_tokens, backend.context_length - before) if n > 0)
        self.to_prefill = self.stats.prompt_tokens
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()
        self.backend.interrupt(self.aborted)

    def advance(self) -> None:
        """One run of the runtime, one token sampled from its logits (or the end)."""
        backend, rt = self.backend, self.backend._require_runtime()
        if self.aborted.is_set():
            self.finish("cancelled")
            return
        logits = _Logits()
        per_request = {"max_new_tokens": 1} if rt.abi.per_request_sampling else {}
        rc = backend._run(rt, self.next_input, logits, self.aborted, mode=rk.RKLLM_INFER_GET_LOGITS, keep_history=True, **per_request)
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
        ended = self.text.feed(token) or sampler.ended(stats.completion_tokens >= self.limit)
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


def _raise_on_failure(rc: int, stream: _Stream | _Logits | _Hidden, what: str) -> None:
    if rc != 0:
        state = " after an ERROR callback" if stream.error_state else ""
        raise BackendError(f"{what} failed: rkllm_run returned {rc}{state}", code=rc)
    if stream.error_state:
        raise BackendError(f"{what} failed: the runtime reported an ERROR state (rkllm_run returned 0)")


def _sampling_values(params: SamplingParams) -> dict[str, Any]:
    """Sampling fields shared by RKLLMParam and RKLLMSamplingParam.

    Temperature 0 means greedy in rkllmd; the runtime has no such switch, so greedy is
    top_k = 1 (with a neutral temperature, avoiding a division by zero inside). The
    penalties are the runtime's to apply, as it does (its window is not documented).
    """
    penalties = {
        "repeat_penalty": params.repeat_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "mirostat": 0,
    }
    if params.temperature <= 0:
        return {"top_k": 1, "top_p": 1.0, "temperature": 1.0, **penalties}
    return {"top_k": params.top_k, "top_p": params.top_p, "temperature": params.temperature, **penalties}


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
    driver = read_driver(sysfs)
    return True, f"librkllmrt at {lib}, model {model}, NPU device {node} ({driver.text or 'driver version unreadable'})"
