"""``rkllmctl``: the shell face of the client. Exit codes are decided here and only here."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rkllmd import __version__

from . import commands
from .client import Client
from .errors import DaemonError, DaemonUnreachable, PermissionDenied, ProtocolViolation


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Callable[[], Client]], int] = args.run
    try:
        return run(args, lambda: Client(args.socket, timeout=args.timeout))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except commands.UsageError as exc:
        print(f"rkllmctl: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except PermissionDenied as exc:
        print(f"rkllmctl: {exc}", file=sys.stderr)
        return ExitCode.PERMISSION
    except DaemonUnreachable as exc:
        print(f"rkllmctl: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except ProtocolViolation as exc:
        print(f"rkllmctl: protocol error: {exc}", file=sys.stderr)
        return ExitCode.PROTOCOL
    except DaemonError as exc:
        print(f"rkllmctl: {exc}", file=sys.stderr)
        return ExitCode.TIMEOUT if exc.name == "timeout" else ExitCode.DAEMON_ERROR
    except BrokenPipeError:
        return ExitCode.OK  # stdout closed early (| head): not an error of ours


if __name__ == "__main__":
    sys.exit(main())
