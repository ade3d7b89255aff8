"""The contract between the daemon and a model backend.

The daemon owns requests, queues, caches and the socket; a backend owns one loaded
model, always used from the model worker thread, which also closes it. Other threads call
only ``abort``, ``interrupt``, ``Run.abort`` and the pure ``render``, ``count_tokens`` and
``tokenize`` (the worker prepares prompts on a thread of their own). Everything a backend
needs to know about a request arrives as plain values defined here (and ``SamplingParams``,
which ``rkllmd.sampling`` owns), so the CPU reference backend and the NPU backend are
interchangeable.

Generations are driven step by step: ``start`` opens one (a ``Run``), ``step`` advances
up to ``max_batch`` of them together, ``release`` lets its state go once the daemon has
kept what it wants of it (``kept_state``). A backend that batches (the CPU backend: one
pass over the weights per step for every stream) implements them; one that generates in
one native call (the NPU runtime) implements ``generate``, and the default ``start`` and
``step`` run that whole call as a single step.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..constraints import ConstraintError
from ..sampling import SamplingParams
from ..templates import ChatTemplate


class BackendError(Exception):
    """A backend failed in a way the client should hear about (maps to a wire error)."""

    def __init__(self, message: str, *, code: int | None = None):
        super().__init__(message)
        self.runtime_code = code


class BuildCancelled(BackendError):
    """``build_prefix`` was aborted: the cache is not broken, only not built yet."""


class ContextOverflow(BackendError):
    """The prompt (plus room to generate one token) does not fit the context.

    ``bound``: why ``prompt_tokens`` is an upper bound rather than a count, when it is one.
    """

    def __init__(self, prompt_tokens: int, context_length: int, bound: str = ""):
        tokens = f"at most {prompt_tokens} tokens ({bound})" if bound else f"{prompt_tokens} tokens"
        super().__init__(f"prompt is {tokens}; the model's context holds {context_length}")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@dataclass
class GenerationStats:
    """What a backend reports when a generation ends (the daemon adds queue timing)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from a prefix state, not prefilled
    completion_tokens: int = 0
    ttft_ms: float = 0.0  # from the start of the backend call to the first token
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    finish_reason: str = "stop"  # stop | length | cancelled | error


TEXT_CACHE, CONVERSATION = "text_cache", "conversation"


@dataclass
class PrefixState:
    """A prefix's model state: a text cache's (loaded from its verified binary cache file)
    or a conversation's (kept in memory after a generation).

    ``text`` is the rendered prefix a text cache was built from; a conversation state
    has ``tokens`` instead (prompt and completion as they went through the model), and
    restores as many of them as a later prompt's tokens start with. ``payload`` is
    whatever the backend's ``load_prefix``/``kept_state`` returned (arrays for the CPU
    backend, the file path for the NPU runtime, which loads it itself).
    """

    name: str
    text: str
    n_tokens: int
    payload: Any
    nbytes: int = 0
    built_sha256: str = ""  # sha256 of the text it was built from
    kind: str = TEXT_CACHE
    tokens: np.ndarray | None = None  # a conversation state's token ids (int32)

    def source(self) -> dict[str, str]:
        """What ``done.stats.cache_source`` says a restored prefix came from."""
        return {"kind": TEXT_CACHE, "name": self.name} if self.kind == TEXT_CACHE else {"kind": self.kind}


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


#: Called after each prefill chunk of a build with (prompt tokens prefilled so far, tokens
#: to prefill). Backends whose prefill is one native call never call it.
Progress = Callable[[int, int], None]

# Called with each piece of generated text, in order. Returning False asks the
# backend to stop (cancel, client gone): it must then finish with reason "cancelled".
TextSink = Callable[[str], bool]


