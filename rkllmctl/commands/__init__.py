"""One module per rkllmctl verb: ``register(subparsers)`` adds it, ``run(args, connect)`` runs it."""

from __future__ import annotations

import json
import sys
from typing import Any


class UsageError(Exception):
    """The command line is inconsistent in a way argparse cannot see."""


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


from . import cache, chat, generate, status  # noqa: E402  (they use the helpers above)

MODULES = (generate, chat, status, cache)
