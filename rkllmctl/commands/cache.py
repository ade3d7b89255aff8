"""rkllmctl cache ls|show|put|edit|rm|rebuild|wait: manage prompt caches."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rkllmd.schema import OPERATIONS

from ..errors import DaemonError
from ..terminal import StatusLine
from . import Aborted, UsageError, print_json


def register(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("ls", help="every text cache and the state of its binary cache")
    v.add_argument("--json", action="store_true", help="the daemon's listing as JSON")
    v.add_argument("--names", action="store_true", help="the names alone, one a line (for scripts and shell completion)")
    v.add_argument("-m", "--model", help="whose binary caches (text caches are shared by every model); default: the default model's")
    v.set_defaults(run=ls)

    v = verbs.add_parser("show", help="one cache's text and state")
    v.add_argument("name")
    v.add_argument("-m", "--model", help="whose binary caches (text caches are shared by every model); default: the default model's")
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=show)

    v = verbs.add_parser("put", help="create or replace a text cache")
    v.add_argument("name")
    v.add_argument("text", nargs="?", help="the text; '-' reads stdin")
    v.add_argument("--file", type=Path, help="read the text from this file")
    v.set_defaults(run=put)

    v = verbs.add_parser("edit", help="edit the text cache in $VISUAL or $EDITOR (a new NAME starts empty); saved empty: nothing changes")
    v.add_argument("name")
    v.set_defaults(run=edit)

    v = verbs.add_parser("rm", help="delete a text cache and its binary caches")
    v.add_argument("name")
    v.set_defaults(run=rm)

    v = verbs.add_parser("rebuild", help="build binary caches again")
    v.add_argument("name", nargs="?")
    v.add_argument("--all", action="store_true", help="every cache")
    v.add_argument("-m", "--model", help="whose binary caches (text caches are shared by every model); default: the default model's")
    v.set_defaults(run=rebuild)

    v = verbs.add_parser("wait", help="return when the binary cache matches the current text")
    v.add_argument("name")
    v.add_argument("-m", "--model", help="whose binary caches (text caches are shared by every model); default: the default model's")
    timeout = OPERATIONS["cache.wait"].field("timeout")
    v.add_argument("--timeout", type=float, default=timeout.default, help=f"seconds, up to {timeout.high:g} (default {timeout.default:g}); exit 124 when they run out")
    v.set_defaults(run=wait)


def _age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = time.time() - timestamp
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _state(row: dict[str, Any]) -> str:
    state = row["state"]
    if row.get("build"):  # since protocol 1.3, while it is built
        state += f" {build_percent(row['build'])}"
    return f"{state}: {row['reason']}" if row.get("reason") else state


def build_percent(build: dict[str, Any]) -> str:
    """A build's progress, "45% of 1800 tokens"; "" when the backend reports none (NPU)."""
    done, total = build.get("done"), build.get("total")
    if done is None or not total:
        return ""
    return f"{100 * done // total}% of {total} tokens"


