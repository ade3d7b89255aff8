"""The protocol's operations, declared once: request fields, reply keys, errors, versions.

The daemon validates requests with ``parse``, the client builds its requests from
``OPERATIONS``, the tests check every reply against it, and docs/protocol.md's tables
are generated from it (``python -m rkllmd.schema docs/protocol.md`` rewrites them; a
test fails when they differ). Light on purpose: clients import it.

Versions: ``PROTOCOL_VERSION`` (the ``v`` of every message) changes only for an
incompatible change; ``PROTOCOL_MINOR`` counts compatible additions (operations, fields,
reply keys, error codes), each declared with the minor that added it, so a client that
reads ``protocol: [1, N]`` from ``ping`` knows which it may use.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .caches.names import check_name
from .protocol import PROTOCOL_VERSION, ErrorCode, WireError

#: Roles a message may have.
ROLES = ("system", "user", "assistant", "tool")
#: Names a request's template variables may not take: the renderer sets them.
RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "documents", "raise_exception", "strftime_now", "range"})

#: Compatible additions since protocol 1.0; see MINOR_VERSIONS.
PROTOCOL_MINOR = 11
MINOR_VERSIONS = {
    0: "the first protocol: every operation and field not marked otherwise",
    1: "`ping` and `status` report `protocol` as `[major, minor]` (it was the integer 1)",
    2: "`render`; `generate` takes `tools`, `vars`, `enable_thinking` and messages of role `tool`, assistant `tool_calls` and `reasoning_content`; "
    "`token` messages may carry `reasoning`; `done` carries `reasoning`, `tool_calls`, `tool_call_error`; "
    "`status` reports `store`: the artifacts on disk per kind, the disk budget, the last collection and its evictions; "
    "`done.stats.cache_source` (what restored prompt tokens came from: a text cache or a conversation state); `status.caches.conversations`",
    3: "`queued` is sent again whenever the generation's position changes; `progress` messages (prefill tokens done of total); "
    "cache entries carry `build` (tokens done of total while building); `status` reports `requests` (running and queued generations), "
    "`build` (the cache build in progress) and `limits.max_batch`",
    4: "`generate` takes `frequency_penalty`, `presence_penalty` and `raw`; `status.model.capabilities` "
    "(`completion`, `tools`, `thinking`: what the model's template supports); `generate` refuses `tools` and "
    "`enable_thinking` a model lacks (`invalid_field`, `details.capability`)",
    5: "messages reach the template with every key they carry (Phi-4-mini's `tools` on a system message, a user's `name`, ...), "
    "nil-valued ones left out, as transformers passes them; a tool call's `arguments` string that is not JSON text of an object "
    "is passed on as it is (it was refused)",
    6: "constrained decoding: `generate` takes `format` (JSON, or a JSON Schema), `grammar` and `tool_choice` (a forced tool call); "
    "`logprobs` and `top_logprobs`, and `token` messages may carry `logprobs`; `done.finish_reason` may be `error`",
    7: "`embed`: embeddings of a text, a list of texts or of token ids (mean of the final hidden states after the output norm, "
    "L2-normalised unless asked not to); `status.model.capabilities` may list `embedding`, and an embedding-only model lists only it",
    8: "several models by name: `generate` and `render` take `model` (absent: the default; unknown: `not_found`) and `generate` `keep_alive`; "
    "`models`, `create`, `copy`, `delete`, `load`; `status` reports `models` (the loaded ones); binary caches are per model: "
    "`cache.ls`, `cache.show`, `cache.put`, `cache.rebuild` and `cache.wait` take `model`, `cache.ls` answers `model`; `embed` takes `keep_alive`",
    9: "`pull`: a `.gguf` or `.rkllm` file from the Hugging Face hub, streamed as `progress` (`status`, `digest`, `total`, `completed`) "
    "and `done` (`finish_reason`, `model`), cancellable; error codes `model_file` and `hub`; models list `source` `pulled`",
    10: "each loaded model in `status.models.loaded` and `models.loaded` carries `pid`: the process that runs it (its runner "
    "process; the daemon's own with `daemon.runners = \"thread\"`); a runner that dies fails its model's requests with `backend`",
    11: "one scheduler for every model: `daemon.max_queue` bounds the generations waiting for any model, `queued` positions and "
    "`status.requests.queued` (each with `model`) follow its one order; `status.models` adds `waiting` (generations per model) and "
    "`draining` (the model taking nothing new until it is unloaded to make room); `queued` carries `cache_build` while the "
    "generation waits for the build of the text cache its prompt starts with; `generate` takes `on_behalf_of` (a gateway's user: "
    "turns go per connection and user)",
}
PROTOCOL = (PROTOCOL_VERSION, PROTOCOL_MINOR)


@dataclass(frozen=True)
class Setting:
    """A default or bound read from the daemon's configuration when the request arrives."""

    key: str

    def __str__(self) -> str:
        return f"`{self.key}`"


