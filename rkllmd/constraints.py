"""Structured output: JSON Schemas, free JSON, grammars and forced tool calls, enforced as
masks over the model's own tokens, with llguidance (the engine llama.cpp, vLLM and SGLang
use; its JSON Schema coverage is the widest, and its masks take tens of microseconds).

Where a request arrives (the socket loop), ``from_request`` turns what it asks for into a
``Constraint``: llguidance's grammar text, checked by the engine without a vocabulary, so a
schema or grammar it rejects is refused at once, naming the request field, with the
engine's reason (``ConstraintError``). A Constraint is plain data: it travels in the
request's ``SamplingParams`` to whatever runs the model.

There the model's ``Vocabulary`` (llguidance's view of its tokens: their bytes, the special
ones marked, the ids that end a generation; built once per loaded model) makes a ``Guide``
of it: one generation's matcher, which says which tokens may come next. The sampler masks
the logits with it (``rkllmd.sampling``); the mask for the next step is computed on a
helper thread while the forward pass of this one runs (llguidance and the C forward pass
both release the GIL).

Two choices keep a constrained answer the model's own:

* A schema or grammar forces no tokens (llguidance's ``no_forcing``): where it allows only
  one text (a required key's name), llguidance would otherwise allow only that text's
  canonical tokenization, which need not be the token the model ranks first. So masking
  only ever removes tokens the constraint forbids, and when the unconstrained greedy answer
  satisfies the constraint, the constrained greedy answer is the same tokens (as with
  llama.cpp's grammar sampler). A forced tool call is the exception: its syntax is the
  template family's, which a small model may barely have learnt, and left to choose it
  spells ``<tool_call>`` a byte at a time and loses the thread; forced into that text's
  canonical tokens, it writes the call in half the tokens, arguments that fit the question
  (SmolLM2 through Qwen 2.5's template: 31 tokens and "Oslo" against 53-60 and junk).
* Whitespace in JSON is bounded, as llama.cpp bounds it: between two tokens of the
  document, up to 40 spaces or tabs, or one line break and up to 40 of them (enough for
  any indentation a model writes); up to 8 characters of it before and after the document
  (JSON allows them: a model that ends its answer with a line break keeps it). Unbounded,
  a small model may loop on blank lines until ``max_tokens``. A schema's own
  ``x-guidance`` options (llguidance's) take precedence within the document.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .templates.families import HERMES, LLAMA3, PHI4

#: JSON whitespace between two tokens: spaces and tabs, or one line break and indentation.
JSON_WHITESPACE = r"(?:[\x20\x09]{1,40}|\r?\n[\x20\x09]{0,40})"
_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
#: A forced tool call is written on one line, as the formats document it (`{"name": ..., "arguments": {...}}`).
_CALL_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The model chooses how to tokenize what a schema or grammar allows (see the module docstring).
_NO_FORCING = '%llguidance {"no_forcing": true}\n'
#: ``format: "json"``: any JSON object (Ollama's "json", OpenAI's json_object).
ANY_OBJECT: dict[str, Any] = {"type": "object"}

#: A forced tool call as each family writes it: (text before the call object, text after it,
#: the key of its arguments).
TOOL_CALL_SYNTAX = {
    HERMES: ("<tool_call>\n", "\n</tool_call>", "arguments"),
    LLAMA3: ("", "", "parameters"),
    PHI4: ("functools[", "]", "arguments"),
}


class ConstraintError(ValueError):
    """What a request asked for cannot be enforced: the engine's reason, and the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Constraint:
    """What a generation's output must match: llguidance's top-level grammar (JSON text).

    ``field`` is the request field it came from (named in errors found later, against the
    model's vocabulary); ``tool_format`` is set for a forced tool call: the tool-call format
    its output is written in, parsed into ``tool_calls``.
    """

    grammar: str
    field: str
    tool_format: str | None = None


def _llguidance() -> Any:
    import llguidance  # imported when first needed: the socket loop of a daemon never asked for it pays nothing

    return llguidance


