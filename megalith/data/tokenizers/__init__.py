"""Tokenizers with Megatron-LM's interface and flag names, plus SentencePiece training.

Every tokenizer maps text to a list of ids and back and names its special ids (`eod`, `pad`,
`mask`, `cls`, `sep`, `bos`, `eos`; None where it has none) and its T5 sentinels
(`additional_special_tokens_ids`, `<extra_id_0>` first). `build_tokenizer` picks one by
Megatron's `--tokenizer-type` name and says which flag is missing when one is.

Types (Megatron's names), one module each:
  SentencePieceTokenizer     spm: a SentencePiece `.model` (--tokenizer-model) plus Megatron's special tokens
  GPTSentencePieceTokenizer  spm: the model's pieces alone; eod = the model's eos
  Llama2Tokenizer            spm: as GPTSentencePieceTokenizer, bos put before every text
  GPT2BPETokenizer           bpe: GPT-2 byte-level BPE from vocab.json + merges.txt (--vocab-file, --merge-file)
  BertWordPieceLowerCase     wordpiece: BERT WordPiece from vocab.txt (--vocab-file), lower-cased
  BertWordPieceCase          wordpiece: the same, case kept
  HuggingFaceTokenizer       huggingface: a local tokenizer.json or its directory (--tokenizer-model)
  NullTokenizer              null: text is already ids separated by spaces (--vocab-size)

`train_sentencepiece` (training) trains a model whose special tokens are all in its own vocab,
so the SentencePieceTokenizer built from it has exactly the requested vocab size and
round-trips text exactly (identity normalisation, whitespace kept, byte fallback).
"""

from megalith.data.tokenizers.base import Tokenizer, sentinel
from megalith.data.tokenizers.bpe import GPT2_EOD, GPT2BPETokenizer
from megalith.data.tokenizers.build import DEFAULT_TOKENIZER_TYPES, TOKENIZER_TYPES, build_tokenizer
from megalith.data.tokenizers.huggingface import HuggingFaceTokenizer
from megalith.data.tokenizers.null import NullTokenizer
from megalith.data.tokenizers.spm import (SP_BOS, SP_EOS, SP_PAD, SP_SPECIAL_TOKENS, SP_UNK,
                                          GPTSentencePieceTokenizer, Llama2Tokenizer, SentencePieceTokenizer)
from megalith.data.tokenizers.training import (add_train_tokenizer_arguments, run_train_tokenizer,
                                               train_sentencepiece, train_sentencepiece_from_lines)
from megalith.data.tokenizers.wordpiece import BertWordPieceTokenizer, read_wordpiece_vocab

__all__ = [
    "TOKENIZER_TYPES", "DEFAULT_TOKENIZER_TYPES", "Tokenizer", "sentinel", "build_tokenizer",
    "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "SP_SPECIAL_TOKENS", "SP_UNK",
    "SP_BOS", "SP_EOS", "SP_PAD",
    "GPT2BPETokenizer", "GPT2_EOD", "BertWordPieceTokenizer", "read_wordpiece_vocab",
    "HuggingFaceTokenizer", "NullTokenizer",
    "train_sentencepiece", "train_sentencepiece_from_lines", "add_train_tokenizer_arguments", "run_train_tokenizer",
]
