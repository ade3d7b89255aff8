"""One module per operation. Each exposes ``OP`` and ``execute(ctx, request)``.

The socket loop checks a request's fields against the protocol schema (rkllmd/schema.py)
before ``execute`` sees them. ``execute`` returns the result map of a one-shot reply;
or a Future (as circus's commands do) when the answer comes later (a ``cache.wait``,
work that reads or hashes files and so runs off the loop), resolved with the result map
or a WireError; or None when the operation answers with its own stream (``generate``).
It raises WireError for anything the client did wrong; the loop turns that into a reply.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

from ..schema import OPERATIONS
from . import cache_ls, cache_put, cache_rebuild, cache_rm, cache_show, cache_wait, cancel, copy, create, delete, embed, generate, load, models, ping, pull, render, status
from .context import Context, Request

Reply = dict[str, Any] | Future | None
Execute = Callable[[Context, Request], Reply]

REGISTRY: dict[str, Execute] = {
    module.OP: module.execute
    for module in (generate, render, embed, cancel, status, ping, cache_ls, cache_show, cache_put, cache_rm, cache_rebuild, cache_wait, models, create, copy, delete, load, pull)
}
assert REGISTRY.keys() == OPERATIONS.keys(), "every operation of the schema has its command, and no other"
