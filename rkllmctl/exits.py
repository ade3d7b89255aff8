"""rkllmctl's exit codes and what each means (README.md, the man page's EXIT STATUS).

Which error gets which code is decided in one place, ``cli.exit_code``."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
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
    ExitCode.DAEMON_ERROR: "the daemon answered with an error, or cut a generation short (it is shutting down); "
    "or cache edit changed nothing (the editor could not run or failed, or the text was saved empty)",
    ExitCode.USAGE: "usage error",
    ExitCode.UNREACHABLE: "the daemon is not reachable (no socket, nothing listening, no answer within --timeout), or it closed the connection during a generation",
    ExitCode.PROTOCOL: "the daemon said something the protocol does not allow (a bug on one side)",
    ExitCode.PERMISSION: "permission denied on the socket: only members of group rkllm may use it",
    ExitCode.TIMEOUT: "cache wait ran out of time",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C; the generation was cancelled on the daemon",
}
