"""megalith convert for BERT: tiny random HF BertForMaskedLM / BertForPreTraining to megalith
checkpoints of a layout and back, with logits equal to Hugging Face's within 1e-5.

No downloads: every HF model is built from a config here and saved with save_pretrained. The
family-independent helpers come from test_hf_convert.py.
"""

from __future__ import annotations

import json
import os
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_convert import (  # noqa: E402
    _assert_files_hold_each_ranks_shards, _assert_trains_under_any_layout, _edit_config,
    _export_gives_back_the_same_tensors, _hf_tensors, _one_line, _perturb, _run, _write_model_checkpoint,
)

from megalith.config import ModelConfig  # noqa: E402
from megalith.errors import ConfigError  # noqa: E402
from megalith.models.bert import BertModel  # noqa: E402
from megalith.models.parallel_context import StageSpec  # noqa: E402
from megalith.models.registry import BUILTIN_MODELS  # noqa: E402
from megalith.convert.bert import BERT, bert_config_from_hf  # noqa: E402
from megalith.convert.command import (  # noqa: E402
    CHECK_TOLERANCE, check_logits, hf_to_megalith, megalith_to_hf, open_checkpoint, read_global_tensors,
)
from megalith.convert.families import family_for_hf, family_for_model  # noqa: E402

LAYERS = 4


def _bert(root, kind: str, name: str | None = None, **overrides) -> str:
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, type_vocab_size=2) | overrides
    model = getattr(transformers, kind)(transformers.BertConfig(**config))
    _perturb(model, 3)
    path = str(root / (name or kind))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-bert")
    return {"mlm": _bert(root, "BertForMaskedLM"), "pretraining": _bert(root, "BertForPreTraining"),
            "encoder-only": _bert(root, "BertModel"),
            "tanh-gelu": _bert(root, "BertForMaskedLM", "tanh-gelu", hidden_act="gelu_pytorch_tanh")}


def _config(path: str) -> ModelConfig:
    hf = json.load(open(os.path.join(path, "config.json")))
    return family_for_hf(hf).config_from_hf(hf, list(_hf_tensors(path)))


# --- config and the placement table -----------------------------------------------------------


def test_the_weights_decide_the_binary_head(models):
    mlm, pretraining = _config(models["mlm"]), _config(models["pretraining"])
    assert (mlm.bert_no_binary_head, pretraining.bert_no_binary_head) == (True, False)
    assert (mlm.post_layer_norm, mlm.num_tokentypes, mlm.norm_epsilon, mlm.openai_gelu) == (True, 2, 1e-12, False)
    assert (mlm.seq_length, mlm.ffn_hidden_size, mlm.hidden_dropout) == (32, 64, 0.0)
    assert _config(models["tanh-gelu"]).openai_gelu
    assert family_for_hf({"model_type": "bert"}) is BERT


@pytest.mark.parametrize("post_norm, binary_head", [(True, False), (True, True), (False, True)])
def test_placement_table_matches_bert_model(post_norm, binary_head):
    """The pure names, tp splits and stages used to write shards are BertModel's own."""
    config = ModelConfig(**BUILTIN_MODELS["bert"].defaults | dict(post_layer_norm=post_norm,
                                                                  bert_no_binary_head=not binary_head))
    params = dict(BertModel(config).named_parameters())
    assert list(params) == BERT.parameter_names(config)
    for name, param in params.items():
        where = BERT.placement(name, config)
        assert where.dim == getattr(param, "tensor_parallel_dim", None), name
        assert where.stride == getattr(param, "tensor_parallel_stride", 1), name
    last = BertModel(config, stage=StageSpec(1, 2, tuple(range(2, config.num_layers))))
    held_last = {n for n, _ in last.named_parameters() if not n.endswith("word_embeddings_for_head.weight")}
    layer_stages = {i: int(i >= 2) for i in range(config.num_layers)}
    assert held_last == {n for n in params if BERT.stage_of(n, config, layer_stages, 1) == 1}


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, layout", [("mlm", (2, 2, None)), ("pretraining", (2, 2, None)),
                                          ("pretraining", (1, 2, 1)), ("tanh-gelu", (2, 1, None))])
def test_round_trip_is_exact_and_logits_match(models, tmp_path, kind, layout):
    """HF -> megalith (tp x pp) -> logits within 1e-5 -> HF: the same tensors, loadable, same logits."""
    tp, pp, vpp_layers = layout
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    config = hf_to_megalith(models[kind], ckpt, tp, pp, vpp_layers)
    reader, _ = open_checkpoint(ckpt)
    assert reader.metadata["model"] == "bert" and reader.metadata["source"] == "hf:bert"
    difference = check_logits(models[kind], ckpt)
    print(f"{kind} tp{tp}.pp{pp}: HF -> megalith logits differ by {difference:.2e}")
    assert difference < CHECK_TOLERANCE
    _export_gives_back_the_same_tensors(models[kind], ckpt, back)
    architecture = "BertForMaskedLM" if kind != "pretraining" else "BertForPreTraining"
    assert json.load(open(os.path.join(back, "config.json")))["architectures"] == [architecture]
    loaded = getattr(transformers, architecture).from_pretrained(back)
    assert loaded.config.hidden_act == ("gelu_pytorch_tanh" if config.openai_gelu else "gelu")
    difference = check_logits(back, ckpt)
    print(f"{kind} tp{tp}.pp{pp}: megalith -> HF logits differ by {difference:.2e}")
    assert difference < CHECK_TOLERANCE


