"""The work both sides of a peer benchmark train, identically."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megalith.config import ModelConfig, parse_layout
from megalith.models.gpt import GPTModel
from megalith.training.loss_scaler import make_loss_scaler
from megalith.training.step import assemble_runner, sequence_mean_loss
from megalith.verify import VerifySettings, plan


@dataclass(frozen=True)
class Work:
    """What both sides train, identically: model, batch shape, seed, optimizer settings."""

    config: ModelConfig
    micro_batch_size: int = 4
    micro_batches: int = 1  # per data-parallel rank per step
    dp: int = 1
    seed: int = 0
    lr: float = 1e-4

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.dp

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels"} `[B, s]`, seeded by (seed, step): a token stream shifted by one."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        stream = torch.randint(0, self.config.vocab_size, (self.global_batch_size, self.config.seq_length + 1),
                               generator=generator)
        return {"input_ids": stream[:, :-1], "labels": stream[:, 1:]}

    def verify_settings(self) -> VerifySettings:
        return VerifySettings("gpt", self.config, micro_batches=self.micro_batches * self.dp,
                              micro_batch_size=self.micro_batch_size, lr=self.lr, min_lr=self.lr, lr_warmup_iters=0,
                              lr_decay_style="constant", weight_decay=0.0, clip_grad=0.0, adam_eps=1e-8,
                              ddp_bucket_size=40_000_000, seed=self.seed)

    def megalith_side(self, layout: str, state, overlap_param_gather: bool = False) -> "MegalithSide":
        return MegalithSide(self, layout, state, overlap_param_gather)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        return GPTModel(self.config, init_seed=self.seed).state_dict()


class MegalithSide:
    """megalith's step of a layout, built as `megalith verify` builds it; `overlap_param_gather` is
    --overlap-param-gather (ZeRO-3: the next layer's all-gather starts during this one's compute)."""

    def __init__(self, work: Work, layout: str, state, overlap_param_gather: bool = False) -> None:
        settings = work.verify_settings()
        step_plan = replace(plan(settings, parse_layout(layout)), overlap_param_gather=overlap_param_gather)
        self.work, self.batch_plan = work, step_plan.batch
        scaler = make_loss_scaler(fp16=False, loss_scale=None, initial_loss_scale=settings.initial_loss_scale,
                                  hysteresis=settings.hysteresis)
        self.runner = assemble_runner(step_plan, state, settings.optimizer_config(), scaler)
        self.dp_rank = state.dp_rank if state is not None else 0
        self.device = state.device if state is not None else torch.device("cpu")

    def step(self, step: int) -> float:
        data = self.work.global_batch(step)
        data["loss_mask"] = torch.ones(data["labels"].shape)
        micro = self.batch_plan.micro_batches(data, self.dp_rank, self.device)
        size = self.work.global_batch_size
        return self.runner.train_step(micro, lambda per_token, b: sequence_mean_loss(per_token, b, size),
                                      self.work.lr).loss
