"""rkllmctl embed: embeddings of texts (the mean of the model's final hidden states, as
llama.cpp's mean pooling; L2-normalised unless --no-normalize)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from . import print_json

#: Values of each embedding the plain output shows.
SHOWN = 4


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="+", metavar="TEXT", help="a text to embed (the raw text: no chat template); - reads one from stdin")
    p.add_argument("--no-normalize", action="store_true", help="the mean as it is, not L2-normalised")
    p.add_argument("--no-truncate", action="store_true", help="refuse a text longer than the context (context_overflow) instead of cutting it")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON: the embeddings as arrays of floats, and the token counts")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    texts = [sys.stdin.read() if text == "-" else text for text in args.text]
    with connect() as client:
        result = client.embed(texts, truncate=not args.no_truncate, normalize=not args.no_normalize)
    if args.json:
        print_json(result)
        return 0
    for vector, tokens in zip(result["embeddings"], result["prompt_tokens"]):
        head = ", ".join(f"{v:.5f}" for v in vector[:SHOWN])
        print(f"{tokens} tokens, {len(vector)} dimensions: [{head}, ...]")
    return 0
