"""The experts' second factorisation of the ranks (etp x ep x edp x pp, Megatron-Core's expert
rank order): hand-written group tables, real process groups, and bad input in one line."""

import pytest
import torch
import torch.distributed as dist

from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid


def assert_one_line_error(call, *mentions):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(m in message for m in mentions), message
    return message

# Written by hand from rank = etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i)).
TABLES = {
    "tp2.ep2": (dict(tp=2, ep=2), {
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "etp_ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "emp": [[0, 1, 2, 3], [4, 5, 6, 7]]}),
    "tp2.etp1.ep4": (dict(tp=2, etp=1, ep=4), {
        "ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "etp": [[r] for r in range(8)],
        "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "etp_ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "emp": [[0, 1, 2, 3], [4, 5, 6, 7]]}),
    "pp2.ep2": (dict(pp=2, ep=2), {
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "etp": [[r] for r in range(8)],
        "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "etp_ep": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "emp": [[0, 1, 4, 5], [2, 3, 6, 7]]}),
    "tp2.pp2.ep2": (dict(tp=2, pp=2, ep=2), {
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "edp": [[r] for r in range(8)],
        "etp_ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "emp": [list(range(8))]}),
    "ep8": (dict(ep=8), {
        "ep": [list(range(8))],
        "etp": [[r] for r in range(8)],
        "edp": [[r] for r in range(8)],
        "etp_ep": [list(range(8))],
        "emp": [list(range(8))]}),
    "tp2.etp2.ep2.cp2": (dict(tp=2, cp=2, ep=2), {  # cp folds into edp on the expert side
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "etp_ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "emp": [[0, 1, 2, 3], [4, 5, 6, 7]]}),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_expert_groups_match_hand_written_tables(name):
    layout, table = TABLES[name]
    grid = RankGrid(8, **layout)
    for kind, expected in table.items():
        assert grid.expert_groups(kind) == expected, (name, kind)
        for group in expected:
            for rank in group:
                assert grid.expert_group_of(kind, rank) == group, (name, kind, rank)
    for rank in range(8):  # both factorisations agree on the pipeline stage, and the coordinates invert
        c = grid.expert_coords(rank)
        assert c.pp == grid.coords(rank).pp
        assert grid.expert_rank_of(etp=c.etp, ep=c.ep, edp=c.edp, pp=c.pp) == rank
    assert grid.edp == 8 // (grid.etp * grid.ep * grid.pp)


def test_trivial_expert_axes_are_the_attention_groups():
    """ep 1 and etp = tp: etp is tp, edp is dp x cp, emp is mp; the grid prints as before."""
    for layout in (dict(tp=2, pp=2), dict(tp=2, cp=2), dict(pp=2, cp=2), dict()):
        grid = RankGrid(8, **layout)
        assert not grid.has_expert_axes and grid.etp == grid.tp
        assert grid.expert_groups("etp") == grid.groups("tp")
        assert grid.expert_groups("edp") == grid.groups("dp_cp")
        assert grid.expert_groups("emp") == grid.groups("mp")
    assert str(RankGrid(8, tp=2, pp=2)) == "tp2.cp1.dp2.pp2 (world 8)"
    assert str(RankGrid(8, tp=2, ep=2)) == "tp2.cp1.dp4.pp1.etp2.ep2.edp2 (world 8)"


def test_bad_expert_sizes_fail_in_one_line():
    assert_one_line_error(lambda: RankGrid(8, tp=2, ep=3), "2", "3", "6", "8")
    assert_one_line_error(lambda: RankGrid(8, ep=4, pp=4), "16", "8")
    assert_one_line_error(lambda: RankGrid(8, ep=0), "ep")
    assert_one_line_error(lambda: RankGrid(8, etp=0), "etp")
    assert_one_line_error(lambda: RankGrid(8, ep=2).expert_groups("xp"), "xp", "edp")


def expert_members(ctx, layout):
    """Every expert group kind of this rank, as the ranks answering an all-gather over it."""
    state = ctx.parallel_state(**layout)
    members = {}
    for kind in RankGrid.EXPERT_GROUP_KINDS:
        group = getattr(state, f"{kind}_group")
        if group is None:
            members[kind] = None
            continue
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, torch.tensor([ctx.rank]), group=group)
        members[kind] = [int(t) for t in gathered]
    return members, (state.etp_rank, state.ep_rank, state.edp_rank), (state.edp_group is state.dp_group and set(state.groups) == set(RankGrid.GROUP_KINDS))


@pytest.mark.parametrize("name", ["tp2.ep2", "tp2.etp1.ep4", "pp2.ep2"])
def test_process_groups_match_the_tables(rank_pools, name):
    layout, table = TABLES[name]
    grid = RankGrid(8, **layout)
    for rank, (members, coords, _) in enumerate(rank_pools(8).run(expert_members, layout)):
        for kind, groups in table.items():
            assert members[kind] == next(g for g in groups if rank in g), (name, kind, rank)
        c = grid.expert_coords(rank)
        assert coords == (c.etp, c.ep, c.edp)


def test_default_layout_builds_no_expert_group(rank_pools):
    """ep 1: no new groups (none in `groups`, so the comm ledger names each group once); ep_group is
    None, edp is the dp group itself."""
    for rank, (members, coords, edp_is_dp) in enumerate(rank_pools(8).run(expert_members, dict(tp=2, pp=2))):
        assert members["ep"] is None and edp_is_dp
        assert members["etp"] == RankGrid(8, tp=2, pp=2).group_of("tp", rank)


# --- flags, layout tokens, topology ------------------------------------------------------

def test_layout_tokens_and_flags_reach_the_grid():
    from megalith.config.layout import Layout, parse_layout

    layout = parse_layout("tp2.ep4.etp1.dp4")
    assert (layout.ep, layout.etp, layout.expert_tp) == (4, 1, 1)
    assert parse_layout(str(layout)) == layout and str(layout) == "tp2.ep4.etp1.dp4"
    grid = layout.grid()
    assert (grid.etp, grid.ep, grid.edp) == (1, 4, 2)
    assert parse_layout("tp2.dp4").etp is None and parse_layout("tp2.dp4").grid().etp == 2  # etp defaults to tp
    assert Layout.over_world(8, tp=2, ep=2).grid().edp == 2


def test_expert_input_refused_in_one_line():
    from megalith.config.layout import Layout

    assert_one_line_error(lambda: Layout.over_world(8, tp=2, ep=3), "--expert-model-parallel-size 3", "6", "8")
    assert_one_line_error(lambda: Layout.over_world(8, pp=2, etp=4, ep=2), "16", "8")
    layout = Layout.over_world(8, tp=2, ep=2)
    assert_one_line_error(lambda: layout.check_experts(None), "--expert-model-parallel-size 2", "--num-experts")
    notice = Layout.over_world(8, tp=2, etp=1).check_experts(0)  # Megatron ignores it: a notice here
    assert notice.startswith("--expert-tensor-parallel-size 1 applies to experts only") and "ignored" in notice
    assert_one_line_error(lambda: layout.check_experts(3), "--num-experts 3", "--expert-model-parallel-size 2")
    layout.check_experts(4)
    Layout.over_world(8, tp=2).check_experts(None)  # no expert axes: a dense model is fine
    assert Layout.over_world(8, tp=2, etp=2).check_experts(None) is None  # etp = tp is the default


def test_pretrain_resolves_the_expert_flags():
    from megalith.config.arguments import parse_pretrain_args

    assert_one_line_error(lambda: parse_pretrain_args(["--mock-data", "--expert-model-parallel-size", "2"], 4),
                          "--expert-model-parallel-size 2 needs a mixture-of-experts model")
    assert_one_line_error(lambda: parse_pretrain_args(["--mock-data", "--expert-model-parallel-size", "3"], 4),
                          "world size 4 is not divisible by --expert-tensor-parallel-size 1 x "
                          "--expert-model-parallel-size 3")
    config = parse_pretrain_args(["--mock-data", "--tensor-model-parallel-size", "2",
                                  "--expert-tensor-parallel-size", "1"], 4)
    assert config.layout.etp is None and not config.layout.grid().has_expert_axes
    assert any(n.startswith("--expert-tensor-parallel-size 1 applies to experts only") for n in config.notices)


def test_pretrain_flags_are_real():
    from megalith.config.megatron.refused_moe import MOE_FLAGS
    from megalith.config.parallel import DistributedConfig

    assert not {"--expert-model-parallel-size", "--expert-tensor-parallel-size"} & {o for f in MOE_FLAGS for o in f.options}
    config = DistributedConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert (config.expert_model_parallel_size, config.expert_tensor_parallel_size) == (2, 1)
    with pytest.raises(ConfigError):
        DistributedConfig(expert_model_parallel_size=0)


def test_topology_prints_the_expert_factorisation(capsys):
    from megalith.cli import main

    assert main(["topology", "--world-size", "8", "--tp", "2", "--ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "experts etp2.ep2.edp2.pp1, order tp-cp-ep-dp-pp" in out
    assert "   2    0  1   0  0  [0,2]  [2,3]  [2,6]  [0,1,2,3]  [0,1,2,3]" in out
    assert main(["topology", "--world-size", "8", "--tp", "2"]) == 0
    assert "experts" not in capsys.readouterr().out  # ep 1, etp = tp: the attention groups are the expert ones


# --- gradient routing: expert gradients over edp, dense ones over dp ---------------------------

ROUTING_LAYOUTS = {"tp2.ep2": dict(tp=2, ep=2), "tp2.etp1.ep4": dict(tp=2, etp=1, ep=4), "ep2": dict(ep=2),
                   "pp2.ep2": dict(pp=2, ep=2)}


def local_grads(grid, rank):
    """The toy's per-rank gradients, small integers (so every sum is exact in fp32): the dense one
    the same on tp replicas (it depends on the dp coordinate and the stage), the expert one this
    rank's own (each rank holds a different expert shard)."""
    c = grid.coords(rank)
    dense = torch.randint(-4, 5, (8, 3), generator=torch.Generator().manual_seed(100 + c.dp + 10 * c.pp))
    expert = torch.randint(-4, 5, (4, 3), generator=torch.Generator().manual_seed(1000 + rank))
    return dense.float(), expert.float()


class Toy(torch.nn.Module):
    """One dense parameter and one expert shard (split over etp along dim 0, as a column-parallel weight)."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Parameter(torch.arange(24.0).view(8, 3))
        self.expert = torch.nn.Parameter(torch.arange(12.0).view(4, 3) - 6)
        self.expert.expert_parallel = True
        self.expert.tensor_parallel_dim = 0

    def forward(self, a, b):
        return (self.dense * a).sum() + (self.expert * b).sum()


def toy_step(ctx, layout, zero):
    """Backward + finalize of the toy on this rank; with a ZeRO stage, a clipped SGD step too (the
    dense part sharded over dp, the expert one over edp)."""
    from megalith.config.optimizer import OptimizerConfig
    from megalith.parallel.data_parallel import split_by_experts
    from megalith.training.optimizer import ParallelOptimizer

    state = ctx.parallel_state(**layout)
    model = Toy()
    dense, experts = split_by_experts(model, state.dp_group, state.edp_group, shard=zero >= 1,
                                      shard_grads=zero >= 2, shard_params=zero >= 3)
    a, b = local_grads(state.grid, ctx.rank)
    for buffer in (dense, experts):
        buffer.set_last_microbatch(True)
    model(a, b).backward()
    for buffer in (dense, experts):
        buffer.finish()
    if not zero:
        return model.dense.main_grad.clone(), model.expert.main_grad.clone(), experts.dp_size
    config = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1.0)
    optimizer = ParallelOptimizer([dense, experts], config, tp_group=state.tp_group, mp_group=state.mp_group,
                                  etp_group=state.etp_group, emp_group=state.emp_group)
    outcome = optimizer.step(1.0)
    with dense.gathered_parameters(), experts.gathered_parameters():  # ZeRO-3: whole only in here
        return outcome.grad_norm, model.dense.detach().clone(), model.expert.detach().clone()


def expected_grads(grid):
    """Direct sums: the dense gradient over each rank's dp group, the expert one over its edp group."""
    grads = [local_grads(grid, rank) for rank in range(grid.world_size)]
    dense = [sum(grads[r][0] for r in grid.group_of("dp", rank)) for rank in range(grid.world_size)]
    expert = [sum(grads[r][1] for r in grid.expert_group_of("edp", rank)) for rank in range(grid.world_size)]
    return dense, expert


@pytest.mark.parametrize("name", list(ROUTING_LAYOUTS))
def test_expert_gradients_are_summed_over_edp_only(rank_pools, name):
    layout = ROUTING_LAYOUTS[name]
    grid = RankGrid(8, **layout)
    dense, expert = expected_grads(grid)
    for rank, (got_dense, got_expert, edp) in enumerate(rank_pools(8).run(toy_step, layout, 0)):
        assert edp == grid.edp
        assert torch.equal(got_dense, dense[rank]), (name, rank)
        assert torch.equal(got_expert, expert[rank]), (name, rank)
        # a negative control: summing the expert over dp instead would differ
        over_dp = sum(local_grads(grid, r)[1] for r in grid.group_of("dp", rank))
        assert not torch.equal(got_expert, over_dp)


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("name", list(ROUTING_LAYOUTS))
def test_zero_over_edp_and_the_clipping_norm_count_every_shard_once(rank_pools, name, zero):
    """Norm^2 = the dense gradient of each stage once (tp replicas and dp not repeated) + each expert
    shard (one per etp x ep x pp position) once, summed over edp; the clipped update is exact."""
    layout = ROUTING_LAYOUTS[name]
    grid = RankGrid(8, **layout)
    dense, expert = expected_grads(grid)
    stages = {grid.coords(r).pp: dense[r] for r in range(8)}
    shards = {(grid.expert_coords(r).etp, grid.expert_coords(r).ep, grid.expert_coords(r).pp): expert[r]
              for r in range(8)}
    squares = sum(float(g.double().pow(2).sum()) for g in [*stages.values(), *shards.values()])
    norm = squares ** 0.5
    coefficient = 1.0 / (norm + 1e-6)
    for rank, (got_norm, got_dense, got_expert) in enumerate(rank_pools(8).run(toy_step, layout, zero)):
        assert abs(got_norm - norm) / norm < 1e-6, (name, rank, got_norm, norm)
        model = Toy()
        torch.testing.assert_close(got_dense, model.dense.detach() - coefficient * dense[rank], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_expert, model.expert.detach() - coefficient * expert[rank], rtol=1e-6,
                                   atol=1e-6)


# --- through the step: a GPT whose MLPs are marked as experts, on trivial expert axes -------------

def _marked_gpt_build(config, ctx, init_seed, stage):
    """GPT with every MLP parameter marked expert_parallel: with ep 1 and etp = tp they are replicated
    over edp = dp, so the run must equal one process exactly, through the second buffer."""
    from megalith.models.registry import BUILTIN_MODELS

    model = BUILTIN_MODELS["gpt"].build(config, ctx, init_seed, stage)
    for name, param in model.named_parameters():
        if ".mlp." in name:
            param.expert_parallel = True
    return model


def _marked_spec():
    from dataclasses import replace as replace_spec

    from megalith.models.registry import BUILTIN_MODELS

    return replace_spec(BUILTIN_MODELS["gpt"], name="gpt-marked-experts", build=_marked_gpt_build)


MARKED_GPT = _marked_spec()
MARKED_CONFIG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                     hidden_dropout=0.0, attention_dropout=0.0)


def _buffer_split(ctx, settings, layout):
    from megalith.config.layout import parse_layout
    from megalith.verify import build_runner

    parsed = parse_layout(layout)
    state = ctx.parallel_state(tp=parsed.tp, pp=parsed.pp, dp=parsed.dp)
    runner = build_runner(settings, parsed, state)
    return [(b.expert, len(b.params), b.dp_size) for b in runner.buffers]


def test_marked_experts_get_their_own_buffer_and_train_as_one_process(rank_pools):
    from megalith.config import ModelConfig
    from megalith.config.layout import parse_layout
    from megalith.verify import VerifySettings, run_verify

    settings = VerifySettings("test_expert_axes:MARKED_GPT", ModelConfig(**MARKED_CONFIG), steps=2)
    split = rank_pools(4).run(_buffer_split, settings, "tp2.dp2")[0]
    assert [(expert, dp) for expert, _, dp in split] == [(False, 2), (True, 2)] and split[1][1] == 8  # 2 layers x 4
    layouts = ["tp2.dp2", "dp2.zero1", "tp2.dp2.zero2", "dp2.zero3"]
    results = run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4))
    for r in results:
        assert r.passed and max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


def test_verify_refuses_expert_tokens_without_experts(capsys):
    from megalith.cli import main

    assert main(["verify", "--layouts", "tp2.etp1.dp2"]) == 2
    assert "--expert-tensor-parallel-size 1 applies to experts only" in capsys.readouterr().err
    assert main(["verify", "--layouts", "ep2.dp2"]) == 2
    assert "--expert-model-parallel-size 2 needs a mixture-of-experts model" in capsys.readouterr().err


def test_expert_parallelism_resolves_in_pretrain_and_verify():
    """verify proves ep layouts exact (tests/test_moe_verify_ep.py), so pretrain and verify take ep > 1; what
    is not proven is refused there in one line."""
    from megalith.config import ModelConfig, parse_layout
    from megalith.config.arguments import parse_pretrain_args
    from megalith.verify import VerifySettings, plan

    moe = ["--mock-data", "--num-experts", "4", "--moe-token-dispatcher-type", "alltoall", "--disable-bias-linear",
           "--expert-model-parallel-size", "2"]
    assert parse_pretrain_args(moe, 2).layout.ep == 2
    config = ModelConfig(num_experts=4, moe_token_dispatcher_type="alltoall", disable_bias_linear=True)
    assert plan(VerifySettings("gpt", config), parse_layout("dp2.ep2")).layout.ep == 2
