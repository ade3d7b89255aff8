"""What crosses the daemon <-> runner boundary besides plain values: the facts the daemon
needs of a backend it does not hold, and exceptions."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable

from ..backends.base import Backend
from ..protocol import ErrorCode, WireError
from ..templates import ChatTemplate


@dataclasses.dataclass(eq=False)
class BackendFacts:
    """A runner's backend as the daemon sees it: what status, /api/show and a request's
    checks on arrival read (its template, capabilities, description). Nothing here runs
    the model."""

    kind: str
    max_batch: int
    embedding_only: bool
    embeds: bool
    template: ChatTemplate
    _describe: dict[str, Any]  # as it was when the model loaded
    _identity: dict[str, Any]
    #: The description now, from the runner (a backend learns facts as it runs: the NPU's
    #: embedding length at its first embedding); None when the runner does not answer.
    fresh: Callable[[], dict[str, Any] | None] = lambda: None

    @classmethod
    def of(cls, backend: Backend) -> dict[str, Any]:
        """In the runner: ``backend``'s facts as plain values (its template as its fields:
        a compiled Jinja template does not pickle)."""
        template = {f.name: getattr(backend.template, f.name) for f in dataclasses.fields(backend.template)}
        return {"kind": backend.kind, "max_batch": backend.max_batch, "embedding_only": backend.embedding_only, "embeds": backend.embeds,
                "template": template, "_describe": backend.describe(), "_identity": backend.identity()}

    @classmethod
    def from_wire(cls, values: dict[str, Any]) -> BackendFacts:
        return cls(**{**values, "template": ChatTemplate(**values["template"])})

    def describe(self) -> dict[str, Any]:
        return self.fresh() or dict(self._describe)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)


def portable_error(exc: BaseException) -> tuple[Any, ...]:
    """An exception as it crosses: a WireError by its fields, others pickled (the daemon's
    one boundary turns their types into wire errors), or by their text if they do not pickle."""
    if isinstance(exc, WireError):
        return ("wire", int(exc.code), exc.message, exc.details)
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return ("pickled", data)
    except Exception:
        return ("text", f"{exc.__class__.__name__}: {exc}")


def raised_error(error: tuple[Any, ...]) -> BaseException:
    """The exception ``portable_error`` carried."""
    if error[0] == "wire":
        return WireError(ErrorCode(error[1]), error[2], **error[3])
    if error[0] == "pickled":
        return pickle.loads(error[1])
    return WireError(ErrorCode.INTERNAL, f"internal error in the runner: {error[1]}")
