"""Communication counted, not assumed: the ledger of megalith.parallel.comm against analytic volumes.

Every expected number is computed here from the shapes (b, s, h, layers, vocabulary, bucket
sizes, bytes per element) and compared for exact equality with what the ledger counted on each
rank of a real training step; docs/communication.md derives the formulas. Byte convention: the
logical full tensor of each operation (the all-reduced buffer, the all-gathered output, the
reduce-scattered input, the tensor sent or received).
"""

import contextvars
import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from megalith.config import ModelConfig, parse_layout
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.parallel import comm
from megalith.parallel.comm_ledger import OTHER_KIND, CommLedger, active_ledger, counting
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.data_parallel import DataParallelGrads
from megalith.parallel.layers import VocabParallelEmbedding
from megalith.testing import pretrain_on_rank
from megalith.verify import VerifySettings, build_runner, global_batch, plan, sequence_mean_loss

ROOT = Path(__file__).resolve().parents[1]
F32 = 4  # bytes per fp32 element (activations, gradients, parameters here)
F64 = 8  # the step's loss and the norm's squares are reduced in float64
L, H, S, V, B = 2, 32, 16, 128, 2  # layers, hidden, sequence, vocabulary (no padding: divisible by 8 x tp), batch

def _config(layers: int) -> ModelConfig:
    return ModelConfig(**{**BUILTIN_MODELS["gpt"].defaults, "num_layers": layers, "hidden_size": H,
                          "num_attention_heads": 4, "seq_length": S, "vocab_size": V,
                          "make_vocab_size_divisible_by": 8})


CONFIG = _config(L)
SETTINGS = VerifySettings("gpt", CONFIG, steps=1, micro_batches=4, micro_batch_size=B)
ACT = S * B * H * F32  # one micro-batch's activations [s, b, h]
CE = 3 * S * B * F32  # cross-entropy: max, then (sum of exp, target logit) stacked, over [s, b] in fp32
STEP_SCALARS = {"loss": F64, "norm": 2 * F64}  # the dp sum of the loss; the norm's [counted, other] squares


@pytest.fixture(scope="module")
def pool(rank_pools):
    return rank_pools(4)


def _params_per_layer(h: int, tp: int = 1) -> int:
    """One GPT layer's parameters on a tp rank: qkv (3h x h + 3h), proj (h x h + h), fc1 (4h x h + 4h),
    fc2 (h x 4h + h), two LayerNorms (2 x 2h); column/row weights and column biases split over tp."""
    return (12 * h * h + 3 * h + 4 * h) // tp + h + h + 4 * h


def _gpt_params(layers: int, tp: int = 1) -> int:
    """The whole (tied) GPT on a tp rank: word embedding V/tp x h, learned positions s x h, layers, final norm."""
    return V * H // tp + S * H + layers * _params_per_layer(H, tp) + 2 * H


