"""Named timers with Megatron's `--timing-log-level` and its "(min, max) time across ranks" report.

Level 0 times only the iteration, 1 adds the big phases (forward-backward, optimizer, gradient
all-reduce), 2 the fine-grained ones (per micro-batch compute, p2p). A timer asked for above the
run's level is a shared no-op, so fine-grained timing costs nothing when it is off. Reading the
clock first waits for the device (a no-op on CPU), so GPU timings mean the work finished.
The clock is injectable so that tests can check the arithmetic with exact numbers.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from megalith.device import synchronize
from megalith.errors import ConfigError

TIMING_LOG_LEVELS = (0, 1, 2)
_NAME_WIDTH = 48  # Megatron pads "name " with dots to this width


def _check_level(level: int, what: str) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level not in TIMING_LOG_LEVELS:
        raise ConfigError(f"{what} must be 0, 1 or 2, got {level!r}; use 0 (iteration), 1 (phases) or 2 (everything)")
    return level


class TimerError(RuntimeError):
    """A timer was used out of order (started twice, stopped while not running)."""


class Timer:
    """Accumulates the time between start() and stop() calls until elapsed(reset=True) reads it."""

    def __init__(self, name: str, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.name = name
        self._device = device
        self._clock = clock
        self._elapsed = 0.0
        self._started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def _now(self) -> float:
        synchronize(self._device)
        return self._clock()

    def start(self) -> None:
        if self._started_at is not None:
            raise TimerError(f"timer {self.name!r} was started twice; stop() it before starting it again")
        self._started_at = self._now()

    def stop(self) -> None:
        if self._started_at is None:
            raise TimerError(f"timer {self.name!r} was stopped without being started; call start() first")
        self._elapsed += self._now() - self._started_at
        self._started_at = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated so far (a running timer counts up to now and keeps running)."""
        running = self.running
        if running:
            self.stop()
        total = self._elapsed
        if reset:
            self._elapsed = 0.0
        if running:
            self.start()
        return total


class _NoOpTimer(Timer):
    """What a timer above the log level is: every call does nothing and it reads zero."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0


class Timers:
    """The run's timers by name, each created on first use at a log level (0, 1 or 2)."""

    def __init__(
        self,
        log_level: int,
        device: torch.device | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log_level = _check_level(log_level, "--timing-log-level")
        self.device = device if device is not None else torch.device("cpu")
        self._clock = clock
        self._timers: dict[str, Timer] = {}
        self._levels: dict[str, int] = {}
        self._no_op = _NoOpTimer("no-op", self.device, clock)

    def __call__(self, name: str, log_level: int = 0) -> Timer:
        _check_level(log_level, f"log level of timer {name!r}")
        if name in self._levels and self._levels[name] != log_level:
            raise ConfigError(
                f"timer {name!r} was created at log level {self._levels[name]} and is now asked for at "
                f"{log_level}; use one level per timer name"
            )
        self._levels[name] = log_level
        if log_level > self.log_level:
            return self._no_op
        if name not in self._timers:
            self._timers[name] = Timer(name, self.device, self._clock)
        return self._timers[name]

    def active_names(self) -> list[str]:
        """The timers that really time at this log level (created, not no-ops), in creation order."""
        return list(self._timers)

    def elapsed_ms(self, names: Iterable[str] | None = None, reset: bool = True) -> dict[str, float]:
        """This rank's milliseconds per timer (0 for a name never started here), in the order asked."""
        names = list(self._timers) if names is None else list(names)
        return {name: self._timers[name].elapsed(reset) * 1000.0 if name in self._timers else 0.0 for name in names}

    def format(
        self,
        names: Iterable[str] | None = None,
        group=None,
        reset: bool = True,
        *,
        normalizer: float = 1.0,
    ) -> str:
        """Megatron's report: a "(min, max) time across ranks (ms):" line, then one line per timer.

        With a process group, every rank of it must call this (it is collective); min and max are
        over the ranks where the timer ran, and a timer that ran nowhere is left out, as in Megatron.
        Without a group the numbers are this rank's. Times are divided by `normalizer` (pass the log
        interval for a per-iteration average). Returns "" when no timer has anything to report.
        """
        if normalizer <= 0:
            raise ConfigError(
                f"timer normalizer must be positive, got {normalizer}; pass the number of iterations timed"
            )
        names = None if names is None else list(names)
        if group is not None and names is None:
            names = _union_of_names_over(group, list(self._timers))
        per_rank = self.elapsed_ms(names, reset)
        names = list(per_rank)
        if not names:  # the same on every rank of the group, so nobody waits in a collective
            return ""
        values = torch.tensor([per_rank[name] for name in names], dtype=torch.float64)
        if group is not None:
            values = _all_gather_rows(values, group, self.device)
        else:
            values = values.unsqueeze(0)
        lines = ["(min, max) time across ranks (ms):"]
        for column, name in enumerate(names):
            ran = values[:, column][values[:, column] > 0.0]
            if ran.numel() == 0:
                continue
            label = (name + " ").ljust(_NAME_WIDTH, ".")
            lines.append(f"    {label}: ({ran.min().item() / normalizer:.2f}, {ran.max().item() / normalizer:.2f})")
        return "\n".join(lines) if len(lines) > 1 else ""


def _union_of_names_over(group, names: list[str]) -> list[str]:
    """Every rank's timer names, in rank order of first appearance (ranks may time different phases).
    A gather of pickled objects, the one operation that bypasses megalith.parallel.comm: it moves
    no tensor, so it has no byte count to add to the communication ledger."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, names, group=group)
    union: dict[str, None] = {}
    for rank_names in gathered:
        union.update(dict.fromkeys(rank_names))
    return list(union)


def _all_gather_rows(values: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    """[ranks, names]: every rank's row of the group."""
    from megalith.parallel import comm

    local = values.to(device)
    rows = torch.empty((comm.group_size(group),) + tuple(local.shape), dtype=local.dtype, device=local.device)
    comm.all_gather_into(rows.view(-1), local.contiguous().view(-1), group)
    return rows.cpu()
