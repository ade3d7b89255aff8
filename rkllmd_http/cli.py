"""``rkllmd-http``: serve the OpenAI and Ollama APIs in front of rkllmd, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from rkllmd import __version__
from rkllmd.config import ConfigError, load

from .server import KeyFileError, read_keys, serve, split_listen

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rkllmd-http",
        description="OpenAI- and Ollama-compatible HTTP API in front of the rkllmd daemon (a client of its socket).",
        epilog="Settings: the [http] section of the TOML file, RKLLMD_HTTP_* variables, then these flags (docs/http.md).")
    parser.add_argument("--config", type=Path, help="TOML file (default: /etc/rkllmd/rkllmd.toml when it exists)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080; port 0: any free port)")
    parser.add_argument("--socket", help="the daemon's socket (default: the daemon's own, from the same file)")
    parser.add_argument("--api-key-file", help="accepted API keys, one a line; requests then need Authorization: Bearer KEY")
    parser.add_argument("--cors-origins", help="origins allowed from browsers, comma-separated, or *")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"rkllmd-http {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger("rkllmd_http")
    flags = {
        "http.listen": args.listen,
        "http.socket": args.socket,
        "http.api_key_file": args.api_key_file,
        "http.cors_origins": args.cors_origins,
        "http.log_level": args.log_level,
    }
    try:
        config = load(args.config, flags=flags)
        split_listen(config.http.listen)
        keys = read_keys(config.http.api_key_file) if config.http.api_key_file else ()
    except (ConfigError, KeyFileError, ValueError) as exc:
        log.error("configuration: %s", exc)
        return 2
    logging.getLogger().setLevel(config.http.log_level.upper())
    try:
        asyncio.run(serve(config.http, config.http.socket or config.daemon.socket, keys))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        log.error("cannot listen on %s: %s", config.http.listen, exc.strerror or exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
