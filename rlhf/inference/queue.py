"""The engine's queue of waiting requests: one FIFO per team, served in turn.

A request joins its team's queue; rows that free up go to the team whose turn it is, one request
per turn (round robin over the teams with waiting requests). So a burst of one team's requests
waits behind its own earlier requests, not in front of another team's: each team with work gets
every k-th admission when k teams wait, whatever their queue lengths.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, team_of: Callable[[T], str]):
        self._team_of = team_of
        self._queues: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()  # teams with waiting items, the next one first

    def append(self, item: T) -> None:
        team = self._team_of(item)
        q = self._queues.get(team)
        if q is None:
            q = self._queues[team] = deque()
            self._turns.append(team)
        q.append(item)

    def head(self) -> T | None:
        """The item to serve next (the oldest of the team whose turn it is)."""
        return self._queues[self._turns[0]][0] if self._turns else None

    def pop(self) -> T:
        """Take :meth:`head`; the next team gets the next turn."""
        team = self._turns.popleft()
        q = self._queues[team]
        item = q.popleft()
        if q:
            self._turns.append(team)
        else:
            del self._queues[team]
        return item

    def remove_if(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove and return the items for which ``pred`` is true (in queue order per team)."""
        removed: list[T] = []
        for team in list(self._turns):
            q = self._queues[team]
            keep = deque(x for x in q if not pred(x))
            if len(keep) != len(q):
                removed.extend(x for x in q if pred(x))
                if keep:
                    self._queues[team] = keep
                else:
                    del self._queues[team]
                    self._turns.remove(team)
        return removed

    def clear(self) -> None:
        self._queues.clear()
        self._turns.clear()

    def __iter__(self) -> Iterator[T]:
        for team in self._turns:
            yield from self._queues[team]

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._turns)
