"""PlainGPT cut into pipeline stages exactly where megalith cuts GPTModel, for the pipeline peers.

The peers must do megalith's work, so their stages hold the same layers: `split_layers` gives each
global stage its layers, the first stage also the embedding, the last the final norm, the output
layer and (in the peer's loss function) the cross-entropy. With tied embeddings the last stage
holds its own copy of the word embedding, as Megatron and megalith do; the peer sums the two
copies' gradients over the first and last stage (`tied_parameters`) before its optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.models.plain_gpt import PlainGPT, load_megalith_state_dict
from megalith.parallel.pipeline.split import split_layers


def reference_model(work) -> PlainGPT:
    """A PlainGPT holding megalith's one-process initial weights."""
    model = PlainGPT(work.config)
    load_megalith_state_dict(model, work.reference_state_dict())
    return model


class Embedding(nn.Module):
    """Word plus learned position embeddings: ids `[b, s]` -> `[b, s, h]` (PlainGPT's first steps)."""

    def __init__(self, model: PlainGPT) -> None:
        super().__init__()
        self.word_embeddings, self.position_embeddings = model.word_embeddings, model.position_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        return x


class Head(nn.Module):
    """Final norm and output layer: `[b, s, h]` -> logits `[b, s, V]`. Tied: a copy of the word
    embedding (a parameter of its own, kept equal by summing both copies' gradients)."""

    def __init__(self, model: PlainGPT, copy_embedding: bool) -> None:
        super().__init__()
        self.final_norm = model.final_norm
        if model.output_layer is not None:
            self.weight = model.output_layer.weight
        elif copy_embedding:
            self.weight = nn.Parameter(model.word_embeddings.weight.detach().clone())
        else:
            self.weight = model.word_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x) @ self.weight.t()


class Stage(nn.Module):
    """One global pipeline stage of PlainGPT: the embedding if first, its layers, the head if last."""

    def __init__(self, model: PlainGPT, index: int, layers: list[int], count: int) -> None:
        super().__init__()
        self.index = index
        self.embedding = Embedding(model) if index == 0 else None
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.head = Head(model, copy_embedding=count > 1) if index == count - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) if self.head is not None else x


def stage_layers(work, pp: int, vpp: int = 1) -> list[list[int]]:
    """megalith's split of the model's layers over the pp * vpp global stages."""
    return split_layers(work.config.num_layers, pp, vpp)


def rank_stages(work, pp: int, vpp: int, pp_rank: int) -> list[Stage]:
    """This pipeline rank's stages (chunk c is global stage c * pp + pp_rank, as in megalith)."""
    model = reference_model(work)
    split = stage_layers(work, pp, vpp)
    return [Stage(model, index, split[index], len(split)) for index in range(pp_rank, pp * vpp, pp)]


def tied_parameters(stages: list[Stage], work) -> list[nn.Parameter]:
    """The tied word embedding's copies on this rank (first stage's table, last stage's head)."""
    if work.config.untie_embeddings_and_output_weights:
        return []
    found = [s.embedding.word_embeddings.weight for s in stages if s.embedding is not None]
    return found + [s.head.weight for s in stages if s.head is not None and s.embedding is None]


def adamw(parameters, work) -> torch.optim.Optimizer:
    """The optimizer both sides use: AdamW, lr from the work, betas (0.9, 0.999), eps 1e-8, no decay,
    in the foreach form megalith's CPU fallback takes (`megalith.backends`), so the step costs the same."""
    return torch.optim.AdamW(list(parameters), lr=work.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             foreach=True)
