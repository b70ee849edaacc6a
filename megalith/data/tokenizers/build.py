"""Choosing a tokenizer by Megatron's `--tokenizer-type` name, from its flags' values."""

from __future__ import annotations

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import Tokenizer
from megalith.data.tokenizers.bpe import GPT2BPETokenizer
from megalith.data.tokenizers.huggingface import HuggingFaceTokenizer
from megalith.data.tokenizers.null import NullTokenizer
from megalith.data.tokenizers.spm import GPTSentencePieceTokenizer, Llama2Tokenizer, SentencePieceTokenizer
from megalith.data.tokenizers.wordpiece import BertWordPieceTokenizer

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer",
                   "BertWordPieceLowerCase", "BertWordPieceCase", "HuggingFaceTokenizer", "NullTokenizer")
# --tokenizer-type when only --vocab-file (and --merge-file) is given, by the samples the model reads:
# Megatron's pretrain_gpt.py, pretrain_bert.py and pretrain_t5.py default it so.
DEFAULT_TOKENIZER_TYPES = {"gpt": "GPT2BPETokenizer", "bert": "BertWordPieceLowerCase", "t5": "BertWordPieceLowerCase"}


def _needs(value, message: str) -> None:
    if value is None:
        raise DataError(message)


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None,
                    vocab_extra_ids: int = 0) -> Tokenizer:
    """The tokenizer Megatron's `--tokenizer-type` names, from its flags' values.

    As in Megatron, `vocab_extra_ids` (T5 sentinels) reaches SentencePieceTokenizer and the
    BERT WordPiece types only; the others have no sentinels."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        _needs(tokenizer_model, f"{tokenizer_type} needs a SentencePiece model; pass --tokenizer-model PATH")
        if tokenizer_type == "SentencePieceTokenizer":
            return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
        if tokenizer_type == "GPTSentencePieceTokenizer":
            return GPTSentencePieceTokenizer(tokenizer_model)
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        _needs(vocab_file, "GPT2BPETokenizer needs GPT-2's vocab.json; pass --vocab-file PATH")
        _needs(merge_file, "GPT2BPETokenizer needs GPT-2's merges.txt; pass --merge-file PATH")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        _needs(vocab_file, f"{tokenizer_type} needs a BERT WordPiece vocab.txt; pass --vocab-file PATH")
        return BertWordPieceTokenizer(vocab_file, lower_case=tokenizer_type == "BertWordPieceLowerCase",
                                      vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "HuggingFaceTokenizer":
        _needs(tokenizer_model, "HuggingFaceTokenizer needs a directory holding tokenizer.json (or the file); "
               "pass --tokenizer-model PATH")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        _needs(vocab_size, "NullTokenizer needs the vocab size; pass --vocab-size N")
        return NullTokenizer(vocab_size)
    raise DataError(f"unknown tokenizer type {tokenizer_type!r}; pass --tokenizer-type as one of "
                    f"{', '.join(TOKENIZER_TYPES)}")
