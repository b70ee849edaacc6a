"""T5: every layout equals one process (`megalith verify`), wherever the pipeline splits encoder
from decoder; T5's flags resolve as Megatron's; relative buckets and logits match Hugging Face."""

from dataclasses import replace

import pytest
import torch

from megalith.config import ModelConfig, parse_layout
from megalith.errors import ConfigError
from megalith.models.parallel_context import StageSpec
from megalith.models.registry import BUILTIN_MODELS, t5_batch
from megalith.models.t5 import T5Model, relative_position_buckets, resolve_t5_config
from megalith.parallel import comm
from megalith.parallel.layers import sequence_parallel_parameters
from megalith.testing import relative_error
from megalith.convert.mapping import ConvertError
from megalith.convert.t5 import t5_config_from_hf, t5_global_to_hf, t5_hf_to_global
from megalith.verify import VerifySettings, _train_on_rank, compare, merge_ranks, run_verify

SPEC = BUILTIN_MODELS["t5"]
BASE = SPEC.resolved(ModelConfig(**SPEC.defaults))  # 2 + 2 layers


def t5_config(**changes) -> ModelConfig:
    return SPEC.resolved(ModelConfig(**{**SPEC.defaults, **changes}))


@pytest.mark.parametrize("config, layouts", [
    pytest.param(BASE, ["tp2", "pp2", "tp2.pp2.dp2"], marks=pytest.mark.slow),
    # the split falls inside a stage: encoder output and decoder state travel together
    (t5_config(encoder_num_layers=1, decoder_num_layers=3, untie_embeddings_and_output_weights=True),
     ["tp2.pp2.dp2.sp.zero1", "pp4.mb4"]),
    (t5_config(encoder_num_layers=3, decoder_num_layers=1), ["pp2.recompute-full"]),
], ids=["2+2", "1+3-untied", "3+1"])
def test_layouts_match_one_process(rank_pools, config, layouts):
    results = run_verify(VerifySettings("t5", config, steps=3), [parse_layout(t) for t in layouts],
                         pool=rank_pools(8))
    assert [r.layout for r in results] == layouts
    for r in results:
        assert r.passed, r
        assert r.losses[-1] < r.losses[0]


def sync_only_over_tp(self):
    comm.all_reduce_grads(sequence_parallel_parameters(self), self.ctx.tp_group)


def train_without_pipeline_sum(ctx, settings):
    original = T5Model.finish_grad_sync
    T5Model.finish_grad_sync = sync_only_over_tp
    try:
        return _train_on_rank(ctx, settings, parse_layout("pp2"))
    finally:
        T5Model.finish_grad_sync = original


def test_negative_control_unsummed_shared_tables_fail(rank_pools):
    """Without the pipeline sum, the embedding's copies (encoder input on stage 0, decoder input
    and output layer on stage 1) each keep only their own stage's gradient: FAIL."""
    pool, settings = rank_pools(8), VerifySettings("t5", BASE, steps=1)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("pp2", reference, merge_ranks(pool.run(train_without_pipeline_sum, settings)))
    assert not broken.passed
    assert broken.grad_error > 1e-2  # a thousand times the tolerance
    assert "word_embeddings" in broken.worst_grad


def test_flags_resolve_as_megatron():
    assert (BASE.encoder_num_layers, BASE.decoder_num_layers, BASE.num_layers) == (2, 2, 4)
    assert (BASE.seq_length, BASE.encoder_seq_length, BASE.decoder_seq_length) == (32, 32, 16)
    given = t5_config(num_layers=3, encoder_seq_length=64, decoder_seq_length=None)
    assert (given.encoder_num_layers, given.decoder_num_layers, given.num_layers) == (3, 3, 6)
    assert (given.seq_length, given.decoder_seq_length) == (64, 64)
    split = t5_config(encoder_num_layers=5, decoder_num_layers=1)
    assert split.num_layers == 6 and resolve_t5_config(split) == split  # idempotent


@pytest.mark.parametrize("change, message", [
    (dict(position_embedding_type="learned_absolute"), "relative position buckets"),
    (dict(num_query_groups=4), "multi-head"),
])
def test_bad_t5_configs_are_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        T5Model(t5_config(**change))


def test_a_stage_without_layers_and_interleaving_are_refused():
    with pytest.raises(ConfigError, match="holds no layer"):
        T5Model(BASE, stage=StageSpec(0, 2, ()))
    with pytest.raises(ConfigError, match="interleaved"):
        SPEC.check_virtual_pipeline(2)
    with pytest.raises(ConfigError, match="decoder-seq-length 15"):
        from megalith.config import Layout
        Layout(tp=2, sequence_parallel=True).check_model(replace(BASE, decoder_seq_length=15))


def test_mock_batch_is_a_batched_t5_dataset_item():
    batch = t5_batch(BASE, 5, torch.Generator().manual_seed(4))
    se, sd = BASE.seq_length, BASE.decoder_seq_length
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "encoder_input_ids": ((5, se), torch.int64), "decoder_input_ids": ((5, sd), torch.int64),
        "labels": ((5, sd), torch.int64), "loss_mask": ((5, sd), torch.float32),
        "encoder_padding_mask": ((5, se), torch.bool), "decoder_padding_mask": ((5, sd), torch.bool)}
    assert torch.equal(batch["loss_mask"] > 0, batch["labels"] >= 0)
    assert torch.equal(batch["decoder_padding_mask"], batch["loss_mask"] > 0)
    assert torch.equal(batch["decoder_input_ids"][:, 1:][batch["loss_mask"][:, 1:] > 0],
                       batch["labels"][:, :-1][batch["loss_mask"][:, 1:] > 0])  # teacher forcing
    assert not batch["encoder_padding_mask"].all()


