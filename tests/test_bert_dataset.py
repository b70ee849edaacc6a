"""BERT samples: Megatron's sample mapping, masked-LM statistics, sentence order, determinism."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalith.data import masking
from megalith.data.bert_dataset import BertDataset, truncate_pair
from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder

VOCAB, CLS, SEP, MASK, PAD, EOD, BOS, EOS = 295, 288, 289, 290, 291, 292, 293, 294
SENTINELS = list(range(256, 288))
SPECIALS = set(SENTINELS) | {CLS, SEP, MASK, PAD, EOD, BOS, EOS}
SAMPLES = 1500


def fake_tokenizer(sentinels=SENTINELS):
    """Ordinary ids 0..255, sentinels and the other special tokens above them."""
    return SimpleNamespace(vocab_size=VOCAB, cls=CLS, sep=SEP, mask=MASK, pad=PAD, eod=EOD, bos=BOS, eos=EOS,
                           additional_special_tokens_ids=list(sentinels))


def write_corpus(prefix, documents=300, sentences=(2, 9), tokens=(3, 25), seed=0):
    """Documents of random sentences; each ends with EOD and some hold a BOS, which must never be masked."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as builder:
        for _ in range(documents):
            count = int(rng.integers(*sentences))
            for k in range(count):
                sentence = rng.integers(0, 256, int(rng.integers(*tokens)))
                if rng.random() < 0.2:
                    sentence[int(rng.integers(len(sentence)))] = BOS
                if k == count - 1:
                    sentence[-1] = EOD
                builder.add_item(sentence)
            builder.end_document()
        builder.finalize()
    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("bert") / "corpus")


@pytest.fixture(scope="module")
def bert(corpus):
    return BertDataset(corpus, (0, 300), SAMPLES, 64, 1234, fake_tokenizer())


@pytest.fixture(scope="module")
def items(bert):
    return [bert[i] for i in range(SAMPLES)]


def originals(item):
    """The unmasked sequence: labels where masked, the input elsewhere (real tokens only)."""
    real = item["padding_mask"]
    return torch.where(item["loss_mask"].bool(), item["labels"], item["input_ids"])[real].numpy()


def test_item_format(bert, items):
    assert len(bert) >= SAMPLES
    item = items[0]
    assert set(item) == {"input_ids", "token_type_ids", "labels", "loss_mask", "padding_mask", "is_random"}
    for key in ("input_ids", "token_type_ids", "labels", "loss_mask", "padding_mask"):
        assert item[key].shape == (64,)
    assert item["input_ids"].dtype == item["token_type_ids"].dtype == item["labels"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32 and item["padding_mask"].dtype == torch.bool
    assert item["is_random"].shape == () and item["is_random"].dtype == torch.int64


def test_layout_and_token_types(items):
    for item in items:
        n = int(item["padding_mask"].sum())
        assert item["padding_mask"][:n].all() and not item["padding_mask"][n:].any()
        tokens, types = originals(item), item["token_type_ids"].numpy()
        assert tokens[0] == CLS and tokens[-1] == SEP
        seps = np.flatnonzero(tokens == SEP)
        assert len(seps) == 2  # the binary head always has two segments here
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all() and (types[n:] == 0).all()
        assert (item["input_ids"][n:] == PAD).all() and (item["labels"][n:] == -1).all()
        unmasked = ~item["loss_mask"].bool()
        assert (item["labels"][unmasked] == -1).all()


def test_masked_count_follows_megatron_rule_and_is_about_15_percent(bert, items):
    masked_total = real_total = 0
    for index, item in enumerate(items):
        n, masked = int(item["padding_mask"].sum()), int(item["loss_mask"].sum())
        target = int(bert.sample_mapping[index][2])
        assert masked == math.floor(min(0.15 * target, max(1, round(0.15 * n))))
        masked_total, real_total = masked_total + masked, real_total + n
    # The rule rounds per sample and caps at 15% of the target (n - 3 tokens for a full sample):
    # about one token below 15% per full sample of ~60 tokens, so the overall rate is 14-15%.
    assert 0.135 < masked_total / real_total <= 0.15


def test_replacements_80_10_10(items):
    counts = np.zeros(3)
    for item in items:
        at = item["loss_mask"].bool()
        given, original = item["input_ids"][at], item["labels"][at]
        counts += [(given == MASK).sum().item(), ((given != MASK) & (given != original)).sum().item(),
                   (given == original).sum().item()]
    total = counts.sum()
    assert total > 10_000
    # Binomial proportions: standard error sqrt(p(1-p)/total) <= 0.004 here; allow 5 of them.
    # (A random token equal to the original counts as unchanged: 0.1/256 more, well inside.)
    for observed, expected in zip(counts / total, (0.8, 0.1, 0.1)):
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / total)


