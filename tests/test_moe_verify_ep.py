"""Expert parallelism proven end to end (issue 21, item 3): `megalith verify` gathers expert shards over etp
and ep, and each expert layout trains like one process (fp32 < 1e-5); the two dispatchers are bitwise equal
under ep; what is not proven is refused in one line before any group exists; pretrain runs ep2."""

from dataclasses import replace

import pytest
import torch

from megalith.config import ModelConfig, parse_layout
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS
from megalith.testing import log_record_errors, pretrain_on_rank
from megalith.verify import VerifySettings, _train_on_rank, compare, merge_ranks, plan, run_verify

BASE = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=2, num_experts=4, moe_router_topk=2,
               moe_token_dispatcher_type="alltoall", disable_bias_linear=True)
RICH = replace(BASE, swiglu=True, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)  # balancing losses, SwiGLU


def _settings(**options) -> VerifySettings:
    return VerifySettings("gpt", replace(RICH, **options), steps=2)


def _assert_exact(results) -> None:
    for r in results:
        assert r.passed and max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


def test_ep2_equals_one_process(rank_pools):
    """dp2.ep2: each rank holds 2 of the 4 experts; verify gathers them over ep in ep-rank order."""
    _assert_exact(run_verify(_settings(), [parse_layout("dp2.ep2")], pool=rank_pools(2)))


@pytest.mark.slow
@pytest.mark.parametrize("layouts, options", [
    (["dp4.ep4", "pp2.dp2.ep2", "dp2.ep2.zero1"], {}),
    (["tp2.dp2.sp.ep2", "dp4.etp2.ep2", "tp2.dp2.sp.ep2.etp1"], {}),  # etp = tp; etp over non-tp ranks; etp 1
    (["dp2.ep2", "dp4.ep4"], {"moe_expert_capacity_factor": 1.0}),  # dropping (probs policy)
    (["dp2.ep2"], {"moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True,
                   "moe_token_drop_policy": "position"}),
    (["dp2.ep2", "tp2.dp2.sp.ep2"], {"moe_shared_expert_intermediate_size": 32}),
    (["dp2.ep2", "tp2.dp2.sp.ep2.etp1"], {"disable_bias_linear": False}),  # expert biases under ep at etp 1
    (["dp2.ep2", "tp2.dp2.sp.ep2", "dp4.etp2.ep2"], {"moe_token_dispatcher_type": "allgather"}),
])
def test_expert_layouts_equal_one_process(rank_pools, layouts, options):
    _assert_exact(run_verify(_settings(**options), [parse_layout(t) for t in layouts], pool=rank_pools(4)))


def _train_with_expert_grads_over_dp(ctx, settings, layout_text):
    """A broken layout: expert gradients summed over dp (the ranks holding other experts), not edp."""
    import megalith.training.step as step

    original = step.split_by_experts
    step.split_by_experts = lambda module, dp, edp, **options: original(module, dp, dp, **options)
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout_text))
    finally:
        step.split_by_experts = original


@pytest.mark.slow
def test_expert_grads_reduced_over_dp_instead_of_edp_fail(rank_pools):
    settings, pool = _settings(), rank_pools(2)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("dp2.ep2", reference, merge_ranks(pool.run(_train_with_expert_grads_over_dp, settings,
                                                                "dp2.ep2")))
    assert not broken.passed and "experts" in broken.worst_grad, broken


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2.ep2", "dp4.ep4"])
def test_the_two_dispatchers_are_bitwise_equal_under_ep(rank_pools, layout):
    """allgather (tokens over etp x ep, keep this rank's experts' rows) and alltoall give the experts the same
    rows in the same order; with top-2 each token's sums have at most two nonzero terms, so the runs are
    bitwise equal (under etp > 1 they sum the etp partials in another order: tp2.dp2.sp.ep2 above)."""
    runs = []
    for dispatcher in ("alltoall", "allgather"):
        settings = _settings(moe_token_dispatcher_type=dispatcher)
        runs.append(merge_ranks(rank_pools(4).run(_train_on_rank, settings, parse_layout(layout))))
    (losses, grads, params, norms), (losses2, grads2, params2, norms2) = runs
    assert losses == losses2 and norms == norms2
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert all(torch.equal(params[n], params2[n]) for n in params)