@pytest.mark.parametrize("bidirectional, buckets, distance", [(True, 32, 128), (False, 32, 128), (True, 8, 20),
                                                              (False, 10, 7)])
def test_relative_buckets_match_hugging_face(bidirectional, buckets, distance):
    transformers = pytest.importorskip("transformers")
    query, key = torch.arange(300)[:, None], torch.arange(300)[None, :]
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        key - query, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
    ours = relative_position_buckets(300, 300, bidirectional=bidirectional, num_buckets=buckets,
                                     max_distance=distance)
    assert torch.equal(ours, theirs)


# --- Hugging Face parity ----------------------------------------------------------------------


def tiny_hf_t5(**overrides):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.T5Config(**{
        "vocab_size": 120, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "dropout_rate": 0.0, "feed_forward_proj": "relu", "attn_implementation": "eager", **overrides})
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for param in hf.parameters():  # norms away from 1
            param.add_(0.1 * torch.randn_like(param))
    return hf


def load_global(model: T5Model, tensors: dict[str, torch.Tensor]) -> None:
    """Global tensors into a one-process model (vocabulary rows into the padded table)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_()
            param[: tensors[name].shape[0]].copy_(tensors[name])


def hf_logits(hf, batch) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=batch["encoder_input_ids"], attention_mask=batch["encoder_padding_mask"].long(),
                  decoder_input_ids=batch["decoder_input_ids"],
                  decoder_attention_mask=batch["decoder_padding_mask"].long()).logits


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_logits_match_hugging_face(backend):
    hf = tiny_hf_t5()
    config = replace(t5_config_from_hf(hf.config.to_dict()), encoder_seq_length=24, decoder_seq_length=12,
                     attention_backend=backend)
    model = T5Model(config).eval()
    tensors = t5_hf_to_global(hf.state_dict(), config)
    load_global(model, tensors)
    batch = t5_batch(config, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(batch["encoder_input_ids"], batch["decoder_input_ids"], None, batch["encoder_padding_mask"],
                     batch["decoder_padding_mask"])
    ours = ours[:, :, :config.vocab_size].transpose(0, 1)
    real = batch["decoder_padding_mask"]
    assert not real.all() and not batch["encoder_padding_mask"].all()  # padding is exercised on both sides
    assert relative_error(ours[real], hf_logits(hf, batch)[real]) < 1e-5
    back = t5_global_to_hf(tensors, config)
    state = hf.state_dict()
    assert set(state) - set(back) == {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                      "lm_head.weight"} - {"shared.weight"}
    assert all(torch.equal(value, state[name]) for name, value in back.items())


def test_gated_or_unscaled_t5s_are_refused():
    with pytest.raises(ConvertError, match="gated"):
        t5_config_from_hf({"feed_forward_proj": "gated-gelu"})
    with pytest.raises(ConvertError, match="v1.1"):
        t5_config_from_hf({"feed_forward_proj": "relu", "tie_word_embeddings": False})


# --- pretrain and checkpoints -----------------------------------------------------------------

PRETRAIN = ["--model", "t5", "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "2e-3",
            "--lr-warmup-iters", "1", "--adam-eps", "1e-6", "--log-interval", "1", "--eval-interval", "3",
            "--eval-iters", "1", "--no-log-progress-bar", "--train-iters", "6"]


def _pretrain(pool, tmp_path, name: str, flags: list[str], world: int) -> list[dict]:
    import json

    from megalith.testing import pretrain_on_rank

    log = tmp_path / f"{name}.jsonl"
    pool.run(pretrain_on_rank, PRETRAIN + flags + ["--log-json", str(log)], world)
    return [json.loads(line) for line in log.read_text().splitlines() if "consumed_samples" in line]


@pytest.mark.slow  # about 10 s
def test_pretrain_saves_under_one_layout_and_resumes_under_another(rank_pools, tmp_path):
    """T5 trained 3 iterations under tp2.pp2.dp2.zero1, saved, continued under pp4 (every form
    of stage boundary): the losses of continuing under the first layout; the checkpoint holds
    each shared table once."""
    from megalith.training.checkpoint_format import CheckpointReader

    pool = rank_pools(8)
    source = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]
    straight = _pretrain(pool, tmp_path, "straight", source, 8)
    _pretrain(pool, tmp_path, "first", source + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"], 8)
    moved = _pretrain(pool, tmp_path, "moved", ["--pipeline-model-parallel-size", "4", "--load",
                                                 str(tmp_path / "ckpt")], 4)
    assert [r["iteration"] for r in moved] == [4, 5, 6]
    for key in ("lm_loss", "grad_norm"):
        expected = torch.tensor([r[key] for r in straight if r["iteration"] > 3], dtype=torch.float64)
        got = torch.tensor([r[key] for r in moved], dtype=torch.float64)
        assert relative_error(got, expected) < 1e-6, key
    assert straight[-1]["lm_loss"] < straight[0]["lm_loss"]
    reader = CheckpointReader(str(tmp_path / "ckpt" / "iter_0000003"))
    names = reader.names()
    assert reader.shape("model/embedding.word_embeddings.weight") == (BASE.vocab_size, BASE.hidden_size)
    assert reader.shape("model/decoder_relative_position.weight") == (32, 8)
    assert {n for n in names if n.startswith("model/")} == {"model/" + n for n in T5Model(BASE).state_dict()}
