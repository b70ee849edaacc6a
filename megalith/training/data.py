"""The batches `megalith pretrain` trains on: synthetic (`--mock-data`) or read from indexed datasets.

The model's registry entry says which samples it reads (`ModelSpec.dataset`): GPT windows of
documents (GPTDataset), BERT masked sentence pairs (BertDataset) or T5 span-corrupted samples
(T5Dataset), each built per --data-path prefix and split, then blended by one builder
(megalith.data.blended.build_blended_datasets).

Either way one global batch is the same list of samples whatever the layout: iteration i of a
split is samples [i x global batch, (i + 1) x global batch) of that split's (blended, shuffled)
dataset, dp rank r reads only rows [r x b/dp, (r + 1) x b/dp) of it, and micro-batches are
consecutive slices of those rows (megalith.training.batch.BatchPlan). So resuming from a
consumed-samples count gives exactly the batches an uninterrupted run would have.

The datasets' sample indices are built by global rank 0 first (and cached beside the data or
under --data-cache-path), then by every other rank, which reads the cache: the same files
whatever the number of ranks, and no rank reads a half-written index.
"""

from __future__ import annotations

import torch

from megalith.data import bert_dataset, t5_dataset
from megalith.data.bert_dataset import BertDataset
from megalith.data.blended import build_blended_datasets, parse_data_path
from megalith.data.errors import DataError
from megalith.data.gpt_dataset import GPTDataset
from megalith.data.indexed import IndexedDataset
from megalith.data.masking import word_start_from_tokenizer, word_start_table
from megalith.data.sampler import collate, cyclic_sample, local_batch_indices
from megalith.data.t5_dataset import T5Dataset
from megalith.data.tokenizers import Tokenizer, build_tokenizer
from megalith.errors import ConfigError
from megalith.models.registry import get_model_spec
from megalith.parallel.comm import max_over_job
from megalith.training.batch import BatchPlan

TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")


def tokenizer_from_flags(data, vocab_size: int | None) -> Tokenizer:
    """The tokenizer that `--tokenizer-type` and its file flags describe (`vocab_size`: NullTokenizer's)."""
    return build_tokenizer(data.tokenizer_type, tokenizer_model=data.tokenizer_model, vocab_file=data.vocab_file,
                           merge_file=data.merge_file, vocab_size=vocab_size, vocab_extra_ids=data.vocab_extra_ids)


def run_tokenizer(config) -> Tokenizer:
    """The tokenizer of a resolved run (whose model vocabulary already includes NullTokenizer's eod)."""
    null = config.data.tokenizer_type == "NullTokenizer"
    return tokenizer_from_flags(config.data, config.model.vocab_size - 1 if null else None)


def check_datasets(data) -> None:
    """Open every dataset of --data-path (or the per-split paths) once, header and sizes checked: a
    bad path or a corrupt file is one line before any process group starts."""
    for paths in filter(None, split_paths(data)):
        for _, prefix in parse_data_path(paths):
            IndexedDataset(prefix, mmap=data.mmap_bin_files)


def model_vocab_size(data, given_vocab_size: int, explicit: bool) -> int:
    """The model's vocabulary for a run that reads datasets: the tokenizer's, as in Megatron.
    NullTokenizer reads --vocab-size (and adds its end-of-document id)."""
    if data.tokenizer_type == "NullTokenizer":
        return tokenizer_from_flags(data, given_vocab_size).vocab_size
    size = tokenizer_from_flags(data, None).vocab_size
    if explicit and given_vocab_size != size:
        raise ConfigError(f"--vocab-size {given_vocab_size} contradicts the {data.tokenizer_type}'s {size} tokens; "
                          "drop --vocab-size (the tokenizer sets the vocabulary)")
    return size


DATASET_KINDS = ("gpt", "bert", "t5")

# Megatron's fixed masking choices (pretrain_bert.py, pretrain_t5.py): BERT spans of up to 3 words;
# T5 spans geometric with p = 0.2 (mean 5 words), at most 10; whole words where the tokenizer tells.
BERT_MAX_NGRAM = 3
T5_MAX_NGRAM, T5_MEAN_SPAN_LENGTH = 10, 5.0


def dataset_kind(config) -> str:
    """The samples `--model` trains on from --data-path: its registry entry's `dataset`."""
    kind = get_model_spec(config.training.model).dataset
    if kind not in DATASET_KINDS:
        raise ConfigError(f"model {config.training.model!r} asks for {kind!r} samples, but --data-path builds "
                          f"{', '.join(DATASET_KINDS)} samples; set its ModelSpec.dataset to one of them or "
                          "use --mock-data")
    return kind


