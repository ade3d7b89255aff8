"""The Jinja environment chat templates run in: transformers' semantics, bounded.

transformers (``render_jinja_template``) compiles a model's template in an
``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks`` and the
loop-controls extension, and gives it ``raise_exception``, ``strftime_now`` and a
``tojson`` that keeps non-ASCII text as it is. A template rendered here must produce
the same bytes, because the model was trained on them.

A template may come from a model file or a configuration someone else wrote, so the
sandbox is not enough: it refuses attribute access outside the template's data, but
not work. Rendering is therefore bounded:

* time: every ``for`` loop's iterable is wrapped (when the template is parsed) in a
  guard that checks the deadline as it yields; so are function calls and filters;
* size: the output is produced as a stream and counted; string and list results
  that could grow past the limit in one step (``*``, ``**``, ``+``, ``~``, filters,
  ``join``, ``replace``, padding widths) are checked before or right after they are
  made, so no single step allocates much more than the limit.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Largest ``range()`` a template may make (jinja2's own sandbox allows 100 000).
MAX_RANGE = 100_000


class RenderLimitExceeded(jinja2.exceptions.TemplateError):
    """The template ran longer or produced more than it may."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 2.0
    chars: int = 4_000_000


class _Budget(threading.local):
    """The running render's deadline and limits (one render at a time per thread)."""

    deadline: float = float("inf")
    seconds: float = Limits.seconds
    chars: int = Limits.chars

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(f"rendering took longer than {self.seconds:g} s")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.chars:
            raise RenderLimitExceeded(f"made a value longer than {self.chars} characters")
        return value


_budget = _Budget()


def _guard_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every ``for`` loop of a template iterates: the deadline checked as it goes."""
    for i, item in enumerate(iterable):
        if not i & 255:
            _budget.check_time()
        yield item


def _safe_range(*args: int) -> range:
    result = range(*args)
    if len(result) > MAX_RANGE:
        raise RenderLimitExceeded(f"range() of {len(result)} items; at most {MAX_RANGE}")
    return result


def _size(value: Any) -> int:
    """Characters a value stands for once printed (strings inside lists counted)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value) + sum(len(v) for v in value if isinstance(v, str))
    return 0


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: non-ASCII kept, optional indent (not HTML-escaped like Jinja's)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it;
    for rendering it is just its body)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Bounded(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+"])

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("__loop_guard", "load"), [loop.iter], [], None, None, lineno=loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            # ``a ~ b``: checked right after it is made (each operand is within the limit).
            concat.nodes = [nodes.Call(nodes.Name("__size_guard", "load"), [nodes.Concat(concat.nodes)], [], None, None)]
        return tree

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Refuse outright (jinja2 returns an undefined that prints as nothing)."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is refused")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _budget.check_time()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and _size(seq) * max(n, 0) > _budget.chars:
                    raise RenderLimitExceeded(f"made a value longer than {_budget.chars} characters")
        elif operator == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(right) > 256 and abs(left) > 1:
                raise RenderLimitExceeded("raised a number to too large a power")
        elif operator == "+" and _size(left) + _size(right) > _budget.chars:
            raise RenderLimitExceeded(f"made a value longer than {_budget.chars} characters")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        _budget.check_time()
        _check_call(__obj, args, kwargs)
        return _budget.check_size(super().call(__context, __obj, *args, **kwargs))


def _check_call(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse calls whose result would be far larger than the limit, before making it."""
    limit = _budget.chars
    if any(isinstance(a, int) and not isinstance(a, bool) and a > limit for a in (*args, *kwargs.values())):
        raise RenderLimitExceeded(f"asked for a size above {limit}")
    owner, name = getattr(function, "__self__", None), getattr(function, "__name__", "")
    if isinstance(owner, str) and name == "join" and args:
        items = list(args[0]) if not isinstance(args[0], (list, tuple)) else args[0]
        if _size(list(items)) + len(owner) * len(items) > limit:
            raise RenderLimitExceeded(f"made a value longer than {limit} characters")
    if isinstance(owner, str) and name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grows = (owner.count(args[0]) if args[0] else len(owner) + 1) * len(args[1])
        if len(owner) + grows > limit:
            raise RenderLimitExceeded(f"made a value longer than {limit} characters")


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that checks the deadline and the sizes it is given and makes."""

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _budget.check_time()
        _check_call(function, args, kwargs)
        if name == "join" and any(_size(a) > _budget.chars for a in args if isinstance(a, (list, tuple))):
            raise RenderLimitExceeded(f"made a value longer than {_budget.chars} characters")
        return _budget.check_size(function(*args, **kwargs))

    if hasattr(function, "jinja_pass_arg"):  # pass_context and the like
        bounded.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def make_environment(clock: Callable[[], datetime], on_clock: Callable[[], None] = lambda: None) -> jinja2.Environment:
    """An environment with transformers' semantics whose ``strftime_now`` reads ``clock``.

    ``on_clock`` is called whenever the template reads the clock (so the caller knows
    a rendering depends on the date).
    """

    def strftime_now(fmt: str) -> str:
        on_clock()
        return clock().strftime(fmt)

    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=strftime_now,
        range=_safe_range,
        __loop_guard=_guard_iter,
        __size_guard=_budget.check_size,
    )
    return env


def render_bounded(template: jinja2.Template, context: dict[str, Any], limits: Limits) -> str:
    """Render as a stream, stopping at the time or size limit."""
    _budget.deadline = time.monotonic() + limits.seconds
    _budget.seconds, _budget.chars = limits.seconds, limits.chars
    try:
        out: list[str] = []
        total = 0
        for piece in template.generate(context):
            total += len(piece)
            if total > limits.chars:
                raise RenderLimitExceeded(f"wrote more than {limits.chars} characters")
            _budget.check_time()
            out.append(piece)
        return "".join(out)
    finally:
        _budget.deadline = float("inf")
