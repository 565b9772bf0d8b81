"""decode_images: batching, padding, beam/greedy choice, model mode and missing features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from butd.data.captions import Vocabulary
from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter
from butd.decoding import DecodeOptions, greedy_decode
from butd.errors import DataError
from butd.inference import decode_images
from butd.models import UpDownCaptioner

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "cat", "man", "on", "the", "grass", "bed", "with", "red"]
FEATURE_DIM = 8
IMAGE_IDS = [int(i) for i in np.arange(1, 13) * 11]  # 12 images, ids that are not indices


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """12 images with 2 to 9 regions each, so batches are padded differently depending on their composition."""
    path = tmp_path_factory.mktemp("inference") / "feats.lmdb"
    rng = np.random.default_rng(0)
    with FeatureWriter(path, dtype="float32") as writer:
        for n, image_id in enumerate(IMAGE_IDS):
            k = 2 + (n * 5) % 8
            boxes = np.sort(rng.uniform(0, 60, size=(k, 4)).astype(np.float32), axis=1)
            writer.put(FeatureRecord(image_id=image_id, features=rng.normal(size=(k, FEATURE_DIM)).astype(np.float32),
                                     boxes=boxes, image_w=64, image_h=48))
    return FeatureStore(path)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary(words=WORDS)


@pytest.fixture(scope="module")
def model() -> UpDownCaptioner:
    """A tiny random Up-Down model with sharpened logits (no near-ties that float noise could flip) and a penalised
    <eos> (captions of several words); dropout is on, so results only agree if decoding runs in eval mode."""
    torch.manual_seed(1)
    net = UpDownCaptioner(vocab_size=len(WORDS), feature_dim=FEATURE_DIM, rnn_size=16, att_hid_size=8,
                          input_encoding_size=12, dropout=0.5)
    with torch.no_grad():
        net.logit.weight.mul_(10.0)
        net.logit.bias[2] = -3.0
        net.attention.score.weight.mul_(10.0)
        for param in net.region_embed.parameters():  # captions that depend on the image
            param.mul_(4.0)
    return net


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batch_composition_does_not_change_results(store, vocab, model, beam_size):
    one = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=beam_size, max_length=7), batch_size=1)
    seven = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=beam_size, max_length=7), batch_size=7)
    assert list(one) == list(seven) == IMAGE_IDS
    assert len({r.caption for r in one.values()}) > 1, "images should get different captions"
    for image_id in IMAGE_IDS:
        a, b = one[image_id], seven[image_id]
        assert a.caption == b.caption and a.tokens == b.tokens
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.attention.shape == b.attention.shape == (len(a.tokens), store[image_id].num_boxes)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
        np.testing.assert_array_equal(a.boxes, store[image_id].boxes)
        assert [c for c, _ in a.alternatives] == [c for c, _ in b.alternatives]


def test_greedy_matches_the_decoder_on_one_unpadded_image(store, vocab, model):
    results = decode_images(model, store, IMAGE_IDS[:5], vocab, options=DecodeOptions(beam_size=1, max_length=7), batch_size=5)
    record = store[IMAGE_IDS[3]]
    model.eval()
    with torch.no_grad():
        mask = torch.ones(1, record.num_boxes, dtype=torch.bool)
        regions = model.encode(torch.from_numpy(record.features)[None], mask, torch.from_numpy(record.boxes)[None],
                               torch.tensor([[64.0, 48.0]]))
        direct = greedy_decode(model, regions, max_length=7, suppress_unk=True, decoding_constraint=True,
                               block_trigrams=True)  # DecodeOptions' default rules
    assert results[IMAGE_IDS[3]].caption == vocab.decode(direct.tokens[0].tolist())
    assert results[IMAGE_IDS[3]].alternatives == []


def test_beam_search_reports_every_beam_best_first(store, vocab, model):
    results = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=3, max_length=7), batch_size=4)
    greedy = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=1, max_length=7), batch_size=4)
    for image_id, result in results.items():
        assert len(result.alternatives) == 3
        assert result.alternatives[0] == (result.caption, pytest.approx(result.logprob))
        logprobs = [lp for _, lp in result.alternatives]
        assert logprobs == sorted(logprobs, reverse=True)
        # Beam 3 keeps the greedy path among its candidates, so it never scores worse.
        assert result.logprob >= greedy[image_id].logprob - 1e-5


def test_runs_in_eval_mode_and_restores_training_mode(store, vocab, model):
    model.train()
    first = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=1, max_length=7))
    second = decode_images(model, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=1, max_length=7))
    assert model.training, "the caller's training mode must be restored"
    assert {i: r.caption for i, r in first.items()} == {i: r.caption for i, r in second.items()}
    model.eval()


def test_duplicates_are_decoded_once_and_max_boxes_cuts_regions(store, vocab, model):
    ids = [IMAGE_IDS[2], IMAGE_IDS[0], IMAGE_IDS[2]]
    results = decode_images(model, store, ids, vocab, options=DecodeOptions(beam_size=1, max_length=7), max_boxes=3)
    assert list(results) == [IMAGE_IDS[2], IMAGE_IDS[0]]
    for image_id, result in results.items():
        assert result.boxes.shape[0] == min(3, store[image_id].num_boxes)
        np.testing.assert_array_equal(result.boxes, store[image_id].boxes[:3])


def test_missing_features_are_listed_before_decoding(store, vocab, model):
    missing = [5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    with pytest.raises(DataError) as error:
        decode_images(model, store, [IMAGE_IDS[0], *missing], vocab)
    message = str(error.value)
    assert "12 of 13 images" in message and str(store.path) in message
    assert "5, 6, 7, 8, 9, 10, 12, 13, 14, 15, ... (2 more)" in message
    assert str(IMAGE_IDS[0]) not in message.split(":")[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast decoding needs a CUDA device")
def test_bf16_on_cuda_decodes_every_image(store, vocab, model):
    net = model.to("cuda")
    try:
        results = decode_images(net, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=3, max_length=7), device="cuda",
                                precision="bf16")
        fp32 = decode_images(net, store, IMAGE_IDS, vocab, options=DecodeOptions(beam_size=3, max_length=7), device="auto")
    finally:
        model.to("cpu")
    assert list(results) == IMAGE_IDS
    assert all(r.tokens for r in results.values())
    agree = sum(results[i].caption == fp32[i].caption for i in IMAGE_IDS)
    assert agree >= len(IMAGE_IDS) // 2, "bf16 captions should mostly match fp32 on sharpened logits"
