"""``rkllmctl``: the shell face of the client. Exit codes are decided here and only here,
and errors reported here: on stderr, or with ``--json`` as one JSON object on stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .commands import Aborted, UsageError, build_parser, print_json
from .errors import DaemonError, DaemonUnreachable, GenerationCutShort, PermissionDenied, ProtocolViolation, RkllmError
from .exits import EXIT_CODES, ExitCode

__all__ = ["EXIT_CODES", "ExitCode", "build_parser", "exit_code", "main", "report"]


def exit_code(error: Exception) -> ExitCode:
    """The one place errors become exit codes (most specific type first)."""
    if isinstance(error, DaemonError):
        return ExitCode.TIMEOUT if error.name == "timeout" else ExitCode.DAEMON_ERROR
    for kind, code in (
        (UsageError, ExitCode.USAGE),
        (Aborted, ExitCode.DAEMON_ERROR),
        (GenerationCutShort, ExitCode.DAEMON_ERROR),
        (PermissionDenied, ExitCode.PERMISSION),
        (DaemonUnreachable, ExitCode.UNREACHABLE),
        (ProtocolViolation, ExitCode.PROTOCOL),
    ):
        if isinstance(error, kind):
            return code
    raise error


def report(error: UsageError | Aborted | RkllmError, as_json: bool) -> None:
    """The error on stderr, or as ``{"error": {code, name, message, details}}`` on stdout
    (the shape of the daemon's own error messages; ``code`` null for what never crossed
    the wire)."""
    if as_json:
        message = error.message if isinstance(error, DaemonError) else str(error)
        print_json({"error": {"code": error.code, "name": error.name, "message": message, "details": error.details}})
    elif isinstance(error, UsageError) and error.usage:
        print(f"{error.usage}{error.prog}: error: {error}", file=sys.stderr)
    else:
        prefix = "protocol error: " if isinstance(error, ProtocolViolation) else ""
        print(f"rkllmctl: {prefix}{error}", file=sys.stderr)


def connector(args: argparse.Namespace) -> Callable[[], Any]:
    """What a verb calls to reach the daemon (the socket client is imported only then)."""

    def connect() -> Any:
        from .client import Client

        return Client(args.socket, timeout=args.timeout)

    return connect


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv  # until the command line is understood
    try:
        args = build_parser().parse_args(argv)
        as_json = args.json = getattr(args, "json", False) or args.json_first
        run: Callable[[argparse.Namespace, Callable[[], Any]], int] = args.run
        return run(args, connector(args))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK  # stdout closed early (| head): not an error of ours
    except (UsageError, Aborted, RkllmError) as exc:
        report(exc, as_json)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
