"""What rkllmctl may write to a terminal, and the one live status line it keeps there.

Escapes (the dimmed reasoning) go only to a terminal, never to a pipe or a file, and not
when NO_COLOR is set (https://no-color.org) or TERM is dumb. The status line uses no
escape at all: a carriage return and spaces draw and erase it, on any terminal.
"""

from __future__ import annotations

import os
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except ValueError:  # closed
        return False


def may_style(stream: TextIO) -> bool:
    """Whether ``stream`` may receive ANSI escapes."""
    return is_terminal(stream) and not os.environ.get("NO_COLOR")


class StatusLine:
    """One line on ``stream`` (stderr), rewritten in place while nothing else is printed:
    "queued: 2 ahead", "prefill 37%"; nothing at all when ``stream`` is not a terminal."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = is_terminal(stream)
        self.width = 0  # of the text on screen; 0: nothing shown

    def show(self, text: str) -> None:
        if not self.live:
            return
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        """Erase the line, leaving the cursor where it began (before other output)."""
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
