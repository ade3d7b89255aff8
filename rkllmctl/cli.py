"""``rkllmctl``: the shell face of the client. Exit codes are decided here and only here."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rkllmd import __version__

from . import commands
from .client import Client
from .errors import DaemonError, DaemonUnreachable, PermissionDenied, ProtocolViolation, RkllmError


class ExitCode:
    """Documented in README.md and docs/protocol.md."""

    OK = 0
    DAEMON_ERROR = 1  # the daemon answered with an error
    USAGE = 2  # bad command line (argparse uses 2 as well)
    UNREACHABLE = 3  # no daemon at the socket, or it does not answer
    PROTOCOL = 4  # the daemon said something the protocol does not allow
    PERMISSION = 5  # the socket exists but this user may not use it
    TIMEOUT = 124  # `cache wait` ran out of time (as timeout(1))
    INTERRUPTED = 130  # Ctrl-C; the generation was cancelled on the daemon


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkllmctl", description="Talk to rkllmd: generate, chat, manage prompt caches.")
    parser.add_argument("--socket", help="daemon socket (default: as rkllmd resolves it, or /run/rkllmd/rkllmd.sock)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon's first answer (default 10)")
    parser.add_argument("--version", action="version", version=f"rkllmctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in commands.MODULES:
        module.register(sub)
    return parser


def exit_code(error: Exception) -> int:
    """The one place errors become exit codes (most specific type first)."""
    if isinstance(error, DaemonError):
        return ExitCode.TIMEOUT if error.name == "timeout" else ExitCode.DAEMON_ERROR
    for kind, code in (
        (commands.UsageError, ExitCode.USAGE),
        (PermissionDenied, ExitCode.PERMISSION),
        (DaemonUnreachable, ExitCode.UNREACHABLE),
        (ProtocolViolation, ExitCode.PROTOCOL),
    ):
        if isinstance(error, kind):
            return code
    raise error


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Callable[[], Client]], int] = args.run
    try:
        return run(args, lambda: Client(args.socket, timeout=args.timeout))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK  # stdout closed early (| head): not an error of ours
    except (commands.UsageError, RkllmError) as exc:
        prefix = "protocol error: " if isinstance(exc, ProtocolViolation) else ""
        print(f"rkllmctl: {prefix}{exc}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