def decoder_seq_length(model) -> int:
    """T5's decoder length (--decoder-seq-length; the encoder's when not given)."""
    return model.decoder_seq_length or model.seq_length


def check_data_tokenizer(config) -> None:
    """For a resolved run that reads --data-path: a DataError of one line, before any process
    group, when its tokenizer lacks a token the model's samples need (BERT: cls, sep, mask, pad;
    T5: bos, eos, pad and enough --vocab-extra-ids sentinels). The datasets check again when built."""
    if not config.data.reads_datasets:
        return
    kind, model, tokenizer = dataset_kind(config), config.model, run_tokenizer(config)
    if kind == "bert":
        bert_dataset.check_tokenizer(tokenizer)
    elif kind == "t5":
        t5_dataset.check_tokenizer(tokenizer, model.seq_length, decoder_seq_length(model), config.data.mask_prob)


def _word_starts(tokenizer: Tokenizer):
    """Megatron masks whole words: which ids start one by the tokenizer's pieces ('##', '\u2581' or
    '\u0120' conventions), a table over the vocabulary; None (every token a word) where they do not tell."""
    try:
        return word_start_table(word_start_from_tokenizer(tokenizer), tokenizer.vocab_size)
    except DataError:
        return None


def sample_factory(config, tokenizer: Tokenizer) -> dict:
    """The keyword arguments of build_blended_datasets for the model's samples: `make_part`, the
    class whose name the default cache folder carries, and whether --split divides documents
    (BERT, T5: samples are runs of one document's sentences) or sequences (GPT)."""
    data, model, seed = config.data, config.model, config.training.seed
    kind = dataset_kind(config)
    if kind == "gpt":
        def make_gpt(indexed, document_range, num_samples, split_name, cache_dir):
            return GPTDataset(indexed, document_range, num_samples, model.seq_length, seed, split_name=split_name,
                              cache_dir=cache_dir, eod_id=tokenizer.eod, eod_mask_loss=data.eod_mask_loss,
                              reset_position_ids=data.reset_position_ids,
                              reset_attention_mask=data.reset_attention_mask)
        return dict(make_part=make_gpt, class_name=GPTDataset.__name__, by_documents=False)
    word_start = _word_starts(tokenizer)
    masking = dict(masked_lm_prob=data.mask_prob, short_seq_prob=data.short_seq_prob,
                   whole_word_masking=word_start is not None, word_start=word_start)
    if kind == "bert":
        def make_bert(indexed, document_range, num_samples, split_name, cache_dir):
            return BertDataset(indexed, document_range, num_samples, model.seq_length, seed, tokenizer,
                               binary_head=not model.bert_no_binary_head, masking_max_ngram=BERT_MAX_NGRAM,
                               cache_dir=cache_dir, split=split_name, **masking)
        return dict(make_part=make_bert, class_name=BertDataset.__name__, by_documents=True)

    def make_t5(indexed, document_range, num_samples, split_name, cache_dir):
        return T5Dataset(indexed, document_range, num_samples, model.seq_length, decoder_seq_length(model), seed,
                         tokenizer, mean_span_length=T5_MEAN_SPAN_LENGTH, masking_max_ngram=T5_MAX_NGRAM,
                         cache_dir=cache_dir, split=split_name, **masking)
    return dict(make_part=make_t5, class_name=T5Dataset.__name__, by_documents=True)


class MockBatches:
    """Synthetic global batches from the model's registry entry, the same for every layout."""

    def __init__(self, config, device: torch.device) -> None:
        self.spec = get_model_spec(config.training.model)
        self.model, self.seed, self.device = config.model, config.training.seed, device
        self.size = config.global_batch_size

    def global_batch(self, split: int, index: int) -> dict:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 2 + split)
        return self.spec.make_batch(self.model, self.size, generator)

    def micro_batches(self, plan: BatchPlan, dp_rank: int, split: int, index: int, first_sample: int | None = None):
        """Batch `index` of `split` (mock batches are seeded by their index; first_sample is unused)."""
        return plan.micro_batches(self.global_batch(split, index), dp_rank, self.device)


