"""Megatron's NullTokenizer: the text is already token ids."""

from __future__ import annotations

from typing import Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import Tokenizer


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: the text is already token ids separated by spaces.

    eod is `vocab_size` as given, so the vocab_size property is one more than given.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise DataError(f"NullTokenizer needs a positive vocab size, got {vocab_size}; pass --vocab-size N")
        self._given = int(vocab_size)
        self.eod = self._given

    @property
    def vocab_size(self) -> int:
        return self._given + 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
