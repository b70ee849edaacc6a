"""Run a function on N ranks on one machine: the multi-rank harness (public API).

Starting ranks is the expensive part of a multi-process test on a CPU (seconds), so a
`RankPool` forks its ranks once, joins them into one gloo world, and then runs any number of
functions on them. A rank that raises or dies brings the whole pool down at once with that
rank's traceback; a call that runs too long is killed. Nothing ever hangs.

    def check(ctx, n):
        state = ctx.parallel_state(tp=2)
        return state.tp_rank * n

    with RankPool(4) as pool:
        print(pool.run(check, 10))     # [0, 10, 0, 10]

Functions (and their arguments and results) cross process boundaries by pickle: define them
at module level.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from megalith.errors import ConfigError

DEFAULT_CALL_TIMEOUT_S = 300.0
DEFAULT_GROUP_TIMEOUT_S = 60.0


class RankFailedError(RuntimeError):
    """A rank raised, died or ran past the time limit; the message carries its traceback."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RankContext:
    """What a function run by the pool receives as its first argument on each rank."""

    rank: int
    world_size: int
    group_timeout_s: float
    master_port: int
    _states: dict = field(default_factory=dict, repr=False)

    def parallel_state(self, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None, ep: int = 1,
                       etp: int | None = None):
        """The ParallelState for this layout, built once and reused. Without dp the layout takes
        the whole pool; with dp it takes the first tp x cp x dp x pp ranks and the others get
        None (they idle while the layout runs).

        Every rank must ask for the same layouts in the same order (group creation is collective).
        """
        from megalith.parallel.grid import RankGrid
        from megalith.parallel.state import ParallelState

        key = (tp, pp, cp, dp) if (ep, etp) == (1, None) else (tp, pp, cp, dp, ep, etp)
        if key not in self._states:
            size = self.world_size if dp is None else tp * pp * cp * dp
            if size > self.world_size:
                raise ConfigError(f"layout tp{tp}.cp{cp}.dp{dp}.pp{pp} needs {size} ranks; the pool has {self.world_size}")
            grid = RankGrid(size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp)
            self._states[key] = ParallelState.from_grid(grid, backend="gloo", idle_ranks=True)
        return self._states[key]


def _worker_main(rank: int, world_size: int, port: int, conn, group_timeout_s: float, join_world: bool) -> None:
    """Body of one rank: join the world, then run whatever the parent sends until told to stop."""
    import torch

    torch.set_num_threads(1)  # before any torch op: forked children hang in multi-threaded ops
    import torch.distributed as dist

    status = 0
    try:
        if join_world:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=group_timeout_s),
            )
        ctx = RankContext(rank, world_size, group_timeout_s, port)
        conn.send_bytes(pickle.dumps(("ready", None)))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message is None:
                break
            fn, args, kwargs = message
            try:
                reply = ("ok", fn(ctx, *args, **kwargs))
            except BaseException:  # report everything, the parent decides
                reply = ("error", traceback.format_exc())
            try:
                payload = pickle.dumps(reply)
            except Exception:
                payload = pickle.dumps(("error", "result could not be pickled:\n" + traceback.format_exc()))
            conn.send_bytes(payload)
        if dist.is_initialized():
            dist.destroy_process_group()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        status = 1
    except BaseException:
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        except Exception:
            pass
        status = 1
    finally:
        os._exit(status)  # skip atexit handlers inherited from the parent (pytest, torch)


class RankPool:
    """`world_size` forked ranks in one gloo world that run functions on request.

    `run(fn, *args)` calls `fn(ctx, *args)` on every rank and returns the per-rank results in
    rank order. Any failure kills all ranks and raises RankFailedError; the next `run` starts a
    fresh world. With join_world=False the ranks start without a process group and
    `ctx.master_port` is a free port for the function to build its own (to test launch code).
    """

    def __init__(
        self,
        world_size: int,
        *,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
        join_world: bool = True,
    ) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
        self.world_size = world_size
        self.call_timeout_s = call_timeout_s
        self.group_timeout_s = group_timeout_s
        self.join_world = join_world
        self._processes: list = []
        self._conns: list = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return bool(self._processes)

    def start(self) -> None:
        """Fork the ranks and wait until all have joined the process group."""
        if self.started:
            return
        import torch.distributed  # noqa: F401  (imported once here, inherited by every fork)

        context = mp.get_context("fork")
        port = free_port()
        for rank in range(self.world_size):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, child_end, self.group_timeout_s, self.join_world),
                name=f"megalith-rank{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)
        self._collect(self.group_timeout_s + 30.0, "joining the process group")

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list:
        """Run fn(ctx, *args, **kwargs) on every rank; return the results in rank order."""
        self.start()
        payload = pickle.dumps((fn, args, kwargs))
        for conn in self._conns:
            conn.send_bytes(payload)
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(timeout_s or self.call_timeout_s, name)

    def close(self) -> None:
        """Stop the ranks: politely if they are idle, by force otherwise."""
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=5.0)
        self._kill()

    def _kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=5.0)
        for conn in self._conns:
            conn.close()
        self._processes, self._conns = [], []

    def _fail(self, message: str) -> None:
        self._kill()
        raise RankFailedError(message)

    def _collect(self, timeout_s: float, what: str) -> list:
        """Wait for one reply per rank; on the first error, death or the deadline, fail all."""
        import time

        deadline = time.monotonic() + timeout_s
        results: dict[int, Any] = {}
        by_conn = {conn: rank for rank, conn in enumerate(self._conns)}
        by_sentinel = {p.sentinel: rank for rank, p in enumerate(self._processes)}
        while len(results) < self.world_size:
            remaining = deadline - time.monotonic()
            pending = [c for c, r in by_conn.items() if r not in results]
            sentinels = [s for s, r in by_sentinel.items() if r not in results]
            ready = mp_connection.wait(pending + sentinels, timeout=max(remaining, 0.0))
            if not ready:
                waiting = sorted(r for r in range(self.world_size) if r not in results)
                self._fail(f"{what}: ranks {waiting} did not finish within {timeout_s:.0f} s; all ranks killed")
            # Replies first: a rank that reported an error and then exited should be blamed
            # with its traceback, not merely as dead.
            for item in sorted(ready, key=lambda x: x not in by_conn):
                rank = by_conn[item] if item in by_conn else by_sentinel[item]
                if rank in results:
                    continue
                conn = self._conns[rank]
                if conn.poll():
                    try:
                        kind, value = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        kind, value = "died", None
                    if kind == "error":
                        self._fail(f"{what}: rank {rank} of {self.world_size} failed:\n{value}")
                    if kind != "died":
                        results[rank] = value
                        continue
                if not self._processes[rank].is_alive():
                    code = self._processes[rank].exitcode
                    self._fail(f"{what}: rank {rank} of {self.world_size} died (exit code {code}) without a result")
        return [results[rank] for rank in range(self.world_size)]


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list:
    """One-shot: start `world_size` ranks, run fn(ctx, *args, **kwargs) on each, stop them."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, **kwargs)
