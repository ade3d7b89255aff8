"""``rkllmd``: run the daemon in the foreground (systemd style), logging to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .app import run
from .check import main as check_main
from .config import ConfigError, load

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None, check: bool = False) -> argparse.Namespace:
    """The daemon's flags; ``check`` adds those of ``rkllmd check``, which reads the same configuration."""
    if check:
        parser = argparse.ArgumentParser(
            prog="rkllmd check",
            description="Say whether rkllmd would start with this configuration, and what to fix if not, "
                        "without starting it; every configured model is listed with what its file says. "
                        "Exit status 0: it would start; 1: it would not, or a configured model could not load.")
        parser.add_argument("--json", action="store_true", help="the report as JSON, for scripts")
        parser.add_argument("--user", help="judge access for this account (default: the service's user rkllmd "
                                           "when it exists, else you)")
        parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                            help="look for the kernel's dev/, sys/ and proc/ under DIR (a copy of a board's; tests)")
    else:
        parser = argparse.ArgumentParser(
            prog="rkllmd", description="Serve a language model on the NPU (or the CPU) over a ZeroMQ socket.",
            epilog="rkllmd check [FLAGS] [--json]: check the setup without starting (see rkllmd check --help)")
    parser.add_argument("--config", type=Path, help="TOML file (default: /etc/rkllmd/rkllmd.toml when it exists)")
    parser.add_argument("--socket", help="socket path (ipc)")
    parser.add_argument("--cache-dir", help="folder of text caches (NAME.txt)")
    parser.add_argument("--binary-cache-dir", help="folder of binary caches")
    parser.add_argument("--model", help="model file (GGUF for the CPU backend, .rkllm for the NPU)")
    parser.add_argument("--backend", choices=("auto", "cpu", "rkllm"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"rkllmd {__version__}")
    return parser.parse_args(argv)


def flags_of(args: argparse.Namespace) -> dict[str, object]:
    flags: dict[str, object] = {
        "daemon.socket": args.socket,
        "cache.text_dir": args.cache_dir,
        "cache.binary_dir": args.binary_cache_dir,
        "daemon.backend": args.backend,
        "daemon.log_level": args.log_level,
    }
    if args.model:
        flags["rkllm.model" if args.model.endswith(".rkllm") else "model.path"] = args.model
    return flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = argv[:1] == ["check"]
    args = parse_args(argv[1:] if check else argv, check=check)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    try:
        config = load(args.config, flags=flags_of(args))
    except ConfigError as exc:
        logging.getLogger("rkllmd").error("configuration: %s", exc)
        return 2
    if check:
        return check_main(config, args.user, args.json, args.root)
    return run(config, reload_config=lambda: load(args.config, flags=flags_of(args)))


if __name__ == "__main__":
    sys.exit(main())
