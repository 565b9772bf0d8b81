"""The packed XE fast path computes the same loss and gradients as the plain padded loop.

Packed teacher forcing (butd.models.packed) sorts caption rows by length, shrinks the batch as captions end and
projects only the real tokens onto the vocabulary; the plain path runs ``model.step`` over every padded position.
With dropout off both must give the same loss, the same gradient for every parameter and the same attention
(which the Show-Attend-Tell regulariser reads), for every registered model.
"""
from __future__ import annotations

import pytest
import torch

from butd.config.defaults import ModelConfig
from butd.data.dataset import Batch
from butd.models import build_model
from butd.models.packed import PackedRows, packed_teacher_forcing
from butd.train.xe import XeObjective, teacher_forcing_pair

VOCAB, FEAT, REGIONS = 15, 12, 6
CASES = {
    "updown": dict(name="updown"),
    "showtell": dict(name="showtell"),  # BatchNorm in the image embedding: train-mode statistics are row-order free
    "showtell-init-state": dict(name="showtell", init_state_from_image=True),
    "showattendtell": dict(name="showattendtell"),
    "showattendtell-dot": dict(name="showattendtell", attention="dot"),
    "updown-geometry": dict(name="updown", box_geometry=True),
}


def batch(num_images: int = 3, seq_per_img: int = 3, max_length: int = 9, seed: int = 0) -> Batch:
    """Captions of different lengths (one of full length, ties included) and an image with padded regions."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(4, VOCAB, (num_images, seq_per_img, max_length), generator=g)
    lengths = torch.tensor([[max_length, 2, 5], [1, 5, 7], [3, 3, 8]])[:num_images, :seq_per_img]
    labels = words.masked_fill(torch.arange(max_length) >= lengths.unsqueeze(-1), 0)
    mask = torch.ones(num_images, REGIONS, dtype=torch.bool)
    mask[1, 4:] = False
    features = torch.randn(num_images, REGIONS, FEAT, generator=g)
    features[1, 4:] = 1e4  # garbage in padded regions must not matter on either path
    return Batch(image_ids=torch.arange(num_images), features=features,
                 boxes=torch.rand(num_images, REGIONS, 4, generator=g) * 50,
                 image_size=torch.full((num_images, 2), 60.0), region_mask=mask, labels=labels)


def loss_and_grads(model: torch.nn.Module, packed: bool, data: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = XeObjective(model, label_smoothing=0.1, packed=packed)(data).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_loss_and_gradients_equal_the_plain_loop(case):
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10,
                                    dropout=0.0, **CASES[case]), VOCAB).train()
    data = batch()
    plain_loss, plain_grads = loss_and_grads(model, False, data)
    packed_loss, packed_grads = loss_and_grads(model, True, data)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == packed_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_attention_equals_the_plain_loop_and_is_zero_after_each_caption():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="showattendtell", feature_dim=FEAT, rnn_size=16, att_hid_size=8,
                                    input_encoding_size=10, dropout=0.0), VOCAB).eval()
    data = batch()
    inputs, targets = teacher_forcing_pair(data.labels.reshape(-1, data.labels.shape[-1]))
    regions = model.encode(data.features, data.region_mask).repeat(3)
    rows = PackedRows.from_lengths((targets != 0).sum(1))
    outputs, attention = packed_teacher_forcing(model, regions, inputs, rows)
    logits, plain_attention = model(regions, inputs)
    real = targets != 0
    assert attention.shape == plain_attention.shape
    torch.testing.assert_close(attention[real], plain_attention[real])
    assert torch.count_nonzero(attention[~real]) == 0
    torch.testing.assert_close(model.word_logits(outputs), rows.pack(logits))


def test_packed_rows_order_and_round_trip():
    rows = PackedRows.from_lengths(torch.tensor([2, 4, 1, 4, 3]))
    assert rows.order.tolist() == [1, 3, 4, 0, 2]  # longest first, ties in their original order
    assert rows.active == [5, 4, 3, 2] and rows.num_tokens == 14
    padded = torch.arange(5 * 6).view(5, 6) + 1
    keep = torch.arange(6) < rows.lengths.unsqueeze(1)
    packed = rows.pack(padded)
    assert packed.tolist()[:5] == [7, 19, 25, 1, 13]  # step 0 of the sorted rows
    assert sorted(packed.tolist()) == sorted(padded[keep].tolist())
    assert torch.equal(rows.unpack(packed, 6), padded.masked_fill(~keep, 0))


def test_packed_rows_rejects_an_empty_row():
    with pytest.raises(ValueError, match="at least one token"):
        PackedRows.from_lengths(torch.tensor([3, 0, 2]))


def decode_everything(model: torch.nn.Module, data: Batch) -> list[torch.Tensor]:
    """What validation, SCST and evaluation run: greedy (eval), sampling with gradients (train), beam search."""
    from butd.decoding import beam_search, greedy_decode, sample

    model.eval()
    with torch.no_grad():
        regions = model.encode(data.features, data.region_mask)
        greedy = greedy_decode(model, regions, max_length=6).tokens
        beams = beam_search(model, regions, beam_size=3, max_length=6).alternatives
    model.train()
    drawn = sample(model, model.encode(data.features, data.region_mask), num_samples=2, max_length=6,
                   generator=torch.Generator().manual_seed(0))
    drawn.token_logprobs.sum().backward()
    return [greedy, beams, drawn.tokens, drawn.token_logprobs.detach()]


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_step_trains_and_decodes_like_the_eager_one(fullgraph):
    """``train.compile``: the torch.compile'd ``advance`` (the cheap aot_eager backend stands in for inductor)
    gives the eager loss and gradients, then the eager captions in every decoder. ``fullgraph=True``: the XE step
    has no graph break; ``fullgraph=False`` (what training uses): every decoder runs after it without error."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10,
                                    dropout=0.0), VOCAB).train()
    data = batch()
    eager_loss, eager_grads = loss_and_grads(model, True, data)
    eager_outputs = decode_everything(model, data) if not fullgraph else None
    model.compile_advance(backend="aot_eager", fullgraph=fullgraph)
    compiled_loss, compiled_grads = loss_and_grads(model, True, data)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)
    if eager_outputs is not None:
        for eager, compiled in zip(eager_outputs, decode_everything(model, data)):
            torch.testing.assert_close(compiled, eager)
    assert "advance" not in "".join(model.state_dict())  # checkpoints do not change
