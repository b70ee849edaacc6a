"""megalith convert: tiny random HF GPT-2 and Llama models to megalith checkpoints and back, and
the family-independent parts (files, layouts, errors, the command line).

No downloads: every HF model is built from a config here and saved with save_pretrained. The
helpers here (`_perturb`, `_assert_files_hold_each_ranks_shards`, `_model_flags`, ...) serve the
other families' tests too (test_hf_bert.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megalith.config import Layout, ModelConfig  # noqa: E402
from megalith.errors import ConfigError  # noqa: E402
from megalith.models.gpt import PADDED_VOCAB_PARAMETERS, GPTModel  # noqa: E402
from megalith.models.parallel_context import StageSpec  # noqa: E402
from megalith.parallel.layers import padded_vocab_size  # noqa: E402
from megalith.parallel.pipeline.split import split_layers  # noqa: E402
from megalith.training.checkpoint_format import (  # noqa: E402
    PIECES_KEY, CheckpointReader, pieces, read_local, save_pieces, shard_file_name,
)
from megalith.convert.command import (  # noqa: E402
    CHECK_TOLERANCE, add_convert_arguments, check_logits, hf_to_megalith, megalith_to_hf, open_checkpoint,
    read_global_tensors, run_convert, write_checkpoint,
)
from megalith.convert.families import FAMILIES, family_for_hf  # noqa: E402
from megalith.convert.gpt import GPT2, gpt_parameter_names  # noqa: E402
from megalith.convert.mapping import placement  # noqa: E402

VOCAB, LAYERS = 100, 4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms start at 1 and biases at 0; make every tensor distinct so a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _gpt2(tmp_path, name: str = "gpt2", **overrides) -> str:
    config = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=LAYERS, n_head=4, bos_token_id=None,
                  eos_token_id=None) | overrides
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    _perturb(model, 1)
    path = str(tmp_path / name)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _llama(tmp_path, name: str = "llama", **overrides) -> str:
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}) | overrides
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    _perturb(model, 2)
    path = str(tmp_path / name)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": _gpt2(root), "llama": _llama(root), "llama-tied": _llama(root, "llama-tied",
                                                                            tie_word_embeddings=True)}


def model_config_from_hf(hf: dict, names=()) -> ModelConfig:
    """The config `megalith convert` derives from a config.json dict (and the weights' names)."""
    return family_for_hf(hf).config_from_hf(hf, names)


def _hf_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def _write_model_checkpoint(model: torch.nn.Module, config: ModelConfig, ckpt: str, family, pp: int = 1) -> None:
    """A whole megalith model's parameters as a converted checkpoint (vocabulary padding cut off)."""
    tensors = {n: p.detach()[: config.vocab_size] if n.endswith(PADDED_VOCAB_PARAMETERS) else p.detach()
               for n, p in model.named_parameters()}
    write_checkpoint(tensors, config, ckpt, Layout(pp=pp), family)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text, text
    return text


# --- configs and the placement table -----------------------------------------------------------


def test_configs_follow_the_hf_models(models):
    gpt2 = model_config_from_hf(json.load(open(os.path.join(models["gpt2"], "config.json"))))
    assert (gpt2.openai_gelu, gpt2.normalization, gpt2.position_embedding_type, gpt2.swiglu) == \
        (True, "LayerNorm", "learned_absolute", False)
    assert (gpt2.ffn_hidden_size, gpt2.seq_length, gpt2.untie_embeddings_and_output_weights) == (128, 32, False)
    llama = model_config_from_hf(json.load(open(os.path.join(models["llama"], "config.json"))))
    assert (llama.num_query_groups, llama.rotary_base, llama.swiglu, llama.disable_bias_linear) == \
        (2, 500000, True, True)
    assert (llama.normalization, llama.norm_epsilon, llama.untie_embeddings_and_output_weights) == \
        ("RMSNorm", 1e-6, True)
    assert llama.hidden_dropout == llama.attention_dropout == 0.0
    legacy = dict(model_type="llama", hidden_size=32, num_attention_heads=4, rope_theta=1e6, rope_scaling=None)
    assert model_config_from_hf(legacy).rotary_base == 1_000_000  # transformers 4's config.json
    with pytest.raises(ConfigError) as error:
        model_config_from_hf(legacy | {"rope_theta": 10000.5})
    assert "rope_theta 10000.5" in _one_line(error)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_placement_table_matches_megalith_layers(models, kind):
    """The pure names and splits used to write shards are GPTModel's own parameters and attributes."""
    config = model_config_from_hf(json.load(open(os.path.join(models[kind], "config.json"))))
    params = dict(GPTModel(config).named_parameters())
    assert list(params) == gpt_parameter_names(config)
    for name, param in params.items():
        where = placement(name, config)
        assert where.dim == getattr(param, "tensor_parallel_dim", None), name
        assert where.stride == getattr(param, "tensor_parallel_stride", 1), name


# --- round trips ------------------------------------------------------------------------------


def _export_gives_back_the_same_tensors(hf_dir: str, ckpt: str, back: str) -> None:
    """`--to hf` of a converted checkpoint writes the HF tensors it was converted from, bit for bit."""
    megalith_to_hf(ckpt, back)
    original, exported = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("kind, layout", [("gpt2", (2, 2, None)), ("llama", (2, 2, None)), ("gpt2", (2, 2, 1)),
                                          ("llama-tied", (1, 1, None))])
def test_round_trip_is_exact_and_logits_match(models, tmp_path, kind, layout):
    tp, pp, vpp_layers = layout
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    hf_to_megalith(models[kind], ckpt, tp, pp, vpp_layers)
    assert check_logits(models[kind], ckpt) < CHECK_TOLERANCE
    _export_gives_back_the_same_tensors(models[kind], ckpt, back)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert type(loaded).__name__ == {"gpt2": "GPT2LMHeadModel"}.get(kind, "LlamaForCausalLM")
    assert check_logits(back, ckpt) < CHECK_TOLERANCE


def test_checkpoint_files_and_metadata(models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    config = hf_to_megalith(models["llama"], ckpt, 2, 2, 1)  # vpp 2: rank p holds stages p and 2 + p
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "0"
    directory = os.path.join(ckpt, "iter_0000000")
    files = sorted(shard_file_name(t, p) for t in (0, 1) for p in (0, 1))
    assert sorted(os.listdir(directory)) == ["metadata.json"] + files
    meta = json.load(open(os.path.join(directory, "metadata.json")))
    assert meta == {
        "format_version": 2, "iteration": 0, "consumed_samples": 0, "valid_batches": 0, "model": "gpt",
        "model_config": asdict(config),
        "layout": {"world_size": 4, "tp": 2, "pp": 2, "vpp": 2, "dp": 1, "ep": 1, "etp": 2, "zero1": False, "zero": 0,
                   "params_dtype": "fp32"},
        "has_optimizer": False, "optimizer": None, "scheduler": None, "loss_scaler": None, "config": None,
        "source": "hf:llama",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    _assert_files_hold_each_ranks_shards(directory, config, tp=2, pp=2, vpp=2)


def _assert_files_hold_each_ranks_shards(directory: str, config: ModelConfig, tp: int, pp: int, vpp: int,
                                         build=GPTModel) -> None:
    """File (t, p) holds exactly the parameters of rank p's stages (`build(config, stage=...)`
    builds one), as tp rank t's slices."""
    reader = CheckpointReader(directory)
    stages = split_layers(config.num_layers, pp, vpp)
    for p in range(pp):
        names = set()
        for chunk in range(vpp):
            index = chunk * pp + p
            stage = build(config, stage=StageSpec(index, pp * vpp, tuple(stages[index])))
            names |= {n for n, _ in stage.named_parameters() if not n.endswith("word_embeddings_for_head.weight")}
        for t in range(tp):
            path = os.path.join(directory, shard_file_name(t, p))
            stored = load_file(path)
            where = json.loads(safe_open(path, "pt").metadata()[PIECES_KEY])
            held = set()
            for name in names:
                local_shape = list(reader.shape(f"model/{name}"))
                spot = placement(name, config)
                if spot.dim is not None:
                    rows = local_shape[spot.dim] if spot.valid_rows is None else \
                        padded_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by)
                    local_shape[spot.dim] = rows // tp
                local = read_local(reader, f"model/{name}", tuple(local_shape), spot, t, tp)
                for j, piece in enumerate(pieces(tuple(local_shape), spot, t, tp)):  # none: all padding
                    part = local if piece.dim is None else local.narrow(piece.dim, piece.local_start, piece.length)
                    assert torch.equal(stored[f"model/{name}@{j}"], part), (name, t)
                    held.add(f"model/{name}")
            assert {info["name"] for info in where.values()} == held


def test_global_tensors_do_not_depend_on_the_layout(models, tmp_path):
    hf_to_megalith(models["gpt2"], str(tmp_path / "a"), 2, 2)
    hf_to_megalith(models["gpt2"], str(tmp_path / "b"), 1, 1)
    (reader_a, config), (reader_b, _) = open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b"))
    a, b = read_global_tensors(reader_a), read_global_tensors(reader_b)
    assert sorted(a) == sorted(b) == sorted(gpt_parameter_names(config))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert reader_a.names() == reader_b.names()


def test_sharded_and_pickled_hf_inputs(models, tmp_path):
    """Sharded safetensors with an index, and pytorch_model.bin (weights only), convert the same."""
    original = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    sharded = str(tmp_path / "sharded")
    original.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(models["gpt2"], "config.json")).read())
    state = {k.removeprefix("transformer."): v for k, v in _hf_tensors(models["gpt2"]).items()}  # GPT-2 hub names
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # the old causal-mask buffer is not a weight
    torch.save(state, pickled / "pytorch_model.bin")
    reference = str(tmp_path / "reference")
    hf_to_megalith(models["gpt2"], reference, 1, 1)
    (reader, config) = open_checkpoint(reference)
    expected = read_global_tensors(reader)
    for source in (sharded, str(pickled)):
        out = str(tmp_path / f"from-{os.path.basename(source)}")
        hf_to_megalith(source, out, 2, 1)
        got = read_global_tensors(open_checkpoint(out)[0])
        assert all(torch.equal(got[name], expected[name]) for name in expected)


