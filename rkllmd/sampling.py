"""Choosing the next token from a model's logits.

Temperature 0 is greedy: the argmax, without sorting the vocabulary. Otherwise, in
order: penalties, the constraint's mask, top-k, temperature, top-p, then a draw from
what is left. The penalties also apply in greedy mode, as in llama.cpp and OpenAI's API:

- the repeat penalty follows llama.cpp (a logit of a token among the last 64 of the
  prompt and completion is divided by the penalty when positive and multiplied by it
  otherwise, once per distinct token);
- then the frequency and presence penalties follow OpenAI's definition, additive:
  ``logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)``, where
  ``count(t)`` is how often this generation has produced ``t`` so far. As in OpenAI's
  API and vLLM, only the completion counts, all of it: llama.cpp counts the prompt too,
  within its last 64 tokens (``penalty_last_n``), which makes a long system prompt's
  words penalised and a penalty's effect depend on the window.

Draws come from ``numpy.random.Generator(PCG64(seed))``, so one seed always gives the
same tokens for the same logits; ``seed=None`` takes fresh entropy.

A constraint (``rkllmd.constraints.Guide``: a JSON Schema, a grammar, a forced tool call)
masks the logits after the penalties and before anything that truncates the candidates,
as llama.cpp's grammar sampler does when it resamples: top-k and top-p then choose among
the allowed tokens only, so they can never leave none, and a greedy pick is the argmax of
the allowed tokens (the unconstrained one whenever it is allowed). Penalties and the mask
commute, and so do the mask and temperature; what a mask must come before is truncation.

Log-probabilities (``SamplingParams.logprobs``) are the model's own after the penalties
and the mask: a log-softmax over the allowed tokens at temperature 1, before top-k and
top-p, as OpenAI reports them (the same text gets the same figures at any temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constraints import Constraint, ConstraintError, Guide

DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's default penalty window (prompt tokens included)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 means greedy (argmax).

    ``constraint``: what the output must match (a JSON Schema, a grammar, a forced tool
    call), enforced by the daemon's own sampler on each step's logits. ``logprobs``: when
    not None, each token's log-probability and that many alternatives are reported
    (``Run.logprobs``). Both need a backend whose daemon samples (the CPU backend; the NPU
    backend in its logits mode)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None
    logprobs: int | None = None

    @property
    def daemon_samples(self) -> bool:
        """Whether this request needs the daemon's sampler rather than a runtime's own."""
        return self.constraint is not None or self.logprobs is not None


class Sampler:
    """One generation's sampler: holds the random stream, the completion's token counts and
    the constraint's state (its ``guide``, which moves past each token sampled), so create
    one per request."""

    def __init__(self, params: SamplingParams, repeat_last_n: int = DEFAULT_REPEAT_LAST_N, guide: Guide | None = None):
        self.params = params
        self.repeat_last_n = repeat_last_n
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        #: How often each token was picked so far (kept only when an additive penalty is set).
        self.counts: dict[int, int] | None = {} if params.frequency_penalty or params.presence_penalty else None
        self.guide = guide
        #: After ``sample`` when the request asked for log-probabilities: (logprob of the
        #: token, [(id, logprob)] of the ``params.logprobs`` most likely allowed ones).
        self.logprob: tuple[float, list[tuple[int, float]]] | None = None

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> int:
        """Pick a token id, counting it as part of this generation's completion (the guide
        moves past it). ``logits`` is not modified; ``recent_tokens`` (prompt and
        completion) feeds the repeat penalty."""
        p = self.params
        if p.repeat_penalty != 1.0 and recent_tokens and self.repeat_last_n > 0:
            logits = self._penalized(logits, recent_tokens[-self.repeat_last_n :])
        if self.counts:
            logits = self._additive(logits, self.counts)
        allowed = None
        if self.guide is not None:
            allowed = self.guide.allowed(logits.shape[0])
            if not allowed.any():
                raise ConstraintError(self.guide.constraint.field, "the constraint allows no token")
            logits = np.where(allowed, logits, np.float32(-np.inf))
        token = int(np.argmax(logits)) if p.temperature <= 0 else self._draw(logits, allowed)
        if p.logprobs is not None:
            self.logprob = _log_softmax_at(logits, token, p.logprobs)
        if self.guide is not None:
            self.guide.accept(token)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def ended(self, at_limit: bool) -> str | None:
        """Why the generation ends after the token just sampled, or None: "stop" when the
        constraint's document is complete and nothing but the end may follow (the model is
        not asked for its end token), or when the limit comes with the document complete;
        "length" at the limit otherwise: an answer cut short is never called complete."""
        guide = self.guide
        if guide is not None and (guide.stopped or at_limit and guide.accepting):
            return "stop"
        return "length" if at_limit else None

    def _draw(self, logits: np.ndarray, allowed: np.ndarray | None) -> int:
        p = self.params
        vocab = logits.shape[0]
        if allowed is not None:  # top-k among the allowed tokens only
            candidates = np.flatnonzero(allowed)
            n = candidates.size
            if 0 < p.top_k < n:
                candidates = candidates[np.argpartition(logits[candidates], n - p.top_k)[n - p.top_k :]]
        elif 0 < p.top_k < vocab:
            candidates = np.argpartition(logits, vocab - p.top_k)[vocab - p.top_k :]
        else:
            candidates = np.arange(vocab)
        values = logits[candidates].astype(np.float64)
        # Best first; ties broken by token id so the order never depends on argpartition.
        order = np.lexsort((candidates, -values))
        candidates, values = candidates[order], values[order]

        values /= p.temperature
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest head whose mass reaches top_p (at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            probs = probs[:keep]
        cumulative = np.cumsum(probs)
        choice = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(choice, len(probs) - 1)])

    def _additive(self, logits: np.ndarray, counts: dict[int, int]) -> np.ndarray:
        p = self.params
        ids = np.fromiter(counts, np.int64, len(counts))
        n = np.fromiter(counts.values(), np.float32, len(counts))
        out = logits.copy()
        out[ids] -= np.float32(p.frequency_penalty) * n + np.float32(p.presence_penalty)
        return out

    def _penalized(self, logits: np.ndarray, recent: Sequence[int]) -> np.ndarray:
        penalty = np.float32(self.params.repeat_penalty)
        logits = logits.copy()
        seen = np.unique(np.asarray(recent, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits


def _log_softmax_at(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under ``logits`` (masked ones are -inf) and the ``top``
    most likely tokens', best first, ties by id."""
    values = logits.astype(np.float64)
    peak = values.max()
    total = peak + np.log(np.exp(values - peak).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        n = min(top, int(np.isfinite(values).sum()))
        head = np.argpartition(-values, n - 1)[:n]
        head = head[np.lexsort((head, -values[head]))]
        best = [(int(i), float(values[i] - total)) for i in head]
    return float(values[token] - total), best


def logprob_entry(token_bytes: Sequence[bytes], token: int, logprob: tuple[float, list[tuple[int, float]]]) -> dict[str, Any]:
    """A token's log-probabilities as ``token`` messages carry them (OpenAI's and Ollama's
    shape): ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``;
    ``token`` is the text (U+FFFD for part of a character), ``bytes`` exact."""

    def one(i: int, value: float) -> dict[str, Any]:
        data = token_bytes[i]
        return {"token": data.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(data)}

    chosen, top = logprob
    return {**one(token, chosen), "top_logprobs": [one(i, value) for i, value in top]}
