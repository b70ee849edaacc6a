"""T5 samples: span corruption round trip, sentinel order, noise density, span lengths, lengths."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalith.data import masking
from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalith.data.t5_dataset import T5Dataset

VOCAB, CLS, SEP, MASK, PAD, EOD, BOS, EOS = 295, 288, 289, 290, 291, 292, 293, 294
SENTINELS = list(range(256, 288))
SPECIALS = set(SENTINELS) | {CLS, SEP, MASK, PAD, EOD, BOS, EOS}
SAMPLES = 600
ENCODER, DECODER = 128, 64


def fake_tokenizer(sentinels=SENTINELS):
    """Ordinary ids 0..255, sentinels and the other special tokens above them."""
    return SimpleNamespace(vocab_size=VOCAB, cls=CLS, sep=SEP, mask=MASK, pad=PAD, eod=EOD, bos=BOS, eos=EOS,
                           additional_special_tokens_ids=list(sentinels))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of 5-30 sentences of 5-40 tokens; each ends with EOD, which must never be masked."""
    rng = np.random.default_rng(1)
    prefix = str(tmp_path_factory.mktemp("t5") / "corpus")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(120):
            count = int(rng.integers(5, 30))
            for k in range(count):
                sentence = rng.integers(0, 256, int(rng.integers(5, 40)))
                if k == count - 1:
                    sentence[-1] = EOD
                builder.add_item(sentence)
            builder.end_document()
        builder.finalize()
    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def t5(corpus):
    return T5Dataset(corpus, (0, 120), SAMPLES, ENCODER, DECODER, 1234, fake_tokenizer())


@pytest.fixture(scope="module")
def items(t5):
    return [t5[i] for i in range(SAMPLES)]


def sample_text(dataset, corpus, index):
    first, end, target = (int(x) for x in dataset.sample_mapping[index])
    return np.concatenate([corpus[i] for i in range(first, end)]).astype(np.int64)[:target]


def restore(encoder, target):
    """Put each sentinel's tokens from the target back in place of the sentinel (written independently)."""
    pieces, current = {}, None
    for token in target.tolist():
        if token in SENTINELS:
            current = token
            pieces[current] = []
        else:
            pieces[current].append(token)
    restored = []
    for token in encoder.tolist():
        restored.extend(pieces.pop(token) if token in SENTINELS else [token])
    assert not pieces  # every span was used
    return np.asarray(restored, dtype=np.int64)


def unpack(item):
    ne, nd = int(item["encoder_padding_mask"].sum()), int(item["decoder_padding_mask"].sum())
    return item["encoder_input_ids"][:ne].numpy(), item["labels"][:nd - 1].numpy()


def test_item_format(t5, items):
    assert len(t5) >= SAMPLES
    item = items[0]
    assert set(item) == {"encoder_input_ids", "decoder_input_ids", "labels", "loss_mask",
                         "encoder_padding_mask", "decoder_padding_mask"}
    for key in ("encoder_input_ids", "encoder_padding_mask"):
        assert item[key].shape == (ENCODER,)
    for key in ("decoder_input_ids", "labels", "loss_mask", "decoder_padding_mask"):
        assert item[key].shape == (DECODER,)
    assert item["loss_mask"].dtype == torch.float32
    assert item["encoder_padding_mask"].dtype == item["decoder_padding_mask"].dtype == torch.bool
    assert item["labels"].dtype == item["decoder_input_ids"].dtype == torch.int64


def test_decoder_layout(items):
    for item in items:
        ne, nd = int(item["encoder_padding_mask"].sum()), int(item["decoder_padding_mask"].sum())
        assert item["encoder_padding_mask"][:ne].all() and not item["encoder_padding_mask"][ne:].any()
        assert item["decoder_padding_mask"][:nd].all() and not item["decoder_padding_mask"][nd:].any()
        decoder, labels = item["decoder_input_ids"], item["labels"]
        assert decoder[0] == BOS and torch.equal(decoder[1:nd], labels[:nd - 1])  # [bos] + target[:-1]
        assert labels[nd - 1] == EOS and (labels[nd:] == -1).all() and (decoder[nd:] == PAD).all()
        assert (item["encoder_input_ids"][ne:] == PAD).all()
        assert torch.equal(item["loss_mask"].bool(), item["decoder_padding_mask"])


def test_round_trip_and_sentinel_order(t5, corpus, items):
    for index, item in enumerate(items):
        encoder, target = unpack(item)
        used = [t for t in encoder.tolist() if t in SENTINELS]
        assert used == SENTINELS[:len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in target.tolist() if t in SENTINELS] == used
        assert np.array_equal(restore(encoder, target), sample_text(t5, corpus, index))