def from_request(
    *,
    format: str | Mapping[str, Any] | None = None,
    grammar: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    reasoning: tuple[str, str] | None = None,
    reasoning_opened: bool = False,
    tool_format: str | None = None,
) -> Constraint | None:
    """The constraint a generate request asks for (None: none), checked by the engine.

    ``reasoning``: the template's reasoning markers, if its model reasons in the open: the
    constrained answer may then follow a reasoning block, free text (already opened by the
    prompt when ``reasoning_opened``). ``tool_format``: the template's tool-call format.
    Raises ConstraintError naming the field.
    """
    asked = [name for name, value in (("format", format), ("grammar", grammar)) if value is not None]
    forced = forced_tools(tools, tool_choice)
    if forced:
        asked.append("tool_choice")
    if len(asked) > 1:
        raise ConstraintError(asked[1], f"give at most one of 'format', 'grammar' and a forced 'tool_choice' (got {', '.join(asked)})")
    if not asked:
        return None
    field = asked[0]
    fmt = None
    if field == "grammar":  # the option goes last, so the engine's line numbers are the caller's
        lark = _user_grammar(grammar or "") + "\n" + _NO_FORCING
    elif field == "format":
        lark = _NO_FORCING + _start(reasoning, reasoning_opened, padded=True) + _json_rule("body", _schema_of(format))
    else:  # forced, where the grammar allows one text: the call's syntax in its canonical tokens
        if tool_format not in TOOL_CALL_SYNTAX:  # a template without tools is refused before (its capabilities)
            raise ConstraintError("tool_choice", "a forced tool call needs a template with a tool-call format (Hermes, Llama 3, Phi-4)")
        fmt = tool_format
        lark = _start(reasoning, reasoning_opened, padded=False) + _tool_call_rules(forced, fmt)
    llg = _llguidance()
    compiled = llg.LLMatcher.grammar_from_lark(lark)
    error = llg.LLMatcher.validate_grammar(compiled)
    if error:
        raise ConstraintError(field, f"{field}: {engine_reason(error, ours=field != 'grammar')}")
    return Constraint(compiled, field, fmt)


def forced_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The tools a call must be made to ([] when the choice forces none): all of ``tools`` for
    "required", the one named by ``{"type": "function", "function": {"name": ...}}``."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return []
    if not tools:
        raise ConstraintError("tool_choice", "a forced 'tool_choice' needs 'tools'")
    if tool_choice == "required":
        return list(tools)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) else None
    chosen = [tool for tool in tools if tool["function"]["name"] == name]
    if not chosen:
        raise ConstraintError("tool_choice", f"tool_choice names {name!r}, which is not one of 'tools'")
    return chosen[:1]


def _schema_of(format: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if format == "json":
        return ANY_OBJECT
    if not isinstance(format, Mapping):
        raise ConstraintError("format", "'format' must be \"json\" or a JSON Schema (a map)")
    return format


def _json_rule(name: str, schema: Mapping[str, Any], layout: Mapping[str, Any] = _JSON_OPTIONS) -> str:
    """Rule ``name``: ``%json`` of ``schema``, laid out as ``layout`` says (llguidance's
    ``x-guidance`` options: by default the bounded whitespace) unless the schema says."""
    options = schema.get("x-guidance")
    options = dict(options) if isinstance(options, Mapping) else {}
    if "whitespace_pattern" not in options and "whitespace_flexible" not in options:
        options.update(layout)
    try:
        text = json.dumps({**schema, "x-guidance": options}, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError("format", f"format: not a JSON Schema: {exc}") from None
    return f"{name}: %json {text}\n"


def _user_grammar(text: str) -> str:
    """A caller's grammar, llguidance's Lark or GBNF (llama.cpp's), as Lark. It describes the
    whole output, a reasoning block included if the caller wants one; in its errors, the
    engine's line numbers are the caller's."""
    _llguidance()
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(text)
    except Exception as exc:  # the converter's own errors (GbnfToLarkError, ...)
        raise ConstraintError("grammar", f"grammar: neither Lark nor GBNF: {exc}") from None


def _tool_call_rules(tools: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """Rule ``body``: one call to one of ``tools`` in format ``fmt``, its arguments valid
    under the tool's ``parameters`` schema."""
    before, after, key = TOOL_CALL_SYNTAX[fmt]
    calls = []
    for tool in tools:
        function = tool["function"]
        calls.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, key: function.get("parameters") or ANY_OBJECT},
            "required": ["name", key],
            "additionalProperties": False,
        })
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return f"body: {json.dumps(before)} call {json.dumps(after)}\n" + _json_rule("call", schema, _CALL_LAYOUT)