def ls(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        listing = client.cache_ls(args.model)
    if args.json:
        print_json(listing)
        return 0
    rows = listing["caches"]
    if args.names:
        for row in rows:
            print(row["name"])
        return 0
    if not rows:
        print("no text caches")
        return 0
    if args.model:
        print(f"binary caches of model {listing['model']}")
    print(f"{'NAME':<24} {'TEXT':>8} {'TOKENS':>7} {'BINARY':>10} {'BUILT':>9} {'BUILD':>8}  STATE")
    for row in rows:
        binary = f"{row['binary_bytes'] / 2**20:.1f}M" if row.get("binary_bytes") else "-"
        build = f"{row['build_ms'] / 1000:.1f}s" if row.get("build_ms") else "-"
        hot = " (in memory)" if row.get("in_memory") else ""
        tokens = row.get("tokens") if row.get("tokens") is not None else "-"
        print(f"{row['name']:<24} {row.get('text_bytes') or 0:>7}B {tokens:>7} {binary:>10} {_age(row.get('built_at')):>9} {build:>8}  {_state(row)}{hot}")
    return 0


def show(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        info = client.cache_show(args.name, args.model)
    if args.json:
        print_json(info)
        return 0
    print(f"# {info['name']}: {_state(info)}; {info.get('tokens') or '?'} tokens; {info['path']}", file=sys.stderr)
    if info.get("text") is not None:
        sys.stdout.write(info["text"])
        if not info["text"].endswith("\n"):
            sys.stdout.write("\n")
    return 0


def put(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    if (args.file is None) == (args.text is None):
        raise UsageError("cache put takes exactly one of TEXT, '-' or --file F")
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--file {args.file}: {exc}") from None
    elif args.text == "-":
        text = sys.stdin.read()
    else:
        text = args.text
    with connect() as client:
        info = client.cache_put(args.name, text)
    print(f"{info['name']}: {_state(info)}", file=sys.stderr)
    return 0


def edit(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    """The editor works on a private copy; what it saves goes to the daemon with cache.put,
    so ``cache ls`` shows it as soon as this returns (no wait for the folder watcher), and a
    cache is never left half-written or empty. Saved empty, an editor that cannot run or
    fails: Aborted, and the cache (or its absence) stays as it was, as ``git commit`` does."""
    with connect() as client:
        try:
            shown = client.cache_show(args.name)  # also checks the name before the editor opens
        except DaemonError as exc:
            if exc.name != "not_found":
                raise
            shown = None
    if shown is not None and shown["text"] is None:
        raise Aborted(f"text cache {args.name} cannot be read ({shown['error']}): edit {shown['path']} itself")
    old = shown["text"] if shown is not None else None
    unchanged = f"text cache {args.name} not {'changed' if old is not None else 'created'}"
    with tempfile.TemporaryDirectory(prefix="rkllmctl-edit-") as folder:
        path = Path(folder) / f"{args.name}.txt"  # the name tells the editor what it edits
        path.write_text(old or "", encoding="utf-8")
        run_editor(path, unchanged)
        try:
            new = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Aborted(f"cannot read the edited text ({exc}); {unchanged}") from None
    if not new.strip():
        raise Aborted(f"Aborting: empty text cache; {unchanged}")
    if new == old:
        print(f"{args.name}: no changes", file=sys.stderr)
        return 0
    with connect() as client:
        info = client.cache_put(args.name, new)
    print(f"{info['name']}: {_state(info)}", file=sys.stderr)
    return 0


def run_editor(path: Path, unchanged: str) -> None:
    """$VISUAL, else $EDITOR, else vi, on ``path`` (the variable may hold arguments: "code --wait")."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        status = subprocess.call([*shlex.split(editor), str(path)])
    except (OSError, ValueError) as exc:  # not found, not executable; ValueError: unbalanced quotes
        raise Aborted(f"cannot run the editor {editor!r}: {getattr(exc, 'strerror', None) or exc}; {unchanged}") from None
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        raise Aborted(f"the editor {editor!r} {how}; {unchanged}")


def rm(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        client.cache_rm(args.name)
    return 0


def rebuild(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    if bool(args.name) == bool(args.all):
        raise UsageError("cache rebuild takes a NAME or --all")
    with connect() as client:
        result = client.cache_rebuild(args.name, args.model)
    print(f"queued: {', '.join(result['queued']) or 'nothing'}", file=sys.stderr)
    return 0


def wait(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        line = StatusLine(sys.stderr)
        try:
            info = wait_showing(client, args.name, args.timeout, line, args.model) if line.live else client.cache_wait(args.name, args.timeout, args.model)
        finally:
            line.clear()
    built = f", built in {info['build_ms'] / 1000:.2f} s" if info.get("build_ms") else ""
    print(f"{info['name']}: ready, {info['tokens']} tokens{built}", file=sys.stderr)
    return 0


#: On a terminal, cache wait asks for this long at a time and shows the build's progress between.
POLL_S = 0.25


def wait_showing(client: Any, name: str, timeout: float, line: StatusLine, model: str | None = None) -> dict[str, Any]:
    """cache.wait in short slices (the daemon answers a wait once), the build's percentage
    from cache.show on the status line between them."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        try:
            return client.cache_wait(name, min(POLL_S, left), model)
        except DaemonError as exc:
            if exc.name != "timeout" or left <= POLL_S:
                raise
        entry = client.cache_show(name, model)
        progress = build_percent(entry["build"]) if entry.get("build") else ""
        line.show(f"{name}: {entry['state']} {progress}".rstrip())
