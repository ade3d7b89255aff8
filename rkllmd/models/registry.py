"""The model registry: every model the daemon serves by name, from the configuration and
created at run time.

A model is a weights file plus a template, a system message and default sampling
parameters. The configuration's ``[model]`` (and ``[rkllm]`` on the NPU) is the default
model; ``[models.NAME]`` tables add more. ``create NAME --from BASE`` derives a model
from another: it shares its base's weights (the same loaded backend, no memory of its
own) and overrides only what it names. Created models are kept in one JSON file written
atomically (temporary file, fsync, rename, fsync of the folder): a kill -9 leaves the
old file or the new one, never half of one; an unreadable file is set aside and logged,
never a reason not to start.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..protocol import ErrorCode, WireError
from ..store import atomic_write

log = logging.getLogger(__name__)

#: Ollama's implicit tag: ``smollm2`` and ``smollm2:latest`` name the same model.
LATEST = ":latest"
MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
#: Sampling defaults a model may set (its Ollama ``parameters``): generate's field -> type.
PARAMETERS: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "repeat_penalty": float,
    "frequency_penalty": float, "presence_penalty": float, "max_tokens": int, "seed": int,
}
#: Ollama's names for the same parameters.
PARAMETER_ALIASES = {"num_predict": "max_tokens"}
FILE_VERSION = 1


class ModelError(WireError):
    """A registry change refused: the message says why."""


def canonical(name: object) -> str:
    """``name`` as the registry keys it (without Ollama's ``:latest``), or ``invalid_name``."""
    if not isinstance(name, str) or not name:
        raise ModelError(ErrorCode.INVALID_NAME, "a model name must be a non-empty string")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name) or ".." in name:
        raise ModelError(ErrorCode.INVALID_NAME, f"invalid model name {name!r}: letters, digits and . _ : / - (at most {MAX_NAME_CHARS}, no '..')")
    return name[: -len(LATEST)] if name.endswith(LATEST) else name


def checked_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as a model's default parameters, each of the type generate takes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = PARAMETER_ALIASES.get(key, key)
        kind = PARAMETERS.get(key)
        if kind is None:
            raise ModelError(ErrorCode.INVALID_FIELD, f"unknown parameter {key!r}; known: {', '.join(sorted(PARAMETERS))}", field="parameters")
        if isinstance(value, str):  # from a command line: k=v
            try:
                value = kind(value)
            except ValueError:
                raise ModelError(ErrorCode.INVALID_FIELD, f"parameter {key!r} must be {kind.__name__}, not {value!r}", field="parameters") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not isinstance(value, int):
            raise ModelError(ErrorCode.INVALID_FIELD, f"parameter {key!r} must be {kind.__name__}, not {value!r}", field="parameters")
        out[key] = kind(value)
    return out


@dataclass(frozen=True)
class Model:
    """One name the daemon answers to."""

    name: str
    #: The weights file ("" with no base: the default model's, as [model]/[rkllm] say).
    path: str = ""
    template: str = ""  # a family name or Jinja text; "": the weights' own
    system: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    base: str | None = None  # a derived model: whose weights it runs on
    source: str = "config"  # "config", "created" or "pulled" (a file from the hub: ``path`` is under daemon.models_dir)
    created_at: float = 0.0
    embedding_only: bool = False  # a [models.NAME] with its own weights that only embeds
    #: A .rkllm model's tokenizer.json ([models.NAME] tokenizer; configured only, not on the wire).
    tokenizer: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "template": self.template, "system": self.system,
            "parameters": dict(self.parameters), "base": self.base, "source": self.source, "created_at": self.created_at,
            "embedding_only": self.embedding_only,
        }


def configured_models(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Model]:
    """The configuration's [models.NAME] tables (``Config.models``, checked by its loader) as models."""
    return {
        name: Model(name, path=str(Path(keys["path"]).expanduser()) if "path" in keys else "", template=keys.get("template", ""),
                    system=keys.get("system"), parameters=keys.get("parameters", {}), base=keys.get("from"),
                    embedding_only=keys.get("embedding_only", False),
                    tokenizer=str(Path(keys["tokenizer"]).expanduser()) if "tokenizer" in keys else "")
        for name, keys in tables.items()
    }


