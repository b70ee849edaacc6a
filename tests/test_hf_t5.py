"""megalith convert for T5: tiny random HF T5ForConditionalGeneration (v1.0) to megalith
checkpoints of a layout and back, with logits equal to Hugging Face's within 1e-5.

No downloads: every HF model is built from a config here and saved with save_pretrained. The
family-independent helpers come from test_hf_convert.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from test_hf_convert import (  # noqa: E402
    _assert_trains_under_any_layout, _edit_config, _export_gives_back_the_same_tensors, _hf_tensors, _one_line,
    _perturb, _write_model_checkpoint,
)

from megalith.cli import main  # noqa: E402
from megalith.config import ModelConfig  # noqa: E402
from megalith.errors import ConfigError  # noqa: E402
from megalith.models.parallel_context import StageSpec  # noqa: E402
from megalith.models.registry import BUILTIN_MODELS  # noqa: E402
from megalith.models.t5 import T5Model  # noqa: E402
from megalith.parallel.layers import padded_vocab_size  # noqa: E402
from megalith.parallel.pipeline.split import split_layers  # noqa: E402
from megalith.training.checkpoint import placement_of  # noqa: E402
from megalith.training.checkpoint_format import PIECES_KEY, pieces, shard_file_name  # noqa: E402
from megalith.convert.command import (  # noqa: E402
    CHECK_TOLERANCE, check_logits, hf_to_megalith, megalith_to_hf, open_checkpoint, read_global_tensors,
)
from megalith.convert.families import family_for_hf, family_for_model  # noqa: E402
from megalith.convert.t5 import T5  # noqa: E402

SPEC = BUILTIN_MODELS["t5"]


def _t5(root, name: str, encoders: int, decoders: int, **overrides) -> str:
    config = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=encoders, num_decoder_layers=decoders,
                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  dropout_rate=0.0, feed_forward_proj="relu") | overrides
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
    _perturb(model, 5)
    path = str(root / name)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-t5")
    return {"2+2": _t5(root, "2+2", 2, 2), "1+3": _t5(root, "1+3", 1, 3)}


def _config(path: str) -> ModelConfig:
    hf = json.load(open(os.path.join(path, "config.json")))
    return SPEC.resolved(family_for_hf(hf).config_from_hf(hf, list(_hf_tensors(path))))


def _t5_config(encoders: int, decoders: int, **changes) -> ModelConfig:
    return SPEC.resolved(ModelConfig(**SPEC.defaults | dict(num_layers=encoders, encoder_num_layers=encoders,
                                                            decoder_num_layers=decoders) | changes))


# --- config, names, tp splits and pipeline stages ------------------------------------------------


def test_config_follows_the_hf_model(models):
    config = _config(models["1+3"])
    assert family_for_hf({"model_type": "t5"}) is T5
    assert (config.encoder_num_layers, config.decoder_num_layers, config.num_layers) == (1, 3, 4)
    assert (config.hidden_size, config.kv_channels, config.ffn_hidden_size) == (32, 8, 64)
    assert config.num_attention_heads == 4
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 20)
    assert (config.activation, config.normalization, config.disable_bias_linear) == ("relu", "RMSNorm", True)
    assert (config.untie_embeddings_and_output_weights, config.hidden_dropout, config.attention_dropout) == \
        (False, 0.0, 0.0)
    assert T5.export_misfits(config) == []


@pytest.mark.parametrize("encoders, decoders, untied", [(2, 2, False), (1, 3, True), (3, 1, False)])
def test_names_splits_and_stages_are_t5_models_own(encoders, decoders, untied):
    """parameter_names is a whole T5Model's; placement is what checkpoints record for each of its
    parameters (placement_of); and for pp2 and pp4 every name's stage_of is the stage holding the
    copy `megalith pretrain --save` writes (the one not marked is_tied_copy)."""
    config = _t5_config(encoders, decoders, untie_embeddings_and_output_weights=untied)
    params = dict(T5Model(config).named_parameters())
    assert list(params) == T5.parameter_names(config)
    for name, param in params.items():
        assert T5.placement(name, config) == placement_of(name, param, config.vocab_size), name
    assert T5.placement("decoder.layers.0.cross_attention.linear_kv.weight", config).stride == 2
    assert T5.placement("encoder_relative_position.weight", config).dim == 1
    for pp in (2, 4):
        stages = split_layers(config.num_layers, pp)
        layer_stages = {layer: stage for stage, layers in enumerate(stages) for layer in layers}
        saved = set()
        for index, layers in enumerate(stages):
            stage = T5Model(config, stage=StageSpec(index, pp, tuple(layers)))
            held = {n for n, p in stage.named_parameters()}
            kept = {n for n, p in stage.named_parameters() if not getattr(p, "is_tied_copy", False)}
            mine = {n for n in params if T5.stage_of(n, config, layer_stages, pp - 1) == index}
            assert mine == kept and mine <= held, (pp, index, mine ^ kept)
            saved |= kept
        assert saved == set(params)  # each parameter saved once, by some stage


def _slice(full: torch.Tensor, param: torch.Tensor, rank: int, tp: int, config: ModelConfig) -> torch.Tensor:
    """tp rank's shard as megalith's layers cut it from the global tensor (megalith.parallel.layers)."""
    dim, stride = getattr(param, "tensor_parallel_dim", None), getattr(param, "tensor_parallel_stride", 1)
    if dim is None:
        return full
    if full.shape[0] != param.shape[0] and dim == 0:  # the vocabulary, padded for tp
        rows = padded_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by)
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return full.unflatten(dim, (stride, -1)).chunk(tp, dim=dim + 1)[rank].flatten(dim, dim + 1)


def _assert_files_hold_each_ranks_shards(ckpt: str, config: ModelConfig, tp: int, pp: int) -> None:
    """File (t, p) holds exactly the copies stage p saves, each as tp rank t's slice, with the
    coordinates megalith's checkpointer writes for that parameter."""
    directory = os.path.join(ckpt, "iter_0000000")
    full = read_global_tensors(open_checkpoint(ckpt)[0])
    assert sorted(full) == sorted(T5.parameter_names(config))
    for p, layers in enumerate(split_layers(config.num_layers, pp)):
        stage = T5Model(config, stage=StageSpec(p, pp, tuple(layers)))
        kept = {n: q for n, q in stage.named_parameters() if not getattr(q, "is_tied_copy", False)}
        for t in range(tp):
            path = os.path.join(directory, shard_file_name(t, p))
            stored, where = load_file(path), json.loads(safe_open(path, "pt").metadata()[PIECES_KEY])
            held = set()
            for name, param in kept.items():
                local = _slice(full[name], param, t, tp, config)
                spot = placement_of(name, param, config.vocab_size)
                for j, piece in enumerate(pieces(tuple(local.shape), spot, t, tp)):  # none: all padding
                    part = local if piece.dim is None else local.narrow(piece.dim, piece.local_start, piece.length)
                    assert torch.equal(stored[f"model/{name}@{j}"], part), (name, t, p)
                    held.add(f"model/{name}")
            assert {info["name"] for info in where.values()} == held


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, tp, pp", [("2+2", 2, 2), ("1+3", 1, 4), ("1+3", 2, 2)])
def test_round_trip_is_exact_and_logits_match(models, tmp_path, kind, tp, pp):
    """HF -> megalith (tp x pp) -> logits within 1e-5 -> HF: the same tensors bit for bit, loadable,
    the same logits."""
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    config = hf_to_megalith(models[kind], ckpt, tp, pp)
    reader, _ = open_checkpoint(ckpt)
    assert reader.metadata["model"] == "t5" and reader.metadata["source"] == "hf:t5"
    _assert_files_hold_each_ranks_shards(ckpt, config, tp, pp)
    difference = check_logits(models[kind], ckpt)
    print(f"T5 {kind} tp{tp}.pp{pp}: HF -> megalith logits differ by {difference:.2e}")
    assert difference < CHECK_TOLERANCE
    _export_gives_back_the_same_tensors(models[kind], ckpt, back)
    hf = json.load(open(os.path.join(back, "config.json")))
    assert hf["architectures"] == ["T5ForConditionalGeneration"] and hf["feed_forward_proj"] == "relu"
    difference = check_logits(back, ckpt)
    print(f"T5 {kind} tp{tp}.pp{pp}: megalith -> HF logits differ by {difference:.2e}")
    assert difference < CHECK_TOLERANCE


