"""GPT-2's byte-level BPE from vocab.json + merges.txt (Megatron's GPT2BPETokenizer)."""

from __future__ import annotations

from typing import Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import _VocabTable, require_file

GPT2_EOD = "<|endoftext|>"


class GPT2BPETokenizer(_VocabTable):
    """GPT-2's byte-level BPE (vocab.json + merges.txt) through HF tokenizers.

    Lossless on any text. `<|endoftext|>` is the eod; like Megatron's GPT2 tokenizer, the string
    written in text is encoded as ordinary bytes, not as the eod id.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        require_file(vocab_file, "GPT-2 vocab file", "--vocab-file")
        require_file(merge_file, "GPT-2 merge file", "--merge-file")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as error:  # the Rust side raises plain Exception
            raise DataError(f"{vocab_file} / {merge_file}: not a GPT-2 BPE vocab and merge file ({error}); "
                            "check --vocab-file and --merge-file") from None
        self._tok = HFTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._vocab = self._tok.get_vocab()
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        if GPT2_EOD not in self._vocab:
            raise DataError(f"{vocab_file}: has no {GPT2_EOD} token; use a GPT-2 vocab file (--vocab-file)")
        self.eod = self.eos = self._vocab[GPT2_EOD]

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