def samples_per_split(config) -> tuple[int, int, int]:
    """Megatron's request for training and validation: --train-samples (else every iteration's full
    global batch), at least what the run's steps consume (a ramp-up's), and validation batches of the
    full global batch for every evaluation (and the one at the end). 0 for the test split: pretrain
    never evaluates it, so a split too small to hold a test sample is no error."""
    training, gbs = config.training, config.global_batch_size
    evaluations = training.train_iters // training.eval_interval + 1
    train = training.train_samples if training.train_samples is not None else training.train_iters * gbs
    train = max(train, config.batch_schedule().consumed_after(training.train_iters))
    return (train, evaluations * training.eval_iters * gbs, 0)


def split_paths(data) -> list[list[str] | None]:
    """Each split's --data-path words: --data-path for all three (divided by --split), or the
    per-split --train/--valid/--test-data-path (each file wholly that split's, as in Megatron)."""
    if data.data_path:
        return [list(data.data_path)] * len(SPLIT_NAMES)
    return [list(paths) if paths else None for paths in (data.train_data_path, data.valid_data_path,
                                                         data.test_data_path)]


def build_split_datasets(data, num_samples: tuple[int, int, int], samples: dict) -> tuple:
    """(train, valid, test) datasets of `num_samples` samples from --data-path and --split, or from
    the per-split paths (a split without paths, or asked for 0 samples, is None)."""
    if data.data_path:
        return build_blended_datasets(list(data.data_path), data.split, num_samples, cache_dir=data.data_cache_path,
                                      mmap=data.mmap_bin_files, **samples)
    out = []
    for s, paths in enumerate(split_paths(data)):
        if paths is None or num_samples[s] == 0:
            out.append(None)
            continue
        only = ",".join("1" if i == s else "0" for i in range(len(SPLIT_NAMES)))  # the whole file is split s
        wanted = tuple(num_samples[s] if i == s else 0 for i in range(len(SPLIT_NAMES)))
        out.append(build_blended_datasets(paths, only, wanted, cache_dir=data.data_cache_path,
                                          mmap=data.mmap_bin_files, **samples)[s])
    return tuple(out)


class DatasetBatches:
    """Global batches read from `--data-path` datasets; each dp rank reads only its rows."""

    def __init__(self, config, tokenizer: Tokenizer, device: torch.device, state=None) -> None:
        data = config.data
        self.device, self.global_batch_size = device, config.global_batch_size

        samples = sample_factory(config, tokenizer)

        self.cyclic, self.seed = config.training.dataloader_type == "cyclic", config.training.seed

        def build():
            return build_split_datasets(data, samples_per_split(config), samples)

        if state is None or state.grid.world_size == 1:
            self.datasets = build()
            return
        failed = None
        if state.rank == 0:
            try:
                self.datasets = build()
            except Exception as error:  # every rank must hear of it, or they would wait forever
                failed = error
        # rank 0 has written the cached indices (or failed); the others then read them (or stop too)
        someone_failed = max_over_job(1.0 if failed is not None else 0.0, state) > 0
        if failed is not None:
            raise failed
        if someone_failed:
            raise DataError("rank 0 could not build the datasets (its error is above); fix that and restart")
        if state.rank != 0:
            self.datasets = build()

    def micro_batches(self, plan: BatchPlan, dp_rank: int, split: int, index: int, first_sample: int | None = None):
        """`get(i)`: micro-batch i of rank `dp_rank` in batch `index` of `split`, read on demand;
        the batch starts at sample `first_sample` (the consumed samples; default index x batch)."""
        dataset = self.datasets[split]
        if dataset is None:
            raise DataError(f"the {SPLIT_NAMES[split]} split is empty; give it a share in --split "
                            "(e.g. 969,30,1) or set --eval-iters 0")
        first = index * self.global_batch_size if first_sample is None else first_sample
        rows = local_batch_indices(first, plan.global_batch_size,  # this step's (a ramp-up's) batch
                                   plan.data_parallel_size, dp_rank)
        if self.cyclic and split == TRAIN_SPLIT:  # each pass over the dataset in a new order
            rows = [cyclic_sample(position, len(dataset), self.seed) for position in rows]
        elif rows.stop > len(dataset):
            raise DataError(f"the {SPLIT_NAMES[split]} dataset has {len(dataset)} samples; batch {index} needs "
                            f"sample {rows.stop - 1}; it was sized for fewer iterations")
        size = plan.micro_batch_size

        def get(micro: int) -> dict:
            batch = collate([dataset[i] for i in rows[micro * size:(micro + 1) * size]])
            return {key: value.to(self.device) for key, value in batch.items()}

        return get
