"""SentencePiece models: Megatron's SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer."""

from __future__ import annotations

import re
from typing import Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import _VocabTable, require_file, sentinel

# Megatron's SentencePiece special tokens, reserved in-vocab by train_sentencepiece.
SP_SPECIAL_TOKENS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
SP_UNK, SP_BOS, SP_EOS, SP_PAD = "<unk>", "<s>", "</s>", "<pad>"


class SentencePieceTokenizer(_VocabTable):
    """Megatron's SentencePieceTokenizer: a SentencePiece model plus its special tokens.

    <CLS> <SEP> <EOD> <MASK> are looked up in the model's vocab and appended after its pieces
    where missing; pad, bos and eos are the model's own pieces when it defines them, else
    <PAD> <BOS> <EOS>, likewise looked up or appended; then `vocab_extra_ids` sentinels
    <extra_id_0> ... . `eod` is the <EOD> id, as in Megatron (GPTSentencePieceTokenizer and
    Llama2Tokenizer below use the model's eos instead).

    Special tokens written literally in the text map to their ids (as in Megatron) unless the
    model already encodes them itself (user-defined symbols), which keeps the surrounding
    pieces exactly what the model produces. `detokenize` inverts `tokenize` exactly for models
    trained by `train_sentencepiece` (Megatron's adds spaces around special tokens; this does not).
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        import sentencepiece

        require_file(model_file, "SentencePiece model", "--tokenizer-model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as error:
            reason = (str(error).strip().splitlines() or ["unreadable"])[0]
            raise DataError(f"{model_file}: not a SentencePiece model ({reason}); check --tokenizer-model") from None
        self.model_file = model_file
        self.num_threads = -1  # of tokenize_batch: -1 = SentencePiece's own choice (one per CPU)
        sp = self._sp
        size = sp.get_piece_size()
        self._vocab = {sp.id_to_piece(i): i for i in range(size)}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}
        self._split: dict[str, int] = {}  # special tokens the model does not encode itself -> id

        def add(token: str) -> int:
            if token not in self._vocab:
                index = len(self._vocab)
                self._vocab[token], self._inv_vocab[index] = index, token
            index = self._vocab[token]
            if index >= size or index not in sp.encode(token):  # the model does not match it in text
                self._split[token] = index
            return index

        self.cls, self.sep, self.eod, self.mask = (add(t) for t in SP_SPECIAL_TOKENS)
        self.pad = add(_model_piece(sp, sp.pad_id(), "<PAD>"))
        self.bos = add(_model_piece(sp, sp.bos_id(), "<BOS>"))
        self.eos = add(_model_piece(sp, sp.eos_id(), "<EOS>"))
        self._sentinels = [add(sentinel(i)) for i in range(vocab_extra_ids)]
        # Longest first, so a token that contains another wins.
        tokens = sorted(self._split, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        # Ids sp.decode cannot render (appended, control): detokenize writes their text itself.
        self._literal = {i: t for t, i in self._split.items()}

    def tokenize(self, text: str) -> list[int]:
        if self._pattern is None or self._pattern.search(text) is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode(text[start:match.start()]))
            ids.append(self._split[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._pattern is not None and any(self._pattern.search(t) for t in texts):
            return [self.tokenize(t) for t in texts]
        return self._sp.encode(texts, num_threads=self.num_threads) if texts else []

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not any(i in self._literal for i in ids):
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._literal:
                parts.append(self._sp.decode(run) if run else "")
                parts.append(self._literal[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run) if run else "")
        return "".join(parts)


def _model_piece(sp, index: int, fallback: str) -> str:
    """The model's piece for a reserved id (pad/bos/eos), or the fallback when it has none."""
    return sp.id_to_piece(index) if 0 <= index < sp.get_piece_size() else fallback


class GPTSentencePieceTokenizer(_VocabTable):
    """Megatron's GPTSentencePieceTokenizer: the model's pieces alone, nothing appended.

    The vocab is the model's; bos, eos and pad are the model's ids (None where it has none);
    eod is its eos. No cls, sep, mask or sentinels (Megatron reports -1 and None). Text is
    encoded as the model encodes it: a special token written in the text is not its id.
    """

    name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        require_file(model_file, "SentencePiece model", "--tokenizer-model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as error:
            reason = (str(error).strip().splitlines() or ["unreadable"])[0]
            raise DataError(f"{model_file}: not a SentencePiece model ({reason}); check --tokenizer-model") from None
        self.model_file = model_file
        self.num_threads = -1  # of tokenize_batch, as SentencePieceTokenizer's
        sp = self._sp
        self._vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}
        self.bos, self.eos, self.pad = (_model_id(sp, i) for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self.eod = self.eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        return self._sp.encode(texts, num_threads=self.num_threads) if texts else []

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's Llama2Tokenizer: GPTSentencePieceTokenizer whose `tokenize` puts bos first.

    As Megatron's (text completion defaults: bos, no eos), every text tokenized, each sentence
    with `megalith preprocess --split-sentences` included, starts with the model's bos; eod is
    the model's eos. A model without a bos piece is refused (Megatron would write id -1).
    """

    name = "Llama2Tokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self.bos is None:
            raise DataError(f"{model_file}: the SentencePiece model has no bos piece, which Llama2Tokenizer puts "
                            "before every text; use GPTSentencePieceTokenizer or a model trained with bos_id")

    def tokenize(self, text: str) -> list[int]:
        return [self.bos] + self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos] + ids for ids in super().tokenize_batch(texts)]


def _model_id(sp, index: int) -> int | None:
    """A reserved id of the model (bos/eos/pad), None where SentencePiece reports -1 (none)."""
    return int(index) if 0 <= index < sp.get_piece_size() else None