# --- the check catches a wrong model ----------------------------------------------------------


def test_check_sees_a_wrong_gelu(models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    hf_to_megalith(models["gpt2"], ckpt, 1, 1)
    path = os.path.join(ckpt, "iter_0000000", "metadata.json")
    meta = json.load(open(path))
    meta["model_config"]["openai_gelu"] = False
    json.dump(meta, open(path, "w"))
    assert check_logits(models["gpt2"], ckpt) > CHECK_TOLERANCE


def test_openai_gelu_is_the_tanh_approximation():
    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=50, hidden_dropout=0.0,
                attention_dropout=0.0)
    exact, tanh = GPTModel(ModelConfig(**base)), GPTModel(ModelConfig(**base, openai_gelu=True))
    x = torch.randn(8, 1, 16) * 3
    mlp_exact, mlp_tanh = exact.decoder.layers["0"].mlp, tanh.decoder.layers["0"].mlp
    h = mlp_tanh.linear_fc1(x)
    torch.testing.assert_close(mlp_tanh(x), mlp_tanh.linear_fc2(torch.nn.functional.gelu(h, approximate="tanh")))
    assert not torch.allclose(mlp_exact(x), mlp_tanh(x))
    with pytest.raises(ConfigError) as error:
        ModelConfig(**base, swiglu=True, openai_gelu=True)
    assert "--openai-gelu" in _one_line(error)


