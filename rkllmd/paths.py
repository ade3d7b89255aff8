"""Where things live by default, resolved the same way by the daemon and rkllmctl."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .config import Config

SOCKET_NAME = "rkllmd.sock"
SYSTEM_SOCKET = Path("/run/rkllmd") / SOCKET_NAME
#: Under the binary cache folder: the CPU backend's dequantized weights (see cpu/weights_file.py).
WEIGHTS_SUBDIR = "weights"
KERNELS_SUBDIR = "kernels"
#: Under the text cache folder: the files of pulled models.
MODELS_SUBDIR = "models"


def default_socket(environ: Mapping[str, str] | None = None, *, client: bool = False) -> Path:
    """$RKLLMD_SOCKET, else systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR/rkllmd,
    else a per-user folder under /tmp.

    A client (``client=True``) that finds no socket at its own default but finds the
    system service's /run/rkllmd/rkllmd.sock talks to that one.
    """
    env = os.environ if environ is None else environ
    if env.get("RKLLMD_SOCKET"):
        return Path(env["RKLLMD_SOCKET"])
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if env.get("XDG_RUNTIME_DIR"):
        own = Path(env["XDG_RUNTIME_DIR"]) / "rkllmd" / SOCKET_NAME
    else:
        own = Path(f"/tmp/rkllmd-{os.getuid()}") / SOCKET_NAME
    if client and not own.exists() and _present(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return own


def _present(path: Path) -> bool:
    """Exists, or sits in a folder we may not look into (the socket then says "permission denied")."""
    try:
        return path.exists()
    except PermissionError:
        return True


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    return Path(env.get(var) or Path.home() / fallback)


def default_text_dir(environ: Mapping[str, str] | None = None) -> Path:
    """systemd's StateDirectory, else $XDG_STATE_HOME/rkllmd/caches: a user's caches are
    theirs, wherever rkllmd runs from (never a source checkout's cache/, which holds examples)."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return _xdg(env, "XDG_STATE_HOME", ".local/state") / "rkllmd" / "caches"


def default_binary_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    return _xdg(env, "XDG_CACHE_HOME", ".cache") / "rkllmd"


def cache_dirs(config: Config) -> tuple[Path, Path]:
    text = Path(config["cache.text_dir"]).expanduser() if config["cache.text_dir"] else default_text_dir()
    binary = Path(config["cache.binary_dir"]).expanduser() if config["cache.binary_dir"] else default_binary_dir()
    return text, binary


def weights_dir(config: Config) -> Path | None:
    """Where the CPU backend keeps dequantized weights between starts (None: it does not)."""
    if not config["model.keep_weights"]:
        return None
    if config["model.weights_dir"]:
        return Path(config["model.weights_dir"]).expanduser()
    return cache_dirs(config)[1] / WEIGHTS_SUBDIR


def models_dir(config: Config) -> Path:
    """Where pulled models' files go: beside the text caches and models.json, in the state
    folder (/var/lib/rkllmd under systemd), which outlives caches that may be cleared."""
    if config["daemon.models_dir"]:
        return Path(config["daemon.models_dir"]).expanduser()
    return cache_dirs(config)[0] / MODELS_SUBDIR


def kernels_dir(config: Config) -> Path:
    """Where the CPU backend keeps its compiled decode step between starts."""
    if config["model.kernels_dir"]:
        return Path(config["model.kernels_dir"]).expanduser()
    return cache_dirs(config)[1] / KERNELS_SUBDIR
