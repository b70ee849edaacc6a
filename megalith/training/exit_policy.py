"""When a run should save and stop early: SIGTERM (Slurm's warning before a kill), an iteration
interval, or a wall-clock budget (Megatron's --exit-signal-handler, --exit-interval,
--exit-duration-in-mins).

Ranks must stop at the same iteration, or the ones still training would wait forever in a
collective: after every iteration each rank contributes whether it wants to stop (a signal
can reach ranks at different moments; only rank 0's clock counts for the duration) and the
maximum over the job decides, one small all-reduce that is skipped when no exit condition is
configured.
"""

from __future__ import annotations

import signal
import time

from megalith.parallel.comm import max_over_job


class ExitPolicy:
    """Decides, the same on every rank, whether to save and leave after an iteration."""

    def __init__(self, checkpointing, state, *, started: float | None = None) -> None:
        self.interval = checkpointing.exit_interval
        self.duration_s = checkpointing.exit_duration_in_mins * 60 if checkpointing.exit_duration_in_mins else None
        self.state = state
        self.started = time.monotonic() if started is None else started
        self.signalled = False
        self._previous_handler = None
        if checkpointing.exit_signal_handler:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # see block_sigterm_in_new_threads
        self.active = bool(checkpointing.exit_signal_handler or self.interval or self.duration_s)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on after the current iteration, when every rank agrees

    def reason(self, iteration: int) -> str | None:
        """Why to stop after `iteration` (agreed by every rank), or None to go on."""
        if not self.active:
            return None
        wants = 0.0
        if self.signalled:
            wants = 3.0
        elif self.duration_s is not None and self.state.rank == 0 and time.monotonic() - self.started >= self.duration_s:
            wants = 2.0
        elif self.interval is not None and iteration % self.interval == 0:
            wants = 1.0
        return {0.0: None, 1.0: f"--exit-interval {self.interval}", 2.0: "--exit-duration-in-mins",
                3.0: "SIGTERM"}[max_over_job(wants, self.state)]

    def close(self) -> None:
        """Give SIGTERM back, unless it came: then a repeat during the clean exit is ignored."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.signalled else self._previous_handler)
            self._previous_handler = None


def block_sigterm_in_new_threads() -> None:
    """Call before the process groups start: the threads they create (gloo's, the store's)
    inherit a mask without SIGTERM, so the signal reaches the main thread, where Python runs the
    handler, instead of interrupting a library thread's system call (seen as an abort at exit).
    ExitPolicy unblocks it in the main thread once its handler is installed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
