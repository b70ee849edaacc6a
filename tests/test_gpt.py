"""GPT under tensor + sequence parallelism and recompute equals one process (`megalith verify`)."""

from dataclasses import replace

import pytest
import torch

from megalith.config import ModelConfig, parse_layout
from megalith.models.gpt import GPTModel
from megalith.models.parallel_context import ParallelContext
from megalith.models.registry import BUILTIN_MODELS
from megalith.parallel.rng import model_parallel_rng_tracker
from megalith.testing import relative_error
from megalith.verify import VerifySettings, _train_on_rank, compare, merge_ranks, run_verify

BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)
ISSUE_LAYOUTS = ["tp2", "tp2.sp", "tp4", "tp4.sp", "tp2.sp.recompute-full", "tp2.sp.recompute-selective"]

CONFIGS = {
    "gpt": (BASE, ISSUE_LAYOUTS),
    "gqa": (replace(BASE, num_query_groups=2), ["tp2", "tp2.sp.recompute-selective"]),
    "gqa4-swiglu-rmsnorm-rope": (
        replace(BASE, num_query_groups=4, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                disable_bias_linear=True),
        ["tp2.sp", "tp4.sp", "tp4.sp.recompute-full", "tp2.recompute-selective"],
    ),
    "untied-unfused-qkvbias-block": (
        replace(BASE, untie_embeddings_and_output_weights=True, attention_backend="unfused", disable_bias_linear=True,
                add_qkv_bias=True, num_layers=3, recompute_granularity="full", recompute_method="block",
                recompute_num_layers=2),
        ["tp2.sp.recompute-full", "tp4"],
    ),
}


# "gqa" and "untied-unfused-qkvbias-block" (a few seconds each) cover tp2, tp4, sp and both recomputes in the fast tier
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in ("gpt", "gqa4-swiglu-rmsnorm-rope")
                                  else name for name in CONFIGS])
def test_layouts_match_one_process(rank_pools, name):
    config, layouts = CONFIGS[name]
    settings = VerifySettings("gpt", config, steps=3)
    results = run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4))
    assert [r.layout for r in results] == layouts
    for r in results:
        assert r.passed, r
        assert len(r.losses) == 3 and r.losses[-1] < r.losses[0]


def train_without_sp_grad_sync(ctx, settings):
    original = GPTModel.finish_grad_sync
    GPTModel.finish_grad_sync = lambda self: None
    try:
        return _train_on_rank(ctx, settings, parse_layout("tp2.sp"))
    finally:
        GPTModel.finish_grad_sync = original


def test_negative_control_a_missing_gradient_sum_fails(rank_pools):
    """Under SP, norm gradients not summed over tp must show up as FAIL in the gradient column."""
    pool, settings = rank_pools(4), VerifySettings("gpt", BASE, steps=1)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("tp2.sp", reference, merge_ranks(pool.run(train_without_sp_grad_sync, settings)))
    assert not broken.passed
    assert broken.grad_error > 0.1
    assert any(part in broken.worst_grad for part in ("layernorm", "position_embeddings", "proj.bias", "fc2.bias"))


