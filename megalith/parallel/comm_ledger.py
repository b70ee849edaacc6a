"""The communication ledger: calls and bytes of every collective and p2p, per group kind and operation.

`megalith.parallel.comm` is the one seam through which megalith communicates; each of its
operations adds to the ledger that is active when it is issued. A ledger knows the group
kinds of one `ParallelState` (tp, cp, dp, pp, mp, dp_cp, tp_cp, embedding: whatever the grid
has), so a count says which axis the traffic crossed; a group it does not know counts as
"other".

Byte convention: the bytes of the logical full tensor of the operation, on the rank that
issues it, whatever algorithm the backend uses (ring, tree, ...):

    all_reduce       the buffer reduced
    all_gather       the gathered output (group size x this rank's input)
    reduce_scatter   the unscattered input (group size x this rank's output)
    broadcast        the tensor broadcast (source and receivers alike)
    send / recv      the tensor sent / received
    all_to_all       the input this rank sends (its rows for every rank, its own included)

An operation over a group of one rank moves nothing and is not counted. So the analytic
volumes come out as exact equalities: a tensor-parallel layer's all-reduce of
the activations counts s·b·h·(bytes per element), and under sequence parallelism its
all-gather and reduce-scatter count the same s·b·h each. Wire traffic of a ring all-reduce is
2·(n-1)/n of the buffer per rank; that factor is the backend's, not the model's, and is left out.

No module-level mutable state: a ledger is an object, made active for a region by `counting`
(a ContextVar, so concurrent runs in one process do not mix). Autograd may run backward on
another thread (it does on GPUs), where the ContextVar is not set: the autograd mappings
capture the active ledger in forward, and the data-parallel buffer when its hooks are armed,
and count into that one. With no ledger active, counting costs one ContextVar lookup per
operation.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

OPERATIONS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv", "all_to_all")
OTHER_KIND = "other"  # a group the ledger was not told about

_ACTIVE: ContextVar["CommLedger | None"] = ContextVar("megalith_comm_ledger", default=None)


@dataclass(frozen=True)
class CommCall:
    """One operation as the ledger saw it (kept only with `record_calls`)."""

    kind: str
    op: str
    bytes: int


class CommLedger:
    """Calls and bytes per (group kind, operation) of what was issued while the ledger was active.

    `kinds` maps process groups to their kind; `for_state` builds it from a ParallelState. With
    `record_calls`, `history` also lists every operation in order (for tests that check sizes
    one by one, e.g. one all-reduce per data-parallel bucket)."""

    def __init__(self, kinds: Mapping[Any, str] | None = None, *, record_calls: bool = False) -> None:
        self._groups = list((kinds or {}).items())  # keeps the groups alive, so their ids stay theirs
        self._kind_of: dict[int, str] = {}
        for group, kind in self._groups:
            self._kind_of.setdefault(id(group), kind)
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()  # forward and a backward thread may both count
        self.history: list[CommCall] | None = [] if record_calls else None

    @classmethod
    def for_state(cls, state, *, record_calls: bool = False) -> "CommLedger":
        """A ledger knowing every group of `state` (a ParallelState; None: one process, no groups)."""
        groups = {} if state is None else {group: kind for kind, group in state.groups.items() if group is not None}
        return cls(groups, record_calls=record_calls)

    def kind_of(self, group) -> str:
        return self._kind_of.get(id(group), OTHER_KIND)

    def add(self, group, op: str, nbytes: int) -> None:
        """Count one operation of `op` over `group` moving `nbytes` (the convention above)."""
        if op not in OPERATIONS:
            raise ValueError(f"unknown communication operation {op!r}; one of {', '.join(OPERATIONS)}")
        kind = self.kind_of(group)
        with self._lock:
            entry = self._totals.setdefault((kind, op), [0, 0])
            entry[0] += 1
            entry[1] += nbytes
            if self.history is not None:
                self.history.append(CommCall(kind, op, nbytes))

    def calls(self, kind: str | None = None, op: str | None = None) -> int:
        """Operations counted, over every kind / op when that argument is None."""
        return sum(c for (k, o), (c, _) in self._items() if kind in (None, k) and op in (None, o))

    def bytes(self, kind: str | None = None, op: str | None = None) -> int:
        """Bytes counted, over every kind / op when that argument is None."""
        return sum(b for (k, o), (_, b) in self._items() if kind in (None, k) and op in (None, o))

    def _items(self) -> list[tuple[tuple[str, str], tuple[int, int]]]:
        with self._lock:
            return [(key, (c, b)) for key, (c, b) in self._totals.items()]

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """{kind: {op: {"calls": n, "bytes": b}}}, kinds and ops sorted: the --log-comm-bytes record."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (kind, op), (calls, nbytes) in sorted(self._items()):
            out.setdefault(kind, {})[op] = {"calls": calls, "bytes": nbytes}
        return out

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()
            if self.history is not None:
                self.history.clear()


def active_ledger() -> CommLedger | None:
    """The ledger counting in this context (None: counting is off)."""
    return _ACTIVE.get()


@contextmanager
def counting(ledger: CommLedger | None) -> Iterator[CommLedger | None]:
    """Make `ledger` the active one for the region (None: count nothing there, even inside another region)."""
    token = _ACTIVE.set(ledger)
    try:
        yield ledger
    finally:
        _ACTIVE.reset(token)