# --- command line and errors ------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megalith convert")
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


def test_command_line_both_directions_with_check(models, tmp_path, capsys):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert _run(["--from", "hf", "--input", models["llama"], "--output", ckpt, "--tensor-model-parallel-size", "2",
                 "--pipeline-model-parallel-size", "2", "--check"]) == 0
    assert _run(["--to", "hf", "--input", ckpt, "--output", back, "--check"]) == 0
    checks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check:")]
    assert len(checks) == 2 and all(line.endswith("ok") for line in checks), checks
    with pytest.raises(ConfigError) as error:
        _run(["--to", "hf", "--input", ckpt, "--output", str(tmp_path / "x"), "--tensor-model-parallel-size", "2"])
    assert "drop --tensor-model-parallel-size" in _one_line(error)


def _edit_config(source: str, target, **changes) -> str:
    target.mkdir()
    config = json.load(open(os.path.join(source, "config.json"))) | changes
    (target / "config.json").write_text(json.dumps(config))
    os.link(os.path.join(source, "model.safetensors"), target / "model.safetensors")
    return str(target)


@pytest.mark.parametrize("changes, fragment", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}), "rope_type 'yarn'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="roberta"), "model_type 'roberta' is not supported; megalith converts GPT-2 (gpt2)"),
    (dict(num_hidden_layers=5), "no tensor 'model.layers.4"),
    (dict(num_hidden_layers=3), "has tensors megalith's GPT has no place for (model.layers.3."),
])
def test_unsupported_hf_models_are_one_line(models, tmp_path, changes, fragment):
    source = _edit_config(models["llama"], tmp_path / "edited", **changes)
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(source, str(tmp_path / "out"), 1, 1)
    assert fragment in _one_line(error)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_and_layouts_are_one_line(models, tmp_path):
    cases = [
        (lambda: hf_to_megalith(str(tmp_path), str(tmp_path / "o1")), "config.json: no such file"),
        (lambda: hf_to_megalith(str(_empty_with_config(models, tmp_path)), str(tmp_path / "o2")),
         "holds no model.safetensors"),
        (lambda: hf_to_megalith(models["llama"], str(tmp_path / "o3"), 4, 1),
         "divisible by --tensor-model-parallel-size 4"),
        (lambda: hf_to_megalith(models["llama"], str(tmp_path / "o4"), 1, 3), "do not split evenly"),
        (lambda: hf_to_megalith(models["llama"], str(tmp_path / "o5"), 1, 2, 3), "virtual-pipeline-stage 3"),
        (lambda: hf_to_megalith(models["llama"], models["gpt2"]), "already exists and is not empty"),
        (lambda: megalith_to_hf(str(tmp_path / "nothing"), str(tmp_path / "o6")), "latest_checkpointed_iteration"),
    ]
    for call, fragment in cases:
        with pytest.raises(ConfigError) as error:
            call()
        assert fragment in _one_line(error)


