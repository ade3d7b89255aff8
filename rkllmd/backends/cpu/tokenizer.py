"""GPT-2 style byte-level BPE, built from a GGUF file's vocabulary and merges.

Reproduces llama.cpp's tokenizer for the ``smollm`` pre-tokenizer (SmolLM/SmolLM2):

1. control and user-defined tokens (``<|im_start|>`` ...) are matched literally first,
   longest first;
2. every number character (Unicode category N) is split off on its own;
3. the rest is split with the GPT-2 pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
4. each piece is byte-encoded (GPT-2's byte-to-unicode table) and merged by rank,
   the lowest-ranked adjacent pair first and the leftmost of equal ones, as llama.cpp's
   queue of bigrams does; a byte with no token of its own is dropped, as llama.cpp does
   (SmolLM2's vocabulary lacks a few, such as 0x04 and the UTF-8 lead bytes 0xF1/0xF2).

Python's ``re`` has no ``\\p{..}`` classes, so the pattern is rebuilt from what ``re``
does have, exactly rather than approximately: after step 2 no piece contains a number
character, and for every non-number character ``[^\\W\\d_]`` is exactly ``\\p{L}`` and
``\\w`` is exactly ``\\p{L}`` plus ``_`` (checked over all code points in the tests).
``\\s`` is spelled out as llama.cpp's whitespace set, which differs from Python's
``str.isspace`` (U+001C..U+001F are not whitespace there).

Long texts (a prompt may hold 250,000 characters) cost time in proportion to their length,
never more: merging uses a heap over a linked list (n log n in a piece's length, where
rescanning every pair after each merge was quadratic: a 16,000-letter word took seconds),
and no single call into C (a regular-expression search, a list of a long piece's symbols)
works on more than ``SCAN_WINDOW`` characters past the piece it finds. Python hands the
GIL over only between calls, so a long one here would hold up every other thread of the
daemon (the socket loop answering pings) while another thread tokenizes.
(bench/tokenize_long.py measures both.)
"""

from __future__ import annotations

import codecs
import functools
import heapq
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# llama.cpp's whitespace code points (Unicode White_Space).
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# Step 3 for number-free text; see the module docstring for why these classes are exact.
_PIECE_PATTERN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d"
    r"| ?[^\W\d_]+"  # letters
    # Neither letter, number nor whitespace: "_" or a non-word character. Runs of each
    # (disjoint classes) rather than an alternation per character: ten times faster.
    rf"| ?(?:[^\w{WHITESPACE}]+|_+)+"
    rf"|[{WHITESPACE}]+(?![^{WHITESPACE}])"  # whitespace not followed by a non-space
    rf"|[{WHITESPACE}]+"
)

# Token types in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(1, 7)

#: Characters one call into C scans or copies at most (the GIL held throughout it).
SCAN_WINDOW = 1 << 12
#: Longest byte-encoded piece whose merges are remembered.
CACHED_PIECE_CHARS = 64