def test_noise_density_and_span_length(t5, corpus, items):
    masked_total = text_total = spans_total = 0
    for index, item in enumerate(items):
        encoder, target = unpack(item)
        text = sample_text(t5, corpus, index)
        spans = sum(t in SENTINELS for t in target.tolist())
        masked = len(target) - spans
        target_length = int(t5.sample_mapping[index][2])
        assert masked == math.floor(min(0.15 * target_length, max(1, round(0.15 * len(text)))))
        assert (spans > 0) == (masked > 0)  # short targets (< 7 tokens) get nothing masked, as in Megatron
        assert not np.isin(target, [EOD]).any()  # special tokens stay in the encoder
        masked_total, text_total, spans_total = masked_total + masked, text_total + len(text), spans_total + spans
    density, mean_span = masked_total / text_total, masked_total / spans_total
    assert 0.14 < density <= 0.15  # Megatron's per-sample rounding and cap keep it just under 15%
    # Sizes are drawn with mean 2.95 (geometric, mean 3, clipped at 10); Megatron's procedure
    # realises shorter spans (an n-gram overlapping a chosen span is skipped, long ones more
    # often; the last span shrinks to fit the ~18-token budget): 2.5 here, 2.7 at 512 tokens.
    assert 2.3 < mean_span < 3.0


def test_span_size_draws_have_the_requested_mean():
    rng = np.random.default_rng(0)
    draws = np.array([masking.NgramSampler(10, 1 / 3).draw(rng) for _ in range(20_000)])
    expected = 3 * (1 - (2 / 3) ** 10)  # mean of min(Geometric(1/3), 10)
    # standard deviation ~2.2, so the standard error of 20000 draws is ~0.016; 5 of them
    assert abs(draws.mean() - expected) < 5 * draws.std() / math.sqrt(len(draws))
    assert draws.min() == 1 and draws.max() == 10


def test_tight_decoder_still_fits_and_round_trips(corpus):
    dataset = T5Dataset(corpus, (0, 120), 200, ENCODER, 12, 3, fake_tokenizer())
    for index in range(200):
        item = dataset[index]
        assert item["decoder_padding_mask"].shape == (12,)
        encoder, target = unpack(item)
        assert len(target) + 1 <= 12
        assert np.array_equal(restore(encoder, target), sample_text(dataset, corpus, index))


def test_whole_word_spans(corpus):
    def starts_word(token_id):  # ids divisible by 3 continue the previous word
        return token_id % 3 != 0

    dataset = T5Dataset(corpus, (0, 120), 100, ENCODER, DECODER, 9, fake_tokenizer(), whole_word_masking=True,
                        word_start=starts_word)
    for index in range(100):
        encoder, target = unpack(dataset[index])
        text = sample_text(dataset, corpus, index)
        assert np.array_equal(restore(encoder, target), text)
        position = 0
        for token in encoder.tolist():  # a span starts at a word start and the next token starts a word
            if token in SENTINELS:
                assert starts_word(int(text[position])) or position == 0
                span = target.tolist()[target.tolist().index(token) + 1:]
                span = span[:next((k for k, t in enumerate(span) if t in SENTINELS), len(span))]
                position += len(span)
                assert position == len(text) or starts_word(int(text[position])) or text[position] in SPECIALS
            else:
                position += 1


def test_deterministic_per_index(corpus, items):
    again = T5Dataset(corpus, (0, 120), SAMPLES, ENCODER, DECODER, 1234, fake_tokenizer())
    for index in (SAMPLES - 1, 5, 0):
        for key, value in again[index].items():
            assert torch.equal(value, items[index][key])
    assert not torch.equal(items[0]["encoder_input_ids"], items[1]["encoder_input_ids"])


def test_too_few_sentinels(corpus):
    with pytest.raises(DataError, match="--vocab-extra-ids"):
        T5Dataset(corpus, (0, 120), 10, ENCODER, DECODER, 1, fake_tokenizer(SENTINELS[:3]))
    with pytest.raises(DataError, match="--vocab-extra-ids"):
        T5Dataset(corpus, (0, 120), 10, ENCODER, DECODER, 1, fake_tokenizer([]))
    # up to floor(0.15 * 126) = 18 spans fit, each needing its own sentinel
    T5Dataset(corpus, (0, 120), 10, ENCODER, DECODER, 1, fake_tokenizer(SENTINELS[:18]))
    with pytest.raises(DataError, match="needs up to 18"):
        T5Dataset(corpus, (0, 120), 10, ENCODER, DECODER, 1, fake_tokenizer(SENTINELS[:17]))


def test_bad_inputs(corpus):
    no_bos = fake_tokenizer()
    no_bos.bos = None
    with pytest.raises(DataError, match="no bos token"):
        T5Dataset(corpus, (0, 120), 10, ENCODER, DECODER, 1, no_bos)
    with pytest.raises(DataError, match="decoder_seq_length"):
        T5Dataset(corpus, (0, 120), 10, ENCODER, 2, 1, fake_tokenizer())
    with pytest.raises(DataError, match="document range"):
        T5Dataset(corpus, (5, 5), 10, ENCODER, DECODER, 1, fake_tokenizer())
