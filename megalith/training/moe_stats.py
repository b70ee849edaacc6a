"""MoE logs (issue 21): per-layer balancing loss, z-loss, tokens per expert and dropped fraction, gathered
from the outside of the MoE layers (megalith.models.moe owns them) and reduced over every rank for the log.

`MoEStats.attach` registers one forward hook per MoE layer of this rank's model chunks. After each training
forward (gradients on: evaluation is not counted, and under full recompute only the recomputation is, since
the first forward of a checkpointed layer runs without gradients) the hook adds the layer's `last_stats` to a
buffer on the device, so a step costs no host synchronisation. `reduce` (a collective: every rank calls it at
every log line, also ranks whose stage has no MoE layer) sums the buffers over all ranks and returns, per
MoE layer, Megatron's numbers:

- `load_balancing_loss`: the aux loss without its coefficient (Megatron logs aux_loss / coeff), per
  micro-batch; the tp ranks' shares summed (as Megatron's tp x cp reduce group), averaged over the
  micro-batches of the interval and over dp (and cp), as Megatron-Core's tracker averages over dp;
- `z_loss`: ST-MoE's mean of logsumexp(logits)^2 without its coefficient, averaged over micro-batches and
  every rank that routed tokens (tp included: the mean over all tokens);
- `tokens_per_expert_min` / `_max`: the routed tokens (after capacity) of the fullest and emptiest expert,
  summed over all ranks and micro-batches, per step of the interval;
- `dropped_fraction`: pairs dropped by capacity over all routed (token, expert) pairs (top-k x tokens).

The log line's `load_balancing_loss` and `z_loss` are the mean of the per-layer values over the MoE layers
(Megatron-Core's MoE tracker: sum over layers / number of MoE layers).
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.models.moe import MoELayer, moe_layer_pattern
from megalith.parallel import comm

# the buffer's columns per MoE layer: these five, then the tokens routed to each expert
_LB, _Z, _FORWARDS, _DROPPED, _PAIRS = range(5)
_COLUMNS = 5
# the log line's fields, in Megatron's order
LINE_FIELDS = ("load_balancing_loss", "z_loss")


def moe_layers(chunks) -> dict[int, MoELayer]:
    """This rank's MoE layers by global layer index (TransformerBlock keys its layers by it)."""
    found: dict[int, MoELayer] = {}
    for chunk in chunks:
        for module in chunk.modules():
            layers = getattr(module, "layers", None)
            if not isinstance(layers, nn.ModuleDict):
                continue
            for key, layer in layers.items():
                mlp = getattr(layer, "mlp", None)
                if isinstance(mlp, MoELayer) and key.isdigit():
                    found[int(key)] = mlp
    return found


class MoEStats:
    """Per-layer MoE numbers accumulated since the last `reduce`; see the module docstring."""

    def __init__(self, model_config, layers: dict[int, MoELayer], groups, device) -> None:
        """`groups`: process groups whose product is every rank of the job (megalith: mp and dp x cp)."""
        self.pattern = [index for index, moe in enumerate(moe_layer_pattern(model_config)) if moe]
        self.rows = {index: row for row, index in enumerate(self.pattern)}
        unknown = sorted(set(layers) - set(self.rows))
        if unknown:
            raise ValueError(f"layers {unknown} are MoE here but not in --moe-layer-freq's pattern")
        self.aux_coeff = model_config.moe_aux_loss_coeff if model_config.moe_router_load_balancing_type != "none" else 0.0
        self.z_coeff = model_config.moe_z_loss_coeff or 0.0
        self.groups = [group for group in groups if group is not None and comm.group_size(group) > 1]
        self.buffer = torch.zeros(len(self.pattern), _COLUMNS + model_config.num_experts, dtype=torch.float64,
                                  device=device)
        self.handles = [layer.register_forward_hook(self._hook(self.rows[index])) for index, layer in layers.items()]

    @classmethod
    def attach(cls, chunks, model_config, state) -> "MoEStats | None":
        """Hooks on this rank's MoE layers; None for a model without --num-experts (nothing registered)."""
        if model_config.num_experts is None:
            return None
        return cls(model_config, moe_layers(chunks), (state.mp_group, state.dp_cp_group), state.device)

    def _hook(self, row: int):
        def record(layer: MoELayer, inputs, output) -> None:
            if torch.is_grad_enabled():
                self.add(row, layer)
        return record

    def split_losses(self, layer: MoELayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's latest (load-balancing, z) losses without their coefficients, from the weighted parts
        the router keeps in `last_stats` (the z-loss coefficient is divided by tp there, as Megatron does)."""
        stats = layer.last_stats
        if stats.get("loss") is None:
            return None, None
        balance, z = stats["balance_loss"], stats["z_loss"]
        tp = layer.router.ctx.tp_size
        return (None if balance is None else balance / self.aux_coeff,
                None if z is None else z / (self.z_coeff / tp))

    def add(self, row: int, layer: MoELayer) -> None:
        """Add one forward's stats of `layer` to buffer row `row`."""
        stats = layer.last_stats
        counts = stats["tokens_per_expert"].to(self.buffer.dtype)
        line = self.buffer[row]
        balance, z = self.split_losses(layer)
        if balance is not None:
            line[_LB] += balance.detach().to(self.buffer.dtype) * layer.router.ctx.tp_size  # shares: x tp / tp ranks
        if z is not None:
            line[_Z] += z.detach().to(self.buffer.dtype)
        line[_FORWARDS] += 1
        dropped = stats["dropped"].to(self.buffer.dtype)
        line[_DROPPED] += dropped
        line[_PAIRS] += counts.sum() + dropped
        line[_COLUMNS:] += counts

    def reduce(self, iterations: int) -> dict:
        """Collective: every rank's sums since the last call, as {"layers": [per-layer dicts], and the line's
        means over layers}; then the sums restart. `iterations`: the steps the sums cover."""
        total = self.buffer.clone()
        self.buffer.zero_()
        for group in self.groups:
            comm.all_reduce(total, group, ledger=None)  # not part of a step's communication
        total = total.cpu()
        layers = []
        for row, index in enumerate(self.pattern):
            line = total[row]
            forwards = max(float(line[_FORWARDS]), 1.0)
            counts = line[_COLUMNS:] / max(iterations, 1)
            entry = {"layer": index}
            if self.aux_coeff:
                entry["load_balancing_loss"] = float(line[_LB]) / forwards
            if self.z_coeff:
                entry["z_loss"] = float(line[_Z]) / forwards
            entry["tokens_per_expert_min"] = float(counts.min())
            entry["tokens_per_expert_max"] = float(counts.max())
            entry["dropped_fraction"] = float(line[_DROPPED]) / max(float(line[_PAIRS]), 1.0)
            layers.append(entry)
        summary = {"layers": layers}
        for name in LINE_FIELDS:
            values = [entry[name] for entry in layers if name in entry]
            if values:
                summary[name] = sum(values) / len(values)
        return summary

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def tensorboard_scalars(summary: dict) -> dict[str, float]:
    """--moe-per-layer-logging's TensorBoard scalars: `moe/{name}_layer_{i}` (Megatron's names; i the global
    layer index)."""
    scalars = {}
    for entry in summary["layers"]:
        for name, value in entry.items():
            if name != "layer":
                scalars[f"moe/{name}_layer_{entry['layer']}"] = value
    return scalars