def _empty_with_config(models, tmp_path):
    target = tmp_path / "config-only"
    target.mkdir()
    (target / "config.json").write_text(open(os.path.join(models["gpt2"], "config.json")).read())
    return target


def test_pickled_code_is_refused(models, tmp_path):
    target = tmp_path / "evil"
    target.mkdir()
    (target / "config.json").write_text(open(os.path.join(models["gpt2"], "config.json")).read())
    torch.save({"weights": argparse.Namespace(x=1)}, target / "pytorch_model.bin")  # needs unpickling code
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(str(target), str(tmp_path / "out"))
    assert "never pickled code" in _one_line(error)


def test_export_refuses_a_model_no_hf_architecture_fits(tmp_path):
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=50,
                         position_embedding_type="rope", hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config)
    ckpt = str(tmp_path / "ckpt")
    _write_model_checkpoint(model, config, ckpt, GPT2)
    with pytest.raises(ConfigError) as error:
        megalith_to_hf(ckpt, str(tmp_path / "hf"))
    assert "GPT-2 needs learned positions" in _one_line(error) and "rotary positions" in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_a_failed_write_leaves_nothing(models, tmp_path, monkeypatch):
    import megalith.convert.command as convert

    calls = []

    def failing(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_pieces(path, tensors)

    monkeypatch.setattr(convert, "save_pieces", failing)
    with pytest.raises(OSError):
        hf_to_megalith(models["gpt2"], str(tmp_path / "ckpt"), 2, 1)
    assert list(tmp_path.iterdir()) == []


def _model_flags(config: ModelConfig) -> list[str]:
    """The pretrain flags that build `config` (what a user passes after converting)."""
    flags = []
    for name, value in asdict(config).items():
        if name == "params_dtype" or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        flags += ([flag] if value else ["--no-" + name.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
    return flags


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_converted_checkpoint_trains_under_any_layout(models, tmp_path, rank_pools, kind):
    """Converted at tp2.pp2, loaded by `megalith pretrain --finetune` under tp2.pp2.dp2 and in one
    process: the same first losses (the checkpoint reshards like any other)."""
    ckpt = str(tmp_path / "ckpt")
    config = hf_to_megalith(models[kind], ckpt, tp=2, pp=2)
    _assert_trains_under_any_layout(ckpt, config, "gpt", tmp_path, rank_pools)


def _assert_trains_under_any_layout(ckpt: str, config: ModelConfig, model: str, tmp_path, rank_pools) -> None:
    """`megalith pretrain --model MODEL --load ckpt --finetune` accepts the checkpoint; one process and
    tp2.pp2.dp2 give the same first losses, and both differ from a run that does not load it."""
    from megalith.testing import pretrain_on_rank

    common = ["--model", model, "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4",
              "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0", "--log-interval", "1",
              "--no-log-progress-bar", "--load", ckpt, "--finetune"]
    losses = {}
    tp2pp2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    for name, layout, world in (("one", [], 1), ("tp2.pp2.dp2", tp2pp2, 8), ("not loaded", [], 1)):
        log = tmp_path / f"{name}.jsonl"
        argv = _model_flags(config) + (common if name != "not loaded" else common[:-3]) + layout
        rank_pools(8).run(pretrain_on_rank, argv + ["--log-json", str(log)], world)
        losses[name] = torch.tensor([json.loads(line)["lm_loss"] for line in log.read_text().splitlines()])
    assert len(losses["one"]) == 2
    assert (losses["one"] - losses["not loaded"]).abs().max() > 1e-2  # the HF weights were loaded
    assert (losses["one"] - losses["tp2.pp2.dp2"]).abs().max() / losses["one"].abs().max() < 1e-5


def test_every_family_converts_a_registered_model():
    """The family table: distinct model_types, each family's megalith model built in."""
    from megalith.models.registry import BUILTIN_MODELS

    types = [t for family in FAMILIES for t in family.model_types]
    assert len(types) == len(set(types))
    assert all(family.model in BUILTIN_MODELS for family in FAMILIES)