def dropout_grads(ctx, config, layout_text, recompute):
    """One step with dropout > 0: the loss and every local gradient."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(tp=layout.tp)
    if ctx.rank >= layout.tp:
        return None
    config = replace(config, recompute_granularity=recompute)
    parallel = ParallelContext(state.tp_group, layout.sequence_parallel, model_parallel_rng_tracker(7, state.tp_rank))
    model = GPTModel(config, parallel, init_seed=3)
    generator = torch.Generator().manual_seed(11)
    batch = BUILTIN_MODELS["gpt"].make_batch(config, 2, generator)
    torch.manual_seed(5)
    loss = model(batch["input_ids"], batch["labels"]).mean()
    loss.backward()
    model.finish_grad_sync()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["tp1", "tp2.sp", pytest.param("tp4", marks=pytest.mark.slow)])
def test_recompute_with_dropout_gives_the_same_gradients(rank_pools, layout):
    config = replace(BASE, hidden_dropout=0.2, attention_dropout=0.2)
    pool = rank_pools(4)
    plain = pool.run(dropout_grads, config, layout, None)
    no_dropout = pool.run(dropout_grads, replace(config, hidden_dropout=0.0, attention_dropout=0.0), layout, None)
    assert abs(plain[0][0] - no_dropout[0][0]) > 1e-3, "dropout must actually change the loss"
    for recompute in ("full", "selective"):
        again = pool.run(dropout_grads, config, layout, recompute)
        for rank, (a, b) in enumerate(zip(plain, again)):
            if a is None:
                continue
            assert a[0] == b[0], f"rank {rank}: loss differs under recompute-{recompute}"
            for name in a[1]:
                assert relative_error(b[1][name], a[1][name]) < 1e-6, f"rank {rank} {name} recompute-{recompute}"


def test_padding_mask_hides_the_masked_keys_on_both_attention_paths():
    config = replace(BASE, seq_length=16)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[0, ..., 4:8] = True  # sequence 0: positions 4..7 are padding, no query may look at them
    changed = ids.clone()
    changed[0, 4:8] = (changed[0, 4:8] + 1) % config.vocab_size
    losses = {}
    for backend in ("sdpa", "unfused"):
        model = GPTModel(replace(config, attention_backend=backend), init_seed=2)
        with torch.no_grad():
            losses[backend] = (model(ids, labels, mask), model(changed, labels, mask), model(ids, labels))
    a, b, unmasked = losses["sdpa"]
    keep = torch.ones(16, dtype=torch.bool)
    keep[4:8] = False
    assert relative_error(b[0, keep], a[0, keep]) < 1e-6, "masked tokens leaked into other positions"
    assert relative_error(b[1], a[1]) < 1e-6
    assert relative_error(a[1], unmasked[1]) < 1e-6, "sequence 1 has no padding"
    assert relative_error(unmasked[0, 8:], a[0, 8:]) > 1e-4, "the mask must change what later tokens see"
    for x, y in zip(losses["unfused"], losses["sdpa"]):
        assert relative_error(x, y) < 1e-5


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("softmax_in_fp32", [False, True])
def test_low_precision_parameters_run_on_cpu(dtype, softmax_in_fp32):
    config = replace(BASE, attention_softmax_in_fp32=softmax_in_fp32)
    batch = BUILTIN_MODELS["gpt"].make_batch(config, 2, torch.Generator().manual_seed(4))
    reference = GPTModel(config, init_seed=9)(batch["input_ids"], batch["labels"]).mean()
    model = GPTModel(replace(config, params_dtype=dtype), init_seed=9)
    assert all(p.dtype == config.__class__(params_dtype=dtype).torch_dtype for p in model.parameters())
    loss = model(batch["input_ids"], batch["labels"])
    assert loss.dtype == torch.float32, "the loss is computed in fp32"
    loss.mean().backward()
    assert relative_error(loss.mean(), reference) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- documents inside a sequence: --reset-position-ids and --reset-attention-mask ----------


def _with_documents(batch: dict, step: int) -> dict:
    """Cut every sequence into documents at seeded boundaries: positions restart at each one
    and no token attends across one (what the GPT dataset gives with both reset flags)."""
    tokens = batch["input_ids"]
    b, s = tokens.shape
    generator = torch.Generator().manual_seed(step)
    starts = torch.rand(b, s, generator=generator) < 0.15
    starts[:, 0] = True
    document = starts.long().cumsum(dim=1)  # [b, s] document number of each token
    index = torch.arange(s).expand(b, s)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    position_ids = index - first
    attention_mask = (document[:, :, None] != document[:, None, :]).unsqueeze(1)  # [b, 1, s, s], True = masked
    return {**batch, "position_ids": position_ids, "attention_mask": attention_mask}


def _train_on_documents(ctx, settings, layout_text):
    import megalith.verify as verify

    original = verify.global_batch
    verify.global_batch = lambda settings, spec, step: _with_documents(original(settings, spec, step), step)
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout_text) if layout_text else None)
    finally:
        verify.global_batch = original


@pytest.mark.parametrize("position_type", ["learned_absolute", "rope"])
def test_reset_positions_and_document_masks_match_one_process(rank_pools, position_type):
    pool = rank_pools(4)
    settings = VerifySettings("gpt", replace(BASE, position_embedding_type=position_type, num_layers=4), steps=2)
    reference = pool.run(_train_on_documents, settings, None)[0]
    plain = pool.run(_train_on_rank, settings, None)[0]
    assert compare("no documents", reference, plain).grad_error > 1e-2  # the documents change the gradients
    for layout in ("tp2.sp", "tp2.pp2.sp"):
        result = compare(layout, reference, merge_ranks(pool.run(_train_on_documents, settings, layout)))
        assert result.passed and max(result.loss_error, result.grad_error, result.param_error) < 1e-5, result
