"""Choosing the next token from a model's logits.

Temperature 0 is greedy: the argmax, without sorting the vocabulary. Otherwise, in
order: repeat penalty, top-k, temperature, top-p, then a draw from what is left. The
repeat penalty follows llama.cpp (a logit of a recently seen token is divided by the
penalty when positive and multiplied by it otherwise, once per distinct token) and
also applies in greedy mode, as in llama.cpp. Draws come from
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

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> int:
        """Pick a token id. ``logits`` is not modified; ``recent_tokens`` feeds the penalty."""
        p = self.params
        if p.repeat_penalty != 1.0 and recent_tokens and self.repeat_last_n > 0:
            logits = self._penalized(logits, recent_tokens[-self.repeat_last_n :])
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

    def _penalized(self, logits: np.ndarray, recent: Sequence[int]) -> np.ndarray:
        penalty = np.float32(self.params.repeat_penalty)
        logits = logits.copy()
        seen = np.unique(np.asarray(recent, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits
