"""BERT: every layout equals one process (`megalith verify`), the loss convention, and weights
mapped from Hugging Face's BertForMaskedLM / BertForPreTraining give the same logits."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megalith.config import ModelConfig, parse_layout
from megalith.models.bert import BertModel
from megalith.models.registry import BUILTIN_MODELS, bert_batch
from megalith.testing import relative_error
from megalith.convert.bert import bert_config_from_hf, bert_hf_to_global
from megalith.training.step import sequence_mean_loss
from megalith.verify import VerifySettings, _train_on_rank, compare, merge_ranks, run_verify

BASE = ModelConfig(**BUILTIN_MODELS["bert"].defaults)
POST_NORM = replace(BASE, post_layer_norm=True, num_layers=2)


@pytest.mark.parametrize("config, layouts", [
    pytest.param(BASE, ["tp2.sp", "pp2", "tp2.pp2.dp2.sp.zero1"], marks=pytest.mark.slow),
    (replace(POST_NORM, bert_no_binary_head=True), ["tp2.sp"]),
], ids=["megatron-pre-norm", "hf-post-norm-no-binary-head"])
def test_layouts_match_one_process(rank_pools, config, layouts):
    results = run_verify(VerifySettings("bert", config, steps=3), [parse_layout(t) for t in layouts],
                         pool=rank_pools(8))
    assert [r.layout for r in results] == layouts
    for r in results:
        assert r.passed, r
        assert r.losses[-1] < r.losses[0]


def train_without_grad_sync(ctx, settings):
    original = BertModel.finish_grad_sync
    BertModel.finish_grad_sync = lambda self: None
    try:
        return _train_on_rank(ctx, settings, parse_layout("tp2.sp"))
    finally:
        BertModel.finish_grad_sync = original


def test_negative_control_a_missing_gradient_sum_fails(rank_pools):
    """Without finish_grad_sync the SP-partial gradients (norms, positions, token types, the
    head's dense) and the output bias's vocabulary slices are not summed: FAIL."""
    pool, settings = rank_pools(8), VerifySettings("bert", BASE, steps=1)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("tp2.sp", reference, merge_ranks(pool.run(train_without_grad_sync, settings)))
    assert not broken.passed
    assert broken.grad_error > 0.1
    assert any(part in broken.worst_grad for part in ("layernorm", "embeddings", "lm_head", "bias"))


def test_mock_batch_is_a_batched_bert_dataset_item():
    batch = bert_batch(BASE, 6, torch.Generator().manual_seed(3))
    s = BASE.seq_length
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((6, s), torch.int64), "token_type_ids": ((6, s), torch.int64), "labels": ((6, s), torch.int64),
        "loss_mask": ((6, s), torch.float32), "padding_mask": ((6, s), torch.bool), "is_random": ((6,), torch.int64)}
    assert torch.equal(batch["loss_mask"] > 0, batch["labels"] >= 0)
    assert (batch["loss_mask"].sum(1) >= 1).all() and not (batch["padding_mask"][:, 0] == 0).any()
    assert (batch["labels"][~batch["padding_mask"]] == -1).all()
    assert torch.equal(bert_batch(BASE, 6, torch.Generator().manual_seed(3))["input_ids"], batch["input_ids"])


def test_binary_loss_is_added_once_per_sequence():
    """sequence_mean_loss of the per-token loss = mean over sequences of (MLM mean + binary loss)."""
    model = BertModel(BASE, init_seed=5)
    batch = bert_batch(BASE, 4, torch.Generator().manual_seed(1))
    per_token = model.pipeline_forward(None, batch)
    logits, binary = model(batch["input_ids"], batch["token_type_ids"], batch["padding_mask"])
    mask = batch["loss_mask"]
    mlm = F.cross_entropy(logits[:, :, :BASE.vocab_size].transpose(0, 1).reshape(-1, BASE.vocab_size),
                          batch["labels"].clamp(min=0).reshape(-1), reduction="none").view(mask.shape)
    expected = ((mlm * mask).sum(1) / mask.sum(1) + F.cross_entropy(binary, batch["is_random"], reduction="none"))
    assert relative_error(sequence_mean_loss(per_token, batch, 4), expected.mean()) < 1e-6


# --- Hugging Face parity ----------------------------------------------------------------------


def load_global(model: BertModel, tensors: dict[str, torch.Tensor]) -> None:
    """Global tensors into a one-process model (vocabulary rows into the padded table)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_()
            param[: tensors[name].shape[0]].copy_(tensors[name])


@pytest.mark.parametrize("pretraining, backend", [(False, "sdpa"), (True, "unfused")],
                         ids=["BertForMaskedLM-sdpa", "BertForPreTraining-unfused"])
def test_logits_match_hugging_face(pretraining, backend):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    kind = transformers.BertForPreTraining if pretraining else transformers.BertForMaskedLM
    hf = kind(hf_config).eval()
    with torch.no_grad():
        for param in hf.parameters():  # norms and biases away from 1 and 0
            param.add_(0.1 * torch.randn_like(param))
    config = replace(bert_config_from_hf(hf_config.to_dict(), binary_head=pretraining), seq_length=16,
                     attention_backend=backend)
    model = BertModel(config).eval()
    load_global(model, bert_hf_to_global(hf.state_dict(), config))

    batch = bert_batch(replace(config, bert_no_binary_head=False), 3, torch.Generator().manual_seed(2))
    real = batch["padding_mask"]
    assert not real.all()  # padding is exercised
    with torch.no_grad():
        ours, binary = model(batch["input_ids"], batch["token_type_ids"], real)
        theirs = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=real.long())
    hf_logits = theirs.prediction_logits if pretraining else theirs.logits
    ours = ours[:, :, :config.vocab_size].transpose(0, 1)
    assert relative_error(ours[real], hf_logits[real]) < 1e-5
    if pretraining:
        assert relative_error(binary, theirs.seq_relationship_logits) < 1e-5
    else:
        assert binary is None
