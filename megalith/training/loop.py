"""`megalith pretrain`'s loop: build this rank's part of the model, train, evaluate, report.

`pretrain(config, state)` runs on every rank of a job whose process groups exist (`state`):
under torchrun/srun `run_pretrain` builds them from the environment; tests pass the state of a
RankPool. The last rank (last pipeline stage, which computes the loss) prints Megatron's
iteration line and feeds the JSON-lines / TensorBoard / wandb writers.

Data (megalith.training.data): with `--mock-data` every global batch is drawn from the model's
registry entry, seeded by (seed, split, iteration); with `--data-path` it is the next global
batch of samples of the split's dataset. Either way every layout sees the same samples; each
dp rank takes its fixed slice and micro-batches are slices of that.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn
from datetime import datetime

import torch

from megalith.parallel.comm_ledger import CommLedger, counting
from megalith.parallel.layers import padded_vocab_size
from megalith.config.arguments import resolved_config_directory, write_resolved_config
from megalith.training.checkpoint import Checkpointer
from megalith.config.pretrain import PretrainConfig
from megalith.training.data import TRAIN_SPLIT, VALID_SPLIT, DatasetBatches, MockBatches, run_tokenizer
from megalith.training.exit_policy import ExitPolicy, block_sigterm_in_new_threads
from megalith.training.flops import model_flops_per_iteration, tflops_per_device
from megalith.training.housekeeping import RunHousekeeping
from megalith.training.log_line import IterationLog, as_json_record, format_log_line
from megalith.training import memory_report
from megalith.training.lr_schedule import LRScheduler
from megalith.training.moe_stats import LINE_FIELDS, MoEStats, tensorboard_scalars
from megalith.training.optimizer import learning_rates
from megalith.training.progress import NullProgressBar, progress_bar
from megalith.training.step import StepPlan, assemble_runner, forward_only, sequence_mean_loss, token_sum_loss
from megalith.training.timers import Timers
from megalith.training.writers import MetricsWriters, open_writers


_SHARDING_WORDS = ("", ", distributed optimizer (ZeRO-1)", ", ZeRO-2 (optimizer and gradients sharded)",
                   ", ZeRO-3 (optimizer, gradients and parameters sharded)")


def _sharding_words(stage: int) -> str:
    """The header's words for --data-parallel-sharding-strategy (stage 0..3)."""
    return _SHARDING_WORDS[stage]


@dataclass
class IntervalStats:
    """What the log line averages over one --log-interval (Megatron's total_loss_dict)."""

    loss_sum: float = 0.0
    advanced: int = 0
    skipped: int = 0
    nan: int = 0
    iterations: int = 0
    grad_norm: float | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def mean_loss(self) -> float | None:
        """Over the iterations that updated the model; None if every one was skipped."""
        return self.loss_sum / self.advanced if self.advanced else None

    def add(self, loss: float, skipped: bool, grad_norm: float | None) -> None:
        self.iterations += 1
        if not math.isfinite(loss):
            self.nan += 1
        if skipped:
            self.skipped += 1
        elif math.isfinite(loss):
            self.loss_sum += loss
            self.advanced += 1
        self.grad_norm = grad_norm  # the interval's last iteration's, as Megatron (None when it was skipped)


