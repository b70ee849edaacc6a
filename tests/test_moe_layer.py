"""The MoE MLP (issue 21, item 1) against direct formulas: routing, balancing losses, the layer per token
(forward and gradients), capacity dropping, both dispatchers, grouped GEMM, the expert-bias update, and a
small GPT with experts that trains."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.gpt import GPTModel
from megalith.models.moe import MoELayer, moe_layer_pattern, update_expert_biases
from megalith.models.moe.experts import grouped_mm_usable
from megalith.models.moe.router import aux_loss, seq_aux_loss, z_loss
from megalith.models.parallel_context import ParallelContext
from megalith.models.transformer import MLP
from megalith.parallel.layers import normal_init
from megalith.testing import relative_error

BASE = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                   vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0, num_experts=4, moe_router_topk=2)


def build(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    init = normal_init(0.2, generator)  # large enough that routing is far from ties
    return MoELayer(config, ParallelContext(), init, init, shared_mlp=MLP)


def expert_mlp(config, layer, e, x):
    ex = layer.experts
    h = x @ ex.weight1[e].t() + (0 if ex.bias1 is None else ex.bias1[e])
    if config.swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ ex.weight2[e].t() + (0 if ex.bias2 is None else ex.bias2[e])


def reference_routing(config, layer, x):
    """Per token: [(expert, probability)], straight from the definitions."""
    logits = x @ layer.router.weight.t()
    k, routes = config.moe_router_topk, []
    for t in range(x.shape[0]):
        row = logits[t]
        if config.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(row)
            chosen = torch.topk(scores, k).indices
            probs = scores[chosen] / scores[chosen].sum()
        elif config.moe_router_pre_softmax:
            probs, chosen = torch.topk(torch.softmax(row, -1), k)
        else:
            top, chosen = torch.topk(row, k)
            probs = torch.softmax(top, -1)
        if config.moe_router_topk_scaling_factor:
            probs = probs * config.moe_router_topk_scaling_factor
        routes.append(list(zip(chosen.tolist(), probs)))
    return routes


def keep_within_capacity(config, routes, tokens):
    capacity = -(-tokens * config.moe_router_topk * config.moe_expert_capacity_factor // config.num_experts)
    capacity = int(capacity)
    kept = set()
    for e in range(config.num_experts):
        pairs = [(t, float(p.detach())) for t, r in enumerate(routes) for ee, p in r if ee == e]
        if config.moe_token_drop_policy == "probs":
            pairs.sort(key=lambda pair: -pair[1])  # stable: ties keep token order
        kept |= {(t, e) for t, _ in pairs[:capacity]}
    return [[(e, p) for e, p in r if (t, e) in kept] for t, r in enumerate(routes)]


def reference_forward(config, layer, x3):
    s, b, h = x3.shape
    x = x3.reshape(s * b, h)
    routes = reference_routing(config, layer, x)
    if config.moe_expert_capacity_factor is not None:
        routes = keep_within_capacity(config, routes, x.shape[0])
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(h)
        for e, p in routes[t]:
            out = out + p * expert_mlp(config, layer, e, x[t])
        rows.append(out)
    out = torch.stack(rows).reshape(s, b, h)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x3)
    return out


def compare_with_reference(config, seed=0):
    layer = build(config, seed)
    x = torch.randn(4, 3, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    grad = torch.randn(4, 3, config.hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    results = []
    for forward in (layer, lambda inp: reference_forward(config, layer, inp)):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (out, gx, grads), (ref, ref_gx, ref_grads) = results
    assert relative_error(out, ref) < 1e-5
    assert relative_error(gx, ref_gx) < 1e-5
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name
    return layer


@pytest.mark.parametrize("options", [
    {},
    {"swiglu": True, "disable_bias_linear": True},
    {"moe_router_pre_softmax": True, "moe_router_topk_scaling_factor": 2.5},
    {"moe_router_score_function": "sigmoid", "moe_router_topk": 3},
    {"moe_router_topk": 1, "moe_shared_expert_intermediate_size": 24, "moe_ffn_hidden_size": 8},
    {"moe_router_dtype": "fp32", "moe_token_dispatcher_type": "alltoall"},
])
def test_layer_matches_a_per_token_reference(options):
    compare_with_reference(replace(BASE, **options))


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
def test_capacity_dropping_matches_a_direct_reference(policy, pad):
    config = replace(BASE, moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=0.5,
                     moe_token_drop_policy=policy, moe_pad_expert_input_to_capacity=pad)
    layer = compare_with_reference(config, seed=3)
    assert layer.last_stats["dropped"] > 0  # 12 tokens x 2 pairs into 4 x 3 slots


def test_dispatchers_are_bitwise_equal_and_grouped_gemm_matches_the_loop():
    outputs = {}
    for name, grouped in (("allgather", False), ("alltoall", False), ("allgather", True)):
        config = replace(BASE, hidden_size=16, moe_ffn_hidden_size=8, moe_token_dispatcher_type=name,
                         moe_grouped_gemm=grouped)
        layer = build(config)
        x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        layer(x).square().sum().backward()
        outputs[name, grouped] = [x.grad] + [p.grad for p in layer.parameters()] + [layer(x)]
    for a, b in zip(outputs["allgather", False], outputs["alltoall", False]):
        assert torch.equal(a, b)
    for a, b in zip(outputs["allgather", False], outputs["allgather", True]):
        assert relative_error(a.detach(), b.detach()) < 1e-6  # torch._grouped_mm where usable: not bitwise
    assert grouped_mm_usable(torch.zeros(2, 16), torch.zeros(4, 8, 16)) == hasattr(torch, "_grouped_mm")


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    logits = torch.randn(12, 4, dtype=torch.float64)
    scores = torch.softmax(logits, -1)
    routing_map = torch.zeros(12, 4, dtype=torch.bool).scatter(1, torch.topk(scores, 2).indices, True)
    f = routing_map.sum(0) / (12 * 2)
    p = scores.mean(0)
    assert torch.allclose(aux_loss(scores, routing_map.sum(0).double(), 12, 2, 0.1), 4 * (f * p).sum() * 0.1)
    per_sequence = []
    for b in range(3):  # tokens are sequence-first: token t = position t // 3 of sequence t % 3
        rows = torch.arange(b, 12, 3)
        fb = routing_map[rows].sum(0) / (4 * 2)
        per_sequence.append(4 * (fb * scores[rows].mean(0)).sum())
    assert torch.allclose(seq_aux_loss(scores, routing_map, 3, 2, 0.1), torch.stack(per_sequence).mean() * 0.1)
    direct = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    assert torch.allclose(z_loss(logits, 0.01), direct * 0.01)


def test_the_balancing_loss_reaches_the_router_gradient():
    config = replace(BASE, moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1)
    layer, plain = build(config), build(replace(config, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None))
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    out.sum().backward()
    tokens = x.reshape(12, 16)
    logits = tokens @ plain.router.weight.t()
    scores = torch.softmax(logits, -1)
    routing_map = torch.zeros(12, 4, dtype=torch.bool).scatter(1, torch.topk(scores, 2).indices, True)
    direct = aux_loss(scores, routing_map.sum(0).float(), 12, 2, 0.5) + z_loss(logits, 0.1)
    plain_out = plain(x)
    assert torch.equal(out, plain_out)  # the side channel changes no value
    assert relative_error(layer.last_stats["loss"], direct.detach()) < 1e-6
    (plain_out.sum() + direct).backward()
    assert relative_error(layer.router.weight.grad, plain.router.weight.grad) < 1e-6
    assert "loss" not in plain.last_stats


def test_expert_bias_update_follows_the_loads():
    config = replace(BASE, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_router_bias_update_rate=0.01)
    layer = build(config)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    layer(x).sum().backward()
    layer(x).sum().backward()  # two micro-batches counted
    counts = layer.router.tokens_per_expert.clone()
    assert counts.sum() == 2 * 12 * 2
    update_expert_biases(layer)
    assert torch.equal(layer.router.expert_bias, torch.sign(counts.mean() - counts) * 0.01)
    assert layer.router.tokens_per_expert.sum() == 0
    assert not layer.router.expert_bias.requires_grad
    before = layer.router.expert_bias.clone()
    with torch.no_grad():
        layer(x)  # evaluation counts nothing
    update_expert_biases(layer)
    assert torch.equal(layer.router.expert_bias, before)
    # the bias steers the choice only: a large bias on expert 0 sends every token there with its own score
    layer.router.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    routing = layer.router(x.reshape(12, 16), 3)
    assert routing.routing_map[:, 0].all() and routing.probs.sum(-1).sub(1).abs().max() < 1e-6


def test_layer_pattern_and_bad_input():
    assert moe_layer_pattern(replace(BASE, num_layers=4, moe_layer_freq="2")) == (True, False, True, False)
    assert moe_layer_pattern(replace(BASE, num_layers=3, moe_layer_freq="[0,1,1]")) == (False, True, True)
    assert moe_layer_pattern(replace(BASE, num_experts=0)) == (False, False)
    bad = [
        ({"moe_router_topk": 5}, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        ({"moe_expert_capacity_factor": 1.0}, "needs --moe-token-dispatcher-type alltoall"),
        ({"moe_pad_expert_input_to_capacity": True}, "needs --moe-expert-capacity-factor"),
        ({"moe_router_score_function": "cosine"}, "--moe-router-score-function 'cosine' is not one of softmax"),
        ({"moe_router_load_balancing_type": "sinkhorn"}, "'sinkhorn' is not one of aux_loss, seq_aux_loss, none"),
        ({"moe_router_enable_expert_bias": True}, "needs --moe-router-score-function sigmoid"),
        ({"moe_layer_freq": "[1,0,1]"}, "has 3 entries but the model has 2 layers"),
        ({"moe_layer_freq": "0"}, "must be a positive integer"),
    ]
    for options, words in bad:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")) as error:
            replace(BASE, **options)
        assert "\n" not in str(error.value)


def test_dense_layers_stay_dense_and_a_gpt_with_experts_trains():
    model = GPTModel(replace(BASE, moe_layer_freq="[0,1]", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
                             moe_shared_expert_intermediate_size=16), init_seed=7)
    assert isinstance(model.decoder.layers["0"].mlp, MLP) and isinstance(model.decoder.layers["1"].mlp, MoELayer)
    assert all(p.expert_parallel for p in model.decoder.layers["1"].mlp.experts.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    # --num-experts 0 (Megatron's neutral value) is the dense model: the same modules and weights
    dense = GPTModel(replace(BASE, num_experts=None), init_seed=7)
    zero = GPTModel(replace(BASE, num_experts=0), init_seed=7)
    assert zero.config.num_experts is None and not any(isinstance(m, MoELayer) for m in zero.modules())
    assert dense.state_dict().keys() == zero.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), zero.state_dict().values()))


def test_tp2_with_sequence_parallelism_equals_one_process(rank_pools):
    """Router replicated (its gradient summed over tp under SP), experts split over tp as the dense MLP."""
    from megalith.config import parse_layout
    from megalith.models.registry import BUILTIN_MODELS
    from megalith.verify import VerifySettings, run_verify

    config = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=3, num_experts=4, moe_router_topk=2,
                     moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_shared_expert_intermediate_size=32,
                     moe_layer_freq="[1,0,1]", swiglu=True)
    settings = VerifySettings("gpt", config, steps=2)
    (result,) = run_verify(settings, [parse_layout("tp2.sp")], pool=rank_pools(2))
    assert result.passed, result
    assert result.losses[-1] < result.losses[0]
    # refused when the layer is built (on the ranks); Layout.check_model is where it moves with the ep axes
    with pytest.raises(Exception, match="need --sequence-parallel"):
        run_verify(settings, [parse_layout("tp2")], pool=rank_pools(2))


@pytest.mark.parametrize("ep", [2, 4])
def test_the_alltoall_dispatcher_over_an_ep_group_equals_one_process(rank_pools, ep):
    import moe_checks

    options = {"swiglu": True, "moe_grouped_gemm": ep == 4}
    for result in rank_pools(4).run(moe_checks.expert_parallel_checks, ep, options)[:ep]:
        assert result.pop("local experts") == 4 // ep
        assert all(error < 1e-5 for error in result.values()), result


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_balancing_losses_and_expert_bias_weigh_each_micro_batch_as_one_process(rank_pools, layout):
    """The step gives each micro-batch's balancing loss its share 1/(m x dp) of the batch (dp sums
    gradients) and updates the expert bias from the loads summed over dp: equal to one process,
    which runs the same micro-batches (4) one after another."""
    from megalith.config import parse_layout
    from megalith.models.registry import BUILTIN_MODELS
    from megalith.verify import VerifySettings, run_verify

    config = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=2, num_experts=4, moe_router_topk=2,
                     moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01)
    settings = VerifySettings("gpt", config, steps=3)
    (result,) = run_verify(settings, [parse_layout(layout)], pool=rank_pools(2))
    assert result.passed, result


def test_the_step_weighs_each_micro_batch_balancing_loss_by_its_share_of_the_batch():
    """One process, m micro-batches: every MoE layer's balancing loss gets gradient weight
    loss_scale / (m x dp), so the step optimises the batch's mean balancing loss (the exactness
    tests above cannot see this factor: one process and every layout share it)."""
    from megalith.bench.work import Work
    from megalith.models.moe import MoELayer
    from megalith.models.registry import BUILTIN_MODELS

    config = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=2, num_experts=4, moe_router_topk=2,
                     moe_aux_loss_coeff=0.05)
    for micro_batches in (1, 3):
        side = Work(config, micro_batch_size=2, micro_batches=micro_batches).megalith_side("tp1", None)
        side.step(0)
        scales = {m.aux_loss_scale for chunk in side.runner.chunks for m in chunk.modules() if isinstance(m, MoELayer)}
        assert scales == {1.0 / micro_batches}
