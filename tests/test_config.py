"""Layout and shape rules are checked up front, each with one clear line."""

import pytest

from megalith.config import ParallelConfig, parse_layout
from megalith.errors import ConfigError


def test_a_good_layout_passes():
    config = ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=2, sequence_parallel=True)
    assert config.grid(16).dp == 2
    config.check_model_shapes(hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=256, seq_length=32)


@pytest.mark.parametrize(
    "tp,shapes,fragment",
    [
        (4, dict(hidden_size=64, num_attention_heads=6), "number of attention heads 6 is not divisible by --tensor-model-parallel-size 4"),
        (4, dict(hidden_size=66), "hidden size 66 is not divisible by --tensor-model-parallel-size 4"),
        (2, dict(hidden_size=64, num_attention_heads=6), "hidden size 64 is not divisible by the number of attention heads 6"),
        (4, dict(hidden_size=64, num_attention_heads=8, num_query_groups=2), "number of query groups 2 is not divisible"),
        (1, dict(hidden_size=64, num_attention_heads=8, num_query_groups=3), "heads 8 is not divisible by the number of query groups 3"),
        (4, dict(hidden_size=64, ffn_hidden_size=90), "ffn hidden size 90"),
        (4, dict(hidden_size=64, seq_length=30), "sequence length 30 is not divisible by --tensor-model-parallel-size 4 under --sequence-parallel"),
    ],
)
def test_bad_shapes(tp, shapes, fragment):
    config = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True)
    with pytest.raises(ConfigError) as info:
        config.check_model_shapes(**shapes)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_sequence_length_only_matters_under_sequence_parallel():
    ParallelConfig(tensor_model_parallel_size=4).check_model_shapes(hidden_size=64, seq_length=30)


def test_layout_that_does_not_fit_the_world():
    with pytest.raises(ConfigError, match="does not divide world size 8"):
        ParallelConfig(tensor_model_parallel_size=3).grid(8)


@pytest.mark.parametrize("text,tp,sp", [("tp1", 1, False), ("tp4.sp", 4, True), ("sp.tp2", 2, True)])
def test_layout_tokens(text, tp, sp):
    layout = parse_layout(text)
    assert (layout.tp, layout.sequence_parallel, layout.world_size) == (tp, sp, tp)
    assert parse_layout(str(layout)) == layout


@pytest.mark.parametrize("text,fragment", [("tp2.ep2", "unknown layout token 'ep2'"), ("tp0", "'tp0'"), ("tp2.tp4", "tp twice"), ("", "''")])
def test_bad_layout_tokens(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_layout(text)
