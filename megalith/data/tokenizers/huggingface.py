"""A Hugging Face fast tokenizer saved locally (tokenizer.json); read from disk, never downloaded."""

from __future__ import annotations

import json
import os
from typing import Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import _VocabTable, sentinel


_HF_SPECIALS = {"eos": "eos_token", "bos": "bos_token", "pad": "pad_token", "mask": "mask_token",
                "cls": "cls_token", "sep": "sep_token"}


class HuggingFaceTokenizer(_VocabTable):
    """A Hugging Face fast tokenizer saved locally (tokenizer.json), loaded without transformers.

    Special tokens come from tokenizer_config.json and special_tokens_map.json (the latter wins)
    when present, else are None; eod is the eos token. As with Megatron's (which calls the
    tokenizer with its defaults), `tokenize` lets the tokenizer's post-processor add its special
    tokens (e.g. Llama's BOS) and `detokenize` keeps special tokens. Sentinels are the config's
    `additional_special_tokens`, else the vocab's <extra_id_0>, <extra_id_1>, ... .
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if directory is None:
            raise DataError("a Hugging Face tokenizer directory is needed; pass --tokenizer-model DIR")
        if os.path.isfile(directory) and directory.endswith(".json"):
            directory, tokenizer_json = os.path.dirname(directory) or ".", directory
        else:
            if not os.path.isdir(directory):
                raise DataError(f"{directory}: no such tokenizer directory; --tokenizer-model takes a local directory "
                                "or tokenizer.json (nothing is downloaded: save a hub tokenizer with "
                                "save_pretrained(DIR) and pass DIR)")
            tokenizer_json = os.path.join(directory, "tokenizer.json")
            if not os.path.isfile(tokenizer_json):
                raise DataError(f"{tokenizer_json}: missing; --tokenizer-model must be a directory holding "
                                "a Hugging Face tokenizer.json (save one with tokenizer.save_pretrained)")
        try:
            self._tok = HFTokenizer.from_file(tokenizer_json)
        except Exception as error:  # the Rust side raises plain Exception
            raise DataError(f"{tokenizer_json}: cannot be loaded ({error}); re-save the tokenizer") from None
        self.directory = directory
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config.update(_read_json(os.path.join(directory, name)))
        for attribute, key in _HF_SPECIALS.items():
            token = _token_text(config.get(key))
            setattr(self, attribute, None if token is None else self._id_of(token, key))
        self.eod = self.eos
        extra = [_token_text(t) for t in config.get("additional_special_tokens") or []]
        if extra:
            self._sentinels = [self._id_of(t, "additional_special_tokens") for t in extra if t is not None]
        else:
            self._sentinels = []
            while sentinel(len(self._sentinels)) in self._vocab:
                self._sentinels.append(self._vocab[sentinel(len(self._sentinels))])

    def _id_of(self, token: str, key: str) -> int:
        index = self._tok.token_to_id(token)
        if index is None:
            raise DataError(f"{self.directory}: {key} {token!r} is not in tokenizer.json's vocab; "
                            "fix the tokenizer config")
        return index

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