def _start(markers: tuple[str, str] | None, opened: bool, *, padded: bool) -> str:
    """The start rule: ``body``, after a reasoning block of free text for a model that
    reasons in the open (one the prompt opened must be closed first; otherwise optional).
    ``padded``: a little whitespace may come before and after the body, as JSON allows
    around a document: an answer the unconstrained model writes so stays its own."""
    pad = "SPACE?" if padded else ""
    rules = "SPACE: /[\\r\\n\\x20\\x09]{1,8}/\n"
    if markers is None:
        return f"start: {pad} body {pad}\n{rules}"
    opening = json.dumps(markers[0])
    closing = json.dumps(markers[1])[1:-1].replace("/", "\\/")
    block = "think SPACE?" if opened else f"({opening} think SPACE?)?"
    lead = "" if opened else pad
    return f"start: {block} {lead} body {pad}\nthink[lazy]: /(?s:.*){closing}/\n{rules}"


_AT = re.compile(r"^at \d+\(\d+\): (?:failed to compile JSON schema: )?")
_LISTING = re.compile(r"^\s*\d+ \| |^\s*\^\s*$")


def engine_reason(message: str, *, ours: bool = True, limit: int = 600) -> str:
    """llguidance's message for a caller, not too long and without the state dump of its
    verbose errors. When the grammar is ``ours`` (built around a schema), without its
    location and listing, which would show our text rather than the caller's."""
    text = message.split("\n<state>", 1)[0].strip()
    text = "\n".join(line for line in text.splitlines() if _NO_FORCING.strip() not in line)  # the line we appended
    if ours:
        text = _AT.sub("", "\n".join(line for line in text.splitlines() if not _LISTING.match(line))).strip()
    return text if len(text) <= limit else text[:limit] + "..."


# -- the model side -------------------------------------------------------------------------

#: Computes the next masks while the forward passes run: one thread, since a mask takes tens
#: of microseconds and the cores belong to the forward pass.
_MASKS = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkllmd-mask")


