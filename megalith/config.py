"""Configuration dataclasses (Megatron's names) and the checks that run before any process starts.

Every rule that ties model shapes to the layout lives here, so that a bad combination is one
clear line at start-up instead of a shape error (or a hang) deep inside a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid


def _divides(size: int, count: int, what: str, flag: str = "--tensor-model-parallel-size") -> None:
    if count % size != 0:
        raise ConfigError(f"{what} {count} is not divisible by {flag} {size}; choose a {flag} that divides {count}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the job is split: Megatron's flag names without the dashes."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: int | None = None  # None: whatever the world leaves
    sequence_parallel: bool = False

    def grid(self, world_size: int) -> RankGrid:
        """The rank grid of this layout over `world_size` processes (raises if they do not fit)."""
        return RankGrid(
            world_size,
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            cp=self.context_parallel_size,
            dp=self.data_parallel_size,
        )

    def check_model_shapes(
        self,
        *,
        hidden_size: int,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        ffn_hidden_size: int | None = None,
        seq_length: int | None = None,
    ) -> None:
        """Every shape that tensor (and sequence) parallelism splits must split evenly."""
        tp = self.tensor_model_parallel_size
        _divides(tp, hidden_size, "hidden size")
        if num_attention_heads is not None:
            _divides(tp, num_attention_heads, "number of attention heads")
            if hidden_size % num_attention_heads != 0:
                raise ConfigError(
                    f"hidden size {hidden_size} is not divisible by the number of attention heads "
                    f"{num_attention_heads}; set --kv-channels or change one of them"
                )
        if num_query_groups is not None:
            _divides(tp, num_query_groups, "number of query groups")
            if num_attention_heads is not None and num_attention_heads % num_query_groups != 0:
                raise ConfigError(
                    f"number of attention heads {num_attention_heads} is not divisible by the number of query "
                    f"groups {num_query_groups}; use a --num-query-groups that divides it"
                )
        if ffn_hidden_size is not None:
            _divides(tp, ffn_hidden_size, "ffn hidden size")
        if self.sequence_parallel and seq_length is not None and seq_length % tp != 0:
            raise ConfigError(
                f"sequence length {seq_length} is not divisible by --tensor-model-parallel-size {tp} under "
                f"--sequence-parallel; use a --seq-length that is a multiple of {tp} or drop --sequence-parallel"
            )


LAYOUT_TOKENS = ("tpN", "sp")


@dataclass(frozen=True)
class Layout:
    """A layout written as dotted tokens, e.g. `tp2.sp` (later issues add pp, dp, ...)."""

    tp: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, sequence_parallel=self.sequence_parallel)

    def __str__(self) -> str:
        return f"tp{self.tp}" + (".sp" if self.sequence_parallel else "")


def parse_layout(text: str) -> Layout:
    """`tp4.sp` -> Layout(tp=4, sequence_parallel=True); one clear line for anything else."""
    values: dict = {}
    for token in text.split("."):
        if token.startswith("tp") and token[2:].isdigit() and int(token[2:]) >= 1:
            key, value = "tp", int(token[2:])
        elif token == "sp":
            key, value = "sequence_parallel", True
        else:
            raise ConfigError(
                f"unknown layout token {token!r} in {text!r}; known tokens: {', '.join(LAYOUT_TOKENS)} (e.g. tp2.sp)"
            )
        if key in values:
            raise ConfigError(f"layout {text!r} gives {key} twice; write each token once")
        values[key] = value
    return Layout(**values)
