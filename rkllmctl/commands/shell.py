"""rkllmctl completion bash|zsh|tcsh and rkllmctl manpage: made from the parser itself,
so they list every command and option there is, and nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import shtab

from . import build_parser

MAN_DESCRIPTION = "talk to rkllmd: generate, chat, manage prompt caches"


def register_completion(p: argparse.ArgumentParser) -> None:
    p.description = ("Print the completion script for SHELL. bash: source <(rkllmctl completion bash), "
                     "or save it as /usr/share/bash-completion/completions/rkllmctl; zsh: save it as _rkllmctl in a folder of $fpath.")
    p.add_argument("shell", choices=shtab.SUPPORTED_SHELLS)
    p.set_defaults(run=completion)


def register_manpage(p: argparse.ArgumentParser) -> None:
    p.set_defaults(run=manpage)


#: Cache names, asked of the daemon at TAB time (`cache ls --names`), for NAME and --cache NAME.
CACHE_NAMES = {"bash": "_rkllmctl_caches", "zsh": "_rkllmctl_caches"}
PREAMBLE = {
    "bash": '_rkllmctl_caches() { compgen -W "$(rkllmctl cache ls --names 2>/dev/null)" -- "$1"; }',
    "zsh": '_rkllmctl_caches() { local -a names; names=(${(f)"$(rkllmctl cache ls --names 2>/dev/null)"}); compadd -a names; }',
}


def completion(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    parser = build_parser(whole=True)  # the whole command line, of which this is one verb
    for action in walk(parser):
        if action.type is Path:  # files to read: the shell completes file names
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.dest in ("name", "cache"):  # the cache verbs' NAME, generate's --cache NAME
            action.complete = CACHE_NAMES  # type: ignore[attr-defined]
    sys.stdout.write(shtab.complete(parser, shell=args.shell, preamble=PREAMBLE))
    return 0


def walk(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of ``parser`` and its subcommands' parsers."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                actions += walk(sub)
    return actions


def manpage(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    from argparse_manpage.manpage import Manpage

    from rkllmd import __version__

    from ..exits import EXIT_CODES

    page = Manpage(build_parser(whole=True), _data={"project_name": "rkllmd", "version": __version__, "description": MAN_DESCRIPTION, "manual_title": "rkllmd manual"})
    page.add_section("exit status", "=", "\n".join(f".TP\n.B {int(code)}\n{roff(text)}" for code, text in EXIT_CODES.items()))
    page.add_section("environment", "=", "\n".join(f".TP\n.B {name}\n{roff(text)}" for name, text in ENVIRONMENT.items()))
    page.add_section("see also", "=", r"\fBrkllmd \-\-help\fR, \fBrkllmd\-http \-\-help\fR; docs/protocol.md for the protocol of the socket")
    sys.stdout.write(ascii_roff(str(page)))
    return 0


def ascii_roff(text: str) -> str:
    """Characters beyond ASCII (the help's "0.0–1.0") as groff's \\[uXXXX] escapes:
    troff reads its input as Latin-1 unless a preprocessor converts it."""
    return "".join(c if c.isascii() else f"\\[u{ord(c):04X}]" for c in text)


ENVIRONMENT = {
    "RKLLMD_SOCKET": "the daemon's socket when --socket is not given",
    "NO_COLOR": "when set and not empty, no escape sequences (dimmed reasoning) even on a terminal",
    "VISUAL, EDITOR": "the editor of cache edit (else vi)",
}


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting with a dot."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text