def test_check_sees_a_wrong_bucket_count(models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    hf_to_megalith(models["2+2"], ckpt)
    path = os.path.join(ckpt, "iter_0000000", "metadata.json")
    meta = json.load(open(path))
    meta["model_config"]["relative_attention_max_distance"] = 10
    json.dump(meta, open(path, "w"))
    assert check_logits(models["2+2"], ckpt) > CHECK_TOLERANCE


def test_command_line_both_directions_with_check(models, tmp_path, capsys):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert main(["convert", "--from", "hf", "--input", models["2+2"], "--output", ckpt,
                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--check"]) == 0
    assert main(["convert", "--to", "hf", "--input", ckpt, "--output", back, "--check"]) == 0
    out = capsys.readouterr().out
    assert "--model t5 (T5)" in out and "T5ForConditionalGeneration" in out
    checks = [line for line in out.splitlines() if line.startswith("check:")]
    assert len(checks) == 2 and all(line.endswith("ok") for line in checks), checks
    assert main(["convert", "--from", "hf", "--input", models["2+2"], "--output", str(tmp_path / "vpp"),
                 "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]) == 2
    assert "no interleaved pipeline" in capsys.readouterr().err


# --- what is refused ----------------------------------------------------------------------------


def _rewrite_weights(source: str, target, change) -> str:
    """A copy of HF directory `source` whose state dict is `change(state dict)`."""
    target.mkdir()
    (target / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    save_file(change(_hf_tensors(source)), str(target / "model.safetensors"))
    return str(target)


@pytest.mark.parametrize("changes, fragment", [
    (dict(feed_forward_proj="gated-gelu"), "feed_forward_proj 'gated-gelu' (T5 v1.1 / Flan-T5's gated MLP)"),
    (dict(feed_forward_proj="gelu"), "feed_forward_proj 'gelu' is not supported"),
    (dict(tie_word_embeddings=False, scale_decoder_outputs=False), "untied output layer or unscaled decoder outputs"),
    (dict(num_layers=1), "has tensors megalith's T5 has no place for (encoder.block.1."),
    (dict(num_decoder_layers=3), "no tensor 'decoder.block.2."),
])
def test_unsupported_configs_are_one_line(models, tmp_path, capsys, changes, fragment):
    source = _edit_config(models["2+2"], tmp_path / "edited", **changes)
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(source, str(tmp_path / "out"), 1, 1)
    assert fragment in _one_line(error)
    assert not (tmp_path / "out").exists()
    assert main(["convert", "--from", "hf", "--input", source, "--output", str(tmp_path / "cli")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t | {"lm_head.weight": t["shared.weight"] + 1}, "lm_head.weight differs from the tensor it is tied to"),
    (lambda t: t | {"lm_head.bias": torch.zeros(100)}, "has tensors megalith's T5 has no place for (lm_head.bias)"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith("decoder.")}, "it is a T5EncoderModel"),
])
def test_unsupported_weights_are_one_line(models, tmp_path, change, fragment):
    source = _rewrite_weights(models["2+2"], tmp_path / "edited", change)
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(source, str(tmp_path / "out"), 1, 1)
    assert fragment in _one_line(error)
    assert not (tmp_path / "out").exists()


def test_stored_tied_copies_and_the_unused_cross_attention_bias_are_read(models, tmp_path):
    """Checkpoints written by older transformers store the tied copies of `shared`, and original
    conversions an unused cross-attention bias (transformers drops it): the same model."""
    def change(tensors):
        copies = {copy: tensors["shared.weight"].clone() for copy in
                  ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
        return tensors | copies | {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
                                   torch.ones(8, 4)}
    source = _rewrite_weights(models["2+2"], tmp_path / "old", change)
    hf_to_megalith(source, str(tmp_path / "a"))
    hf_to_megalith(models["2+2"], str(tmp_path / "b"))
    a, b = (read_global_tensors(open_checkpoint(str(tmp_path / n))[0]) for n in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)


def test_export_refuses_an_untied_t5(tmp_path):
    """megalith's untied T5 (and other T5 variants) has no T5 v1.0 counterpart: one line says why."""
    config = _t5_config(1, 1, untie_embeddings_and_output_weights=True)
    ckpt = str(tmp_path / "ckpt")
    _write_model_checkpoint(T5Model(config), config, ckpt, T5, pp=2)
    with pytest.raises(ConfigError) as error:
        megalith_to_hf(ckpt, str(tmp_path / "hf"))
    assert "T5 needs a ReLU MLP" in _one_line(error) and "an untied output layer" in str(error.value)
    assert not (tmp_path / "hf").exists()
    assert family_for_model("t5", _t5_config(1, 1)) is T5
    with pytest.raises(ConfigError) as error:
        family_for_model("t5", _t5_config(1, 1, activation="gelu", disable_bias_linear=False))
    assert "it has a gelu MLP, linear biases" in _one_line(error)


# --- the converted checkpoint trains ----------------------------------------------------------


def test_a_converted_t5_trains_under_any_layout(models, tmp_path, rank_pools):
    """`megalith pretrain --model t5 --load` takes the tp2.pp2 conversion (recorded at length 512)
    at other encoder and decoder lengths and gives the same first losses in one process and
    tp2.pp2.dp2."""
    ckpt = str(tmp_path / "ckpt")
    config = hf_to_megalith(models["2+2"], ckpt, tp=2, pp=2)
    assert (config.encoder_seq_length, config.decoder_seq_length) == (512, 512)
    shorter = replace(config, seq_length=32, encoder_seq_length=32, decoder_seq_length=16)
    _assert_trains_under_any_layout(ckpt, shorter, "t5", tmp_path, rank_pools)
