"""The loop's housekeeping around the steps: profiling, manual garbage collection, cache emptying,
and the memory and timer scalars of TensorBoard. None of it changes a number of the training.

Megatron's meanings:

- `--profile`: a torch.profiler trace on each rank of `--profile-ranks`, of iterations
  `--profile-step-start` .. `--profile-step-end` - 1 (the log line's numbering), with Megatron's
  schedule: one warm-up iteration before the window, written under `--tensorboard-dir` as
  `rank<R>.<ns>.pt.trace.json` (Chrome trace JSON; Perfetto and TensorBoard's profiler read it).
  A resumed run keeps the window on the same iterations, and profiles nothing once past it.
- `--manual-gc`: the automatic collector is off for the run (a collection that starts in the
  middle of a step on one rank stalls every rank waiting for it); everything is collected at the
  start, every `--manual-gc-interval` iterations, and around each evaluation with
  `--manual-gc-eval` (all generations before, the youngest after). The collector is switched
  back on when training ends.
- `--empty-unused-memory-level`: 1 empties the allocator's cache after every step, 2 also after
  each evaluation (on CUDA; elsewhere there is no cache and nothing happens).
"""

from __future__ import annotations

import gc as _gc
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from megalith.device import empty_cache as _empty_cache, memory_stats

# TensorBoard names of megalith.device.memory_stats' counters, as Megatron's.
MEMORY_SCALARS = {"allocated_bytes": "mem-allocated-bytes", "reserved_bytes": "mem-reserved-bytes",
                  "max_allocated_bytes": "mem-max-allocated-bytes", "allocation_count": "mem-allocated-count"}
# Off CUDA: the process's peak resident set, the one memory number every OS keeps.
MAX_RSS_SCALAR = "mem-max-rss-bytes"
# The step's timers that --log-timers-to-tensorboard plots, in seconds per iteration ("<name>-time").
TENSORBOARD_TIMERS = ("forward-backward", "optimizer")


def profiler_schedule(start: int, end: int, resumed_at: int) -> dict[str, int] | None:
    """torch.profiler.schedule's wait/warmup/active for iterations start .. end-1 (1-based, as the
    log line counts) when the loop begins after `resumed_at` finished iterations and the profiler
    steps once before each iteration. None when the window is already over."""
    if end - 1 <= resumed_at:
        return None
    lead = start - resumed_at  # profiler steps before the first profiled iteration
    if lead >= 1:  # Megatron's: wait, one warm-up iteration, then the window
        return {"wait": lead - 1, "warmup": 1, "active": end - start, "repeat": 1}
    return {"wait": 0, "warmup": 0, "active": end - resumed_at, "repeat": 1}  # from the very start


def max_rss_bytes() -> int | None:
    """This process's peak resident set size (None where the OS does not say)."""
    try:
        import resource  # POSIX only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, AttributeError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB, macOS bytes


class RunHousekeeping:
    """What `Trainer.train` calls around its steps; built from the training and logging sections.

    `gc_module` and `empty_cache` are injectable so tests can count the calls.
    """

    def __init__(self, training, logging, rank: int, device: torch.device, *, gc_module=None,
                 empty_cache: Callable[[torch.device], None] | None = None, notice: Callable[[str], None] = print):
        self.training, self.logging, self.rank, self.device = training, logging, rank, device
        self._gc, self._notice = gc_module or _gc, notice
        self._empty_cache = empty_cache or _empty_cache
        self._gc_was_enabled: bool | None = None
        self.profiler: torch.profiler.profile | None = None

    @property
    def profiling_here(self) -> bool:
        return self.training.profile and self.rank in self.training.profile_ranks

    def start(self, iteration: int) -> None:
        """Before the first step; `iteration` is the number already done (a resumed run's)."""
        if self.training.manual_gc:
            self._gc_was_enabled = self._gc.isenabled()
            self._gc.disable()
            self._gc.collect()
        if self.profiling_here:
            self._start_profiler(iteration)

    def _start_profiler(self, iteration: int) -> None:
        t = self.training
        schedule = profiler_schedule(t.profile_step_start, t.profile_step_end, iteration)
        if schedule is None:
            self._notice(f"--profile: iterations {t.profile_step_start}..{t.profile_step_end - 1} are before the "
                         f"resumed iteration {iteration}; nothing is profiled")
            return
        handler = torch.profiler.tensorboard_trace_handler(self.logging.tensorboard_dir, worker_name=f"rank{self.rank}")
        self.profiler = torch.profiler.profile(schedule=torch.profiler.schedule(**schedule), on_trace_ready=handler,
                                               record_shapes=True, with_stack=True)
        self.profiler.start()

    def before_step(self) -> None:
        """At the top of each iteration: the profiler's schedule advances by one."""
        if self.profiler is not None:
            self.profiler.step()

    def after_step(self, iteration: int) -> None:
        """After iteration `iteration` (1-based, evaluation included), before checkpointing."""
        if self.profiler is not None and iteration >= self.training.profile_step_end - 1:
            self._stop_profiler()  # the window's last iteration: the trace is written now
        if self.training.empty_unused_memory_level >= 1:
            self._empty_cache(self.device)
        interval = self.training.manual_gc_interval
        if self.training.manual_gc and interval and iteration % interval == 0:
            self._gc.collect()

    @contextmanager
    def around_evaluation(self) -> Iterator[None]:
        t = self.training
        if t.manual_gc and t.manual_gc_eval:
            self._gc.collect()
        yield
        if t.manual_gc and t.manual_gc_eval:
            self._gc.collect(0)  # what the evaluation itself left behind
        if t.empty_unused_memory_level >= 2:
            self._empty_cache(self.device)

    def _stop_profiler(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()

    def close(self) -> None:
        """After the loop, however it ended: a window cut short is written as far as it got."""
        try:
            if self.profiler is not None:
                self._stop_profiler()
        finally:
            if self._gc_was_enabled:
                self._gc.enable()
            self._gc_was_enabled = None

    # --- TensorBoard's extra scalars ----------------------------------------------------------

    def tensorboard_scalars(self, timers, iterations: int) -> dict[str, float]:
        """--log-memory-to-tensorboard and --log-timers-to-tensorboard's scalars for this log
        interval (timers are read without resetting them: the log line reads them next)."""
        scalars: dict[str, float] = {}
        if self.logging.log_memory_to_tensorboard:
            stats = memory_stats(self.device)
            scalars.update({MEMORY_SCALARS[key]: value for key, value in stats.items()})
            if not stats and (rss := max_rss_bytes()) is not None:
                scalars[MAX_RSS_SCALAR] = rss
        if self.logging.log_timers_to_tensorboard:
            ran = [name for name in TENSORBOARD_TIMERS if name in timers.active_names()]
            per_iteration = max(iterations, 1)
            scalars.update({f"{name}-time": ms / 1000.0 / per_iteration
                            for name, ms in timers.elapsed_ms(ran, reset=False).items()})
        return scalars
