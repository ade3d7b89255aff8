"""Splitting a model's streamed output into its reasoning and its answer.

Reasoning models write ``<think>...</think>`` before the answer; some templates open
the ``<think>`` in the prompt itself (DeepSeek-R1-Distill always, Qwen3 never, and
Qwen3 with ``enable_thinking`` false writes an empty, closed pair there). Text arrives
piece by piece, so a marker may be split across pieces: what could still be the start
of a marker is held back until the next piece says.
"""

from __future__ import annotations

START, REASONING, CONTENT = "start", "reasoning", "content"


class ReasoningSplitter:
    """``feed(piece) -> (reasoning, content)``, then ``flush()`` for what is held back.

    Only one reasoning block is recognised, and only at the start of the output (an
    opening marker later in the answer is answer text); whitespace right after either
    marker is dropped, as the templates write it back themselves.
    """

    def __init__(self, markers: tuple[str, str], *, opened: bool = False):
        self.open, self.close = markers
        self.state = REASONING if opened else START
        #: Whether the output has a reasoning block (opened by the prompt, or by the model).
        self.entered = opened
        self._held = ""
        self._skip_space = opened

    @staticmethod
    def opened_by(prompt: str, markers: tuple[str, str]) -> bool:
        """Whether the prompt leaves a reasoning block open for the model to continue."""
        return prompt.rstrip().endswith(markers[0])

    def feed(self, piece: str) -> tuple[str, str]:
        reasoning, content = [], []
        text = self._held + piece
        self._held = ""
        while text:
            if self._skip_space:
                stripped = text.lstrip()
                if not stripped:
                    break
                text, self._skip_space = stripped, False
            if self.state == START:
                lead = text.lstrip()
                if lead.startswith(self.open):
                    text, self.state, self._skip_space = lead[len(self.open):], REASONING, True
                    self.entered = True
                elif self.open.startswith(lead):
                    self._held = text  # maybe the marker, maybe not: the next piece tells
                    break
                else:
                    self.state = CONTENT
            elif self.state == REASONING:
                end = text.find(self.close)
                if end >= 0:
                    reasoning.append(text[:end])
                    text, self.state, self._skip_space = text[end + len(self.close):], CONTENT, True
                else:
                    keep = _partial_marker(text, self.close)
                    reasoning.append(text[: len(text) - keep])
                    self._held = text[len(text) - keep:]
                    break
            else:
                content.append(text)
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """The end of the output: what was held back is text after all."""
        held, self._held = self._held, ""
        if self.state == REASONING:
            return held, ""
        return "", held.lstrip() if self._skip_space else held


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split(text: str, markers: tuple[str, str], *, opened: bool = False) -> tuple[str, str]:
    """A whole output at once: (reasoning, content)."""
    splitter = ReasoningSplitter(markers, opened=opened)
    a, b = splitter.feed(text)
    c, d = splitter.flush()
    return a + c, b + d
