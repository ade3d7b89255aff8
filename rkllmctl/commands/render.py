"""rkllmctl render: the exact prompt text a chat renders to, as the daemon would prefill it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from . import UsageError, print_json, read_json


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=Path, required=True, metavar="FILE.json", help="the chat: a JSON list of messages")
    p.add_argument("--template", metavar="NAME|FILE", help="a family's name, a .jinja file or a tokenizer_config.json (default: the loaded model's)")
    p.add_argument("--tools", type=Path, metavar="FILE.json", help="a JSON list of tool schemas")
    p.add_argument("--vars", type=Path, metavar="FILE.json", help="a JSON object of template variables (enable_thinking, date_string, ...)")
    p.add_argument("--no-generation-prompt", action="store_true", help="do not end with the assistant's turn header")
    p.add_argument("--json", action="store_true", help='print {"text": ..., "tokens": N}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    messages = read_json(args.messages, "--messages", list)
    tools = read_json(args.tools, "--tools", list)
    variables = read_json(args.vars, "--vars", dict)
    template = template_text(args.template)
    with connect() as client:
        rendered = client.render(messages, tools=tools, vars=variables, template=template, add_generation_prompt=not args.no_generation_prompt)
    if args.json:
        print_json(rendered)
    else:
        sys.stdout.write(rendered["text"])  # exactly the prompt: no newline added
    return 0


def template_text(spec: str | None) -> str | None:
    """What ``--template`` sends: a family's name as it is, a file's template as text
    (the daemon never opens a path a client names)."""
    from rkllmd.templates import FAMILIES, TemplateError
    from rkllmd.templates.source import tokenizer_config

    if spec is None or spec in FAMILIES:
        return spec
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--template {spec}: neither a family ({', '.join(sorted(FAMILIES))}) nor a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--template {spec}: {exc}") from None
    if path.suffix == ".json":
        try:
            return tokenizer_config(path, text)[0]
        except TemplateError as exc:
            raise UsageError(f"--template: {exc}") from None
    return text