Bound = float | int | Setting | None


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # see _KINDS
    doc: str
    required: bool = False
    default: Any = None  # None: absent (the operation decides); a Setting: from the configuration
    low: Bound = None
    high: Bound = None
    default_doc: str | None = None  # for the table, when the default is not a value
    since: int = 0


@dataclass(frozen=True)
class Operation:
    name: str
    doc: str
    fields: tuple[Field, ...] = ()
    #: Keys of the result map, or None: the replies are a stream (``stream``'s messages).
    result: tuple[str, ...] | None = ()
    #: Give exactly one of these two fields (the first is the one reported missing).
    one_of: tuple[str, str] | None = None
    since: int = 0
    #: A streaming operation's messages and their keys (a generation's unless said).
    stream: dict[str, tuple[str, ...]] | None = None

    def messages(self) -> dict[str, tuple[str, ...]]:
        return self.stream if self.stream is not None else STREAM

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


MAX_MESSAGES = 1024
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_WAIT_S = 3600.0
MAX_TOOLS = 128
MAX_VARS = 64
MAX_TOP_LOGPROBS = 20
MAX_EMBED_INPUTS = 2048
MAX_ON_BEHALF_CHARS = 128

#: A cache entry, as cache.ls lists it and the other cache operations return it; ``build``
#: since 1.3: null, or {"done", "total"} (prompt tokens) while its binary cache is built.
ENTRY = ("name", "state", "reason", "text_bytes", "tokens", "built_at", "build_ms", "binary_bytes", "build")
#: Messages of a generation's stream and their keys (besides v, id, type). Since 1.3
#: ``queued`` comes again whenever the position changes, and ``progress`` (phase "prefill")
#: after each prefill chunk: a client may ignore both.
STREAM: dict[str, tuple[str, ...]] = {
    "queued": ("seq", "position"),
    "started": ("seq", "queue_ms"),
    "progress": ("seq", "phase", "done", "total"),
    "token": ("seq", "text"),
    "done": ("seq", "finish_reason", "reason", "cache", "stats", "reasoning", "tool_calls", "tool_call_error"),
}
#: Keys a stream message carries only sometimes: a token's ``reasoning`` when the piece holds
#: some, its ``logprobs`` (since 1.6) when the request asked for them; a ``queued``'s
#: ``cache_build`` (since 1.11) while it waits for the build of the text cache its prompt starts with.
STREAM_OPTIONAL: dict[str, tuple[str, ...]] = {"token": ("reasoning", "logprobs"), "queued": ("cache_build",)}
#: A pull's stream (since 1.9): Ollama's statuses in ``progress`` ("pulling manifest", "pulling
#: <digest's first 12 hex>" with ``digest``/``total``/``completed`` bytes, "verifying sha256 digest",
#: "writing manifest"; the download's keys null in the others), then ``done``: ``finish_reason``
#: "success" (``model`` the registered name) or "cancelled" (``model`` null).
PULL_STREAM: dict[str, tuple[str, ...]] = {
    "progress": ("seq", "status", "digest", "total", "completed"),
    "done": ("seq", "finish_reason", "model", "digest", "size", "path"),
}
#: Every type of message the daemon sends.
REPLY_TYPES = frozenset({"result", "error", *STREAM})
#: ``cache_source`` since 1.2: null, {"kind": "text_cache", "name": NAME} or {"kind": "conversation"}.
STATS = ("prompt_tokens", "cached_tokens", "cache_source", "completion_tokens", "queue_ms", "ttft_ms", "prefill_ms", "decode_ms", "decode_tps", "total_ms")
#: ``requests`` and ``build`` since 1.3 (see docs/protocol.md, status).
STATUS = ("version", "protocol", "pid", "uptime_s", "socket", "backend", "backend_reason", "model", "worker", "healthy", "counters", "caches", "limits", "store", "requests", "build", "models")
#: A model as ``models`` lists it and ``create``/``copy``/``delete`` return it (since 1.8).
MODEL = ("name", "path", "template", "system", "parameters", "base", "source", "created_at", "embedding_only", "default", "weights", "loaded")
_MODEL = Field("model", "str", "the model's name (Ollama's `:latest` tag may be given or left out)", default_doc="the default model", since=8)
#: Binary caches belong to a model; the text caches are shared by name.
_CACHE_MODEL = Field("model", "str", "whose binary caches: a loaded model (one not loaded is `not_found`, `details.loaded` false)",
                     default_doc="the default model", since=8)