def test_random_replacements_are_ordinary_tokens(items):
    for item in items:
        at = item["loss_mask"].bool()
        given, original = item["input_ids"][at], item["labels"][at]
        replaced = given[(given != MASK) & (given != original)]
        assert ((replaced >= 0) & (replaced < 256)).all()


def test_special_tokens_never_masked(items):
    for item in items:
        tokens = originals(item)
        at = item["loss_mask"].bool()[:len(tokens)].numpy()
        assert not np.isin(tokens[at], list(SPECIALS)).any()
    assert any((originals(item) == BOS).any() for item in items)  # the corpus does contain specials


def test_sentence_order_label_about_half(items):
    swapped = sum(int(item["is_random"]) for item in items)
    # Binomial(1500, 0.5): standard error 0.013; 5 of them.
    assert abs(swapped / len(items) - 0.5) < 5 * math.sqrt(0.25 / len(items))


def test_swap_puts_the_later_segment_first(corpus):
    # Long sequences, no short ones: nothing is truncated, so A + B is the sample's text exactly.
    dataset = BertDataset(corpus, (0, 300), 200, 512, 7, fake_tokenizer(), short_seq_prob=0.0)
    labels = set()
    for index in range(200):
        item = dataset[index]
        tokens, types = originals(item), item["token_type_ids"].numpy()[:int(item["padding_mask"].sum())]
        a, b = tokens[1:][types[1:] == 0][:-1], tokens[types == 1][:-1]
        first, end, _ = dataset.sample_mapping[index]
        text = np.concatenate([corpus[i] for i in range(first, end)]).astype(np.int64)
        swapped = int(item["is_random"])
        labels.add(swapped)
        assert np.array_equal(np.concatenate([b, a] if swapped else [a, b]), text)
    assert labels == {0, 1}


def test_whole_word_masking_masks_every_piece(corpus):
    def starts_word(token_id):  # ids divisible by 3 continue the previous word (like "##" pieces)
        return token_id % 3 != 0

    dataset = BertDataset(corpus, (0, 300), 400, 64, 5, fake_tokenizer(), whole_word_masking=True,
                          word_start=starts_word)
    multi_piece_masked = 0
    for index in range(400):
        item = dataset[index]
        tokens, at = originals(item), item["loss_mask"].bool().numpy()
        word, words = [], []
        for position, token in enumerate(tokens.tolist()):
            if token in SPECIALS or starts_word(token) or not word:
                if word:
                    words.append(word)
                word = [] if token in SPECIALS else [position]
            else:
                word.append(position)
        words += [word] if word else []
        for word in words:
            assert at[word].all() or not at[word].any(), (index, word)
            multi_piece_masked += len(word) > 1 and at[word].all()
    assert multi_piece_masked > 50
    with pytest.raises(DataError, match="word_start"):  # no predicate and no pieces to derive one from
        BertDataset(corpus, (0, 300), 10, 64, 5, fake_tokenizer(), whole_word_masking=True)

    # A tokenizer with SentencePiece pieces ('▁' starts a word): the same words, found from its vocab.
    with_pieces = fake_tokenizer()
    with_pieces.inv_vocab = {i: ("piece" if i % 3 == 0 else "\u2581piece") for i in range(VOCAB)}
    derived = BertDataset(corpus, (0, 300), 400, 64, 5, with_pieces, whole_word_masking=True)
    for index in (0, 1, 2, 399):
        assert torch.equal(derived[index]["loss_mask"], dataset[index]["loss_mask"])


