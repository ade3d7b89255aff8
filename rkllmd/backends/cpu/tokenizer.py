"""GPT-2 style byte-level BPE, built from a GGUF file's vocabulary and merges.

Reproduces llama.cpp's tokenizer for the ``smollm`` pre-tokenizer (SmolLM/SmolLM2):

1. control and user-defined tokens (``<|im_start|>`` ...) are matched literally first,
   longest first;
2. every number character (Unicode category N) is split off on its own;
3. the rest is split with the GPT-2 pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
4. each piece is byte-encoded (GPT-2's byte-to-unicode table) and merged by rank;
   a byte with no token of its own is dropped, as llama.cpp does (SmolLM2's vocabulary
   lacks a few, such as 0x04 and the UTF-8 lead bytes 0xF1/0xF2).

Python's ``re`` has no ``\\p{..}`` classes, so the pattern is rebuilt from what ``re``
does have, exactly rather than approximately: after step 2 no piece contains a number
character, and for every non-number character ``[^\\W\\d_]`` is exactly ``\\p{L}`` and
``\\w`` is exactly ``\\p{L}`` plus ``_`` (checked over all code points in the tests).
``\\s`` is spelled out as llama.cpp's whitespace set, which differs from Python's
``str.isspace`` (U+001C..U+001F are not whitespace there).
"""

from __future__ import annotations

import codecs
import functools
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np

# llama.cpp's whitespace code points (Unicode White_Space).
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# Step 3 for number-free text; see the module docstring for why these classes are exact.
_PIECE_PATTERN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d"
    r"| ?[^\W\d_]+"  # letters
    rf"| ?(?:[^\w{WHITESPACE}]|_)+"  # neither letter, number nor whitespace
    rf"|[{WHITESPACE}]+(?![^{WHITESPACE}])"  # whitespace not followed by a non-space
    rf"|[{WHITESPACE}]+"
)

# Token types in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(1, 7)

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
        self._number_split = re.compile(f"({number_character_class()})")
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
        self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_uncached)

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
        pieces = []
        for i, part in enumerate(self._number_split.split(text)):
            if i % 2:
                pieces.append(part)
            elif part:
                pieces.extend(_PIECE_PATTERN.findall(part))
        return pieces

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids: list[int] = []
        parts = self._special_split.split(text) if self._special_split else [text]
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                for piece in self.pre_tokenize(part):
                    ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """Merge the characters of a byte-encoded piece, lowest merge rank first."""
        parts = list(word)
        ranks = self.merge_ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for part in parts:
            token_id = self.token_to_id.get(part)
            if token_id is not None:
                ids.append(token_id)
            else:  # not in the vocabulary: fall back to one token per byte, like llama.cpp
                ids.extend(self.token_to_id[c] for c in part if c in self.token_to_id)
        return tuple(ids)

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