_KEEP_ALIVE = Field("keep_alive", "keep_alive", "how long the model stays loaded once idle: seconds, or a duration (`5m`, `1h`); 0 unloads it when idle, negative keeps it loaded",
                    default_doc="`daemon.keep_alive`", since=8)

_NAME = Field("name", "name", "the text cache's name", required=True)
_MESSAGES_DOC = f"a whole chat; roles {', '.join(f'`{r}`' for r in ROLES)}; 1–{MAX_MESSAGES} messages (see [Messages](#messages))"
_TOOLS = Field("tools", "tools", f"up to {MAX_TOOLS} OpenAI-style function schemas, given to the template", since=2)
_VARS = Field("vars", "vars", f"up to {MAX_VARS} extra template variables (`enable_thinking`, `date_string`, ...)", since=2)

OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "generate",
            "queue a completion; its messages stream back",
            (
                Field("prompt", "str", "the user message (give `prompt` or `messages`)"),
                Field("system", "str", "system message, with `prompt`", default_doc="model's default"),
                Field("messages", "messages", _MESSAGES_DOC),
                Field("cache", "name", "use text cache NAME as the system message (the request must not carry its own)"),
                Field("no_cache", "bool", "prefill everything, never restore a prompt cache (to measure the difference)", default=False),
                Field("temperature", "float", "0 is greedy", default=Setting("sampling.temperature"), low=0.0, high=10.0),
                Field("top_k", "int", "0 disables", default=Setting("sampling.top_k"), low=0, high=100_000),
                Field("top_p", "float", "1.0 disables", default=Setting("sampling.top_p"), low=0.0, high=1.0),
                Field("repeat_penalty", "float", "1.0 disables", default=Setting("sampling.repeat_penalty"), low=0.0, high=10.0),
                Field("frequency_penalty", "float", "OpenAI's: `logit -= frequency_penalty × count` of each token the completion has so far; 0 disables",
                      default=Setting("sampling.frequency_penalty"), low=-2.0, high=2.0, since=4),
                Field("presence_penalty", "float", "OpenAI's: `logit -= presence_penalty` once for each token the completion has; 0 disables",
                      default=Setting("sampling.presence_penalty"), low=-2.0, high=2.0, since=4),
                Field("seed", "int", "same seed and parameters, same output", low=0, high=2**64 - 1, default_doc="random"),
                Field("max_tokens", "int", "completion tokens at most", default=Setting("sampling.max_tokens"), low=1, high=Setting("daemon.max_tokens_limit")),
                Field("stop", "stops", f"up to {MAX_STOPS} strings of ≤{MAX_STOP_CHARS} chars; generation ends before the first one (in the raw output, reasoning included), which is not sent", default=()),
                _TOOLS,
                _VARS,
                Field("enable_thinking", "bool", "sets `vars.enable_thinking` (templates that read it: qwen3)", since=2),
                Field("raw", "bool", "`prompt` is the whole prompt text, sent as it is: no template, no reasoning or tool-call parsing "
                      "(with `prompt` only: not with `system`, `messages`, `cache`, `tools`, `vars`, `enable_thinking`)", default=False, since=4),
                Field("format", "format", "the answer is JSON: `\"json\"` (any object) or a JSON Schema it validates against (see [Constrained output](#constrained-output))", since=6),
                Field("grammar", "str", "the answer matches this grammar: llguidance's Lark, or GBNF (llama.cpp's `grammar`)", since=6),
                Field("tool_choice", "tool_choice", "`\"auto\"`, `\"none\"` (`tools` are not offered), `\"required\"` (the answer is a call to one of `tools`) or `{\"type\": \"function\", \"function\": {\"name\": N}}` (a call to N); a forced call's arguments follow the tool's `parameters`", default_doc="auto", since=6),
                Field("logprobs", "bool", "`token` messages carry each token's log-probability (see [Log-probabilities](#log-probabilities))", default=False, since=6),
                Field("top_logprobs", "int", "with `logprobs`: the most likely alternatives given per token", default=0, low=0, high=MAX_TOP_LOGPROBS, since=6),
                _MODEL,
                _KEEP_ALIVE,
                Field("on_behalf_of", "str", f"who the request is for, when one connection serves several people (a gateway): clients take turns "
                      f"per connection and this (≤{MAX_ON_BEHALF_CHARS} chars)", default_doc="the connection's own turn", since=11),
            ),
            result=None,
            one_of=("prompt", "messages"),
        ),
        Operation(
            "render",
            "the exact prompt text a chat renders to, as `generate` would prefill it",
            (
                Field("messages", "messages", _MESSAGES_DOC, required=True, since=2),
                _TOOLS,
                _VARS,
                Field("template", "str", "a family's name (docs/templates.md), or the Jinja text of a template", default_doc="the loaded model's", since=2),
                Field("add_generation_prompt", "bool", "end with the header of the assistant's turn", default=True, since=2),
                _MODEL,
            ),
            ("text", "tokens"),
            since=2,
        ),
        Operation(
            "embed",
            "embeddings of texts or token ids: the mean of each input's final hidden states after the output norm (see [Embeddings](#embeddings))",
            (
                Field("input", "embed_input", f"a text, a list of 1–{MAX_EMBED_INPUTS} texts, a list of token ids, or a list of such lists; "
                      "the raw text is embedded (no chat template)", required=True, since=7),
                Field("model", "str", "the model's name (Ollama's `:latest` tag may be given or left out); it is loaded first if need be", default_doc="the default model", since=7),
                Field("truncate", "bool", "cut an input longer than the context to its first tokens; false: refuse it with `context_overflow`", default=True, since=7),
                Field("normalize", "bool", "L2-normalise each embedding (false: llama.cpp's mean pooling as it is)", default=True, since=7),
                _KEEP_ALIVE,
            ),
            ("embeddings", "dimensions", "normalized", "prompt_tokens", "total_tokens", "queue_ms", "compute_ms"),
            since=7,
        ),
        Operation("cancel", "stop one of this client's generations, queued or running", (Field("target", "id", "the `id` of one of this client's generations", required=True),), ("target", "was")),
        Operation("status", "what the daemon runs and how it is doing", result=STATUS),
        Operation("ping", "the cheapest round trip", result=("pong", "version", "protocol")),
        Operation("cache.ls", "every text cache with the state of its binary cache (the model's)", (_CACHE_MODEL,), result=("caches", "memory", "model")),
        Operation("cache.show", "one text cache, its text and its binary state (the model's)", (_NAME, _CACHE_MODEL), ENTRY + ("text", "sha256", "path", "error")),
        Operation("cache.put", "create or replace a text cache (its build is queued for every loaded model; the entry is the model's)",
                  (_NAME, Field("text", "str", "the text", required=True), _CACHE_MODEL), ENTRY),
        Operation("cache.rm", "delete a text cache and its binary caches (every model's)", (_NAME,), ("name", "removed")),
        Operation("cache.rebuild", "build binary caches again (one, or all; the model's)", (Field("name", "name", "the text cache's name", default_doc="all"), _CACHE_MODEL), ("queued",)),
        Operation(
            "cache.wait",
            "answer once the binary cache (the model's) matches the current text",
            (_NAME, Field("timeout", "float", "seconds to wait", default=60.0, low=0.0, high=MAX_WAIT_S), _CACHE_MODEL),
            ENTRY,
        ),
        Operation("models", "every model by name, and which are loaded", result=("models", "default", "loaded"), since=8),
        Operation(
            "create",
            "a model derived from another: it runs on its base's weights with its own system message, parameters or template",
            (
                Field("name", "str", "the new model's name", required=True, since=8),
                Field("from", "str", "the model it derives from", required=True, since=8),
                Field("system", "str", "its system message, used when a request gives none", since=8),
                Field("parameters", "parameters", "its default sampling parameters (`temperature`, `top_k`, `top_p`, `repeat_penalty`, "
                      "`frequency_penalty`, `presence_penalty`, `max_tokens` or `num_predict`, `seed`)", since=8),
                Field("template", "str", "its chat template: a family's name or Jinja text", default_doc="its base's", since=8),
            ),
            MODEL,
            since=8,
        ),
        Operation("copy", "a model under a second name", (Field("source", "str", "the model copied", required=True, since=8),
                                                           Field("destination", "str", "the new name", required=True, since=8)), MODEL, since=8),
        Operation("delete", "delete a created or pulled model (configured ones are edited in the configuration); a pulled file goes with the last name using it", (Field("name", "str", "the model", required=True, since=8),),
                  MODEL, since=8),
        Operation("load", "load a model now (Ollama's empty prompt), or unload it once idle with `keep_alive` 0", (_MODEL, _KEEP_ALIVE), ("model", "loaded"), since=8),
        Operation(
            "pull",
            "download a `.gguf` or `.rkllm` file from the Hugging Face hub and register it as a model; its progress streams back",
            (
                Field("source", "str", "`hf.co/OWNER/REPO`, `hf.co/OWNER/REPO/FILE` or `hf.co/OWNER/REPO:TAG` (a quantization such as `Q8_0`, "
                      "or a file's name); `huggingface.co/` or none works too", required=True, since=9),
                Field("name", "str", "the model's name", default_doc="`hf.co/OWNER/REPO[:TAG]`", since=9),
                Field("revision", "str", "a branch, tag or commit of the repository", default_doc="main", since=9),
            ),
            result=None,
            stream=PULL_STREAM,
            since=9,
        ),
    )
}