class Vocabulary:
    """llguidance's view of one model's tokens, for building Guides. Built once per model."""

    def __init__(self, tokenizer: Any, token_bytes: Sequence[bytes], end_ids: frozenset[int]):
        self.tokenizer = tokenizer  # llguidance.LLTokenizer
        self.token_bytes = token_bytes  # each token's text as bytes (special tokens: their literal text)
        self.end_ids = end_ids
        self.size = len(token_bytes)

    @classmethod
    def from_tokens(
        cls,
        token_bytes: Sequence[bytes],
        special: Sequence[bool],
        end_ids: frozenset[int],
        encode: Callable[[str], list[int]],
    ) -> Vocabulary:
        """From a tokenizer of our own (the CPU backend's): every token's bytes, which ones
        are special (never matched by text), the end ids, and the encoder. The ids are ours,
        so the masks index our logits."""
        llg = _llguidance()

        class _Source:  # what llguidance.TokenizerWrapper reads
            eos_token_id = min(end_ids)
            bos_token_id = None
            tokens = [b"\xff" + b if is_special else b for b, is_special in zip(token_bytes, special)]
            special_token_ids = [i for i, is_special in enumerate(special) if is_special]

            def __call__(self, text: str | bytes) -> list[int]:
                return encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)

        tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Source()), eos_token=sorted(end_ids))
        return cls(tokenizer, list(token_bytes), end_ids)

    @classmethod
    def from_tokenizer_json(cls, text: str, end_texts: Sequence[str]) -> Vocabulary:
        """From a Hugging Face ``tokenizer.json`` (the one a ``.rkllm`` model was converted
        with): the model's ids. ``end_texts``: the texts of the tokens that end a
        generation (those among its special tokens count; else llguidance's guess).
        Raises ValueError when the text is not such a file."""
        llg = _llguidance()
        special = {t.get("content"): t.get("id") for t in json.loads(text).get("added_tokens") or () if isinstance(t, dict) and t.get("special")}
        end_ids = frozenset(special[t] for t in end_texts if isinstance(special.get(t), int))
        tokenizer = llg.LLTokenizer(text, eos_token=sorted(end_ids) or None)
        token_bytes = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        return cls(tokenizer, token_bytes, end_ids or frozenset(tokenizer.eos_tokens))

    def guide(self, constraint: Constraint) -> Guide:
        return Guide(self, constraint)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` by llguidance's tokenizer (special tokens written in it recognised)."""
        return self.tokenizer.tokenize_str(text, parse_special=True)


class Guide:
    """One generation's constraint state: which tokens may come next.

    ``allowed()`` is the mask for the coming step; ``accept(token)`` moves past the chosen
    token and starts computing the next mask on the helper thread. Both run on the thread
    that samples. The matcher is never touched by two threads at once (llguidance refuses
    that): the helper holds the lock while it computes.
    """

    def __init__(self, vocabulary: Vocabulary, constraint: Constraint):
        llg = _llguidance()
        self.vocabulary = vocabulary
        self.constraint = constraint
        self._matcher = llg.LLMatcher(vocabulary.tokenizer, constraint.grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(constraint.field, f"{constraint.field}: {engine_reason(self._matcher.get_error(), ours=constraint.field != 'grammar')}")
        self._words = np.full((vocabulary.tokenizer.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._lock = threading.Lock()
        self._stopped = self._accepting = False
        self.mask_s = 0.0  # time spent computing masks (on the helper thread)
        self.wait_s = 0.0  # time the sampler waited for one (what the overlap did not hide)
        self.masks = 0
        self._pending = _MASKS.submit(self._compute)  # the first mask, while the prompt is prefilled

    def _compute(self) -> None:
        started = time.perf_counter()
        with self._lock:
            self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self.mask_s += time.perf_counter() - started
        self.masks += 1

    def allowed(self, size: int) -> np.ndarray:
        """Which of ``size`` token ids (the model's logits) may come next, as booleans.
        Raises ConstraintError when the engine failed (a limit of its own, a bug): an
        answer it cannot vouch for is never passed off as complete."""
        started = time.perf_counter()
        self._pending.result()
        self.wait_s += time.perf_counter() - started
        with self._lock:
            failure = self._matcher.get_error() if self._matcher.is_error() else None
        if failure is not None:
            raise ConstraintError(self.constraint.field, f"the constraint engine failed: {engine_reason(failure)}")
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        if bits.size < size:
            bits = np.concatenate([bits, np.zeros(size - bits.size, np.uint8)])
        return bits[:size].view(bool)

    def accept(self, token: int) -> None:
        """The chosen ``token`` goes past the matcher; the next mask is started."""
        self._pending.result()
        with self._lock:
            consumed = self._matcher.consume_token(token)
            self._stopped = self._matcher.is_stopped()
            self._accepting = self._matcher.is_accepting()
            failure = None if consumed else self._matcher.get_error()
        if failure is not None:
            raise ConstraintError(self.constraint.field, f"token {token} was chosen outside the constraint: {failure}")
        if not self._stopped:
            self._pending = _MASKS.submit(self._compute)

    @property
    def stopped(self) -> bool:
        """Nothing but the end may follow the tokens accepted: the document is complete."""
        return self._stopped

    @property
    def accepting(self) -> bool:
        """The tokens accepted make a complete document (which may go on: whitespace after it)."""
        return self._accepting
