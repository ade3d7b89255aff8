"""Stop strings over a stream of text pieces, and the text a stream of tokens sends.

Text that could still turn out to be the beginning of a stop string is held back, so
a client never sees part of a stop sequence; the stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


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


class Decoder(Protocol):
    """Token ids to text as they come, an incomplete UTF-8 character held back
    (``tokenizer.StreamDecoder``)."""

    def feed(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TokenText:
    """What a generation whose tokens the daemon samples sends its sink: each token's text
    (decoded, stop strings matched) as it comes, and at the end what was held back."""

    def __init__(self, decoder: Decoder, stops: tuple[str, ...], sink: Callable[[str], bool]):
        self.decoder = decoder
        self.stops = StopMatcher(stops)
        self.sink = sink

    def feed(self, token: int) -> str | None:
        """Send ``token``'s text; why the generation ends here ("cancelled": the sink said
        so; "stop": a stop string), or None."""
        piece = self.stops.feed(self.decoder.feed(token))
        if piece and not self.sink(piece):
            return "cancelled"
        return "stop" if self.stops.stopped else None

    def finish(self, reason: str) -> str:
        """The generation ends for ``reason``: what the decoder and the stop matcher held back
        goes out (up to a stop string in it, which makes the reason "stop"). Returns the reason."""
        if reason in ("cancelled", "error") or self.stops.stopped:
            return reason
        rest = self.stops.feed(self.decoder.flush())
        if self.stops.stopped:
            reason = "stop"
        else:
            rest += self.stops.flush()
        return "cancelled" if rest and not self.sink(rest) else reason
