"""``rkllmctl``: the shell face of the client. Exit codes are decided here and only here,
and errors reported here: on stderr, or with ``--json`` as one JSON object on stdout."""

from __future__ import annotations

import argparse
import enum
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from rkllmd import __version__

from . import commands
from .client import Client
from .errors import DaemonError, DaemonUnreachable, GenerationCutShort, PermissionDenied, ProtocolViolation, RkllmError


class ExitCode(enum.IntEnum):
    """Documented in README.md and the man page (EXIT_CODES)."""

    OK = 0
    DAEMON_ERROR = 1
    USAGE = 2  # argparse uses 2 as well
    UNREACHABLE = 3
    PROTOCOL = 4
    PERMISSION = 5
    TIMEOUT = 124  # as timeout(1)
    INTERRUPTED = 130  # as a shell reports SIGINT


EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.DAEMON_ERROR: "the daemon answered with an error, or cut a generation short (it is shutting down)",
    ExitCode.USAGE: "usage error",
    ExitCode.UNREACHABLE: "the daemon is not reachable (no socket, nothing listening, no answer within --timeout), or it closed the connection during a generation",
    ExitCode.PROTOCOL: "the daemon said something the protocol does not allow (a bug on one side)",
    ExitCode.PERMISSION: "permission denied on the socket: only members of group rkllm may use it",
    ExitCode.TIMEOUT: "cache wait ran out of time",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C; the generation was cancelled on the daemon",
}


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are reported like every other error (JSON with --json)."""

    def error(self, message: str) -> NoReturn:
        raise commands.UsageError(message, usage=self.format_usage(), prog=self.prog)


def build_parser() -> Parser:
    parser = Parser(prog="rkllmctl", description="Talk to rkllmd: generate, chat, manage prompt caches.")
    parser.add_argument("--socket", type=Path, help="daemon socket (default: as rkllmd resolves it, or /run/rkllmd/rkllmd.sock)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon's first answer (default 10)")
    parser.add_argument("--version", action="version", version=f"rkllmctl {__version__}")
    # Also before the command (``rkllmctl --json status``), as scripts tend to write it; its
    # own dest, since a command's --json default would overwrite a shared one.
    parser.add_argument("--json", dest="json_first", action="store_true",
                        help="machine-readable output where the command has it (as the command's --json), and errors as JSON")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in commands.MODULES:
        module.register(sub)
    return parser


def exit_code(error: Exception) -> ExitCode:
    """The one place errors become exit codes (most specific type first)."""
    if isinstance(error, DaemonError):
        return ExitCode.TIMEOUT if error.name == "timeout" else ExitCode.DAEMON_ERROR
    for kind, code in (
        (commands.UsageError, ExitCode.USAGE),
        (GenerationCutShort, ExitCode.DAEMON_ERROR),
        (PermissionDenied, ExitCode.PERMISSION),
        (DaemonUnreachable, ExitCode.UNREACHABLE),
        (ProtocolViolation, ExitCode.PROTOCOL),
    ):
        if isinstance(error, kind):
            return code
    raise error


def report(error: commands.UsageError | RkllmError, as_json: bool) -> None:
    """The error on stderr, or as ``{"error": {code, name, message, details}}`` on stdout
    (the shape of the daemon's own error messages; ``code`` null for what never crossed
    the wire)."""
    if as_json:
        message = error.message if isinstance(error, DaemonError) else str(error)
        commands.print_json({"error": {"code": error.code, "name": error.name, "message": message, "details": error.details}})
    elif isinstance(error, commands.UsageError) and error.usage:
        print(f"{error.usage}{error.prog}: error: {error}", file=sys.stderr)
    else:
        prefix = "protocol error: " if isinstance(error, ProtocolViolation) else ""
        print(f"rkllmctl: {prefix}{error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv  # until the command line is understood
    try:
        args = build_parser().parse_args(argv)
        as_json = args.json = getattr(args, "json", False) or args.json_first
        run: Callable[[argparse.Namespace, Callable[[], Client]], int] = args.run
        return run(args, lambda: Client(args.socket, timeout=args.timeout))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK  # stdout closed early (| head): not an error of ours
    except (commands.UsageError, RkllmError) as exc:
        report(exc, as_json)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