def _train_step_counts(ctx, layout_text: str, settings: VerifySettings):
    """One real training step of `layout_text` counted on every rank: (coords, counts, history, buckets)."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp)
    if state is None:
        return None
    step = plan(settings, layout)
    runner = build_runner(settings, layout, state)
    micro = step.batch.micro_batches(global_batch(settings, get_model_spec("gpt"), 0), state.dp_rank)
    ledger = CommLedger.for_state(state, record_calls=True)
    with counting(ledger):
        runner.train_step(micro, lambda per_token, batch: sequence_mean_loss(per_token, batch,
                                                                              settings.global_batch_size), 1e-3)
    runner.finish_param_gather()
    buckets = [[sum(p.numel() for p in b.params), b.size] for buffer in runner.buffers for b in buffer.buckets]
    return (state.coords, ledger.as_dict(), [(c.kind, c.op, c.bytes) for c in ledger.history], buckets)


def _entry(calls: int, nbytes: int) -> dict:
    return {"calls": calls, "bytes": nbytes}


# --- the ledger itself (no processes) --------------------------------------------------------


def test_ledger_counts_per_kind_and_operation_and_knows_only_its_groups():
    tp, dp = object(), object()
    ledger = CommLedger({tp: "tp", dp: "dp"}, record_calls=True)
    ledger.add(tp, "all_reduce", 100)
    ledger.add(tp, "all_reduce", 28)
    ledger.add(dp, "reduce_scatter", 64)
    ledger.add(object(), "send", 8)
    assert ledger.as_dict() == {"dp": {"reduce_scatter": _entry(1, 64)}, OTHER_KIND: {"send": _entry(1, 8)},
                                "tp": {"all_reduce": _entry(2, 128)}}
    assert (ledger.bytes(), ledger.calls(), ledger.bytes("tp"), ledger.bytes(op="send")) == (200, 4, 128, 8)
    assert [c.bytes for c in ledger.history] == [100, 28, 64, 8]
    with pytest.raises(ValueError, match="alltoall"):
        ledger.add(tp, "alltoall", 1)
    ledger.reset()
    assert ledger.as_dict() == {} and ledger.history == []


def test_counting_is_a_region_and_none_turns_it_off_inside_another():
    outer, inner = CommLedger(), CommLedger()
    assert active_ledger() is None
    with counting(outer):
        assert active_ledger() is outer
        with counting(inner):
            assert active_ledger() is inner
        with counting(None):
            assert active_ledger() is None
        assert active_ledger() is outer
    assert active_ledger() is None


def test_every_collective_and_p2p_goes_through_the_comm_seam():
    """No module of megalith calls a torch.distributed operation that moves tensors except comm.py
    (state.py and spawn.py only build and tear down groups; timers.py gathers names as objects).
    megalith/bench/ is exempt: its peers are the other frameworks' training steps, written as their users would."""
    moving = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
              "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "send", "recv", "isend", "irecv",
              "batch_isend_irecv", "P2POp", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
              "barrier")
    pattern = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(moving) + r")\b(?!_)")
    offenders = [f"{path.relative_to(ROOT)}: {match.group(0)}"
                 for path in sorted((ROOT / "megalith").rglob("*.py")) if path.name != "comm.py" and "bench" not in path.relative_to(ROOT).parts
                 for match in pattern.finditer(path.read_text())]
    assert offenders == []


# --- the vocab-parallel embedding and cross-entropy ---------------------------------------


