"""One module per operation. Each exposes ``OP`` and ``execute(daemon, identity, request)``.

``execute`` returns the result map for a one-shot reply, or None when it replies on its
own (a generation's stream, a ``cache.wait`` that is answered later). It raises
WireError for anything the client did wrong; the socket loop turns that into a reply.
"""

from __future__ import annotations

from typing import Any, Callable

from . import cache_ls, cache_put, cache_rebuild, cache_rm, cache_show, cache_wait, cancel, generate, ping, status

Execute = Callable[[Any, bytes, dict[str, Any]], dict[str, Any] | None]

REGISTRY: dict[str, Execute] = {
    module.OP: module.execute
    for module in (generate, cancel, status, ping, cache_ls, cache_show, cache_put, cache_rm, cache_rebuild, cache_wait)
}
