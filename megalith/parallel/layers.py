"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Initialisation is exact across layouts: each layer fills the *full* weight with `init_method`
(on the CPU, in fp32, consuming the random stream exactly as one process would) and keeps its
slice. Every sharded parameter carries `tensor_parallel_dim` (the dimension split over tp);
replicated parameters whose gradient each rank only partly computes under sequence parallelism
carry `sequence_parallel = True` and must be summed over tp after backward
(`comm.all_reduce_grads`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalith.errors import ConfigError
from megalith.parallel import comm
from megalith.parallel.gathered_linear import linear_over_gathered_sequence
from megalith.parallel.weight_grad import linear

InitMethod = Callable[[torch.Tensor], object]


def normal_init(std: float = 0.02, generator: torch.Generator | None = None) -> InitMethod:
    """Megatron's default: N(0, std) on the full weight, from `generator` (default: torch's)."""
    return lambda tensor: tensor.normal_(mean=0.0, std=std, generator=generator)


def scaled_normal_init(std: float, num_layers: int, generator: torch.Generator | None = None) -> InitMethod:
    """Megatron's init for layers that write into the residual: N(0, std / sqrt(2 * num_layers))."""
    return normal_init(std / math.sqrt(2.0 * num_layers), generator)


def xavier_uniform_init(generator: torch.Generator | None = None) -> InitMethod:
    """Megatron's --init-method-xavier-uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)), on the
    full weight (so the fans, and the draw, do not depend on the layout)."""
    return lambda tensor: nn.init.xavier_uniform_(tensor, generator=generator)


def padded_vocab_size(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Round the vocabulary up to a multiple of `make_vocab_size_divisible_by * tp` (as Megatron)."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1:
        raise ConfigError(
            f"vocab size {vocab_size} and make-vocab-size-divisible-by {make_vocab_size_divisible_by} must be positive"
        )
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def _check_split(size: int, tp_size: int, what: str) -> int:
    if size % tp_size != 0:
        raise ConfigError(
            f"{what} {size} is not divisible by the tensor-parallel size {tp_size}; "
            f"choose a tensor-parallel size that divides {size}"
        )
    return size // tp_size


def sharded_parameter(
    full_shape: tuple[int, ...],
    dim: int,
    group,
    init_method: InitMethod,
    dtype: torch.dtype,
    device: torch.device | None,
    valid_rows: int | None = None,
    stride: int = 1,
) -> nn.Parameter:
    """Initialise the full tensor as one process would, keep this rank's slice along `dim`.

    With `valid_rows`, only the first rows are drawn from `init_method` (the rest are padding,
    zero), so the random stream does not depend on how much padding the layout needs. With
    `stride` > 1 the dimension is `stride` equal parts (e.g. SwiGLU's [gate; up]) and each
    rank keeps its slice of every part, so the parts still line up on every rank.
    """
    full = torch.zeros(full_shape, dtype=torch.float32)
    init_method(full if valid_rows is None else full[:valid_rows])
    param = nn.Parameter(_slice(full, dim, stride, group).to(dtype=dtype, device=device).contiguous())
    param.tensor_parallel_dim = dim
    param.tensor_parallel_stride = stride
    return param


def _slice(full: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    parts = full.unflatten(dim, (stride, -1))
    return parts.chunk(comm.group_size(group), dim=dim + 1)[comm.group_rank(group)].flatten(dim, dim + 1)


def gather_full_parameter(param: torch.Tensor, group, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor one process would hold, from every tp rank's shard (a collective).

    `tensor` (default: the parameter itself) may be anything sharded like it, e.g. its gradient.
    """
    tensor = (param if tensor is None else tensor).detach()
    dim = getattr(param, "tensor_parallel_dim", None)
    size = comm.group_size(group)
    if dim is None or size == 1:
        return tensor.clone()
    stacked = torch.empty((size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    comm.all_gather_into(stacked.view(-1), tensor.contiguous().view(-1), group)
    shards = stacked.unbind(0)
    stride = getattr(param, "tensor_parallel_stride", 1)
    parts = [shard.unflatten(dim, (stride, -1)) for shard in shards]
    return torch.cat(parts, dim=dim + 1).flatten(dim, dim + 1)


def _bias(size: int, dtype: torch.dtype, device: torch.device | None, sharded_dim: int | None, stride: int = 1):
    bias = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))  # Megatron zeroes biases
    bias.tensor_parallel_dim = sharded_dim
    bias.tensor_parallel_stride = stride
    return bias


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: each rank computes output_size / tp features.

    Input: `[s, b, in]` (or `[s/tp, b, in]` with sequence_parallel, gathered here). With
    `stride` k the output is k equal parts (fused [gate; up] for SwiGLU) and each rank keeps its
    slice of each part.
    Output: `[s, b, out/tp]`, or `[s, b, out]` with gather_output. With skip_bias_add the bias
    is returned instead of added: `(output, bias)`, so a caller can fuse it; with
    gather_output the returned bias is gathered too.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_bias_add: bool = False,
        init_method: InitMethod | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
    ) -> None:
        super().__init__()
        tp_size = comm.group_size(tp_group)
        self.output_size_per_partition = _check_split(output_size, tp_size * stride, "column-parallel output size") * stride
        if gather_output and sequence_parallel:
            raise ConfigError("gather_output cannot be combined with sequence_parallel; leave the output sharded")
        if gather_output and stride > 1:
            raise ConfigError("gather_output cannot be combined with stride > 1; leave the output sharded")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add
        self.weight = sharded_parameter(
            (output_size, input_size), 0, tp_group, init_method or normal_init(), params_dtype, device, stride=stride
        )
        self.bias = _bias(self.output_size_per_partition, params_dtype, device, 0, stride) if bias else None

    def forward(self, x: torch.Tensor):
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:  # gathered here; backward keeps the shard and gathers again
            y = linear_over_gathered_sequence(x, self.weight, bias, self.tp_group)
        else:
            y = linear(comm.copy_to_tp(x, self.tp_group), self.weight, bias)
        if not self.gather_output:
            return (y, self.bias) if self.skip_bias_add else y
        y = comm.gather_from_tp(y, self.tp_group)
        if not self.skip_bias_add:
            return y
        # the returned bias must match the gathered output (Megatron returns the shard)
        return y, None if self.bias is None else comm.gather_from_tp(self.bias, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows: each rank holds input_size / tp input features.

    Input: `[s, b, in/tp]` (input_is_parallel) or `[s, b, in]` (split here).
    Output: `[s, b, out]` summed over tp, or `[s/tp, b, out]` reduce-scattered with
    sequence_parallel. The bias is replicated and added after the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group,
        bias: bool = True,
        input_is_parallel: bool = False,
        sequence_parallel: bool = False,
        skip_bias_add: bool = False,
        init_method: InitMethod | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        tp_size = comm.group_size(tp_group)
        self.input_size_per_partition = _check_split(input_size, tp_size, "row-parallel input size")
        if sequence_parallel and not input_is_parallel:
            raise ConfigError("sequence_parallel needs input_is_parallel=True in a row-parallel linear")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add
        self.weight = sharded_parameter(
            (output_size, input_size), 1, tp_group, init_method or normal_init(), params_dtype, device
        )
        self.bias = _bias(output_size, params_dtype, device, None) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = comm.scatter_to_tp(x, self.tp_group)
        add_bias = self.bias is not None and not self.skip_bias_add
        if comm.group_size(self.tp_group) == 1:  # nothing to reduce: let the matmul add the bias
            y = linear(x, self.weight, self.bias if add_bias else None)
            return (y, self.bias) if self.skip_bias_add else y
        y = linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_parallel(y, self.tp_group)
        else:
            y = comm.reduce_from_tp(y, self.tp_group)
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if add_bias else y

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary is split over tp; each rank looks up its own rows.

    The vocabulary is padded to a multiple of `make_vocab_size_divisible_by * tp` as in
    Megatron. Only the real `num_embeddings` rows are drawn from `init_method`; padding rows are
    zero and never looked up, so every layout starts from the same table. Output: ids.shape +
    [embedding_dim], summed over tp, or reduce-scattered along dim 0 with sequence_parallel
    (ids then sequence-first, `[s, b]`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group,
        make_vocab_size_divisible_by: int = 128,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        tp_size = comm.group_size(tp_group)
        self.num_embeddings = num_embeddings
        self.padded_num_embeddings = padded_vocab_size(num_embeddings, tp_size, make_vocab_size_divisible_by)
        self.embedding_dim = embedding_dim
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings_per_partition = self.padded_num_embeddings // tp_size
        self.vocab_start_index = comm.group_rank(tp_group) * self.num_embeddings_per_partition
        self.weight = sharded_parameter(
            (self.padded_num_embeddings, embedding_dim),
            0,
            tp_group,
            init_method or normal_init(),
            params_dtype,
            device,
            valid_rows=num_embeddings,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.tp_group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.vocab_start_index
            outside = (local < 0) | (local >= self.num_embeddings_per_partition)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_parallel(out, self.tp_group)
        return comm.reduce_from_tp(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (padded {self.padded_num_embeddings}, per rank "
            f"{self.num_embeddings_per_partition}), {self.embedding_dim}, sequence_parallel={self.sequence_parallel}"
        )


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, tp_group, *, sequence_parallel: bool = False):
    """Logits over this rank's slice of the vocabulary, from a vocab-parallel (tied) weight.

    `hidden` is `[s, b, h]` (or `[s/tp, b, h]` under sequence parallelism, gathered here); the
    result is `[s, b, V/tp]`, ready for vocab_parallel_cross_entropy without a gather.
    """
    if sequence_parallel:
        return linear_over_gathered_sequence(hidden, weight, None, tp_group)
    return linear(comm.copy_to_tp(hidden, tp_group), weight)


def mark_sequence_parallel(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Flag a replicated module's parameters (a norm) as needing a tp gradient sum under SP."""
    for param in module.parameters():
        param.sequence_parallel = enabled
    return module


def sequence_parallel_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients must be summed over tp after backward."""
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]
