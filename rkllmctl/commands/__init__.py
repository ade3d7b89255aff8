"""One module per rkllmctl verb: ``register(subparsers)`` adds it, ``run(args, connect)`` runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """The command line is wrong: argparse's errors (with ``usage``) and what it cannot see."""

    name = "usage"
    code = None
    details: dict[str, Any] = {}

    def __init__(self, message: str, usage: str = "", prog: str = "rkllmctl"):
        super().__init__(message)
        self.usage = usage
        self.prog = prog


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


from . import cache, chat, generate, render, shell, status  # noqa: E402  (they use the helpers above)

MODULES = (generate, chat, render, status, cache, shell)