# Control tokens that end a turn; llama.cpp stops on these besides the EOS id.
END_OF_GENERATION_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@functools.cache
def number_character_class() -> str:
    """A ``re`` character class matching exactly Unicode category N (Nd, Nl, No).

    Built once from ``str`` predicates (~30 ms): a character is in N exactly when it
    is numeric but not alphabetic (CJK numerals such as 三 are letters, category Lo).
    """
    ranges: list[list[int]] = []
    code_points = np.r_[0:0xD800, 0xE000 : sys.maxunicode + 1].astype("<u4")  # all but surrogates
    every_character = code_points.tobytes().decode("utf-32-le")
    for char in filter(str.isnumeric, every_character):  # a C loop: ~1,900 of 1.1 million pass
        if char.isalpha():
            continue
        code_point = ord(char)
        if ranges and ranges[-1][1] == code_point - 1:
            ranges[-1][1] = code_point
        else:
            ranges.append([code_point, code_point])
    body = "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)
    return f"[{body}]"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the vocab's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """Encode text to token ids and decode ids back to bytes/text."""

    def __init__(
        self,
        tokens: list[str],
        token_types: Iterable[int],
        merges: list[str],
        eos_id: int,
        bpe_cache_size: int = 65536,
    ):
        self.tokens = tokens
        self.token_to_id = {text: i for i, text in enumerate(tokens)}
        self.token_types = [int(t) for t in token_types]
        if len(self.token_types) != len(tokens):
            raise ValueError("token_type and tokens arrays differ in length")
        self.merge_ranks = {tuple(merge.split(" ", 1)): rank for rank, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}

        self.special_ids = {
            text: i for i, text in enumerate(tokens) if self.token_types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        }
        by_length = sorted(self.special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        self._number = re.compile(number_character_class())
        self._ascii_number = re.compile("[0-9]")  # the same on ASCII text, many times faster
        # Bytes to the vocabulary's alphabet: a charmap codec's table (one fast C pass a piece).
        self._byte_alphabet = "".join(self.byte_encoder[byte] for byte in range(256))
        self.end_of_generation_ids = frozenset(
            {eos_id} | {self.special_ids[t] for t in END_OF_GENERATION_TEXTS if t in self.special_ids}
        )

        # Bytes of every token for decoding: control tokens (and any token outside the
        # byte alphabet) are their literal text; the others map character by character
        # (translate to code points 0-255, then latin-1: both loops in C).
        to_bytes = str.maketrans({char: chr(byte) for char, byte in byte_decoder.items()})
        outside_alphabet = re.compile(f"[^{re.escape(''.join(byte_decoder))}]")
        self.token_bytes: list[bytes] = []
        for text, kind in zip(tokens, self.token_types):
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) or outside_alphabet.search(text):
                self.token_bytes.append(text.encode("utf-8"))
            else:
                self.token_bytes.append(text.translate(to_bytes).encode("latin-1"))
        self._bpe_cached = functools.lru_cache(maxsize=bpe_cache_size)(lambda word: tuple(self._bpe_uncached(word)))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer model {model!r} is not byte-level BPE ('gpt2')")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre != "smollm":
            raise ValueError(f"pre-tokenizer {pre!r} is not supported (only 'smollm')")
        return cls(
            tokens=metadata["tokenizer.ggml.tokens"],
            token_types=metadata["tokenizer.ggml.token_type"],
            merges=metadata["tokenizer.ggml.merges"],
            eos_id=int(metadata["tokenizer.ggml.eos_token_id"]),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def pre_tokenize(self, text: str) -> list[str]:
        """Split special-token-free text into the pieces BPE works on (steps 2 and 3)."""
        return list(self._pieces(text))

    def _pieces(self, text: str) -> Iterator[str]:
        """Every number character alone, the text between them by the GPT-2 pattern."""
        at = 0
        for number in self._numbers(text):
            if number > at:
                yield from (match.group() for match in _PIECE_PATTERN.finditer(text, at, number))
            yield text[number]
            at = number + 1
        if at < len(text):
            yield from (match.group() for match in _PIECE_PATTERN.finditer(text, at))

    def _numbers(self, text: str) -> Iterator[int]:
        """Positions of the number characters, searched ``SCAN_WINDOW`` characters at a time
        (each a piece of one character, so the windows change nothing)."""
        search = (self._ascii_number if text.isascii() else self._number).search
        for window in range(0, len(text), SCAN_WINDOW):
            end = window + SCAN_WINDOW
            found = search(text, window, end)
            while found is not None:
                yield found.start()
                found = search(text, found.end(), end)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids: list[int] = []
        parts = self._special_split.split(text) if self._special_split else [text]
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                for piece in self._pieces(part):
                    ids.extend(self._bpe(codecs.charmap_decode(piece.encode("utf-8"), "strict", self._byte_alphabet)[0]))
        return ids

    def _bpe(self, word: str) -> Sequence[int]:
        """``_bpe_uncached``, remembered for pieces as short as words: a long piece (a run of
        letters or symbols) is rare in text and would make the memory of the cache unbounded."""
        return self._bpe_cached(word) if len(word) <= CACHED_PIECE_CHARS else self._bpe_uncached(word)

    def _bpe_uncached(self, word: str) -> list[int]:
        """Merge the characters of a byte-encoded piece: the adjacent pair of lowest merge
        rank first, the leftmost of equal ones (llama.cpp's order). A heap holds the candidate
        pairs as ``rank << 32 | left position`` (plain ints: tuples would feed the garbage
        collector, whose full passes over a long piece's heap hold the GIL for tens of ms);
        the symbols form a linked list (``right``), a merged one left empty; an entry whose
        pair changed since it was pushed is skipped. Long lists are made a window at a time:
        list(range(n)) of a long piece is one call making n objects, the GIL held throughout."""
        n = len(word)
        symbols: list[str] = []
        right: list[int] = []  # n: none
        left: list[int] = []  # -1: none
        for start in range(0, n, SCAN_WINDOW):
            end = min(start + SCAN_WINDOW, n)
            symbols += word[start:end]
            right += range(start + 1, end + 1)
            left += range(start - 1, end - 1)
        ranks = self.merge_ranks
        heap: list[int] = []
        push, pop = heapq.heappush, heapq.heappop
        for i in range(n - 1):  # pushed one by one: heapify is one long call on a long piece
            if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None:
                push(heap, rank << 32 | i)
        while heap:
            entry = pop(heap)
            rank, i = entry >> 32, entry & 0xFFFFFFFF
            j = right[i]
            if j >= n or not symbols[i] or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one side was merged into something else meanwhile
            symbols[i] += symbols[j]
            symbols[j] = ""
            right[i] = k = right[j]
            if k < n:
                left[k] = i
                if (rank := ranks.get((symbols[i], symbols[k]))) is not None:
                    push(heap, rank << 32 | i)
            if (h := left[i]) >= 0 and (rank := ranks.get((symbols[h], symbols[i]))) is not None:
                push(heap, rank << 32 | h)
        ids = []
        for part in filter(None, symbols):
            token_id = self.token_to_id.get(part)
            if token_id is not None:
                ids.append(token_id)
            else:  # not in the vocabulary: fall back to one token per byte, like llama.cpp
                ids.extend(self.token_to_id[c] for c in part if c in self.token_to_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut-off character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes)


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 characters.

    A byte-level token can end in the middle of a multi-byte character; its bytes are
    kept until the next token completes it, so no piece ever contains half a character.
    """

    def __init__(self, token_bytes: Sequence[bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
