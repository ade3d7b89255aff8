"""rkllmctl chat: an interactive conversation (history kept here, in the client).

When the model calls tools (``--tools``), each call is shown and its result is asked
for; the results go back as ``tool`` messages and the model answers again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import DaemonError
from . import UsageError, read_json
from .generate import add_sampling_options, follow, sampling_fields, stats_line

if TYPE_CHECKING:
    from ..client import GenerationResult

HELP = "commands: /reset (back to the conversation's start), /exit (or Ctrl-D); Ctrl-C stops an answer"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system message")
    p.add_argument("--messages", type=Path, metavar="FILE.json", help="start from this conversation (a JSON list of messages)")
    add_sampling_options(p)
    p.add_argument("--stats", action="store_true", help="print stats after each answer")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    fields = sampling_fields(args)
    start: list[dict[str, Any]] = read_json(args.messages, "--messages", list) or []
    if args.system:
        if start:
            raise UsageError("--messages replaces --system")
        start.append({"role": "system", "content": args.system})
    history = list(start)
    with connect() as client:
        if sys.stdin.isatty():
            print(HELP, file=sys.stderr)
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            line = line.strip()
            if not line:
                continue
            if line == "/exit":
                return 0
            if line == "/reset":
                history = list(start)
                continue
            turn_start = len(history)
            history.append({"role": "user", "content": line})
            try:
                while True:  # an answer, and another after each round of tool results
                    result = follow(client.generate(messages=history, **fields), echo=True, show_reasoning=not args.hide_reasoning)
                    history.append(assistant_turn(result))
                    if args.stats:
                        print(stats_line(result), file=sys.stderr)
                    if not result.tool_calls:
                        break
                    history.extend(tool_results(result.tool_calls))
            except KeyboardInterrupt:  # the turn is forgotten, the conversation goes on
                del history[turn_start:]
                print(file=sys.stderr)
            except EOFError:
                return 0
            except DaemonError as exc:
                if exc.name == "shutting_down":  # no next turn to wait for
                    raise
                del history[turn_start:]
                print(f"rkllmctl: {exc}", file=sys.stderr)


def assistant_turn(result: GenerationResult) -> dict[str, Any]:
    """The answer as history: its reasoning (the template decides whether the model sees
    it again) and its tool calls with it."""
    turn: dict[str, Any] = {"role": "assistant", "content": result.text}
    if result.reasoning:
        turn["reasoning_content"] = result.reasoning
    if result.tool_calls:
        turn["tool_calls"] = result.tool_calls
    return turn


def tool_results(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ask for each call's result (one line each), as ``tool`` messages."""
    results = []
    for call in calls:
        name = call["function"]["name"]
        content = input(f"result of {name} ({call['id']})> " if sys.stdin.isatty() else "")
        results.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": content})
    return results
