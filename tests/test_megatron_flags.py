"""The Megatron compatibility table: every flag in one case, (b) refused away from its default in
one line before anything starts, (c) accepted with one notice, and Megatron's example scripts parse."""

import argparse
import shlex

import pytest

from megalith.cli import build_parser, main
from megalith.config import explicit_flags
from megalith.config.arguments import build_pretrain_parser, resolve_pretrain_config
from megalith.config.megatron import accepted_given, compat_notice, refuse_unsupported, refused_flags
from megalith.config.megatron.arguments import GROUP_TITLE
from megalith.config.megatron.records import ARITIES, AliasTarget, Owner, option_strings
from megalith.config.megatron.table import ACCEPTED, ALIASES, CASES, REFUSED, TABLE, case_of
from megalith.errors import ConfigError


def _own_options(parser: argparse.ArgumentParser) -> set[str]:
    """The options megalith implements itself: everything outside the compatibility group."""
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    ours = set(parser._option_string_actions) - {o for a in group._group_actions for o in a.option_strings}
    return ours


def test_every_table_flag_lands_in_exactly_one_case():
    assert sum(len(records) for _, records in CASES) == len(TABLE)
    spellings = [option for record in TABLE for option in option_strings(record)]
    assert len(spellings) == len(set(spellings)), "a Megatron option appears in two table records"
    for record in TABLE:
        assert [case for case, records in CASES if record in records] == [case_of(record)]
        assert record.arity in ARITIES and record.meaning and record.note
        assert all(option.startswith("--") for option in record.options)
    assert all(isinstance(r.note, Owner) for r in REFUSED) and all(isinstance(r.note, str) for r in ACCEPTED)
    assert all(isinstance(r.note, AliasTarget) for r in ALIASES)


def test_no_table_flag_duplicates_a_flag_megalith_implements():
    parser = build_pretrain_parser()
    duplicated = sorted(o for record in TABLE for o in option_strings(record) if o in _own_options(parser))
    assert not duplicated, f"megalith implements these now; remove them from megalith/config/megatron: {duplicated}"
    added = set(parser._option_string_actions)
    assert all(o in added for record in TABLE for o in option_strings(record))
    assert all(record.note.option in added for record in ALIASES)


def _args(words: str) -> argparse.Namespace:
    return build_pretrain_parser().parse_args(["--mock-data", *shlex.split(words)])


@pytest.mark.parametrize("words", ["--num-experts 0", "--expert-model-parallel-size 1", "--moe-router-topk 2",
                                   "--moe-router-load-balancing-type aux_loss", "--cp-comm-type p2p",
                                   "--rerun-mode disabled", "--moe-layer-freq 1", "--fp8-recipe delayed",
                                   "--no-langrl-external-server", "--recompute-modules core_attn"])
def test_a_refused_flag_at_megatrons_default_passes(words):
    args = _args(words)
    assert refused_flags(args) == []
    refuse_unsupported(args)


