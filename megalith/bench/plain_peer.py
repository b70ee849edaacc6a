"""The one-process row of benchmarks/peers.py: megalith's step against a plain PyTorch training loop.

The peer is the loop a user writes by hand: PlainGPT holding megalith's initial weights, the mean
per-token cross-entropy over the batch, backward, AdamW (`megalith.bench.stages.adamw`). megalith's
side is its whole step (`StepRunner` as `megalith verify` builds it, one rank, layout tp1), so the
ratio is the price of everything megalith does around the same arithmetic.
"""

from __future__ import annotations

import torch

from megalith.bench.harness import Case
from megalith.bench.stages import adamw, reference_model
from megalith.bench.work import Work


class PlainSide:
    """A hand-written training step of PlainGPT on one process."""

    def __init__(self, work: Work) -> None:
        self.work, self.model = work, reference_model(work)
        self.optimizer = adamw(self.model.parameters(), work)

    def step(self, step: int) -> float:
        batch = self.work.global_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(batch["input_ids"], batch["labels"]).mean()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def build(ctx, work: Work):
    """(megalith's side, the plain side) on pool rank 0; None on the pool's other ranks."""
    state = ctx.parallel_state(tp=1, pp=1, dp=1)
    if state is None:
        return None
    return work.megalith_side("tp1", state), PlainSide(work)


def cases(config, quick: bool, micro_batch_size: int = 4) -> list[Case]:
    """The one-process row (`quick` changes repetitions only, which the driver decides)."""
    del quick
    return [Case("one process", "plain", 1, build, Work(config, micro_batch_size=micro_batch_size))]
