"""rkllmctl models | create NAME --from BASE [...] | cp SOURCE DEST | rm NAME"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any, Callable

from . import UsageError, print_json


def register_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the listing as JSON")
    p.set_defaults(run=run_models)


def register_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the new model's name")
    p.add_argument("--from", dest="base", required=True, metavar="BASE", help="the model it derives from (it shares its weights)")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", metavar="TEXT", help="its system message (used when a request gives none)")
    system.add_argument("--system-file", type=Path, metavar="FILE", help="its system message, read from FILE")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a default sampling parameter (temperature, top_k, top_p, repeat_penalty, frequency_penalty, presence_penalty, max_tokens, seed); repeatable")
    p.add_argument("--template", metavar="FAMILY|FILE.jinja", help="its chat template: a family's name, or a .jinja file sent as its text")
    p.add_argument("--json", action="store_true", help="the model as JSON")
    p.set_defaults(run=run_create)


def register_copy(p: argparse.ArgumentParser) -> None:
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--json", action="store_true", help="the new model as JSON")
    p.set_defaults(run=run_copy)


def register_delete(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the deleted model as JSON")
    p.set_defaults(run=run_delete)


def run_models(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        listing = client.models()
    if args.json:
        print_json(listing)
        return 0
    loaded = {m["name"]: m for m in listing["loaded"]}
    print(f"{'NAME':<32} {'FROM':<24} {'LOADED':<22} SOURCE")
    for model in listing["models"]:
        weights = loaded.get(model["weights"])
        state = "no" if weights is None else _expiry(weights["expires_at"])
        name = model["name"] + (" (default)" if model["default"] else "")
        print(f"{name:<32} {model['base'] or model['path'] or '-':<24} {state:<22} {model['source']}")
    return 0


def _expiry(expires_at: float | None) -> str:
    if expires_at is None:
        return "yes, until stopped"
    return "yes, until " + datetime.datetime.fromtimestamp(expires_at).strftime("%H:%M:%S")


def run_create(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    system = args.system
    if args.system_file is not None:
        system = _read(args.system_file, "--system-file")
    parameters: dict[str, str] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE")
        parameters[key] = _number(value)
    template = args.template
    if template is not None and template.endswith(".jinja"):
        template = _read(Path(template), "--template")
    with connect() as client:
        model = client.create(args.name, args.base, system=system, parameters=parameters or None, template=template)
    _show(model, args.json, "created")
    return 0


def run_copy(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        model = client.copy(args.source, args.destination)
    _show(model, args.json, f"copied {args.source} to")
    return 0


def run_delete(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        model = client.delete(args.name)
    _show(model, args.json, "deleted")
    return 0


def _show(model: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        print_json(model)
    else:
        print(f"{verb} {model['name']}")


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: {exc}") from None


def _number(text: str) -> Any:
    """A parameter's value as the number it spells (the daemon checks its type and range)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    raise UsageError(f"--param value {text!r} is not a number")