class Run(abc.ABC):
    """One generation on a backend, from ``Backend.start`` until ``done``; what the daemon
    reads of it between steps (status, progress messages) is kept current by the backend."""

    def __init__(self, prompt_tokens: int = 0) -> None:
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)
        self.done = False
        self.phase = "prefill"  # then "decode"
        self.to_prefill = 0  # prompt tokens to prefill (restored ones are not)
        self.prefilled = 0  # of those, how many so far
        # Log-probabilities of the tokens generated since the daemon last took them
        # (``sampling.logprob_entry`` dicts), when the request asked for them.
        self.logprobs: list[dict[str, Any]] = []

    def take_logprobs(self) -> list[dict[str, Any]]:
        """The log-probabilities not taken yet (the daemon sends them with the text)."""
        taken, self.logprobs = self.logprobs, []
        return taken

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop this generation soon (it then ends "cancelled"). Thread-safe."""


class _WholeRun(Run):
    """A generation made by one blocking ``Backend.generate`` call: one step runs all of it."""

    def __init__(self, backend: Backend, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink, prompt_tokens: int):
        super().__init__(prompt_tokens)
        self.to_prefill = self.stats.prompt_tokens  # restored ones are known only at the end
        self.backend = backend
        self.request = (prompt_text, params, prefix, sink)
        self.aborted = threading.Event()  # this run's own: a cancel never outlives it

    def abort(self) -> None:
        self.aborted.set()
        self.backend.interrupt(self.aborted)

    def run(self) -> None:
        prompt_text, params, prefix, sink = self.request
        beat = self.backend.heartbeat

        def heartbeat() -> None:  # the backend beats once a token
            beat()
            self.stats.completion_tokens += self.phase == "decode"

        def decoding(text: str) -> bool:
            self.phase, self.prefilled = "decode", self.to_prefill
            return sink(text)

        self.backend.heartbeat = heartbeat
        try:
            self.stats = self.backend.generate(prompt_text, params, prefix, decoding, cancelled=self.aborted)
        finally:
            self.backend.heartbeat = beat
            self.done = True


class Backend(abc.ABC):
    """One loaded model. Construct, then ``load()``; afterwards everything is ready."""

    #: "cpu" or "rkllm"
    kind: str = ""
    #: Generations this backend can advance together (the daemon's ``max_batch`` is capped by it).
    max_batch: int = 1
    #: The model's chat template, which the daemon renders (``rkllmd.templates``).
    template: ChatTemplate

    def __init__(self) -> None:
        # Called after every token and every prefill chunk, so the systemd watchdog
        # can tell a working model from one stuck in a native call. The daemon sets it.
        self.heartbeat: Callable[[], None] = lambda: None
        # Set by abort(): it stops a build (``build_prefix``), or a ``generate`` called without
        # a flag of its own. Cleared only by reset_abort(), which the model worker calls as a
        # build starts; a backend never clears it itself: an abort that arrives just before a
        # call starts would be lost. A generation the daemon runs has a flag of its own
        # (``Run.abort``): cancelling it never touches a build, nor a build's cancel it.
        self.cancelled = threading.Event()
        # Called between a build's prefill chunks (``build_prefix``): the daemon runs the
        # generations waiting meanwhile, so a build never holds up interactive work.
        self.pause: Callable[[], None] = lambda: None
        # ``model.embedding_only``: the model serves embeddings only (generate is refused).
        self.embedding_only = False

    @abc.abstractmethod
    def load(self, progress: Callable[[str], None] | None = None) -> None:
        """Load the model. ``progress`` is called now and then during slow loads."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a binary cache built by this backend depends on.

        Keys: backend, runtime (version string), model (path), model_fingerprint,
        template (a hash of the chat template), context_length, dtype.
        """

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Human facts for status: model name, path, context length, and so on."""

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """Render chat messages with the model's own template (raises ``templates.RenderError``)."""
        return self.template.render(messages, add_generation_prompt, tools=tools, variables=variables)

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` (already rendered) occupies (any thread)."""

    def tokenize(self, text: str) -> Sequence[int] | None:
        """The token ids of ``text`` (rendered); None when this backend has no tokenizer of
        its own. Any thread: it remembers nothing between calls."""
        return None

    #: Whether ``embed`` works (the "embedding" capability).
    embeds = False

    def embedding_size(self) -> int | None:
        """The length of this model's embeddings (its hidden size); None: not known (yet)."""
        return None

    def embed(self, inputs: Sequence[Sequence[int] | str], between: Callable[[], None]) -> list[tuple[np.ndarray, int]]:
        """For each input (token ids; text only on a backend without a tokenizer of its own),
        the mean over its tokens of the final hidden states after the output norm (float32
        [embedding_size], not normalised: llama.cpp's mean pooling) and its token count. The
        inputs fit the context (the caller truncated them); they run in scratch state, never
        a generation's. ``between`` is called between forward passes (the daemon steps the
        running generations there). Model worker only."""
        raise BackendError(f"the {self.kind} backend cannot compute embeddings")

    def resumable(self, prompt: str) -> PrefixState | None:
        """A conversation state this backend holds itself (the NPU runtime's KV history)
        that ``prompt`` continues; None if there is none. Chosen like a kept state."""
        return None

    def kept_state(self, run: Run, max_bytes: int) -> PrefixState | None:
        """The model state a finished ``run`` left (its prompt and completion tokens),
        copied to be restored by a later turn; None if there is none or it would take
        more than ``max_bytes``. Called on the model worker before ``release(run)``."""
        return None

    @abc.abstractmethod
    def build_prefix(self, prefix_text: str, dest: Path, progress: Progress | None = None) -> int:
        """Prefill ``prefix_text`` and write its state to ``dest``; return its token count.

        ``dest`` is a temporary path; the caller verifies, checksums and renames it. A
        backend that prefills in chunks calls ``progress`` and ``pause`` between them.
        """

    @abc.abstractmethod
    def load_prefix(self, path: Path, n_tokens: int) -> tuple[Any, int]:
        """Read a verified state file; return (payload for PrefixState, bytes held in memory)."""

    @abc.abstractmethod
    def generate(
        self,
        prompt_text: str,
        params: SamplingParams,
        prefix: PrefixState | None,
        sink: TextSink,
        cancelled: threading.Event | None = None,
    ) -> GenerationStats:
        """Generate a completion of the rendered ``prompt_text``, blocking until it ends.

        With ``prefix`` (whose text the prompt starts with), the prefix's state is
        restored instead of prefilled; the output must be identical either way.
        Stops on EOS, on any of ``params.stop`` (the stop string itself is not emitted),
        at ``params.max_tokens`` (reason "length"), or when ``sink`` returns False or
        ``cancelled`` is set (reason "cancelled"): this call's own flag, set by whoever
        cancels it, who then calls ``interrupt(cancelled)``; None: the backend's, ``abort()``.
        """

    def start(
        self, prompt_text: str, params: SamplingParams, prefix: PrefixState | None, sink: TextSink, ids: Sequence[int] | None = None
    ) -> Run:
        """Open a generation, as ``generate`` describes it, to be advanced by ``step``.
        ``ids``: the prompt's token ids when the caller has them (``tokenize``).
        Raises (ContextOverflow, BackendError, constraints.ConstraintError) before anything runs."""
        if params.daemon_samples:
            field = params.constraint.field if params.constraint is not None else "logprobs"
            raise ConstraintError(field, f"the {self.kind} backend cannot constrain its output or report log-probabilities")
        return _WholeRun(self, prompt_text, params, prefix, sink, len(ids) if ids is not None else self.count_tokens(prompt_text))

    def step(self, runs: Sequence[Run]) -> None:
        """Advance each of ``runs`` (at most ``max_batch``, none done) by one step: a prefill
        chunk or a token. Here: each run's whole ``generate`` call."""
        for run in runs:
            assert isinstance(run, _WholeRun)
            run.run()

    def release(self, run: Run) -> None:
        """The daemon is done with a finished ``run``: its state may be reused."""

    def abort(self) -> None:
        """Ask the running (or the next) ``build_prefix``, or a ``generate`` without a flag of its
        own, to stop soon. Thread-safe."""
        self.cancelled.set()
        self.interrupt(self.cancelled)

    def interrupt(self, cancelled: threading.Event) -> None:
        """``cancelled`` was just set: stop the native call running with that flag, if one is,
        now rather than at its next check. Thread-safe; here nothing (checks come often)."""

    def reset_abort(self) -> None:
        """Forget an earlier abort before a new build starts."""
        self.cancelled.clear()

    def close(self) -> None:
        """Release the model (on the model worker, after its last call has returned)."""


