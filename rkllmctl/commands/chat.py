"""rkllmctl chat: an interactive conversation (history kept here, in the client)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ..errors import DaemonError
from .generate import add_sampling_options, follow, sampling_fields, stats_line

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops an answer"


def register(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive conversation")
    p.add_argument("--system", help="system message")
    add_sampling_options(p)
    p.add_argument("--stats", action="store_true", help="print stats after each answer")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    fields = sampling_fields(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
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
                del history[1 if args.system else 0 :]
                continue
            history.append({"role": "user", "content": line})
            stream = client.generate(messages=history, **fields)
            try:
                result = follow(stream, echo=True)
            except KeyboardInterrupt:
                history.pop()
                continue
            except DaemonError as exc:
                history.pop()
                print(f"rkllmctl: {exc}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": result.text})
            if args.stats:
                print(stats_line(result), file=sys.stderr)
