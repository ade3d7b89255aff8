"""rkllmctl generate [options] [PROMPT|-]: stream a completion to stdout, stats to stderr.

Reasoning is shown dimmed before the answer when stdout is a terminal; otherwise it goes
to stderr, without escapes, so stdout holds the answer alone (``--hide-reasoning``: nowhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from rkllmd.config import Config
from rkllmd.schema import OPERATIONS, Setting

from ..errors import GenerationCutShort
from ..terminal import StatusLine, may_style
from . import UsageError, print_json, read_json

if TYPE_CHECKING:
    from ..client import GenerationResult, Piece, Progress, Queued, Started, Stream

DIM, UNDIM = "\x1b[2m", "\x1b[22m"
#: Where a daemon's default comes from when its configuration does not change it.
BUILT_IN = Config()


def schema_help(name: str, doc: str | None = None) -> str:
    """A generate field's help: its meaning, range and default as rkllmd/schema.py declares
    them (a default read from the daemon's configuration: its built-in value, and the key)."""
    f = OPERATIONS["generate"].field(name)
    parts = [doc or f.doc]
    low, high = (_value(bound) for bound in (f.low, f.high))
    if low is not None and high is not None and f.high != 2**64 - 1:
        parts.append(f"{low}–{high}")
    parts.append(f"default: {_value(f.default) if f.default_doc is None else f.default_doc}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def _value(bound: Any) -> str | None:
    if isinstance(bound, Setting):
        return f"{BUILT_IN[bound.key]} (rkllmd.toml {bound.key})"
    if bound == ():
        return "none"
    return None if bound is None else str(bound)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="the model (rkllmctl models lists them); default: the daemon's default model")
    p.add_argument("--keep-alive", metavar="DURATION", help=schema_help("keep_alive"))
    p.add_argument("--cache", metavar="NAME", help="use text cache NAME as the system message; default: none (a prompt that starts like a cache uses it all the same)")
    p.add_argument("--no-cache", action="store_true", help="prefill the whole prompt (no prompt cache), to measure the difference; default: restore what a cache or the conversation holds")
    p.add_argument("--temperature", type=float, help=schema_help("temperature"))
    p.add_argument("--top-k", type=int, help=schema_help("top_k"))
    p.add_argument("--top-p", type=float, help=schema_help("top_p"))
    p.add_argument("--repeat-penalty", type=float, help=schema_help("repeat_penalty"))
    p.add_argument("--frequency-penalty", type=float, help=schema_help("frequency_penalty"))
    p.add_argument("--presence-penalty", type=float, help=schema_help("presence_penalty"))
    p.add_argument("--seed", type=int, help=schema_help("seed"))
    p.add_argument("--max-tokens", type=int, help=schema_help("max_tokens"))
    p.add_argument("--stop", action="append", metavar="S", help=schema_help("stop", "stop before this text (repeatable), which is not printed"))
    p.add_argument("--tools", type=Path, metavar="FILE.json", help="a JSON list of tool schemas the model may call (a model whose template has no tools refuses them: rkllmctl status, capabilities)")
    p.add_argument("--vars", type=Path, metavar="FILE.json", help="a JSON object of template variables (date_string, ...)")
    p.add_argument("--think", dest="enable_thinking", action=argparse.BooleanOptionalAction, help="ask a template that reads enable_thinking (qwen3) to let the model reason, or not (--think on a model without thinking is refused: rkllmctl status, capabilities); default: as the template decides")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the model's reasoning")


def sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cache": args.cache,
        "no_cache": args.no_cache,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repeat_penalty": args.repeat_penalty,
        "frequency_penalty": args.frequency_penalty,
        "presence_penalty": args.presence_penalty,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "stop": args.stop,
        "tools": read_json(args.tools, "--tools", list),
        "vars": read_json(args.vars, "--vars", dict),
        "enable_thinking": args.enable_thinking,
        "model": args.model,
        "keep_alive": args.keep_alive,
    }


