"""rkllmctl generate [options] [PROMPT|-]: stream a completion to stdout, stats to stderr.

Reasoning is shown dimmed before the answer when stdout is a terminal; otherwise it goes
to stderr, without escapes, so stdout holds the answer alone (``--hide-reasoning``: nowhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from ..client import GenerationResult, Piece, Stream
from . import UsageError, print_json, read_json

DIM, UNDIM = "\x1b[2m", "\x1b[22m"


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
    p.add_argument("--tools", type=Path, metavar="FILE.json", help="a JSON list of tool schemas the model may call")
    p.add_argument("--vars", type=Path, metavar="FILE.json", help="a JSON object of template variables (date_string, ...)")
    p.add_argument("--think", dest="enable_thinking", action=argparse.BooleanOptionalAction, help="ask a template that reads enable_thinking (qwen3) to let the model reason, or not")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the model's reasoning")


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
        "tools": read_json(args.tools, "--tools", list),
        "vars": read_json(args.vars, "--vars", dict),
        "enable_thinking": args.enable_thinking,
    }


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a completion (streams to stdout)")
    p.add_argument("prompt", nargs="?", help="the user message; '-' or absent reads stdin")
    p.add_argument("--system", help="system message")
    p.add_argument("--messages", type=Path, metavar="FILE.json", help="a chat: a JSON list of {role, content}")
    add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the text, reasoning, tool calls and all stats at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    fields = sampling_fields(args)
    if args.messages:
        if args.prompt or args.system:
            raise UsageError("--messages replaces PROMPT and --system")
        fields["messages"] = read_json(args.messages, "--messages", list)
    else:
        prompt = args.prompt
        if prompt is None or prompt == "-":
            prompt = sys.stdin.read()
        fields["prompt"] = prompt
        fields["system"] = args.system
    with connect() as client:
        stream = client.generate(**fields)
        result = follow(stream, echo=not args.json, show_reasoning=not args.hide_reasoning)
    if args.json:
        print_json({
            "text": result.text,
            "reasoning": None if args.hide_reasoning else result.reasoning,
            "tool_calls": result.tool_calls,
            "tool_call_error": result.tool_call_error,
            "finish_reason": result.finish_reason,
            "cache": result.cache,
            "stats": result.stats,
            "client_ttft_ms": result.client_ttft_ms,
        })
    elif not args.quiet:
        print(stats_line(result), file=sys.stderr)
    return 0


def follow(stream: Stream, echo: bool, show_reasoning: bool = True) -> GenerationResult:
    """Print text as it arrives; on Ctrl-C cancel on the daemon, then let the interrupt through."""
    printer = Printer(show_reasoning) if echo else None
    try:
        for piece in stream.pieces():
            if printer is not None:
                printer.write(piece)
    except KeyboardInterrupt:
        try:
            stream.cancel()
        finally:
            if printer is not None:
                printer.end()
        raise
    result = stream.result
    assert result is not None
    if printer is not None:
        printer.end()
        for call in result.tool_calls or ():
            print(f"[tool call {call['id']}: {call['function']['name']}({call['function']['arguments']})]")
        if result.tool_call_error:
            print(f"rkllmctl: the model's tool call did not parse ({result.tool_call_error}); it is left in the text", file=sys.stderr)
    return result


class Printer:
    """The answer on stdout; reasoning dimmed before it on a terminal, else on stderr."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.tty = sys.stdout.isatty()
        self.reasoning_to: TextIO = sys.stdout if self.tty else sys.stderr
        self.last: dict[TextIO, str] = {}  # each stream's last character written
        self.dimmed = False

    def write(self, piece: Piece) -> None:
        if piece.reasoning and self.show_reasoning:
            if self.tty and not self.dimmed:
                sys.stdout.write(DIM)
                self.dimmed = True
            self._put(self.reasoning_to, piece.reasoning)
        if piece.text:
            if self.dimmed:  # the answer starts on a line of its own after the reasoning
                self._undim()
                if self.last[sys.stdout] != "\n":
                    self._put(sys.stdout, "\n")
            self._put(sys.stdout, piece.text)

    def end(self) -> None:
        """Close the lines left open (and the dim attribute)."""
        self._undim()
        for out, last in self.last.items():
            if last != "\n":
                self._put(out, "\n")

    def _undim(self) -> None:
        if self.dimmed:
            sys.stdout.write(UNDIM)
            self.dimmed = False

    def _put(self, out: TextIO, text: str) -> None:
        out.write(text)
        out.flush()
        self.last[out] = text[-1]


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
