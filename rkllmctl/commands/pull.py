"""rkllmctl pull hf.co/OWNER/REPO[/FILE][:TAG] [--name NAME] [--revision REV]"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..terminal import StatusLine


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="hf.co/OWNER/REPO[/FILE][:TAG]",
                   help="a Hugging Face repository, and the .gguf or .rkllm file in it (a path, or a quantization tag such as Q8_0) when it has several")
    p.add_argument("--name", help="the model's name (default: hf.co/OWNER/REPO[:TAG], as Ollama names it)")
    p.add_argument("--revision", help="a branch, tag or commit of the repository (default: main)")
    p.add_argument("--json", action="store_true", help="each status as a JSON line on stdout, then the result as one")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    """Statuses on stderr (the download's bytes on a live line at a terminal), the model's
    name on stdout; Ctrl-C cancels on the daemon, which keeps the bytes for the next pull."""
    with connect() as client:
        stream = client.pull(args.source, name=args.name, revision=args.revision)
        line = StatusLine(sys.stderr)
        shown = None
        try:
            for event in stream:
                if args.json:
                    print(json.dumps({"status": event.status, "digest": event.digest, "total": event.total, "completed": event.completed}), flush=True)
                elif event.total is not None and line.live:
                    line.show(f"{event.status} {100 * (event.completed or 0) // max(1, event.total)}% {_mib(event.completed or 0)}/{_mib(event.total)}")
                elif event.status != shown:
                    line.clear()
                    print(event.status, file=sys.stderr, flush=True)
                shown = event.status
        except KeyboardInterrupt:
            line.clear()
            stream.cancel()
            raise
        finally:
            line.clear()
    result = stream.result
    assert result is not None
    if args.json:
        print(json.dumps(result), flush=True)
    elif result["finish_reason"] == "success":
        print(result["model"])
    else:  # cancelled by someone else (another client's cancel cannot reach it: the daemon stopping)
        print("rkllmctl: the pull was cancelled; pull again to resume it", file=sys.stderr)
    return 0 if result["finish_reason"] == "success" else 1


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