def add_constraint_options(p: argparse.ArgumentParser) -> None:
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--schema", type=Path, metavar="FILE.json", help="the answer is JSON valid under this JSON Schema")
    shape.add_argument("--json-mode", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--grammar", type=Path, metavar="FILE", help="the answer matches this grammar (llguidance's Lark, or GBNF as llama.cpp's --grammar-file)")
    p.add_argument("--tool-choice", metavar="auto|none|required|NAME", help="with --tools: 'required' makes the answer a call to one of them, NAME a call to that one (its arguments valid under its parameters); default: auto")
    p.add_argument("--logprobs", type=int, metavar="N", help="report each token's log-probability and N alternatives (0-20) in --json's \"logprobs\"")


def constraint_fields(args: argparse.Namespace) -> dict[str, Any]:
    choice = args.tool_choice
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    grammar = None
    if args.grammar is not None:
        try:
            grammar = args.grammar.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise UsageError(f"--grammar {args.grammar}: {exc}") from None
    return {
        "format": "json" if args.json_mode else read_json(args.schema, "--schema", dict),
        "grammar": grammar,
        "tool_choice": choice,
        "logprobs": args.logprobs is not None,
        "top_logprobs": args.logprobs,
    }


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the user message; '-' or absent reads stdin")
    p.add_argument("--system", help="system message")
    p.add_argument("--messages", type=Path, metavar="FILE.json", help="a chat: a JSON list of {role, content}")
    p.add_argument("--raw", action="store_true", help="PROMPT is the whole prompt text, sent as it is: no chat template, no system message")
    add_sampling_options(p)
    add_constraint_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the text, reasoning, tool calls and all stats at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    fields = {**sampling_fields(args), **constraint_fields(args)}
    if args.messages:
        if args.prompt or args.system or args.raw:
            raise UsageError("--messages replaces PROMPT and --system (and --raw takes PROMPT)")
        fields["messages"] = read_json(args.messages, "--messages", list)
    else:
        prompt = args.prompt
        if prompt is None or prompt == "-":
            prompt = sys.stdin.read()
        fields["prompt"] = prompt
        fields["system"] = args.system
        fields["raw"] = args.raw
    with connect() as client:
        stream = client.generate(**fields)
        result = follow(stream, echo=not args.json, show_reasoning=not args.hide_reasoning, leaving_on_interrupt=True)
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
            **({"logprobs": result.logprobs} if args.logprobs is not None else {}),
        })
    elif not args.quiet:
        print(stats_line(result), file=sys.stderr)
    return 0


def follow(stream: Stream, echo: bool, show_reasoning: bool = True, leaving_on_interrupt: bool = False) -> GenerationResult:
    """Print text as it arrives, and until it does a live line on a terminal's stderr
    (queue position, prefill percentage). On Ctrl-C cancel on the daemon, then let the
    interrupt through: once the generation has ended, or, ``leaving_on_interrupt`` (the
    command exits on it), once the daemon has taken the cancel in. A generation the
    daemon cut short is a GenerationCutShort."""
    from ..client import Piece
    printer = Printer(show_reasoning) if echo else None
    line = StatusLine(sys.stderr)
    waiting = True
    try:
        for event in stream.events():
            if isinstance(event, Piece):
                waiting = False
                line.clear()
                if printer is not None:
                    printer.write(event)
            elif waiting:
                line.show(waiting_text(event))
    except KeyboardInterrupt:
        line.clear()
        if leaving_on_interrupt:
            stream.abandon()
        else:
            stream.cancel()
        raise
    finally:
        line.clear()
        if printer is not None:
            printer.end()
    result = stream.result
    assert result is not None
    if printer is not None:
        for call in result.tool_calls or ():
            print(f"[tool call {call['id']}: {call['function']['name']}({call['function']['arguments']})]")
        if result.tool_call_error:
            print(f"rkllmctl: the model's tool call did not parse ({result.tool_call_error}); it is left in the text", file=sys.stderr)
    if result.finish_reason == "cancelled":  # not by us: Ctrl-C left above
        raise GenerationCutShort(result.reason, result.text, result.reasoning)
    return result


def waiting_text(event: Queued | Started | Progress) -> str:
    from ..client import Progress, Queued
    if isinstance(event, Queued):
        return f"queued: {event.position} ahead"
    if isinstance(event, Progress):
        return f"{event.phase} {event.percent}%"
    return "prefill"  # started; a daemon before protocol 1.3 says no more until the first token


class Printer:
    """The answer on stdout; reasoning dimmed before it on a terminal, else on stderr."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.tty = sys.stdout.isatty()
        self.dim = may_style(sys.stdout)
        self.reasoning_to: TextIO = sys.stdout if self.tty else sys.stderr
        self.last: dict[TextIO, str] = {}  # each stream's last character written
        self.in_reasoning = False  # reasoning is being written to stdout (a terminal)

    def write(self, piece: Piece) -> None:
        if piece.reasoning and self.show_reasoning:
            if self.tty and not self.in_reasoning:
                if self.dim:
                    sys.stdout.write(DIM)
                self.in_reasoning = True
            self._put(self.reasoning_to, piece.reasoning)
        if piece.text:
            if self.in_reasoning:  # the answer starts on a line of its own after the reasoning
                self._leave_reasoning()
                if self.last[sys.stdout] != "\n":
                    self._put(sys.stdout, "\n")
            self._put(sys.stdout, piece.text)

    def end(self) -> None:
        """Close the lines left open (and the dim attribute)."""
        self._leave_reasoning()
        for out, last in self.last.items():
            if last != "\n":
                self._put(out, "\n")

    def _leave_reasoning(self) -> None:
        if self.in_reasoning and self.dim:
            sys.stdout.write(UNDIM)
        self.in_reasoning = False

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
        queued = f"queued {s['queue_ms']:.0f} ms, " if s.get("queue_ms", 0) >= 1 else ""
        parts.append(f"TTFT {ttft:.0f} ms ({queued}prefill {s['prefill_ms']:.0f} ms)")
        if s.get("decode_tps"):
            parts.append(f"{s['decode_tps']:.1f} tokens/s")
    return "[" + "; ".join(parts) + "]"