class Trainer:
    """This rank's model chunks, buffers, optimizer, schedule and reporting."""

    def __init__(self, config: PretrainConfig, state, *, print_fn=print) -> None:
        self.config, self.state, self.print = config, state, print_fn
        self.is_last_rank = state.rank == state.grid.world_size - 1
        torch.manual_seed(config.training.seed)
        self.plan = StepPlan.for_pretrain(config)
        self.batches = config.batch_schedule()  # the global batch of each step (a --rampup-batch-size ramp)
        self.runner = assemble_runner(self.plan, state, config.optimizer, config.precision.make_loss_scaler())
        self.optimizer = self.runner.optimizer
        self.eval_actions = forward_only(self.runner.actions)
        self.scheduler = LRScheduler(config.lr_schedule())
        self.data = (MockBatches(config, state.device) if config.data.mock_data else
                     DatasetBatches(config, run_tokenizer(config), state.device, state))
        self.timers = Timers(config.logging.timing_log_level, state.device)
        # --log-comm-bytes: each training step's communication, counted afresh every iteration
        self.comm_ledger = CommLedger.for_state(state) if config.logging.log_comm_bytes else None
        # MoE logs: hooks on this rank's MoE layers (None, and nothing hooked, for a dense model)
        self.moe_stats = MoEStats.attach(self.runner.chunks, config.model, state)
        self.flops = model_flops_per_iteration(
            config.model, config.global_batch_size,
            padded_vocab_size(config.model.vocab_size, state.tp_size, config.model.make_vocab_size_divisible_by))
        self.iteration = 0
        self.consumed_samples = 0
        self.current_global_batch_size = config.global_batch_size  # the last step's (the log line's)
        self.valid_batches = 0  # validation walks on through its stream, as Megatron's does
        self.exit_reason = None  # why training stopped early, if it did
        self.checkpointer = Checkpointer(self.runner, state, config, log=self._notice)
        self.loaded = None
        if config.checkpointing.load:
            self.loaded = self._load(config.checkpointing)

    def _report(self, lines: list[str], emit=None) -> None:
        """Print lines every rank computed (a collective came first) from the last rank only."""
        if self.is_last_rank:
            for line in lines:
                (emit or self.print)(line)

    def _notice(self, line: str) -> None:
        if self.is_last_rank:
            self.print(line)

    def _load(self, checkpointing) -> dict | None:
        meta = self.checkpointer.load(checkpointing.load, load_optim=not checkpointing.no_load_optim,
                                      load_rng=not checkpointing.no_load_rng, finetune=checkpointing.finetune,
                                      scheduler=self.scheduler,
                                      override_scheduler=checkpointing.override_opt_param_scheduler)
        if meta is not None and not checkpointing.finetune:  # Megatron: --finetune starts at iteration 0
            self.iteration, self.consumed_samples = meta["iteration"], meta["consumed_samples"]
            self.valid_batches = meta.get("valid_batches", 0)
            if checkpointing.no_load_optim:  # the schedule follows the samples (Megatron's --no-load-optim)
                self.scheduler.num_samples = self.consumed_samples
        return meta

    def save(self) -> str:
        path = self.checkpointer.save(self.config.checkpointing.save, self.iteration, self.consumed_samples,
                                      self.valid_batches, self.scheduler)
        self._notice(f"saved checkpoint {path} at iteration {self.iteration}")
        return path

    def loss_fn(self, per_token, batch, global_batch_size: int | None = None):
        """A micro-batch's share of the loss of a step of `global_batch_size` (None: the full batch);
        with --calculate-per-token-loss its (sum, tokens)."""
        if self.plan.calculate_per_token_loss:
            return token_sum_loss(per_token, batch)
        return sequence_mean_loss(per_token, batch, global_batch_size or self.config.global_batch_size)

    # --- one step and one evaluation ------------------------------------------------------

    def train_step(self):
        """One step of the global batch the consumed samples call for (Megatron's update_num_microbatches)."""
        plan = self.batches.plan_at(self.consumed_samples)
        size = plan.global_batch_size
        micro = self.data.micro_batches(plan, self.state.dp_rank, TRAIN_SPLIT, self.iteration,
                                        first_sample=self.consumed_samples)
        if self.comm_ledger is not None:
            self.comm_ledger.reset()
        with counting(self.comm_ledger):
            report = self.runner.train_step(micro, lambda per_token, batch: self.loss_fn(per_token, batch, size),
                                            learning_rates(self.scheduler, self.config.optimizer), timers=self.timers,
                                            num_micro_batches=plan.num_micro_batches)
        if not report.outcome.skipped:  # Megatron advances the schedule only on a real update
            self.scheduler.step(size)
        self.iteration += 1
        self.consumed_samples += size
        self.current_global_batch_size = size
        return report.loss, report.outcome

    def evaluate(self) -> float:
        iters = self.config.training.eval_iters
        total = 0.0
        for _ in range(iters):
            micro = self.data.micro_batches(self.plan.batch, self.state.dp_rank, VALID_SPLIT, self.valid_batches)
            total += self.runner.evaluate(micro, self.loss_fn, self.eval_actions)
            self.valid_batches += 1
        return total / iters

    # --- the loop ---------------------------------------------------------------------------

    def startup_lines(self) -> list[str]:
        c, s = self.config, self.state
        params = sum(p.numel() for chunk in self.runner.chunks for p in chunk.parameters())
        lines = [
            f"megalith pretrain: {c.training.model}, {c.model.num_layers} layers, hidden {c.model.hidden_size}, "
            f"{c.model.params_dtype}; world {c.layout.world_size} = tp {s.tp_size} x pp {s.pp_size} (vpp "
            f"{c.layout.vpp}) x dp {s.dp_size}, {c.layout.pipeline_schedule}"
            f"{', sequence parallel' if c.distributed.sequence_parallel else ''}"
            + _sharding_words(c.distributed.zero_stage),
            f"global batch {c.global_batch_size} = micro-batch {c.training.micro_batch_size} x dp {s.dp_size} x "
            f"{c.num_micro_batches} micro-batches; {c.training.train_iters} iterations"
            + (f"; ramp-up from {c.training.rampup_batch_size[0]} by {c.training.rampup_batch_size[1]} over "
               f"{c.training.rampup_batch_size[2]} samples" if c.training.rampup_batch_size else ""),
            f"parameters on the last rank: {params:,}; optimizer: {self.optimizer.backend.name}",
        ]
        if self.optimizer.backend.notice:
            lines.append(f"notice: {self.optimizer.backend.notice}")
        return lines + [f"notice: {n}" for n in c.notices]

    def log(self, stats: IntervalStats, writers: MetricsWriters, emit, moe: dict | None = None) -> None:
        """The log line and the writers' record; `moe`: MoEStats.reduce's summary of the interval."""
        elapsed = (time.perf_counter() - stats.started) / max(stats.iterations, 1)
        c, size = self.config, self.current_global_batch_size
        flops = self.flops * size / c.global_batch_size  # the last step's batch (a ramp-up's)
        entry = IterationLog(
            iteration=self.iteration, train_iters=c.training.train_iters, consumed_samples=self.consumed_samples,
            elapsed_ms=elapsed * 1000.0, tflops_per_device=tflops_per_device(flops, elapsed, c.layout.world_size),
            tokens_per_s=size * c.model.seq_length / elapsed, learning_rate=self.scheduler.lr,
            global_batch_size=size, lm_loss=stats.mean_loss,
            loss_scale=self.optimizer.loss_scale, grad_norm=stats.grad_norm, skipped_iterations=stats.skipped,
            nan_iterations=stats.nan, timestamp=datetime.now(),
            moe_losses=tuple((name, moe[name]) for name in LINE_FIELDS if moe and name in moe))
        emit(format_log_line(entry))
        # this (last) rank's times per iteration; gathering them would need every rank to log
        timing = self.timers.format(["forward-backward", "optimizer"], reset=True, normalizer=max(stats.iterations, 1))
        if timing:
            emit(timing)
        record = as_json_record(entry)
        if self.iteration == c.training.log_interval:  # once: this rank's persistent storage (ZeRO shrinks it)
            record["memory"] = memory_report.persistent_memory(self.runner)
        if self.comm_ledger is not None:  # this rank's, of the last iteration (as the grad norm is)
            record["comm"] = self.comm_ledger.as_dict()
        if moe is not None and c.logging.moe_per_layer_logging:
            record["moe_layers"] = moe["layers"]
            writers.write_tensorboard(tensorboard_scalars(moe), self.iteration)
        writers.write(record, self.iteration)

    def train(self) -> list[float]:
        """Run every iteration; return the logged interval losses (last rank; others: empty; None
        for an interval whose iterations were all skipped)."""
        c = self.config
        if self.is_last_rank:
            for line in self.startup_lines():
                self.print(line)
            directory = resolved_config_directory(c)
            if directory:
                self.print(f"resolved config: {write_resolved_config(c, directory)}")
        self._report(memory_report.startup_lines(self.state, memory_report.startup_memory(
            self.runner, c, self.state.tp_size)))
        first_iteration = self.iteration + 1
        writers = (open_writers(log_json=c.logging.log_json, tensorboard_dir=c.logging.tensorboard_dir,
                                wandb_project=c.logging.wandb_project, wandb_exp_name=c.logging.wandb_exp_name,
                                wandb_save_dir=c.logging.wandb_save_dir, run_config=c.to_dict(),
                                tensorboard_log_interval=c.logging.tensorboard_log_interval,
                                log_validation_ppl_to_tensorboard=c.logging.log_validation_ppl_to_tensorboard)
                   if self.is_last_rank else MetricsWriters([]))
        house = RunHousekeeping(c.training, c.logging, self.state.rank, self.state.device, notice=self.print)
        logged = []
        bar = progress_bar(c.training.train_iters, self.iteration,
                           enabled=c.logging.log_progress_bar if self.is_last_rank else False)
        # lines go through the bar when there is one, so it is redrawn below them
        emit = self.print if isinstance(bar, NullProgressBar) else bar.write
        checkpointing = c.checkpointing
        exits = ExitPolicy(checkpointing, self.state)
        saved_at = None
        try:
            house.start(self.iteration)
            stats = IntervalStats()
            while self.iteration < c.training.train_iters:
                house.before_step()
                loss, outcome = self.train_step()
                stats.add(loss, outcome.skipped, outcome.grad_norm)
                bar.update(1)
                if self.iteration % c.training.log_interval == 0:
                    # a collective of every rank: the MoE layers live on every stage
                    moe = self.moe_stats.reduce(stats.iterations) if self.moe_stats is not None else None
                    if self.is_last_rank:
                        writers.write_tensorboard(house.tensorboard_scalars(self.timers, stats.iterations),
                                                  self.iteration)
                        self.log(stats, writers, emit, moe)
                        logged.append(stats.mean_loss)
                    stats = IntervalStats()
                if self.iteration == first_iteration:  # what the first step really took (Megatron's report_memory)
                    self._report(memory_report.measured_lines(self.state, self.iteration), emit)
                at_end = self.iteration == c.training.train_iters
                if c.training.eval_iters and (self.iteration % c.training.eval_interval == 0 or at_end):
                    eval_started = time.perf_counter()
                    with house.around_evaluation():
                        self.report_validation(self.evaluate(), writers, emit)
                    stats.started += time.perf_counter() - eval_started  # not part of an iteration's time
                house.after_step(self.iteration)
                if checkpointing.save_interval and self.iteration % checkpointing.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                reason = self.exit_reason = exits.reason(self.iteration)
                if reason is not None:
                    self._notice(f"exiting at iteration {self.iteration} ({reason})")
                    break
            if checkpointing.save and saved_at != self.iteration and self.iteration > 0:
                self.save()  # the end of training, or an early exit, is always saved (as Megatron)
        finally:
            self.runner.finish_param_gather()  # no gather in flight when the groups are torn down
            house.close()
            exits.close()
            bar.close()
            writers.close()
        return logged

    def report_validation(self, loss: float, writers: MetricsWriters, emit) -> None:
        if not self.is_last_rank:
            return
        ppl = math.exp(min(20.0, loss))
        line = f" validation loss at iteration {self.iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        emit("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        writers.write({"iteration": self.iteration, "validation_lm_loss": loss, "validation_lm_loss_ppl": ppl},
                      self.iteration)