#: What each error code means, for docs/protocol.md (every ErrorCode has a line; a test checks it).
ERRORS: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED: "not one msgpack object (with string map keys and no ext types), not a map, nested deeper than 16, holding an array of more than 65,536 items or a map of more than 4,096 keys, or not exactly one frame",
    ErrorCode.UNSUPPORTED_VERSION: "`v` missing or not the integer 1; `details.supported` lists versions",
    ErrorCode.UNKNOWN_OP: "`details.known` lists the operations",
    ErrorCode.INVALID_FIELD: "a field missing, of the wrong type or out of range; `details.field` names it",
    ErrorCode.TOO_LARGE: "message over 1 MiB, or prompt over `daemon.max_prompt_chars`",
    ErrorCode.DUPLICATE_ID: "this client already has a running request with this id",
    ErrorCode.INVALID_NAME: "a cache name was refused",
    ErrorCode.QUEUE_FULL: "`daemon.max_queue` generations are already waiting (or 16 pulls running and waiting)",
    ErrorCode.NOT_FOUND: "no such cache, no such running request, or no such model (`details.model`)",
    ErrorCode.SHUTTING_DOWN: "the daemon is stopping; queued generations end with this",
    ErrorCode.TIMEOUT: "`cache.wait` ran out of time",
    ErrorCode.CONTEXT_OVERFLOW: "the prompt does not fit the context; `details.prompt_tokens`, `details.context_length`",
    ErrorCode.BACKEND: "the model runtime failed; `details.runtime_code` when it gave one",
    ErrorCode.CACHE_BUILD_FAILED: "a text cache cannot be used or its build failed",
    ErrorCode.STORAGE: "a cache folder refused the change (read-only, full, permissions); `details.errno` names the system error; "
    "a pull without room for its file: `details.needed`, `details.free`, `details.folder`",
    ErrorCode.MODEL_FILE: "a pulled file is refused: `details.reason` is `not_a_model_file` (not `.gguf`/`.rkllm`), `magic`, `platform` "
    "(a `.rkllm` converted for another SoC), `toolkit` (converted by a toolkit the runtime cannot run) or `sha256` (not the hub's bytes); "
    "nothing is registered, the file is removed",
    ErrorCode.HUB: "the Hugging Face hub (`HF_ENDPOINT`) cannot be reached or refused the request (`details.status`: 401 or 403 wants `HF_TOKEN`)",
    ErrorCode.INTERNAL: "a bug in the daemon; it keeps serving",
}

