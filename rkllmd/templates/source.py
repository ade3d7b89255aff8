"""Where a model's chat template comes from: configuration, the model file, the family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .families import FAMILIES
from .template import ChatTemplate, TemplateError

MAX_FILE_BYTES = 4 << 20
#: Where a GGUF model file keeps its chat template (also the template's name then).
GGUF_KEY = "tokenizer.chat_template"


def resolve(configured: str, model_metadata: Mapping[str, Any] | None, family: str, **kw: Any) -> ChatTemplate:
    """The first that exists: ``configured`` (a family name, a ``.jinja`` file or a
    ``tokenizer_config.json``), the model file's ``tokenizer.chat_template`` (GGUF
    metadata), the built-in template of ``family``."""
    tokens = gguf_tokens(model_metadata or {})
    if configured:
        return load(configured, tokens, **kw)
    text = (model_metadata or {}).get(GGUF_KEY)
    if isinstance(text, str) and text:
        return ChatTemplate.from_text(GGUF_KEY, text, tokens, **kw)
    return ChatTemplate.of_family(family, **kw)


def load(spec: str, tokens: Mapping[str, str] | None = None, **kw: Any) -> ChatTemplate:
    """A family by name, or a file. ``tokens``: the model's special tokens, for a file
    that does not give them (a ``.jinja`` file never does)."""
    if spec in FAMILIES:
        return ChatTemplate.of_family(spec, **kw)
    path = Path(spec)
    if path.suffix not in (".jinja", ".json"):
        raise TemplateError(
            f"unknown chat template {spec!r}; known: {', '.join(sorted(FAMILIES))}, or a .jinja or tokenizer_config.json file"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise TemplateError(f"chat template file {path} is larger than {MAX_FILE_BYTES} bytes")
        text = data.decode("utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read chat template file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TemplateError(f"chat template file {path} is not UTF-8") from None
    if path.suffix == ".jinja":
        return ChatTemplate.from_text(str(path), text, dict(tokens or {}), **kw)
    template, file_tokens = tokenizer_config(path, text)
    return ChatTemplate.from_text(str(path), template, {**(tokens or {}), **file_tokens}, **kw)


def tokenizer_config(path: Path, text: str) -> tuple[str, dict[str, str]]:
    """The ``chat_template`` of a Hugging Face ``tokenizer_config.json`` (the default one
    when it holds several) and its special tokens."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise TemplateError(f"{path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise TemplateError(f"{path} is not a tokenizer_config.json (not an object)")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise TemplateError(f"{path} has no chat_template")
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return template, tokens


def gguf_tokens(metadata: Mapping[str, Any]) -> dict[str, str]:
    """bos_token/eos_token as text, from a GGUF's token list and ids."""
    names = metadata.get("tokenizer.ggml.tokens")
    tokens = {}
    for key in ("bos", "eos", "unknown", "padding"):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if names is not None and isinstance(index, int) and 0 <= index < len(names):
            tokens[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = str(names[index])
    return tokens