def pretrain(config: PretrainConfig, state, *, print_fn=print) -> list[float]:
    """Train on this rank with the process groups of `state`; see the module docstring."""
    return Trainer(config, state, print_fn=print_fn).train()


def run_pretrain(config: PretrainConfig) -> NoReturn:
    """Join the job described by the launcher's environment, train, leave (status 0)."""
    from megalith.parallel.state import ParallelState

    timeout = config.distributed.distributed_timeout_minutes
    if config.checkpointing.exit_signal_handler:
        block_sigterm_in_new_threads()
    layout = config.layout
    state = ParallelState.initialize(layout.tp, layout.pp, layout.cp, layout.dp, layout.ep, layout.etp, backend=config.distributed_backend,
                                     timeout_s=timeout * 60 if timeout else None)
    try:
        trainer = Trainer(config, state)
        trainer.train()
    except BaseException:
        state.destroy()
        raise
    if trainer.exit_reason != "SIGTERM":  # after the signal the job is being ended: leave at once
        state.destroy()
    leave_process(0)


def leave_process(status: int) -> NoReturn:
    """End a finished pretrain process at once, without the interpreter's finalization.

    Everything is written by now: checkpoints (atomically), logs and writers closed, every
    collective waited on. But a gloo worker thread may still be releasing the last collective's
    work, which holds Python tensors; during finalization that thread cannot take the GIL, and
    the process aborts in C++ ("terminate called without an active exception", SIGABRT), turning
    a finished run into a failure for the launcher. Seen about once in 25 runs on 2 ranks after the
    last checkpoint (a core dump shows the gloo thread in ~AsyncWork -> decref -> take_gil ->
    pthread_exit); the SIGTERM exit had shown the same abort. Skipping finalization removes the window."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
