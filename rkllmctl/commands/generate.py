"""rkllmctl generate [options] [PROMPT|-]: stream a completion to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..client import GenerationResult, Stream
from . import UsageError, print_json


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="NAME", help="use text cache NAME as the system message")
    p.add_argument("--no-cache", action="store_true", help="prefill the whole prompt (no prompt cache), to measure the difference")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--stop", action="append", metavar="S", help="stop before this text (repeatable)")


def sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cache": args.cache,
        "no_cache": args.no_cache,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "stop": args.stop,
    }


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a completion (streams to stdout)")
    p.add_argument("prompt", nargs="?", help="the user message; '-' or absent reads stdin")
    p.add_argument("--system", help="system message")
    p.add_argument("--messages", type=Path, metavar="FILE.json", help="a chat: a JSON list of {role, content}")
    add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and all stats at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    fields = sampling_fields(args)
    if args.messages:
        if args.prompt or args.system:
            raise UsageError("--messages replaces PROMPT and --system")
        try:
            fields["messages"] = json.loads(args.messages.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--messages {args.messages}: {exc}") from None
    else:
        prompt = args.prompt
        if prompt is None or prompt == "-":
            prompt = sys.stdin.read()
        fields["prompt"] = prompt
        fields["system"] = args.system
    with connect() as client:
        stream = client.generate(**fields)
        result = follow(stream, echo=not args.json)
    if args.json:
        print_json({"text": result.text, "finish_reason": result.finish_reason, "cache": result.cache, "stats": result.stats, "client_ttft_ms": result.client_ttft_ms})
    elif not args.quiet:
        print(stats_line(result), file=sys.stderr)
    return 0


def follow(stream: Stream, echo: bool) -> GenerationResult:
    """Print text as it arrives; on Ctrl-C cancel on the daemon, then let the interrupt through."""
    try:
        for text in stream:
            if echo:
                sys.stdout.write(text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        try:
            stream.cancel()
        finally:
            if echo:
                sys.stdout.write("\n")
        raise
    assert stream.result is not None
    if echo and stream.result.text and not stream.result.text.endswith("\n"):
        sys.stdout.write("\n")
    return stream.result


def stats_line(result: GenerationResult) -> str:
    s = result.stats or {}
    parts = [f"finish: {result.finish_reason}"]
    if s:
        source = s.get("cache_source") or ({"kind": "text_cache", "name": result.cache} if result.cache else None)
        cached = ""
        if source is not None:
            origin = f"cache {source['name']}" if source["kind"] == "text_cache" else "this conversation's last turn"
            cached = f", {s['cached_tokens']} from {origin}"
        parts.append(f"prompt {s['prompt_tokens']} tokens{cached}")
        parts.append(f"completion {s['completion_tokens']} tokens")
        ttft = result.client_ttft_ms if result.client_ttft_ms is not None else s["ttft_ms"]
        parts.append(f"TTFT {ttft:.0f} ms (prefill {s['prefill_ms']:.0f} ms)")
        if s.get("decode_tps"):
            parts.append(f"{s['decode_tps']:.1f} tokens/s")
    return "[" + "; ".join(parts) + "]"
