"""GPT split over pipeline stages (1F1B, interleaved, GPipe) equals one process, tied embeddings included."""

from dataclasses import replace

import pytest

from megalith.cli import main
from megalith.config import ModelConfig, parse_layout
from megalith.models.gpt import GPTModel
from megalith.models.registry import BUILTIN_MODELS
from megalith.verify import VerifySettings, _train_on_rank, compare, merge_ranks, run_verify

BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)  # 8 layers: pp4.vpp2 has one layer per chunk
ISSUE_LAYOUTS = ["pp2", "pp4", "pp2.vpp2", "tp2.pp2.sp", "pp4.vpp2", "tp2.pp2.vpp2.sp"]


def assert_all_pass(results, layouts):
    assert [r.layout for r in results] == layouts
    for r in results:
        assert r.passed, r


@pytest.mark.slow  # about 20 s; test_micro_batches_not_a_multiple_of_pp covers pp4, tp2.pp2 and vpp in the fast tier
def test_issue_layouts_with_eight_micro_batches(rank_pools):
    settings = VerifySettings("gpt", BASE, steps=3, micro_batches=8, micro_batch_size=1)
    assert_all_pass(run_verify(settings, [parse_layout(t) for t in ISSUE_LAYOUTS], pool=rank_pools(4)), ISSUE_LAYOUTS)


def test_micro_batches_not_a_multiple_of_pp(rank_pools):
    """1F1B and interleaved 1F1B take any m (here 2 and 6 with pp 4, 3 with pp 2); the loss does not depend on m."""
    settings = VerifySettings("gpt", BASE, steps=2, micro_batches=4, micro_batch_size=3)
    layouts = ["pp4.mb2", "pp4.mb6", "pp2.mb3.sp.tp2", "pp2.vpp2.mb12", "pp2.vpp2.mb3", "pp4.vpp2.mb6",
               "tp2.pp2.vpp2.sp.mb3"]
    results = run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4))
    assert_all_pass(results, [str(parse_layout(t)) for t in layouts])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_with_uneven_stages_and_untied_output(rank_pools, schedule):
    config = replace(BASE, untie_embeddings_and_output_weights=True, position_embedding_type="rope",
                     recompute_granularity="full")
    for first, last, layouts in ((1, 3, ["pp4"]), (3, None, ["tp2.pp2.sp"])):  # 1|2|2|3 and 3|5 layers
        settings = VerifySettings("gpt", config, steps=2, micro_batches=4, schedule=schedule,
                                  decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last)
        assert_all_pass(run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4)), layouts)


def train_without_embedding_sync(ctx, settings, layout):
    original = GPTModel.finish_grad_sync

    def only_sequence_parallel(self):
        shared = [p for p in self.parameters() if getattr(p, "shared_embedding", False)]
        for p in shared:
            p.shared_embedding = False
        original(self)
        for p in shared:
            p.shared_embedding = True

    GPTModel.finish_grad_sync = only_sequence_parallel
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout))
    finally:
        GPTModel.finish_grad_sync = original


def test_negative_control_tied_embedding_gradients_must_be_summed(rank_pools):
    pool, settings = rank_pools(4), VerifySettings("gpt", BASE, steps=2, micro_batches=4)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("pp2", reference, merge_ranks(pool.run(train_without_embedding_sync, settings, "pp2")))
    assert not broken.passed
    assert "word_embeddings" in broken.worst_grad


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["verify", "--layouts", "pp4", "--num-layers", "6"], "6 layers do not split evenly over 4 pipeline stages"),
        (["verify", "--layouts", "tp2.vpp2"], "virtual pipeline stages (2) need a pipeline"),
        (["verify", "--layouts", "pp2.mb3"], "does not split into dp 1 x 3 micro-batches"),
        (["verify", "--layouts", "dp3"], "does not split over dp 3; use --micro-batches that is a multiple of 3"),
        (["verify", "--layouts", "pp2", "--decoder-first-pipeline-num-layers", "3",
          "--decoder-last-pipeline-num-layers", "3"], "add up to 6, not the 8 layers"),
    ],
)
def test_bad_pipeline_input_is_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert err.count("\n") == 1
