"""The tokenizer interface every type shares: text <-> ids and Megatron's named special ids."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Sequence

from megalith.data.errors import DataError


def sentinel(i: int) -> str:
    """The T5 sentinel token number i."""
    return f"<extra_id_{i}>"


class Tokenizer(ABC):
    """Text <-> ids; special ids are None where the tokenizer has no such token."""

    name: str = "Tokenizer"
    eod: int | None = None
    pad: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    bos: int | None = None
    eos: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """All ids, added special tokens included: every id is below it."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        ...

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (subclasses batch this in native code)."""
        return [self.tokenize(text) for text in texts]

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return []

    def special_ids(self) -> dict[str, int]:
        """The named special ids this tokenizer has (for checks and messages)."""
        names = ("eod", "pad", "mask", "cls", "sep", "bos", "eos")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size})"


class _VocabTable(Tokenizer):
    """A tokenizer that keeps its piece <-> id tables (`_vocab`, `_inv_vocab`) and sentinels."""

    _vocab: dict[str, int]
    _inv_vocab: dict[int, str]
    _sentinels: list[int] | tuple = ()

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return list(self._sentinels)


def require_file(path: str | None, what: str, flag: str) -> str:
    if path is None:
        raise DataError(f"{what} is needed; pass {flag} PATH")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what}; check {flag}")
    return path
