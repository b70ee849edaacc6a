"""The engine passes several tensors between stages (what T5 needs) and frees what it sent."""

import torch
from torch import nn

from megalith.parallel.pipeline.engine import PipelineEngine
from megalith.parallel.pipeline.schedules import build_schedule
from megalith.testing import relative_error

HIDDEN, MICRO_BATCH, MICROBATCHES = 6, 3, 4


class TwoStreamStage(nn.Module):
    """A toy encoder-decoder stage: carries an 'encoder output' and a 'decoder state' onward."""

    outputs_freeable = True

    def __init__(self, index: int, count: int) -> None:
        super().__init__()
        torch.manual_seed(100 + index)  # the same weights whichever process builds this stage
        self.index, self.count = index, count
        self.encoder = nn.Linear(HIDDEN, HIDDEN)
        self.decoder = nn.Linear(2 * HIDDEN, HIDDEN)

    def pipeline_shapes(self, micro_batch_size):
        return [(micro_batch_size, HIDDEN), (micro_batch_size, HIDDEN)]

    def pipeline_forward(self, inputs, batch):
        encoded, state = (batch["x"], batch["x"]) if inputs is None else inputs
        encoded = torch.tanh(self.encoder(encoded)) + encoded
        state = torch.tanh(self.decoder(torch.cat([encoded, state], dim=-1))) + state
        if self.index < self.count - 1:
            return encoded, state
        return ((state - batch["y"]) ** 2).mean(dim=-1, keepdim=True)  # a per-"token" loss


def data(i):
    generator = torch.Generator().manual_seed(i)
    return {"x": torch.randn(MICRO_BATCH, HIDDEN, generator=generator),
            "y": torch.randn(MICRO_BATCH, HIDDEN, generator=generator)}


def loss_fn(per_token, batch):
    return per_token.sum() / (MICRO_BATCH * MICROBATCHES)


def run(ctx, pp):
    state = ctx.parallel_state(pp=pp) if pp > 1 else None
    rank = state.pp_rank if state else 0
    stages = [TwoStreamStage(i, 4) for i in range(4)] if pp == 1 else [TwoStreamStage(rank, pp)]
    if pp == 1:  # one process: the four stages chained as one chunk
        chain = TwoStreamStage(0, 1)

        def whole(inputs, batch):
            out = None
            for stage in stages:
                out = stage.pipeline_forward(out, batch)
            return out
        chain.pipeline_forward = whole
        chunks = [chain]
    else:
        chunks = stages
    engine = PipelineEngine(chunks, rank=rank, pp=pp, pp_group=state.pp_group if state else None,
                            micro_batch_size=MICRO_BATCH, dtype=torch.float32)
    schedule = "no-pipelining" if pp == 1 else "1f1b"
    result = engine.step(build_schedule(schedule, pp, 1, MICROBATCHES, rank), data, loss_fn)
    grads = {f"{stage.index}.{name}": p.grad.clone() for stage in stages for name, p in stage.named_parameters()}
    return result.loss, grads


def test_two_tensors_per_stage_match_one_process(rank_pools):
    reference_loss, reference_grads = rank_pools(4).run(run, 1)[0]
    results = rank_pools(4).run(run, 4)
    assert all(abs(loss - reference_loss) <= 1e-6 * abs(reference_loss) for loss, _ in results), "loss on every rank"
    grads = {name: g for _, rank_grads in results for name, g in rank_grads.items()}
    assert set(grads) == set(reference_grads)
    for name in grads:
        assert relative_error(grads[name], reference_grads[name]) < 1e-5, name


def test_sent_activations_are_released():
    from megalith.parallel.pipeline.engine import _release

    t = torch.randn(64, 64, requires_grad=True) * 2
    _release(t)
    assert t.numel() == 1 and t.grad_fn is not None
