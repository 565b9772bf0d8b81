"""Up-Down captioner: masking, pooling, geometry, teacher forcing and the model registry."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from butd.errors import ConfigError, DataError
from butd.models import MODEL_REGISTRY, Regions, UpDownCaptioner, build_model, masked_mean

VOCAB, FEAT, RNN = 20, 12, 16


def tiny_model(**kwargs) -> UpDownCaptioner:
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, feature_dim=FEAT, rnn_size=RNN, att_hid_size=8, input_encoding_size=10, dropout=0.0)
    args.update(kwargs)
    return UpDownCaptioner(**args).eval()


def batch(num_images: int = 3, regions: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, regions, FEAT, generator=g)
    mask = torch.ones(num_images, regions, dtype=torch.bool)
    mask[1, 3:] = False  # image 1 has only 3 real regions
    return features, mask


def with_garbage_padding(features, mask, extra: int = 4):
    """The same images with ``extra`` more padded regions full of huge random values."""
    b = features.shape[0]
    garbage = torch.randn(b, extra, features.shape[2]) * 1e4
    return torch.cat([features, garbage], 1), torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], 1)


@dataclass
class FakeModelConfig:
    name: str = "updown"
    feature_dim: int = FEAT
    rnn_size: int = RNN
    att_hid_size: int = 8
    input_encoding_size: int = 10
    embed_features: bool = True
    dropout: float = 0.5
    box_geometry: bool = False


def test_padding_changes_nothing():
    model = tiny_model()
    features, mask = batch()
    inputs = torch.randint(3, VOCAB, (3, 6))
    inputs[:, 0] = 1
    logits, attention = model(model.encode(features, mask), inputs)
    padded_f, padded_m = with_garbage_padding(features, mask)
    logits_p, attention_p = model(model.encode(padded_f, padded_m), inputs)
    torch.testing.assert_close(logits_p, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_p[..., :5], attention, atol=1e-6, rtol=0)
    assert torch.all(attention_p[..., 5:] == 0)


def test_attention_sums_to_one_over_real_regions_and_zero_on_padding():
    model = tiny_model()
    features, mask = batch()
    inputs = torch.full((3, 4), 5)
    _, attention = model(model.encode(features, mask), inputs)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4))
    assert torch.all(attention[1, :, 3:] == 0)
    assert torch.all(attention[1, :, :3] > 0)


def test_mean_pools_real_regions_only():
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([[2.0, 3.0]]))
    model = tiny_model(embed_features=False)
    features, mask = batch()
    regions = model.encode(features, mask)
    torch.testing.assert_close(regions.mean[1], features[1, :3].mean(0))
    torch.testing.assert_close(regions.mean[0], features[0].mean(0))


def test_encode_casts_float16_features_and_checks_dim():
    model = tiny_model()
    features, mask = batch()
    regions = model.encode(features.half(), mask)
    assert regions.features.dtype == torch.float32
    with pytest.raises(DataError, match="expects"):
        model.encode(torch.randn(3, 5, FEAT + 1), mask)


def test_box_geometry_path():
    model = tiny_model(box_geometry=True, embed_features=False)
    features, mask = batch()
    boxes = torch.tensor([10.0, 20.0, 50.0, 100.0]).expand(3, 5, 4)
    size = torch.tensor([[100.0, 200.0]]).expand(3, 2)
    regions = model.encode(features, mask, boxes, size)
    assert regions.features.shape == (3, 5, FEAT + 5)
    assert regions.keys.shape == (3, 5, 8)
    geometry = regions.features[0, 0, FEAT:]
    torch.testing.assert_close(geometry, torch.tensor([0.1, 0.1, 0.5, 0.5, 40 * 80 / 20000]))
    assert torch.all(regions.features[1, 3:] == 0)
    logits, attention = model(regions, torch.ones(3, 2, dtype=torch.long))
    assert logits.shape == (3, 2, VOCAB) and attention.shape == (3, 2, 5)
    with pytest.raises(ConfigError, match="boxes"):
        model.encode(features, mask)


def test_teacher_forcing_equals_manual_step_loop():
    model = tiny_model()
    features, mask = batch()
    regions = model.encode(features, mask)
    inputs = torch.randint(3, VOCAB, (3, 5))
    inputs[:, 0] = 1
    logits, attention = model(regions, inputs)
    assert logits.shape == (3, 5, VOCAB) and attention.shape == (3, 5, 5)
    state = model.init_state(regions)
    assert all(s.shape == (3, RNN) for s in state)
    for t in range(5):
        step_logits, state, weights = model.step(inputs[:, t], state, regions)
        torch.testing.assert_close(logits[:, t], step_logits)
        torch.testing.assert_close(attention[:, t], weights)


def test_regions_repeat_and_index_select():
    model = tiny_model()
    features, mask = batch()
    regions = model.encode(features, mask)
    repeated = regions.repeat(2)
    assert isinstance(repeated, Regions) and repeated.batch_size == 6
    torch.testing.assert_close(repeated.keys[2], regions.keys[1])
    torch.testing.assert_close(repeated.keys[3], regions.keys[1])
    picked = regions.index_select(torch.tensor([2, 0]))
    assert torch.equal(picked.mask, mask[[2, 0]])
    torch.testing.assert_close(picked.mean, regions.mean[[2, 0]])


def test_gradients_reach_every_parameter():
    model = tiny_model(box_geometry=True)
    model.train()
    features, mask = batch()
    boxes = torch.rand(3, 5, 4) * 50
    regions = model.encode(features, mask, boxes, torch.full((3, 2), 100.0))
    logits, _ = model(regions, torch.randint(3, VOCAB, (3, 4)))
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_build_model_by_name_and_defaults():
    assert "updown" in MODEL_REGISTRY
    model = build_model(FakeModelConfig(), VOCAB)
    assert isinstance(model, UpDownCaptioner)
    assert model.logit.out_features == VOCAB and model.rnn_size == RNN
    default = UpDownCaptioner(vocab_size=VOCAB)
    assert default.att_lstm.hidden_size == 1000 and default.attention.key.out_features == 512
    assert default.embed.embed.embedding_dim == 1000 and default.dropout.p == 0.5


def test_build_model_unknown_name_lists_known():
    with pytest.raises(ConfigError, match="'nope'.*updown"):
        build_model(FakeModelConfig(name="nope"), VOCAB)