def test_a_refused_flag_away_from_its_default_is_one_line_naming_it_and_its_owner():
    with pytest.raises(ConfigError) as error:
        refuse_unsupported(_args("--moe-router-num-groups 8"))
    assert str(error.value) == ("--moe-router-num-groups is not supported yet: mixture of experts is issue 21; "
                                "drop the flag")
    with pytest.raises(ConfigError, match=r"^--use-torch-fsdp2 is not supported yet: ZeRO-2/3 and FSDP are issue 20"):
        refuse_unsupported(_args("--use-torch-fsdp2"))
    with pytest.raises(ConfigError, match=r"^--retro-add-retriever is not supported: Retro .* not planned"):
        refuse_unsupported(_args("--retro-add-retriever"))
    with pytest.raises(ConfigError) as error:
        refuse_unsupported(_args("--cp-comm-type a2a --fp8-recipe mxfp8 --inprocess-restart"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("--cp-comm-type is not supported yet: context parallelism is "
                                                      "issue 22")
    assert message.endswith("(also refused: --fp8-recipe, --inprocess-restart)")


def test_refusal_comes_first_in_resolve():
    with pytest.raises(ConfigError, match="^--moe-router-num-groups is not supported yet"):
        resolve_pretrain_config(_args("--moe-router-num-groups 2 --tensor-model-parallel-size 3"), world_size=2)


def test_accepted_flags_are_named_once_in_the_notices():
    args = _args("--use-mcore-models --no-gradient-accumulation-fusion --tp-comm-overlap --use-mcore-models "
                 "--no-masked-softmax-fusion")  # the fusion switches are model flags now: not in this list
    assert accepted_given(args) == ["--use-mcore-models", "--no-gradient-accumulation-fusion", "--tp-comm-overlap"]
    config = resolve_pretrain_config(args, world_size=1)
    assert compat_notice(args) in config.notices
    assert compat_notice(args).startswith("accepted and ignored here: --use-mcore-models, --no-gradient-accum")
    assert compat_notice(_args("")) is None


def test_aliases_set_megaliths_own_flag_as_given():
    args = _args("--recompute-activations --use-rotary-position-embeddings --persistent-save-interval 7 "
                 "--override-opt_param-scheduler --save /tmp/unused")
    assert (args.recompute_granularity, args.position_embedding_type, args.save_interval) == ("selective", "rope", 7)
    assert args.override_opt_param_scheduler is True
    assert {"recompute_granularity", "position_embedding_type", "save_interval",
            "override_opt_param_scheduler"} <= explicit_flags(args)


def test_verify_and_bench_take_the_table_too(capsys):
    parser = build_parser()
    for command in ("verify", "bench-overhead"):
        args = parser.parse_args([command, "--tp-comm-overlap", "--moe-router-topk", "2"])
        assert accepted_given(args) == ["--tp-comm-overlap"]
    assert main(["verify", "--moe-router-num-groups", "4"]) == 2
    assert "--moe-router-num-groups is not supported yet: mixture of experts is issue 21" in capsys.readouterr().err


# The flag words of Megatron-LM's example launch scripts (shell variables replaced by values).
GPT3_175B = """--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048
 --max-position-embeddings 2048 --attention-backend auto --micro-batch-size 1 --global-batch-size 1536
 --rampup-batch-size 16 16 5859375 --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6
 --lr-warmup-fraction .001 --lr-decay-iters 430000 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
 --data-path DATA_text_document --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --split 949,50,1
 --log-interval 100 --save-interval 10000 --eval-interval 1000 --save CKPT --load CKPT --eval-iters 10
 --tensorboard-dir TB"""
LLAMA3_8B_FP8 = """--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
 --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192
 --max-position-embeddings 8192 --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0
 --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused
 --apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1
 --global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748 --lr-warmup-samples 3906252
 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine
 --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16
 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
 --exit-duration-in-mins 235 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather
 --tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel --mock-data
 --tokenizer-type NullTokenizer --vocab-size 128256 --data-cache-path CACHE --tiktoken-pattern v2
 --split 99,1,0 --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1 --log-interval 1
 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile --profile-step-start 4
 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60 --save CKPT --load CKPT
 --tensorboard-dir TB"""
MIXTRAL_8X7B = """--use-mcore-models --disable-bias-linear --seq-length 256 --max-position-embeddings 2048
 --num-layers 2 --hidden-size 256 --ffn-hidden-size 896 --num-attention-heads 2 --init-method-std 0.01
 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu
 --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 --no-masked-softmax-fusion
 --no-position-embedding --rotary-base 1000000 --num-experts 2 --moe-router-topk 2
 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall
 --overlap-param-gather --overlap-grad-reduce --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model
 --mock-data --split 99990,8,2 --micro-batch-size 1 --global-batch-size 4 --lr 1e-4 --train-iters 7 --min-lr 1.0e-5
 --weight-decay 0.1 --clip-grad 1.0 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
 --expert-model-parallel-size 2 --use-distributed-optimizer --sequence-parallel --eval-iters 10 --no-load-optim
 --no-load-rng"""
BERT_340M = """--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 512
 --max-position-embeddings 512 --attention-backend auto --micro-batch-size 4 --global-batch-size 32
 --train-iters 1000000 --weight-decay 1e-2 --clip-grad 1.0 --fp16 --lr 0.0001 --lr-decay-iters 990000
 --lr-decay-style linear --min-lr 1.0e-5 --weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0
 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --data-path DATA_text_document
 --vocab-file bert-vocab.json --split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000
 --save CKPT --load CKPT --eval-iters 10 --tensorboard-dir TB"""
T5_220M = """--encoder-num-layers 12 --decoder-num-layers 12 --hidden-size 768 --num-attention-heads 12
 --kv-channels 64 --ffn-hidden-size 3072 --encoder-seq-length 512 --decoder-seq-length 128
 --max-position-embeddings 512 --micro-batch-size 64 --global-batch-size 512 --lr 0.0001 --train-iters 1000000
 --lr-decay-iters 1000000 --lr-decay-style linear --min-lr 0.00001 --weight-decay 1e-2 --lr-warmup-fraction .01
 --clip-grad 1.0 --bf16 --vocab-extra-ids 100 --init-method-std 0.015 --transformer-impl transformer_engine
 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --attention-backend auto
 --data-path DATA_text_document --vocab-file bert-large-cased-vocab.txt --tokenizer-type BertWordPieceCase
 --split 99982,9,9 --log-interval 100 --tensorboard-dir TB --save-interval 500 --eval-interval 1000
 --eval-iters 10 --distributed-backend nccl --save CKPT --load CKPT"""

# (script, the refused flags, the accepted flags) as the table classifies them.
EXAMPLES = {
    "gpt3_175b": (GPT3_175B, [], []),
    "llama3_8b_fp8": (LLAMA3_8B_FP8, [], ["--use-mcore-models", "--tiktoken-pattern",
                                          "--no-create-attention-mask-in-dataloader"]),
    "mixtral_8x7b": (MIXTRAL_8X7B, [], ["--use-mcore-models"]),
    "bert_340m": (BERT_340M, [], []),
    "t5_220m": (T5_220M, [], []),
}


class _NoExit(argparse.ArgumentParser):
    def error(self, message):
        raise AssertionError(message)


def _supported_tokenizer(words: list[str]) -> list[str]:
    """The words with a tokenizer type megalith lacks (Llama2Tokenizer, BertWordPiece*) replaced: the
    tokenizer's choices belong to the data section, not to this table."""
    from megalith.data.tokenizers import TOKENIZER_TYPES

    at = words.index("--tokenizer-type") + 1 if "--tokenizer-type" in words else None
    if at is not None and words[at] not in TOKENIZER_TYPES:
        words = words[:at] + ["SentencePieceTokenizer"] + words[at + 1:]
    return words


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_megatron_example_scripts_parse(name):
    words, refused, accepted = EXAMPLES[name]
    parser = build_pretrain_parser()
    parser.__class__ = _NoExit  # an unrecognized or ill-typed flag fails the test with argparse's message
    args, unknown = parser.parse_known_args(_supported_tokenizer(words.split()))
    assert unknown == []
    assert refused_flags(args) == refused
    assert accepted_given(args) == accepted