def _embedding_and_cross_entropy(ctx, sequence_parallel: bool):
    state = ctx.parallel_state(tp=2, dp=1)
    if state is None:
        return None
    tp = state.tp_group
    embedding = VocabParallelEmbedding(V, H, tp_group=tp, make_vocab_size_divisible_by=8,
                                       sequence_parallel=sequence_parallel)
    ids = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(0))
    ledger = CommLedger.for_state(state)
    with counting(ledger):
        out = embedding(ids)
        forward = ledger.as_dict()
        ledger.reset()
        out.sum().backward()  # counted into the forward's ledger in any case (see the thread test)
    backward = ledger.as_dict()
    logits = torch.randn(S, B, V // 2, requires_grad=True, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(2))
    losses = {}
    for smoothing in (0.0, 0.1):
        ledger = CommLedger.for_state(state, record_calls=True)
        with counting(ledger):
            loss = vocab_parallel_cross_entropy(logits, target, tp, vocab_size=V, label_smoothing=smoothing)
            loss.sum().backward()
        losses[smoothing] = [c.bytes for c in ledger.history]
    return forward, backward, losses


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2.sp"])
def test_vocab_parallel_embedding_and_cross_entropy(pool, sequence_parallel):
    for forward, backward, losses in filter(None, pool.run(_embedding_and_cross_entropy, sequence_parallel)):
        # the embedding sums its vocabulary shards' lookups: one all-reduce of [s, b, h], or a reduce-scatter
        if sequence_parallel:  # whose backward gathers the sequence's gradient back
            assert forward == {"tp": {"reduce_scatter": _entry(1, ACT)}}
            assert backward == {"tp": {"all_gather": _entry(1, ACT)}}
        else:
            assert forward == {"tp": {"all_reduce": _entry(1, ACT)}}
            assert backward == {}
        # max over the shards, then the stacked sums: [s, b] floats each; label smoothing adds the logits' sum
        assert losses == {0.0: [S * B * F32, 2 * S * B * F32], 0.1: [S * B * F32, 3 * S * B * F32]}


# --- tensor parallelism, with and without sequence parallelism ----------------------------


def _forward_counts(ctx, layout_text: str):
    """One micro-batch's forward (no backward) of the whole GPT, counted."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp)
    if state is None:
        return None
    runner = build_runner(SETTINGS, layout, state)
    batch = plan(SETTINGS, layout).batch.micro_batches(global_batch(SETTINGS, get_model_spec("gpt"), 0), 0)(0)
    ledger = CommLedger.for_state(state)
    with torch.no_grad(), counting(ledger):
        runner.chunks[0](batch["input_ids"], batch["labels"])
    return ledger.as_dict()


def test_tp_forward_is_two_all_reduces_of_the_activations_per_layer(pool):
    """Per layer the attention's and the MLP's row-parallel outputs are summed; plus the embedding's sum and
    the cross-entropy's reductions. With SP each all-reduce becomes an all-gather and a reduce-scatter of
    the same [s, b, h]: the same total each."""
    for counts in filter(None, pool.run(_forward_counts, "tp2")):
        assert counts == {"tp": {"all_reduce": _entry(2 * L + 1 + 2, (2 * L + 1) * ACT + CE)}}
    for counts in filter(None, pool.run(_forward_counts, "tp2.sp")):
        # gathered before qkv, fc1 and the output layer; scattered after proj, fc2 and the embedding
        assert counts == {"tp": {"all_gather": _entry(2 * L + 1, (2 * L + 1) * ACT),
                                 "reduce_scatter": _entry(2 * L + 1, (2 * L + 1) * ACT),
                                 "all_reduce": _entry(2, CE)}}


def test_tp_training_step_without_and_with_sequence_parallelism(pool):
    m = SETTINGS.micro_batches
    # forward: 2L + 1 all-reduces (embedding, proj, fc2); backward: 2L + 1 (the gradients of the inputs of
    # qkv, fc1 and the output layer); then the norm's squares over mp (tp x pp)
    results = list(filter(None, pool.run(_train_step_counts, "tp2", SETTINGS)))
    assert len(results) == 2
    without_sp = m * (4 * L + 2) * ACT
    for _, counts, _, _ in results:
        assert counts == {"tp": {"all_reduce": _entry(m * (4 * L + 2 + 2), without_sp + m * CE)},
                          "mp": {"all_reduce": _entry(1, STEP_SCALARS["norm"])}}
    # SP: every activation all-reduce is an all-gather plus a reduce-scatter of the same bytes; the
    # column-parallel layers (qkv, fc1, the output layer) keep their input's shard for backward and
    # gather it again there: 2L + 1 more all-gathers of A per micro-batch. After backward the
    # replicated parameters' gradients (norms, row-parallel biases, positions) are summed once
    sp_grads = F32 * (L * (2 * 2 * H + 2 * H) + 2 * H + S * H)
    regathered = m * (2 * L + 1)
    for _, counts, history, _ in filter(None, pool.run(_train_step_counts, "tp2.sp", SETTINGS)):
        assert counts == {"tp": {"all_gather": _entry(m * (4 * L + 2) + regathered, without_sp + regathered * ACT),
                                 "reduce_scatter": _entry(m * (4 * L + 2), without_sp),
                                 "all_reduce": _entry(2 * m + 1, m * CE + sp_grads)},
                          "mp": {"all_reduce": _entry(1, STEP_SCALARS["norm"])}}
        assert [b for kind, op, b in history if op == "all_reduce" and b not in (S * B * F32, 2 * S * B * F32)] == [
            sp_grads, STEP_SCALARS["norm"]]


# --- data parallelism -----------------------------------------------------------------------


def test_dp_all_reduces_the_gradients_once_per_bucket(pool):
    """Plus the step's loss summed over dp; the gradients are whole on every dp rank, so the norm's squares
    are not (tp x pp = 1: nothing over mp either)."""
    n = _gpt_params(L)
    one_bucket = replace(SETTINGS, ddp_bucket_size=10**9)
    for _, counts, _, buckets in filter(None, pool.run(_train_step_counts, "dp2", one_bucket)):
        assert buckets == [[n, n]]
        assert counts == {"dp": {"all_reduce": _entry(2, F32 * n + STEP_SCALARS["loss"])}}
    small = replace(SETTINGS, ddp_bucket_size=5000)
    for _, counts, history, buckets in filter(None, pool.run(_train_step_counts, "dp2", small)):
        assert len(buckets) > 2 and sum(size for _, size in buckets) == n
        grads = [b for kind, op, b in history if (kind, op) == ("dp", "all_reduce")][:len(buckets)]
        assert sorted(grads) == sorted(F32 * size for _, size in buckets)  # one all-reduce per bucket, its size
        assert counts == {"dp": {"all_reduce": _entry(len(buckets) + 1, F32 * n + STEP_SCALARS["loss"])}}


def test_distributed_optimizer_reduce_scatters_and_all_gathers_each_bucket(pool):
    n, dp = _gpt_params(L), 2
    small = replace(SETTINGS, ddp_bucket_size=5000)
    # sharded gradients: the norm's squares are summed over dp too
    for _, counts, history, buckets in filter(None, pool.run(_train_step_counts, "dp2.zero1", small)):
        padded = [-(-elements // dp) * dp for elements, _ in buckets]  # each bucket padded to a multiple of dp
        assert sum(elements for elements, _ in buckets) == n and [size for _, size in buckets] == padded
        assert sorted(b for kind, op, b in history if op == "reduce_scatter") == sorted(F32 * p for p in padded)
        assert sorted(b for kind, op, b in history if op == "all_gather") == sorted(F32 * p for p in padded)
        assert counts == {"dp": {"reduce_scatter": _entry(len(padded), F32 * sum(padded)),
                                 "all_gather": _entry(len(padded), F32 * sum(padded)),
                                 "all_reduce": _entry(2, STEP_SCALARS["loss"] + STEP_SCALARS["norm"])}}


# --- pipeline parallelism -------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 4])
def test_pp_sends_the_activations_per_boundary_per_micro_batch_each_way(pool, pp):
    """1F1B: a stage receives each micro-batch's [s, b, h] from the one before and sends it on; the
    gradients go back the same way. The loss is broadcast from the last stage; the tied embedding's two
    copies are summed over the embedding group (first and last stage)."""
    m, layers = SETTINGS.micro_batches, 2 * pp
    settings = replace(SETTINGS, config=_config(layers))
    results = list(filter(None, pool.run(_train_step_counts, f"pp{pp}", settings)))
    assert len(results) == pp
    total_sent = 0
    for coords, counts, _, _ in results:
        first, last = coords.pp == 0, coords.pp == pp - 1
        messages = m * ((not last) + (not first))  # forward activations out, gradients back
        expected = {"pp": {"send": _entry(messages, messages * ACT), "recv": _entry(messages, messages * ACT),
                           "broadcast": _entry(1, F64)},
                    "mp": {"all_reduce": _entry(1, STEP_SCALARS["norm"])}}
        if first or last:
            expected["embedding"] = {"all_reduce": _entry(1, F32 * V * H)}
        assert counts == expected, coords
        total_sent += counts["pp"]["send"]["bytes"]
    assert total_sent == 2 * (pp - 1) * m * ACT  # every boundary, every micro-batch, both ways


# --- backward on another thread (as on a GPU) -----------------------------------------------


def _backward_on_another_thread(ctx):
    """Forward under a ledger on this thread, backward on a thread with an empty context (autograd's device
    threads on a GPU see no ContextVar): the mappings and the dp buffer still count into the forward's ledger."""
    state = ctx.parallel_state(tp=2, dp=2)
    torch.manual_seed(0)
    x = torch.randn(S, B, H, requires_grad=True)
    module = nn.Sequential(nn.Linear(H, H), nn.Linear(H, H))
    buffer = DataParallelGrads(module, state.dp_group, bucket_size=H * H + H, overlap=True)
    ledger = CommLedger.for_state(state)
    buffer.zero_grad()
    with counting(ledger):
        buffer.set_last_microbatch(True)
        shard = comm.scatter_to_sequence_parallel(x, state.tp_group)
        y = comm.gather_from_sequence_parallel(module(shard), state.tp_group)  # its backward: a reduce-scatter
    seen = {}

    def backward():
        seen["ledger"] = active_ledger()
        y.sum().backward()

    thread = threading.Thread(target=contextvars.Context().run, args=(backward,))
    thread.start()
    thread.join()
    buffer.finish()  # outside the region: a bucket it launched would not be counted
    launched_in_backward = buffer.launches[0].hooks_fired < len(buffer.params)
    return seen["ledger"] is None, launched_in_backward, ledger.as_dict()


def test_backward_on_another_thread_counts_into_the_forwards_ledger(pool):
    gathered = S * B * H * F32  # the sequence gathered / its gradient reduce-scattered, then gathered back
    for empty_context, in_hooks, counts in pool.run(_backward_on_another_thread):
        assert empty_context and in_hooks
        assert counts == {"tp": {"all_gather": _entry(2, 2 * gathered), "reduce_scatter": _entry(1, gathered)},
                          "dp": {"all_reduce": _entry(2, F32 * 2 * (H * H + H))}}


# --- pretrain --log-comm-bytes ----------------------------------------------------------------


def test_pretrain_writes_each_iterations_bytes_into_the_json_log(pool, tmp_path):
    log = tmp_path / "log.jsonl"
    argv = ["--mock-data", "--num-layers", str(L), "--hidden-size", str(H), "--num-attention-heads", "4",
            "--seq-length", str(S), "--vocab-size", str(V), "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "1e-3", "--train-iters", "4", "--log-interval", "2", "--eval-iters", "0",
            "--no-log-progress-bar", "--log-json", str(log), "--log-comm-bytes"]
    pool.run(pretrain_on_rank, argv, 2)  # dp2 without --overlap-grad-reduce: one bucket
    records = [json.loads(line) for line in log.read_text().splitlines()]
    n = _gpt_params(L)
    expected = {"dp": {"all_reduce": _entry(2, F32 * n + STEP_SCALARS["loss"])}}
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(r["comm"] == expected for r in records)


def test_log_comm_bytes_needs_log_json():
    from megalith.config.arguments import parse_pretrain_args

    with pytest.raises(ConfigError, match="--log-comm-bytes .* add --log-json"):
        parse_pretrain_args(["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
                             "4", "--seq-length", "16", "--vocab-size", "128", "--micro-batch-size", "1",
                             "--global-batch-size", "4", "--train-iters", "1", "--log-comm-bytes"], 1)


# --- ZeRO-2 (tests/test_zero_stages.py has its exactness) --------------------------------------


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_zero2_reduce_scatters_every_micro_batch_and_all_gathers_once(pool, micro_batches):
    """m micro-batches per dp rank: each bucket reduce-scattered m times (its padded size each time),
    all-gathered once after the step; with m = 1 the total equals ZeRO-1's and DP's 2 x buffer."""
    n, dp = _gpt_params(L), 2
    small = replace(SETTINGS, ddp_bucket_size=5000, micro_batches=micro_batches)
    m = plan(small, parse_layout("dp2.zero2")).batch.num_micro_batches
    for _, counts, history, buckets in filter(None, pool.run(_train_step_counts, "dp2.zero2", small)):
        padded = [-(-elements // dp) * dp for elements, _ in buckets]
        assert sum(elements for elements, _ in buckets) == n and [size for _, size in buckets] == padded
        assert sorted(b for kind, op, b in history if op == "reduce_scatter") == sorted(F32 * p for p in padded * m)
        assert counts == {"dp": {"reduce_scatter": _entry(m * len(padded), m * F32 * sum(padded)),
                                 "all_gather": _entry(len(padded), F32 * sum(padded)),
                                 "all_reduce": _entry(2, STEP_SCALARS["loss"] + STEP_SCALARS["norm"])}}


def _unit_sizes(ctx, layout_text: str, settings: VerifySettings):
    """ZeRO-3: each unit's (root first) padded bucket sizes on this rank."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(dp=layout.dp)
    runner = build_runner(settings, layout, state)
    return [[b.size for b in unit.buckets] for unit in runner.buffers[0].units.units]


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_zero3_gathers_each_unit_for_forward_and_each_layer_again_for_backward(pool, micro_batches):
    """Per micro-batch: every unit all-gathered for forward, every layer again for backward (the root
    unit is kept through the chunk's backward), every unit's gradient reduce-scattered; no all-gather
    after the step. With m = 1 and only layers that is the issue's 3 x the (padded) buffer."""
    settings = replace(SETTINGS, micro_batches=micro_batches)
    m = plan(settings, parse_layout("dp2.zero3")).batch.num_micro_batches
    units = pool.run(_unit_sizes, "dp2.zero3", settings)[0]
    root, layers = sum(units[0]), sum(sum(u) for u in units[1:])
    assert len(units) == 1 + L and root + layers >= _gpt_params(L)
    for _, counts, _, _ in filter(None, pool.run(_train_step_counts, "dp2.zero3", settings)):
        assert counts == {"dp": {"all_gather": _entry(m * (len(units[0]) + 2 * L), m * F32 * (root + 2 * layers)),
                                 "reduce_scatter": _entry(m * (len(units[0]) + L), m * F32 * (root + layers)),
                                 "all_reduce": _entry(2, STEP_SCALARS["loss"] + STEP_SCALARS["norm"])}}
