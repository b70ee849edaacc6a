"""The data and tokenizer section, with Megatron's flags and meanings."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_int, check_range
from megalith.data.tokenizers import TOKENIZER_TYPES
from megalith.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from (group "data and tokenizer"); Megatron's flags and meanings."""

    data_path: tuple[str, ...] | None = flag_field(
        None, "indexed datasets (PREFIX of PREFIX.bin/.idx), optionally weighted: [W1] PREFIX1 [W2 PREFIX2 ...]")
    split: str = flag_field("969,30,1", "train,valid,test proportions of each dataset's documents")
    train_data_path: tuple[str, ...] | None = flag_field(None, "datasets of the training split only (instead of "
                                                         "--data-path and --split), weighted like --data-path")
    valid_data_path: tuple[str, ...] | None = flag_field(None, "datasets of the validation split only")
    test_data_path: tuple[str, ...] | None = flag_field(None, "datasets of the test split only")
    data_args_path: str | None = flag_field(None, "a file whose whitespace-separated words are the --data-path "
                                            "value (long blends)")
    mmap_bin_files: bool = flag_field(True, "memory-map the .bin files (--no-mmap-bin-files: read them with file "
                                      "reads)")
    data_cache_path: str | None = flag_field(
        None, "where the sample indices are cached (None: a cache folder beside each dataset)")
    mock_data: bool = flag_field(False, "train on synthetic batches from the model's registry entry")
    tokenizer_type: str | None = flag_field(None, "tokenizer of the datasets (needed with --data-path; with only "
                                            "--vocab-file: GPT2BPETokenizer, BERT/T5: BertWordPieceLowerCase)",
                                            TOKENIZER_TYPES)
    tokenizer_model: str | None = flag_field(None, "SentencePiece .model file, or a local HuggingFace tokenizer.json "
                                            "or its directory")
    vocab_file: str | None = flag_field(None, "GPT-2 BPE vocab.json, or BERT WordPiece vocab.txt")
    merge_file: str | None = flag_field(None, "GPT-2 BPE merges.txt")
    vocab_extra_ids: int = flag_field(0, "T5 sentinel tokens added to the vocabulary")
    eod_mask_loss: bool = flag_field(False, "no loss on the end-of-document token's position")
    reset_position_ids: bool = flag_field(False, "positions restart after each end-of-document token")
    reset_attention_mask: bool = flag_field(False, "no attention across end-of-document tokens")
    mask_prob: float = flag_field(0.15, "BERT, T5: share of a sample's tokens masked (BERT) or corrupted in spans (T5)")
    short_seq_prob: float = flag_field(0.1, "BERT, T5: probability that a sample is cut to a random shorter length")

    def __post_init__(self) -> None:
        check_choices(self)
        check_int("vocab_extra_ids", self.vocab_extra_ids, 0)
        check_range("mask_prob", self.mask_prob, 0.0, 1.0, open_low=True)
        check_range("short_seq_prob", self.short_seq_prob, 0.0, 1.0, open_high=False)
        per_split = any((self.train_data_path, self.valid_data_path, self.test_data_path))
        if self.data_path and per_split:
            raise ConfigError("--data-path and --train/--valid/--test-data-path are both given; give one (--data-path "
                              "is divided by --split, the per-split paths are each wholly their split's)")
        if per_split and not self.train_data_path:
            raise ConfigError("--valid-data-path / --test-data-path need --train-data-path (the training datasets)")
        if self.mock_data and self.reads_datasets:
            raise ConfigError("--mock-data and --data-path are both given; drop one (mock data is synthetic, "
                              "--data-path reads datasets)")
        if not self.mock_data and not self.reads_datasets:
            raise ConfigError("no training data: give --data-path PREFIX (a .bin/.idx pair from megalith preprocess, "
                              "with --tokenizer-type) or --mock-data for synthetic batches")
        if self.reads_datasets and self.tokenizer_type is None:
            raise ConfigError("--data-path needs --tokenizer-type (and its files, e.g. --tokenizer-model) to know the "
                              "vocabulary and the end-of-document token")

    @property
    def reads_datasets(self) -> bool:
        """Whether the run reads .bin/.idx datasets (--data-path or --train-data-path), not mock data."""
        return bool(self.data_path or self.train_data_path)


def read_data_args(path: str) -> tuple[str, ...]:
    """--data-args-path: the --data-path words kept in a file (whitespace-separated), as Megatron reads it."""
    try:
        with open(path, encoding="utf-8") as words:
            found = tuple(words.read().split())
    except OSError as error:
        raise ConfigError(f"--data-args-path {path}: {error.strerror or error}; give a file holding the --data-path "
                          "words") from None
    if not found:
        raise ConfigError(f"--data-args-path {path} is empty; it should hold the --data-path words ([W1] PREFIX1 ...)")
    return found
