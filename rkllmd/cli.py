"""``rkllmd``: run the daemon in the foreground (systemd style), logging to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .app import run
from .config import ConfigError, load

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rkllmd", description="Serve a language model on the NPU (or the CPU) over a ZeroMQ socket.")
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
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    try:
        config = load(args.config, flags=flags_of(args))
    except ConfigError as exc:
        logging.getLogger("rkllmd").error("configuration: %s", exc)
        return 2
    return run(config, reload_config=lambda: load(args.config, flags=flags_of(args)))


if __name__ == "__main__":
    sys.exit(main())