@dataclass(frozen=True)
class Resolved:
    """A model with its overrides applied over its bases' and the weights it runs on."""

    model: Model
    weights: Model  # the root of its chain: the model whose file is loaded
    template: str
    system: str | None
    parameters: Mapping[str, Any]


class Registry:
    """Every model by name; thread-safe (the socket loop and the disk thread use it)."""

    def __init__(self, default: str, configured: Mapping[str, Model], file: Path | None):
        self.default = canonical(default)
        self.file = file
        self._lock = threading.Lock()
        self._configured = {self.default: Model(self.default), **{canonical(n): replace(m, name=canonical(n)) for n, m in configured.items()}}
        self._created: dict[str, Model] = self._read() if file is not None else {}

    def reconfigured(self, configured: Mapping[str, Model]) -> Registry:
        """A registry with these configured models and our created ones (a reload's), checked
        whole: each configured model's chain of bases ends at a weights file."""
        other = Registry.__new__(Registry)
        other.default, other.file, other._lock = self.default, self.file, threading.Lock()
        other._configured = {self.default: Model(self.default), **{canonical(n): replace(m, name=canonical(n)) for n, m in configured.items()}}
        with self._lock:
            other._created = {n: m for n, m in self._created.items() if n not in other._configured}
        for name in configured:
            other.resolve(name)
        return other

    def adopt(self, other: Registry) -> None:
        """Take ``other``'s models (from ``reconfigured``) as ours."""
        with self._lock:
            self._configured, self._created = other._configured, other._created

    # -- reading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted({**self._configured, **self._created})

    def get(self, name: str | None) -> Model:
        """The model ``name`` names (None or "": the default), or ``not_found``."""
        key = self.default if not name else canonical(name)
        with self._lock:
            model = self._created.get(key) or self._configured.get(key)
        if model is None:
            raise WireError(ErrorCode.NOT_FOUND, f"model {name!r} not found", model=name)
        return model

    def resolve(self, name: str | None) -> Resolved:
        """``name``'s model with its chain of bases folded in (each overriding its base)."""
        chain = [self.get(name)]
        while chain[-1].base is not None:
            if len(chain) > 64:
                raise WireError(ErrorCode.INTERNAL, f"model {name!r}: its chain of bases does not end")
            chain.append(self.get(chain[-1].base))
        template, system, parameters = "", None, {}
        for model in reversed(chain):
            template = model.template or template
            system = model.system if model.system is not None else system
            parameters = {**parameters, **model.parameters}
        return Resolved(chain[0], chain[-1], template, system, parameters)

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            models = {**self._configured, **self._created}
        return [{**models[n].public(), "default": n == self.default, "weights": self._root(models, n)} for n in sorted(models)]

    @staticmethod
    def _root(models: Mapping[str, Model], name: str) -> str:
        seen = 0
        while models[name].base is not None and models[name].base in models and seen < 64:
            name, seen = models[name].base, seen + 1  # type: ignore[assignment]
        return name

    # -- changing (each change written before it is answered) ------------------------------

    def create(self, name: str, base: str, *, system: str | None = None, parameters: Mapping[str, Any] | None = None, template: str = "") -> Model:
        key = canonical(name)
        base_model = self.get(base)
        with self._lock:
            if key in self._configured:
                raise ModelError(ErrorCode.INVALID_NAME, f"model {key!r} comes from the configuration; edit it there", field="model")
            if key == base_model.name or self._depends_on(key, base_model.name):
                raise ModelError(ErrorCode.INVALID_FIELD, f"model {key!r} cannot derive from itself", field="from")
            model = Model(key, template=template, system=system, parameters=checked_parameters(parameters or {}), base=base_model.name,
                          source="created", created_at=time.time())
            self._commit({**self._created, key: model})
        return model

    def copy(self, source: str, destination: str) -> Model:
        """``destination`` as a copy of ``source``: a derived model of the same base with the
        same overrides (a copy of a configured model derives from it)."""
        original, key = self.get(source), canonical(destination)
        with self._lock:
            if key in self._configured:
                raise ModelError(ErrorCode.INVALID_NAME, f"model {key!r} comes from the configuration; edit it there", field="destination")
            if original.source == "created":
                model = replace(original, name=key, created_at=time.time())
            else:
                model = Model(key, base=original.name, source="created", created_at=time.time())
            if self._depends_on(key, model.base or ""):
                raise ModelError(ErrorCode.INVALID_FIELD, f"model {key!r} cannot derive from itself", field="destination")
            self._commit({**self._created, key: model})
        return model

    def delete(self, name: str) -> Model:
        key = canonical(name)
        with self._lock:
            if key in self._configured:
                raise ModelError(ErrorCode.INVALID_NAME, f"model {key!r} comes from the configuration; remove it there", field="model")
            model = self._created.get(key)
            if model is None:
                raise WireError(ErrorCode.NOT_FOUND, f"model {name!r} not found", model=name)
            users = sorted(n for n, m in self._created.items() if m.base == key)
            if users:
                raise ModelError(ErrorCode.INVALID_FIELD, f"model {key!r} is the base of {', '.join(users)}; delete those first", field="model")
            self._commit({n: m for n, m in self._created.items() if n != key})
        return model

    def pulled(self, name: str, path: str) -> tuple[Model, Model | None]:
        """``name`` as the model of a pulled weights file, and the model it replaced (a pull of
        the same name again: Ollama's update); never a configured or created model's name."""
        key = canonical(name)
        with self._lock:
            old = self._pullable(key)
            model = Model(key, path=path, source="pulled", created_at=time.time())
            self._commit({**self._created, key: model})
        return model, old

    def check_pullable(self, name: str) -> str:
        """``name``'s key if a pull may take it (before a download that would be refused after)."""
        key = canonical(name)
        with self._lock:
            self._pullable(key)
        return key

    def _pullable(self, key: str) -> Model | None:
        """The pulled model ``key`` names now, if any (the lock is held); never a configured or created one's name."""
        if key in self._configured:
            raise ModelError(ErrorCode.INVALID_NAME, f"model {key!r} comes from the configuration; pull under another name", field="name")
        old = self._created.get(key)
        if old is not None and old.source != "pulled":
            raise ModelError(ErrorCode.INVALID_NAME, f"model {key!r} exists (derived from {old.base}); delete it first or pull under another name", field="name")
        return old

    def uses(self, path: str) -> list[str]:
        """The models whose weights file is ``path``."""
        with self._lock:
            return sorted(n for n, m in {**self._configured, **self._created}.items() if m.path == path)

    def _depends_on(self, name: str, base: str) -> bool:
        """Whether ``base`` is ``name`` or derives from it (the lock is held)."""
        models = {**self._configured, **self._created}
        seen = 0
        while base and seen < 64:
            if base == name:
                return True
            base, seen = (models[base].base or "") if base in models else "", seen + 1
        return False

    def _commit(self, created: dict[str, Model]) -> None:
        if self.file is not None:
            data = {"version": FILE_VERSION, "models": [m.public() for m in created.values()]}
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.file, json.dumps(data, indent=1, sort_keys=True).encode(), mode=0o640)
            except OSError as exc:
                raise WireError(ErrorCode.STORAGE, f"cannot write {self.file}: {exc.strerror or exc}", errno=exc.errno) from None
        self._created = created

    def _read(self) -> dict[str, Model]:
        """The created models on disk; a file that cannot be read is renamed aside (kept for
        whoever wants to look) and the daemon starts with none."""
        assert self.file is not None
        try:
            data = json.loads(self.file.read_bytes())
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("models"), list):
                raise ValueError("not a models file of version 1")
            models = {}
            for item in data["models"]:
                model = Model(**{k: item[k] for k in asdict(Model("x")) if k in item})
                source = "pulled" if model.source == "pulled" else "created"
                model = replace(model, name=canonical(model.name), parameters=checked_parameters(model.parameters), source=source)
                if model.name in self._configured:
                    log.warning("%s: model %s is configured too; the configuration's is used", self.file, model.name)
                    continue
                models[model.name] = model
            return models
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, WireError) as exc:
            aside = self.file.with_name(f"{self.file.name}.unreadable-{int(time.time())}")
            log.error("%s cannot be read (%s); set aside as %s, starting without created models", self.file, exc, aside.name)
            try:
                self.file.rename(aside)
            except OSError:
                pass
            return {}
