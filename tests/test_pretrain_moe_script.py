"""scripts/pretrain_gpt_moe.sh: the command it builds (DRY_RUN=1) is a valid Mixtral-style run on 4 CPU processes
(tp2 + SP for attention, etp2 x ep2 for 8 top-2 experts, alltoall), and (slow) it trains: the loss falls."""

from __future__ import annotations

import sys

import pytest
from test_pretrain_script import SCRIPTS, cpu_only, run_script, train_with_script  # noqa: F401 (cpu_only: autouse)

from megalith.config.arguments import parse_pretrain_args

MOE_SCRIPT = SCRIPTS / "pretrain_gpt_moe.sh"
MOE_OVERRIDES = ("EP", "NUM_EXPERTS", "TOPK", "MOE_FFN_HIDDEN", "AUX_LOSS_COEFF")


@pytest.fixture(autouse=True)
def no_moe_overrides(monkeypatch):
    for name in MOE_OVERRIDES:
        monkeypatch.delenv(name, raising=False)


def test_no_gpu_runs_four_cpu_processes_with_expert_parallelism(tmp_path):
    settings, launcher, torchrun, flags = run_script(tmp_path, script=MOE_SCRIPT)
    assert launcher == [sys.executable, "-m", "torch.distributed.run"] and torchrun[:2] == ["--nproc-per-node", "4"]
    assert settings == {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    config = parse_pretrain_args(flags, world_size=4)
    layout, model = config.layout, config.model
    assert (layout.tp, layout.pp, layout.dp, layout.ep, layout.expert_tp) == (2, 1, 2, 2, 2)
    assert layout.sequence_parallel and config.distributed.distributed_backend == "gloo"
    assert (model.num_experts, model.moe_router_topk, model.moe_token_dispatcher_type) == (8, 2, "alltoall")
    assert (model.normalization, model.position_embedding_type, model.swiglu) == ("RMSNorm", "rope", True)
    assert model.untie_embeddings_and_output_weights and not model.add_bias_linear
    assert (model.num_query_groups, model.moe_aux_loss_coeff) == (2, 0.01)
    assert config.logging.log_json == "./runs/gpt_moe/log.jsonl" and config.notices == ()


def test_sizes_come_from_the_environment(tmp_path):
    _, _, torchrun, flags = run_script(tmp_path, script=MOE_SCRIPT, EP="1", NUM_EXPERTS="4", TOPK="1", GPUS_PER_NODE="2")
    assert torchrun[:2] == ["--nproc-per-node", "2"]
    config = parse_pretrain_args(flags, world_size=2)
    assert (config.layout.ep, config.model.num_experts, config.model.moe_router_topk) == (1, 4, 1)


@pytest.mark.slow  # about 20 s on 2 cores (4 processes)
def test_the_script_trains_and_the_loss_falls(tmp_path):
    losses = train_with_script(MOE_SCRIPT, tmp_path, 20, "--log-interval", "5", "--eval-iters", "1")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
