"""One module per rkllmctl verb: ``register(subparsers)`` adds it, ``run(args, connect)`` runs it.

``build_parser`` makes the command line: every verb with its one-line help from VERBS,
and a verb's own options only once that verb is chosen, so the verb's module (and what it
imports: the daemon's configuration defaults for generate's help, ...) is imported only
then; ``rkllmctl --help`` imports none. A module imports what only its run needs (the
socket client, templates) when it runs. The modules import only the helpers below from
this package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from rkllmd import __version__

#: verb -> (its module, the function adding its options, its help), in the order --help lists them.
VERBS: dict[str, tuple[str, str, str]] = {
    "generate": ("generate", "register", "generate a completion (streams to stdout)"),
    "chat": ("chat", "register", "interactive conversation"),
    "render": ("render", "register", "print the exact prompt text a chat renders to"),
    "embed": ("embed", "register", "print the embeddings of texts (mean-pooled, L2-normalised)"),
    "status": ("status", "register", "what the daemon runs and how it is doing"),
    "cache": ("cache", "register", "prompt caches: ls, show, put, edit, rm, rebuild, wait"),
    "models": ("models", "register_models", "every model by name, and which are loaded"),
    "create": ("models", "register_create", "derive a model from another: its own system message, parameters or template"),
    "cp": ("models", "register_copy", "copy a model under a second name"),
    "rm": ("models", "register_delete", "delete a created model"),
    "pull": ("pull", "register", "download a .gguf or .rkllm model from the Hugging Face hub (hf.co/OWNER/REPO[/FILE])"),
    "completion": ("shell", "register_completion", "print the shell completion script"),
    "manpage": ("shell", "register_manpage", "print the manual page (roff), e.g. rkllmctl manpage > rkllmctl.1; man -l rkllmctl.1"),
}


class UsageError(Exception):
    """The command line is wrong: argparse's errors (with ``usage``) and what it cannot see."""

    name = "usage"
    code = None
    details: dict[str, Any] = {}

    def __init__(self, message: str, usage: str = "", prog: str = "rkllmctl"):
        super().__init__(message)
        self.usage = usage
        self.prog = prog


class Aborted(Exception):
    """The command stopped before it changed anything, on purpose (``cache edit``: the
    editor could not run or failed, or the text was saved empty), as ``git commit`` does."""

    name = "aborted"
    code = None
    details: dict[str, Any] = {}


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are reported like every other error (JSON with --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, usage=self.format_usage(), prog=self.prog)


class _Verbs(argparse._SubParsersAction):
    """Subcommands whose options are added when one is chosen on the command line."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        _add_options(values[0], self.choices[values[0]])
        super().__call__(parser, namespace, values, option_string)


def _add_options(verb: str, parser: argparse.ArgumentParser) -> None:
    if parser.get_default("run") is None:  # not added yet
        module, function, _ = VERBS[verb]
        getattr(importlib.import_module(f"{__name__}.{module}"), function)(parser)


def build_parser(whole: bool = False) -> Parser:
    """The command line; ``whole``: with every verb's options at once (for the man page,
    the completion scripts and tests)."""
    parser = Parser(prog="rkllmctl", description="Talk to rkllmd: generate, chat, manage prompt caches.")
    parser.add_argument("--socket", type=Path, help="daemon socket (default: as rkllmd resolves it, or /run/rkllmd/rkllmd.sock)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon's first answer (default 10)")
    parser.add_argument("--version", action="version", version=f"rkllmctl {__version__}")
    # Also before the command (``rkllmctl --json status``), as scripts tend to write it; its
    # own dest, since a command's --json default would overwrite a shared one.
    parser.add_argument("--json", dest="json_first", action="store_true",
                        help="machine-readable output where the command has it (as the command's --json), and errors as JSON")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Verbs)
    for verb, (_, _, help) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help)
        if whole:
            _add_options(verb, verb_parser)
    return parser


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def read_json(path: Path | None, option: str, kind: type) -> Any:
    """The JSON value of an option's file (None without the option); UsageError if it is
    not readable or not a ``kind``."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: {exc}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{option} {path}: expected a JSON {'array' if kind is list else 'object'}, not {type(value).__name__}")
    return value
