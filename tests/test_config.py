"""The one layout value: its shape rules, its grid and its text grammar, each with one clear line."""

import pytest

from megalith.config import Layout, ModelConfig, parse_layout
from megalith.errors import ConfigError


def test_a_good_layout_passes():
    layout = Layout(tp=4, pp=2, dp=2, sequence_parallel=True)
    assert layout.grid(16).dp == 2 and layout.world_size == 16
    layout.check_model(ModelConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=256,
                                   seq_length=32))


@pytest.mark.parametrize(
    "tp,shapes,fragment",
    [
        (4, dict(hidden_size=60, num_attention_heads=6), "number of attention heads 6 is not divisible by --tensor-model-parallel-size 4"),
        (4, dict(hidden_size=66, num_attention_heads=6, kv_channels=11), "hidden size 66 is not divisible by --tensor-model-parallel-size 4"),
        (2, dict(hidden_size=64, num_attention_heads=6), "hidden size 64 is not divisible by the number of attention heads 6"),
        (4, dict(hidden_size=64, num_attention_heads=8, num_query_groups=2), "number of query groups 2 is not divisible"),
        (1, dict(hidden_size=64, num_attention_heads=8, num_query_groups=3), "heads 8 is not divisible by the number of query groups 3"),
        (4, dict(hidden_size=64, ffn_hidden_size=90), "ffn hidden size 90"),
        (4, dict(hidden_size=64, seq_length=30), "sequence length 30 is not divisible by --tensor-model-parallel-size 4 under --sequence-parallel"),
        (4, dict(hidden_size=64, decoder_seq_length=30), "--decoder-seq-length 30 is not divisible by --tensor-model-parallel-size 4"),
    ],
)
def test_bad_shapes(tp, shapes, fragment):
    with pytest.raises(ConfigError) as info:
        Layout(tp=tp, sequence_parallel=True).check_model(ModelConfig(**shapes))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_sequence_length_only_matters_under_sequence_parallel():
    Layout(tp=4).check_model(ModelConfig(hidden_size=64, seq_length=30))


def test_layout_that_does_not_fit_the_world():
    with pytest.raises(ConfigError, match="does not equal world size 8"):
        Layout(tp=3).grid(8)
    with pytest.raises(ConfigError, match="world size 8 is not divisible by --tensor-model-parallel-size 3"):
        Layout.over_world(8, tp=3)
    assert Layout.over_world(8, tp=2, pp=2).dp == 2


@pytest.mark.parametrize("text,tp,sp", [("tp1", 1, False), ("tp4.sp", 4, True), ("sp.tp2", 2, True)])
def test_layout_tokens(text, tp, sp):
    layout = parse_layout(text)
    assert (layout.tp, layout.sequence_parallel, layout.world_size) == (tp, sp, tp)
    assert parse_layout(str(layout)) == layout


@pytest.mark.parametrize("text", ["tp2.pp2.vpp2.dp2.sp.zero1.recompute-full.bf16", "pp4.mb4.gpipe", "tp2.cp2.dp2",
                                  "ep2.etp2.dp4", "dp2.zero3.fp16"])
def test_every_axis_round_trips_through_its_text(text):
    layout = parse_layout(text)
    assert parse_layout(str(layout)) == layout


def test_axes_without_a_layer_yet_are_named_and_refused_before_training():
    for text, fragment in [("cp2", "--context-parallel-size 2 is not supported yet")]:
        layout = parse_layout(text)  # the value can describe it (topology, the planner)
        with pytest.raises(ConfigError, match=fragment):
            layout.check_implemented()


def test_schedule_follows_megatron_unless_named():
    assert [parse_layout(t).pipeline_schedule for t in ("tp2", "pp2", "pp2.vpp2", "pp2.gpipe")] == [
        "no-pipelining", "1f1b", "interleaved-1f1b", "gpipe"]


@pytest.mark.parametrize("text,fragment", [("tp2.xp2", "unknown layout token 'xp2'"), ("tp0", "'tp0'"),
                                           ("tp2.tp4", "tp twice"), ("", "''"), ("dp2.zero4", "--zero 4 is not one of")])
def test_bad_layout_tokens(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_layout(text)