def _refusal(layout_text: str, **options) -> str:
    with pytest.raises(ConfigError) as info:
        plan(VerifySettings("gpt", replace(BASE, **options)), parse_layout(layout_text))
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("layout, options, mention", [
    ("tp2", {}, "need --sequence-parallel"),
    ("tp2.sp", {"moe_expert_capacity_factor": 1.0}, "--moe-expert-capacity-factor with --tensor-model-parallel"),
    ("dp2.etp2", {"moe_expert_capacity_factor": 1.0}, "--expert-tensor-parallel-size 2 is not built"),
    ("tp2.sp", {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.01}, "seq_aux_loss"),
    ("dp4.ep4", {"num_experts": 6}, "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    ("tp2.dp2.sp.ep2", {"disable_bias_linear": False}, "expert biases with --expert-model-parallel-size 2"),
    ("tp2.dp2.sp.etp4", {}, "--expert-tensor-parallel-size 4 with --tensor-model-parallel-size 2"),
    ("dp2.etp2", {"moe_ffn_hidden_size": 33}, "--moe-ffn-hidden-size 33 is not divisible"),
    ("dp2.ep2.etp2", {}, "world size 2 is not divisible by --expert-tensor-parallel-size 2 x"),
])
def test_unproven_expert_layouts_are_refused_before_any_rank_starts(layout, options, mention):
    assert mention in _refusal(layout, **options)


def test_the_moe_flags_are_refused_when_the_config_is_built():
    """topk > E and capacity with the allgather dispatcher: one line from the ModelConfig itself."""
    with pytest.raises(ConfigError, match="--moe-router-topk 5 must be between 1 and --num-experts 4"):
        replace(BASE, moe_router_topk=5)
    with pytest.raises(ConfigError, match="needs --moe-token-dispatcher-type alltoall"):
        replace(BASE, moe_token_dispatcher_type="allgather", moe_expert_capacity_factor=1.0)


def test_pretrain_refuses_an_unproven_expert_layout_before_any_group():
    from megalith.config.arguments import parse_pretrain_args

    argv = ["--mock-data", "--num-experts", "4", "--expert-model-parallel-size", "2",
            "--tensor-model-parallel-size", "2", "--sequence-parallel"]  # expert biases at etp 2 under ep
    with pytest.raises(ConfigError, match="expert biases with --expert-model-parallel-size 2"):
        parse_pretrain_args(argv, 4)


SMALL = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "2e-3", "--adam-eps",
         "1e-6", "--log-interval", "1", "--eval-interval", "100", "--no-log-progress-bar", "--train-iters", "4",
         "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
         "--moe-aux-loss-coeff", "0.01"]


@pytest.mark.slow
def test_pretrain_with_ep2_on_two_ranks_equals_one_process(rank_pools, tmp_path):
    import json

    records = {}
    for name, extra, world in (("one", [], 1), ("ep2", ["--expert-model-parallel-size", "2"], 2)):
        log = tmp_path / f"{name}.jsonl"
        rank_pools(2).run(pretrain_on_rank, SMALL + extra + ["--log-json", str(log)], world)
        records[name] = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["lm_loss"] for r in records["ep2"] if "lm_loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    errors = log_record_errors(records["one"], records["ep2"], keys=("lm_loss", "grad_norm"))
    assert max(errors.values()) < 1e-5, errors


def _alltoall_bytes_under_tp2_sp_ep2(rank_ctx) -> dict:
    """tp2.dp2.sp.ep2 (etp = tp): one MoE layer's forward; the bytes each rank sends over ep, in calls."""
    from megalith.models.moe import MoELayer
    from megalith.models.parallel_context import ParallelContext
    from megalith.parallel.comm_ledger import CommLedger, counting
    from megalith.parallel.layers import normal_init

    state = rank_ctx.parallel_state(tp=2, dp=2, ep=2)
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=8, seq_length=8,
                         vocab_size=64, num_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                         disable_bias_linear=True)
    ctx = ParallelContext(state.tp_group, True, ep_group=state.ep_group, etp_group=state.etp_group)
    layer = MoELayer(config, ctx, normal_init(0.2, torch.Generator().manual_seed(5)), normal_init(0.2))
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(state.rank))  # s/tp x b local tokens
    ledger = CommLedger({state.ep_group: "ep"}, record_calls=True)
    with counting(ledger):
        layer(x)
    calls = [call.bytes for call in ledger.history if call.kind == "ep" and call.op == "all_to_all"]
    return {"calls": calls, "formula": config.moe_router_topk * 8 * 16 * 4}


@pytest.mark.slow
def test_only_a_ranks_own_tokens_cross_the_alltoall_under_tensor_parallelism(rank_pools):
    """Megatron's order: the all-to-all of the local tokens, then the gather over etp (not the reverse,
    which would send etp times the rows)."""
    results = rank_pools(4).run(_alltoall_bytes_under_tp2_sp_ep2)
    for result in results:
        _, dispatch, _ = result["calls"]  # the per-expert counts, this rank's rows out, the rows it got back
        assert dispatch == result["formula"], result
    assert sum(r["calls"][2] for r in results) == sum(r["calls"][1] for r in results), results