def test_checkpoint_files_hold_each_ranks_shards(models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    config = hf_to_megalith(models["pretraining"], ckpt, 2, 2)
    _assert_files_hold_each_ranks_shards(os.path.join(ckpt, "iter_0000000"), config, tp=2, pp=2, vpp=1,
                                         build=BertModel)
    one = str(tmp_path / "one")
    hf_to_megalith(models["pretraining"], one, 1, 1)
    a, b = read_global_tensors(open_checkpoint(ckpt)[0]), read_global_tensors(open_checkpoint(one)[0])
    assert sorted(a) == sorted(b) == sorted(BERT.parameter_names(config))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_check_sees_a_wrong_gelu(models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    hf_to_megalith(models["mlm"], ckpt)
    path = os.path.join(ckpt, "iter_0000000", "metadata.json")
    meta = json.load(open(path))
    meta["model_config"]["openai_gelu"] = True
    json.dump(meta, open(path, "w"))
    assert check_logits(models["mlm"], ckpt) > CHECK_TOLERANCE


def test_command_line_both_directions_with_check(models, tmp_path, capsys):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert _run(["--from", "hf", "--input", models["pretraining"], "--output", ckpt,
                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--check"]) == 0
    assert _run(["--to", "hf", "--input", ckpt, "--output", back, "--check"]) == 0
    out = capsys.readouterr().out
    assert "--model bert (BERT)" in out and "BertForPreTraining" in out
    checks = [line for line in out.splitlines() if line.startswith("check:")]
    assert len(checks) == 2 and all(line.endswith("ok") for line in checks), checks


# --- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, changes, fragment", [
    ("encoder-only", {}, "no masked-LM head"),
    ("mlm", dict(hidden_act="relu"), "hidden_act 'relu'"),
    ("mlm", dict(is_decoder=True), "is_decoder"),
    ("mlm", dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    ("mlm", dict(num_hidden_layers=3), "has tensors megalith's BERT has no place for (bert.encoder.layer.3."),
    ("pretraining", dict(num_hidden_layers=5), "no tensor 'bert.encoder.layer.4"),
])
def test_unsupported_hf_berts_are_one_line(models, tmp_path, kind, changes, fragment):
    source = _edit_config(models[kind], tmp_path / "edited", **changes)
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(source, str(tmp_path / "out"), 1, 1)
    assert fragment in _one_line(error)
    assert not (tmp_path / "out").exists()


def _rewrite_weights(source: str, target, change) -> str:
    """A copy of HF directory `source` whose state dict is `change(state dict)`."""
    from safetensors.torch import save_file

    target.mkdir()
    (target / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    save_file(change(_hf_tensors(source)), str(target / "model.safetensors"))
    return str(target)


def test_tf_layernorm_names_are_read_and_a_lone_pooler_is_refused(models, tmp_path):
    """Original TF conversions name LayerNorm parameters gamma/beta: the same checkpoint. A pooler
    without cls.seq_relationship has no place (megalith's pooler feeds the binary head)."""
    renamed = _rewrite_weights(models["mlm"], tmp_path / "tf", lambda tensors: {
        key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
        for key, value in tensors.items()})
    hf_to_megalith(renamed, str(tmp_path / "a"))
    hf_to_megalith(models["mlm"], str(tmp_path / "b"))
    a, b = (read_global_tensors(open_checkpoint(str(tmp_path / n))[0]) for n in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    pooler = _rewrite_weights(models["mlm"], tmp_path / "pooler", lambda tensors: tensors | {
        "bert.pooler.dense.weight": torch.zeros(32, 32), "bert.pooler.dense.bias": torch.zeros(32)})
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(pooler, str(tmp_path / "c"))
    assert "no place for (bert.pooler.dense.bias" in _one_line(error)


def test_export_refuses_a_pre_norm_bert(tmp_path):
    """Megatron's default (pre-norm) BERT has no Hugging Face counterpart: one line says why."""
    config = ModelConfig(**BUILTIN_MODELS["bert"].defaults)
    ckpt = str(tmp_path / "ckpt")
    _write_model_checkpoint(BertModel(config), config, ckpt, BERT)
    with pytest.raises(ConfigError) as error:
        megalith_to_hf(ckpt, str(tmp_path / "hf"))
    assert "BERT needs post-norm layers" in _one_line(error) and "--post-layer-norm" in str(error.value)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError) as error:
        family_for_model("mamba", config)
    assert "megalith converts bert, gpt, t5 models" in _one_line(error)


def test_bert_config_refuses_an_untied_head():
    with pytest.raises(ConfigError) as error:
        bert_config_from_hf({"tie_word_embeddings": False})
    assert "tie_word_embeddings false" in _one_line(error)


# --- the converted checkpoint trains ----------------------------------------------------------


def test_a_converted_bert_trains_under_any_layout(models, tmp_path, rank_pools):
    """`megalith pretrain --model bert --load` takes the tp2.pp2 conversion of a BertForPreTraining
    (binary head on the last stage) and gives the same first losses in one process and tp2.pp2.dp2."""
    ckpt = str(tmp_path / "ckpt")
    config = hf_to_megalith(models["pretraining"], ckpt, tp=2, pp=2)
    _assert_trains_under_any_layout(ckpt, config, "bert", tmp_path, rank_pools)