# -- validation (the daemon) ------------------------------------------------------------

_MISSING = object()
_KIND_NAMES = {
    "str": "a string", "name": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
    "id": "a string or an integer", "messages": "an array of messages", "stops": "an array of strings",
    "tools": f"an array of at most {MAX_TOOLS} tool schemas", "vars": f"a map of at most {MAX_VARS} template variables",
    "format": '"json" or a JSON Schema (a map)', "parameters": "a map of parameter names to numbers", "keep_alive": "a number of seconds or a duration",
    "embed_input": f"a string, an array of 1 to {MAX_EMBED_INPUTS} strings, an array of token ids or an array of arrays of token ids",
    "tool_choice": '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse(op: Operation, request: dict[str, Any], setting: Callable[[str], Any]) -> dict[str, Any]:
    """Every field of ``op`` from ``request``, checked, defaults filled in (None: absent);
    raise WireError (``invalid_field``, ``invalid_name``) naming the first wrong one."""
    if op.one_of is not None:
        first, second = op.one_of
        if request.get(first) is not None and request.get(second) is not None:
            raise WireError(ErrorCode.INVALID_FIELD, f"give either {second!r} or {first!r}, not both", field=second)
    values = {}
    for field in op.fields:
        value = request.get(field.name)
        if value is None:
            required = field.required or (op.one_of is not None and field.name == op.one_of[0] and request.get(op.one_of[1]) is None)
            if required:
                raise WireError(ErrorCode.INVALID_FIELD, f"missing field {field.name!r}", field=field.name)
            default = field.default
            values[field.name] = setting(default.key) if isinstance(default, Setting) else default
            continue
        values[field.name] = _check(field, value, setting)
    return values


def _bound(bound: Bound, setting: Callable[[str], Any]) -> float | None:
    return setting(bound.key) if isinstance(bound, Setting) else bound


def _check(field: Field, value: Any, setting: Callable[[str], Any]) -> Any:
    def wrong(message: str | None = None) -> WireError:
        return WireError(ErrorCode.INVALID_FIELD, message or f"field {field.name!r} must be {_KIND_NAMES[field.kind]}", field=field.name)

    kind, is_number = field.kind, isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("str", "name") and not isinstance(value, str) or kind == "bool" and not isinstance(value, bool):
        raise wrong()
    if kind == "id" and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise wrong(f"field {field.name!r} must be the id of a generate request")
    if kind == "int" and not (is_number and isinstance(value, int)):
        raise wrong()
    if kind == "float":
        if not is_number:
            raise wrong()
        value = float(value)
        if value != value:
            raise wrong(f"field {field.name!r} must be a number, not NaN")
    if kind in ("int", "float"):
        low, high = _bound(field.low, setting), _bound(field.high, setting)
        if low is not None and value < low or high is not None and value > high:
            raise wrong(f"field {field.name!r} must be between {low} and {high}")
    if kind == "name":
        return check_name(value)
    if kind == "messages":
        return _messages(value, wrong)
    if kind == "tools":
        return _tools(value, wrong)
    if kind == "vars":
        return _vars(value, wrong)
    if kind == "format" and value != "json" and not isinstance(value, dict):
        raise wrong()
    if kind == "tool_choice":
        return _tool_choice(value, wrong)
    if kind == "embed_input":
        return _embed_input(value, wrong)
    if kind == "parameters" and not isinstance(value, dict):
        raise wrong()
    if kind == "keep_alive" and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise wrong()
    if kind == "stops":
        if not isinstance(value, list) or len(value) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value):
            raise wrong(f"'stop' must be up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return tuple(value)
    return value


def _messages(value: Any, wrong: Callable[..., WireError]) -> list[dict[str, Any]]:
    """Messages as transformers passes them to a template: every key the client gave but
    those whose value is nil, in its order; from OpenAI's wire form, tool calls'
    ``arguments`` a map when they are JSON text of one, and a tool-calling turn's nil
    content ""."""
    if not isinstance(value, list):
        raise wrong()
    if not value or len(value) > MAX_MESSAGES:
        raise wrong(f"'messages' must hold 1 to {MAX_MESSAGES} messages")
    return [_message(item, f"messages[{i}]", wrong) for i, item in enumerate(value)]


#: Message keys the daemon reads, and the only role each belongs to (any other key goes to
#: the template as it is: Phi-4-mini's ``tools`` on a system message, a ``name``, ...).
_ROLE_KEYS = {"tool_calls": "assistant", "reasoning_content": "assistant", "tool_call_id": "tool"}


def _message(item: Any, at: str, wrong: Callable[..., WireError]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise wrong(f"{at} must be a map")
    role = item.get("role")
    if role not in ROLES:
        raise wrong(f"{at}.role must be one of {', '.join(ROLES)}")
    # OpenAI sends a turn that only calls tools with a nil content: "", which every
    # template takes (a missing content fails most of them).
    calls_only = role == "assistant" and item.get("content") is None and bool(item.get("tool_calls"))
    message = {}
    for key, value in item.items():
        if calls_only and key == "content":
            value = ""
        if value is not None:  # transformers 5 leaves out nil keys
            message[key] = value
    if calls_only:
        message.setdefault("content", "")
    if not isinstance(message.get("content"), str):
        raise wrong(f"{at}.content must be a string")
    for key, value in message.items():
        if not isinstance(key, str) or not _plain(value):
            raise wrong(f"{at}.{key!s} must hold what JSON can (maps with string keys, arrays, strings, numbers, booleans)")
        owner = _ROLE_KEYS.get(key)
        if owner is not None and role != owner:
            raise wrong(f"{at}.{key} is only for {owner} messages")
        if key in ("reasoning_content", "tool_call_id") and not isinstance(value, str):
            raise wrong(f"{at}.{key} must be a string")
    if "tool_calls" in message:
        calls = message["tool_calls"]
        if not isinstance(calls, list) or not calls or len(calls) > MAX_TOOLS:
            raise wrong(f"{at}.tool_calls must hold 1 to {MAX_TOOLS} tool calls")
        message["tool_calls"] = [_tool_call(call, f"{at}.tool_calls[{j}]", wrong) for j, call in enumerate(calls)]
    return message


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON's (msgpack's binary strings are not)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _tool_call(call: Any, at: str, wrong: Callable[..., WireError]) -> dict[str, Any]:
    """``{"id"?, "type"?: "function", "function": {"name", "arguments"}}`` as the client gave
    it, ``arguments`` a map: OpenAI's JSON text of an object is parsed (transformers'
    templates expect a map); any other string goes on as it is."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise wrong(f'{at} must be a map {{"type": "function", "function": {{"name", "arguments"}}}}')
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise wrong(f"{at}.function.name must be a non-empty string")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise wrong(f"{at}.id must be a string")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return call
        return {**call, "function": {**function, "arguments": parsed}} if isinstance(parsed, dict) else call
    if arguments is not None and not isinstance(arguments, dict):
        raise wrong(f"{at}.function.arguments must be a map, or a string (JSON text of one)")
    return call


def _tools(value: Any, wrong: Callable[..., WireError]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise wrong()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise wrong(f'tools[{i}] must be a map {{"type": "function", "function": {{"name", "description", "parameters"}}}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise wrong(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(function.get("description", ""), str):
            raise wrong(f"tools[{i}].function.description must be a string")
        if not isinstance(function.get("parameters", {}), dict):
            raise wrong(f"tools[{i}].function.parameters must be a map (a JSON Schema)")
    return value


def _tool_choice(value: Any, wrong: Callable[..., WireError]) -> str | dict[str, Any]:
    if value in ("auto", "none", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise wrong()
    return {"type": "function", "function": {"name": function["name"]}}


def _embed_input(value: Any, wrong: Callable[..., WireError]) -> list[str | list[int]]:
    """The inputs as a list: texts, or token-id lists (a flat list of ids is one input). An
    empty text or id list has no token to average: refused, as is a NUL."""
    def token_ids(item: list[Any]) -> bool:
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in item)

    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_EMBED_INPUTS:
        raise wrong()
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise wrong(f"input[{i}] is empty: it has no token to average")
            if "\x00" in item:
                raise wrong(f"input[{i}] must not contain NUL")
        elif isinstance(item, list):
            if not item or not token_ids(item):
                raise wrong(f"input[{i}] must be a non-empty array of token ids (integers from 0)")
        else:
            raise wrong(f"input[{i}] must be a string or an array of token ids")
    return value


def _vars(value: Any, wrong: Callable[..., WireError]) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_VARS:
        raise wrong()
    for key in value:
        if not _IDENTIFIER.fullmatch(key):
            raise wrong(f"vars: {key!r} is not a template variable's name (letters, digits, _)")
        if key in RESERVED:
            raise wrong(f"vars: {key!r} is set by the renderer, not by a request")
    return value


# -- docs/protocol.md's tables ------------------------------------------------------------

_KIND_DOCS = {
    "str": "str", "name": "str (cache name)", "int": "int", "float": "float", "bool": "bool", "id": "str or int",
    "messages": "array of messages", "stops": "array of str", "tools": "array of tool schemas", "vars": "map",
    "format": '"json" or map', "tool_choice": "str or map", "embed_input": "str, array of str, array of int or array of arrays of int", "parameters": "map", "keep_alive": "number or str",
}


def _range(field: Field) -> str:
    if field.low is None and field.high is None:
        return ""
    high = "" if field.high is None else "2⁶⁴−1" if field.high == 2**64 - 1 else f"{field.high:,}" if isinstance(field.high, int) else str(field.high)
    low = "" if field.low is None else str(field.low)
    return f" {low}–{high}" if high else f" ≥ {low}"


def _default(field: Field) -> str:
    if field.required:
        return "required"
    if field.default_doc is not None:
        return field.default_doc
    if field.default is None or field.default == ():
        return "—"
    if isinstance(field.default, bool):
        return str(field.default).lower()
    return str(field.default) if isinstance(field.default, Setting) else f"{field.default:g}"


def fields_table(op: Operation) -> str:
    rows = ["| key | type | default | since | meaning |", "|---|---|---|---|---|"]
    for f in op.fields:
        rows.append(f"| `{f.name}` | {_KIND_DOCS[f.kind]}{_range(f)} | {_default(f)} | 1.{f.since} | {f.doc} |")
    return "\n".join(rows)


def operations_table() -> str:
    rows = ["| op | since | fields | result keys |", "|---|---|---|---|"]
    for op in OPERATIONS.values():
        fields = ", ".join(f"`{f.name}`" for f in op.fields) or "—"
        result = "a stream: " + " → ".join(f"`{t}`" for t in op.messages()) if op.result is None else ", ".join(f"`{k}`" for k in op.result)
        rows.append(f"| `{op.name}` | 1.{op.since} | {fields} | {result} |")
    return "\n".join(rows)


def errors_table() -> str:
    rows = ["| code | name | meaning |", "|---|---|---|"]
    rows += [f"| {int(code)} | `{code.name.lower()}` | {ERRORS[code]} |" for code in ErrorCode]
    return "\n".join(rows)


def versions_table() -> str:
    rows = ["| minor | added |", "|---|---|"]
    rows += [f"| 1.{minor} | {what} |" for minor, what in MINOR_VERSIONS.items()]
    return "\n".join(rows)


def tables() -> dict[str, str]:
    """Every generated table by its marker name in docs/protocol.md."""
    out = {"operations": operations_table(), "errors": errors_table(), "versions": versions_table()}
    out.update({f"fields {op.name}": fields_table(op) for op in OPERATIONS.values() if op.fields})
    return out


_BLOCK = re.compile(r"(<!-- schema: (?P<name>[^>]+?) -->\n)(?P<body>(?:(?!<!--).*\n)*)(<!-- /schema -->)")


def render_doc(text: str) -> str:
    """``text`` with every ``<!-- schema: NAME -->`` block replaced by the table NAME."""
    generated = tables()
    return _BLOCK.sub(lambda m: m.group(1) + generated[m.group("name")] + "\n" + m.group(4), text)


def doc_blocks(text: str) -> list[str]:
    return [m.group("name") for m in _BLOCK.finditer(text)]


if __name__ == "__main__":  # python -m rkllmd.schema docs/protocol.md
    path = Path(sys.argv[1])
    path.write_text(render_doc(path.read_text()))
