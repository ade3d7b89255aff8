"""Stop strings over a stream of text pieces.

Text that could still turn out to be the beginning of a stop string is held back, so
a client never sees part of a stop sequence; the stop string itself is never emitted.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what may be emitted now. Sets ``stopped`` on a match."""
        if not self.stops:
            return piece
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return text[:cut]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Text still held back when generation ends without a match."""
        held, self._held = self._held, ""
        return held
