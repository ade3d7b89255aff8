"""Stop strings are cut exactly, even when split across pieces, and never leak partially."""

from __future__ import annotations

import pytest

from rkllmd.backends.stops import StopMatcher


@pytest.mark.parametrize(
    "pieces, stops, emitted, stopped",
    [
        (["Hello", " wor", "ld"], ["STOP"], "Hello world", False),
        (["Hello ST", "OP more"], ["STOP"], "Hello ", True),
        (["a\n", "\nb"], ["\n\n"], "a", True),
        (["ab", "c"], ["bcd"], "abc", False),  # a held-back "bc" is flushed at the end
        (["xENDy"], ["END", "x"], "", True),  # the earliest match wins
        (["one two"], [], "one two", False),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert out == emitted
    assert matcher.stopped is stopped


def test_held_text_is_not_emitted_early() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("answer <") == "answer "
    assert matcher.feed("/") == ""
    assert matcher.feed("x") == "</x"
