"""BERT's WordPiece from a vocab.txt: Megatron's BertWordPieceLowerCase and BertWordPieceCase.

The splitting is Hugging Face tokenizers' (BertNormalizer, BertPreTokenizer, WordPiece), which
reproduces the original BERT FullTokenizer that Megatron uses: text cleaned, CJK characters
split apart, accents stripped only when lower-casing, punctuation split off, then greedy
longest-match-first pieces with '##' continuations, [UNK] for a word it cannot cover or one
over 200 characters.
"""

from __future__ import annotations

from typing import Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.base import _VocabTable, require_file, sentinel

WORDPIECE_PREFIX = "##"
BERT_CLS, BERT_SEP, BERT_PAD, BERT_MASK, BERT_UNK = "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"
BERT_BOS, BERT_EOS = "[BOS]", "[EOS]"  # appended by Megatron for T5 where the vocab lacks them
MAX_WORD_CHARS = 200  # longer words are [UNK] (BERT's WordpieceTokenizer)


def read_wordpiece_vocab(vocab_file: str) -> dict[str, int]:
    """BERT's vocab.txt: one token a line (surrounding whitespace stripped), its id the line number."""
    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                token = line.strip()
                if token in vocab:
                    raise DataError(f"{vocab_file}:{index + 1}: token {token!r} is already on line "
                                    f"{vocab[token] + 1}; a WordPiece vocab lists each token once (--vocab-file)")
                vocab[token] = index
    except UnicodeDecodeError:
        raise DataError(f"{vocab_file}: not UTF-8 text; --vocab-file takes BERT's vocab.txt") from None
    return vocab


class BertWordPieceTokenizer(_VocabTable):
    """Megatron's _BertWordPieceTokenizer: WordPiece pieces of vocab.txt, lower-cased or not.

    cls, sep, pad and mask are the vocab's [CLS] [SEP] [PAD] [MASK] (it must have them, and
    [UNK]); [BOS] and [EOS] are appended after the vocab's tokens where missing (Megatron adds
    them for T5), then `vocab_extra_ids` sentinels <extra_id_0> ... . eod is the eos ([EOS]), as
    in Megatron. As there, special tokens written in the text are split like any other text,
    never read as their ids. `detokenize` joins the pieces with spaces and glues '##'
    continuations, Megatron's decode (lower-casing and punctuation splits are not undone).
    """

    continuing_subword_prefix = WORDPIECE_PREFIX  # for whole-word masking (megalith.data.masking)

    def __init__(self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

        require_file(vocab_file, "BERT WordPiece vocab file", "--vocab-file")
        vocab = read_wordpiece_vocab(vocab_file)
        missing = [t for t in (BERT_CLS, BERT_SEP, BERT_PAD, BERT_MASK, BERT_UNK) if t not in vocab]
        if missing:
            raise DataError(f"{vocab_file}: no {', '.join(missing)} in the vocab; --vocab-file takes a BERT "
                            "WordPiece vocab.txt that has [CLS] [SEP] [PAD] [MASK] [UNK]")
        self.name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        self.lower_case = bool(lower_case)
        self._tok = HFTokenizer(models.WordPiece(dict(vocab), unk_token=BERT_UNK,
                                                 continuing_subword_prefix=WORDPIECE_PREFIX,
                                                 max_input_chars_per_word=MAX_WORD_CHARS))
        self._tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=self.lower_case)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX, cleanup=False)
        self._vocab = vocab
        self._inv_vocab = {i: t for t, i in vocab.items()}
        self.cls, self.sep, self.pad, self.mask = (vocab[t] for t in (BERT_CLS, BERT_SEP, BERT_PAD, BERT_MASK))
        self.bos, self.eos = self._add(BERT_BOS), self._add(BERT_EOS)
        self.eod = self.eos
        self._sentinels = [self._add(sentinel(i)) for i in range(int(vocab_extra_ids))]

    def _add(self, token: str) -> int:
        """The token's id, appending it to the vocab when missing (Megatron's add_token)."""
        if token not in self._vocab:
            index = max(self._inv_vocab) + 1
            self._vocab[token], self._inv_vocab[index] = index, token
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return max(self._inv_vocab) + 1

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        tokens = []
        for i in ids:
            token = self._inv_vocab.get(int(i))
            if token is None:
                raise DataError(f"token id {int(i)} is outside the {self.name} vocab of {self.vocab_size}")
            tokens.append(token)
        return self._decoder.decode(tokens).strip()
