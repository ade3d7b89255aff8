"""Clients take turns: the one served least recently first (a new one before all), each
one's own requests in arrival order. The scheduler orders what waits for every model by it,
and each runner the few generations it was given. Not locked: its owner's lock guards it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, TypeVar

T = TypeVar("T")

#: Clients whose last turn is remembered (the longest unserved go first).
CLIENTS_REMEMBERED = 4096


class Turns:
    def __init__(self) -> None:
        self._count = itertools.count()
        self._last: OrderedDict[Hashable, int] = OrderedDict()  # client -> when it was last served

    def order(self, items: Iterable[T], client: Callable[[T], Hashable], received: Callable[[T], float]) -> list[T]:
        """``items`` (in arrival order) in the order they are served."""
        mine: dict[Hashable, list[T]] = {}
        for item in items:
            mine.setdefault(client(item), []).append(item)
        clients = sorted(mine, key=lambda c: (self._last.get(c, -1), received(mine[c][0])))
        order: list[T] = []
        for rank in range(max((len(q) for q in mine.values()), default=0)):
            order += [mine[c][rank] for c in clients if rank < len(mine[c])]
        return order

    def served(self, client: Hashable) -> None:
        self._last[client] = next(self._count)
        self._last.move_to_end(client)
        while len(self._last) > CLIENTS_REMEMBERED:
            self._last.popitem(last=False)
