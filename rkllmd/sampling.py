"""Choosing the next token from a model's logits.

Temperature 0 is greedy: the argmax, without sorting the vocabulary. Otherwise, in
order: penalties, top-k, temperature, top-p, then a draw from what is left. The
penalties also apply in greedy mode, as in llama.cpp and OpenAI's API:

- the repeat penalty follows llama.cpp (a logit of a token among the last 64 of the
  prompt and completion is divided by the penalty when positive and multiplied by it
  otherwise, once per distinct token);
- then the frequency and presence penalties follow OpenAI's definition, additive:
  ``logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)``, where
  ``count(t)`` is how often this generation has produced ``t`` so far. As in OpenAI's
  API and vLLM, only the completion counts, all of it: llama.cpp counts the prompt too,
  within its last 64 tokens (``penalty_last_n``), which makes a long system prompt's
  words penalised and a penalty's effect depend on the window.
 Draws come from
``numpy.random.Generator(PCG64(seed))``, so one seed always gives the same tokens
for the same logits; ``seed=None`` takes fresh entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backends.base import SamplingParams

DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's default penalty window (prompt tokens included)


class Sampler:
    """One generation's sampler: holds the random stream, so create one per request."""

    def __init__(self, params: SamplingParams, repeat_last_n: int = DEFAULT_REPEAT_LAST_N):
        self.params = params
        self.repeat_last_n = repeat_last_n
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        #: How often each token was picked so far (kept only when an additive penalty is set).
        self.counts: dict[int, int] | None = {} if params.frequency_penalty or params.presence_penalty else None

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> int:
        """Pick a token id, counting it as part of this generation's completion. ``logits``
        is not modified; ``recent_tokens`` (prompt and completion) feeds the repeat penalty."""
        p = self.params
        if p.repeat_penalty != 1.0 and recent_tokens and self.repeat_last_n > 0:
            logits = self._penalized(logits, recent_tokens[-self.repeat_last_n :])
        if self.counts:
            logits = self._additive(logits, self.counts)
        token = self._pick(logits)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _pick(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))

        vocab = logits.shape[0]
        if 0 < p.top_k < vocab:
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