def test_deterministic_per_index(corpus, bert, items):
    again = BertDataset(corpus, (0, 300), SAMPLES, 64, 1234, fake_tokenizer())
    for index in (SAMPLES - 1, 17, 0):  # any order of access
        for key, value in again[index].items():
            assert torch.equal(value, items[index][key])
    assert not torch.equal(items[0]["input_ids"], items[1]["input_ids"])
    other_seed = BertDataset(corpus, (0, 300), SAMPLES, 64, 99, fake_tokenizer())
    assert any(not torch.equal(other_seed[i]["input_ids"], items[i]["input_ids"]) for i in range(5))


def test_sample_mapping_is_megatron_build_mapping(corpus):
    start, end = 10, 60
    mapping = masking.build_sample_mapping(corpus.document_indices[start:end + 1], corpus.sequence_lengths,
                                           None, 61, 0.1, 3, 2)
    bounds = corpus.document_indices
    # one epoch: the samples cut every (eligible) document of the range into runs of >= 2 sentences
    covered = np.zeros(len(corpus), dtype=int)
    for first, stop, target in mapping:
        assert stop - first >= 2 and 2 <= target <= 61
        document = np.searchsorted(bounds, first, side="right") - 1
        assert start <= document < end and stop <= bounds[document + 1]
        covered[first:stop] += 1
    assert (covered[bounds[start]:bounds[end]] == 1).all() and covered.sum() == bounds[end] - bounds[start]
    targets = mapping[:, 2]
    assert (targets == 61).mean() > 0.8 and (targets < 61).any()  # short_seq_prob 0.1
    more = masking.build_sample_mapping(bounds[start:end + 1], corpus.sequence_lengths, 3 * len(mapping),
                                        61, 0.1, 3, 2)
    assert len(more) >= 3 * len(mapping)  # whole epochs until num_samples


def test_no_binary_head_uses_single_sentence_documents(tmp_path):
    corpus = write_corpus(tmp_path / "single", documents=40, sentences=(1, 2))
    with pytest.raises(DataError, match="--split-sentences"):
        BertDataset(corpus, (0, 40), 10, 64, 1, fake_tokenizer())
    dataset = BertDataset(corpus, (0, 40), 50, 64, 1, fake_tokenizer(), binary_head=False)
    for index in range(50):
        item = dataset[index]
        tokens = originals(item)
        assert tokens[0] == CLS and tokens[-1] == SEP and (tokens == SEP).sum() == 1
        assert int(item["is_random"]) == 0 and not item["token_type_ids"].any()


def test_truncate_pair_trims_the_longer_segment():
    rng = np.random.default_rng(0)
    a, b, truncated = truncate_pair(np.arange(30), np.arange(100, 110), 20, rng)
    assert truncated and len(a) + len(b) == 20 and len(b) == 10
    assert np.array_equal(a, np.arange(a[0], a[0] + len(a)))  # a contiguous piece of A
    a, b, truncated = truncate_pair(np.arange(5), np.arange(5), 20, rng)
    assert not truncated and len(a) == len(b) == 5


def test_bad_inputs(corpus, tmp_path):
    with pytest.raises(DataError, match="document range"):
        BertDataset(corpus, (0, 301), 10, 64, 1, fake_tokenizer())
    no_mask = fake_tokenizer()
    no_mask.mask = None
    with pytest.raises(DataError, match="no mask token"):
        BertDataset(corpus, (0, 300), 10, 64, 1, no_mask)
    with pytest.raises(DataError, match="seq_length"):
        BertDataset(corpus, (0, 300), 10, 4, 1, fake_tokenizer())


def test_mapping_cache(corpus, tmp_path):
    first = BertDataset(corpus, (0, 300), 100, 64, 1, fake_tokenizer(), cache_dir=str(tmp_path), split="train")
    assert any(path.name.endswith("sample_mapping.npy") for path in tmp_path.iterdir())
    second = BertDataset(corpus, (0, 300), 100, 64, 1, fake_tokenizer(), cache_dir=str(tmp_path), split="train")
    assert np.array_equal(first.sample_mapping, second.sample_mapping)
    assert torch.equal(first[3]["input_ids"], second[3]["input_ids"])
