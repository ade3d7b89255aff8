"""The protocol schema is the one declaration: the docs' tables, the client's methods and
the daemon's commands all follow it (no daemon needed here)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from rkllmctl.client import Client
from rkllmd.commands import REGISTRY
from rkllmd.protocol import ErrorCode, WireError
from rkllmd.schema import ERRORS, MINOR_VERSIONS, OPERATIONS, PROTOCOL_MINOR, doc_blocks, parse, render_doc, tables

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SETTINGS = {"sampling.temperature": 0.0, "sampling.top_k": 40, "sampling.top_p": 0.95, "sampling.repeat_penalty": 1.0,
            "sampling.frequency_penalty": 0.0, "sampling.presence_penalty": 0.0, "sampling.max_tokens": 256, "daemon.max_tokens_limit": 4096}

#: Client methods whose parameters are named otherwise than the fields they fill.
RENAMED = {("cancel", "request_id"): "target", ("create", "base"): "from"}


def test_docs_tables_are_the_schemas() -> None:
    text = PROTOCOL_DOC.read_text()
    assert sorted(doc_blocks(text)) == sorted(tables()), "docs/protocol.md must hold every generated table once"
    assert render_doc(text) == text, "docs/protocol.md differs from rkllmd/schema.py: run python -m rkllmd.schema docs/protocol.md"


def test_every_error_code_is_documented_and_every_minor_described() -> None:
    assert set(ERRORS) == set(ErrorCode)
    assert sorted(MINOR_VERSIONS) == list(range(PROTOCOL_MINOR + 1))
    for op in OPERATIONS.values():
        assert 0 <= op.since <= PROTOCOL_MINOR and all(0 <= f.since <= PROTOCOL_MINOR for f in op.fields), op.name


def test_every_operation_has_its_command_and_its_client_method() -> None:
    assert set(REGISTRY) == set(OPERATIONS)
    for op in OPERATIONS.values():
        method = getattr(Client, op.name.replace(".", "_"))
        params = [p for p in inspect.signature(method).parameters if p != "self"]
        assert {RENAMED.get((op.name, p), p) for p in params} == {f.name for f in op.fields}, op.name


def test_the_client_refuses_fields_the_schema_does_not_have() -> None:
    client = Client.__new__(Client)  # no socket: refused before anything is sent
    with pytest.raises(TypeError, match="generate has no field temprature"):
        client.send("generate", prompt="x", temprature=0.5)


def test_parse_fills_defaults_from_the_configuration_and_checks_bounds_from_it() -> None:
    args = parse(OPERATIONS["generate"], {"prompt": "hi", "temperature": 1}, SETTINGS.__getitem__)
    assert args["temperature"] == 1.0 and isinstance(args["temperature"], float)
    assert args["top_k"] == 40 and args["max_tokens"] == 256 and args["stop"] == () and args["no_cache"] is False
    assert args["messages"] is None and args["seed"] is None
    with pytest.raises(WireError) as refused:
        parse(OPERATIONS["generate"], {"prompt": "hi", "max_tokens": 4097}, SETTINGS.__getitem__)
    assert refused.value.code == ErrorCode.INVALID_FIELD and refused.value.details == {"field": "max_tokens"}


@pytest.mark.parametrize(
    "op, fields, code, field",
    [
        ("generate", {}, ErrorCode.INVALID_FIELD, "prompt"),
        ("generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, ErrorCode.INVALID_FIELD, "messages"),
        ("generate", {"prompt": "x", "cache": 3}, ErrorCode.INVALID_FIELD, "cache"),
        ("generate", {"prompt": "x", "cache": "../etc"}, ErrorCode.INVALID_NAME, None),
        ("generate", {"prompt": "x", "top_p": float("nan")}, ErrorCode.INVALID_FIELD, "top_p"),
        ("generate", {"prompt": "x", "seed": True}, ErrorCode.INVALID_FIELD, "seed"),
        ("cancel", {"target": 1.5}, ErrorCode.INVALID_FIELD, "target"),
        ("cache.wait", {"name": "a", "timeout": 3601}, ErrorCode.INVALID_FIELD, "timeout"),
        ("cache.put", {"name": "a"}, ErrorCode.INVALID_FIELD, "text"),
    ],
)
def test_parse_refuses_with_the_documented_code(op: str, fields: dict, code: ErrorCode, field: str | None) -> None:
    with pytest.raises(WireError) as refused:
        parse(OPERATIONS[op], fields, SETTINGS.__getitem__)
    assert refused.value.code == code
    assert refused.value.details.get("field") == field
