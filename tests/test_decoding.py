"""Greedy decoding, sampling, batched beam search and per-image results."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from butd.decoding import (
    BOS,
    EOS,
    PAD,
    DecodeOutput,
    beam_search,
    greedy_decode,
    next_token_logprobs,
    sample,
    to_results,
)
from butd.decoding.sample import filter_logprobs
from butd.models import Regions, UpDownCaptioner

VOCAB, FEAT = 20, 12


class EndingModel(UpDownCaptioner):
    """The tiny Up-Down model with an <eos> logit that grows with the step, carried in the state
    (so beams reorder it), so that captions end at lengths that differ between images."""

    def init_state(self, regions):
        return super().init_state(regions) + (regions.mean.new_zeros(regions.batch_size),)

    def step(self, tokens, state, regions):
        logits, inner, weights = super().step(tokens, state[:4], regions)
        steps = state[4] + 1
        eos_bonus = nn.functional.one_hot(torch.tensor(EOS), logits.shape[-1]) * (0.3 * steps - 2.0).unsqueeze(1)
        return logits + eos_bonus, inner + (steps,), weights


def tiny_model() -> UpDownCaptioner:
    torch.manual_seed(0)
    model = EndingModel(
        vocab_size=VOCAB, feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10, dropout=0.0
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # larger weights: words depend more on the image and the previous word
    return model


def encoded(model, num_images: int = 4, regions: int = 6):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(num_images, regions, FEAT, generator=g) * 2
    mask = torch.ones(num_images, regions, dtype=torch.bool)
    for b in range(num_images):
        mask[b, regions - b :] = False  # image b has regions - b real regions
    return model.encode(features, mask), features, mask


def caption_length(row: list[int]) -> int:
    """Emitted tokens: words plus <eos> if present."""
    return row.index(EOS) + 1 if EOS in row else len([t for t in row if t != PAD])


def rescore(model, regions: Regions, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of next_token_logprobs of each row's tokens up to and including <eos>, by teacher forcing."""
    inputs = torch.cat([torch.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], 1)
    logits, _ = model(regions, inputs)
    logprobs = next_token_logprobs(logits).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([caption_length(r) for r in tokens.tolist()])
    keep = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(keep, logprobs, torch.zeros_like(logprobs)).sum(1)


def padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return nn.functional.pad(tokens, (0, length - tokens.shape[-1]), value=PAD)


class TableModel(nn.Module):
    """A fake captioner whose next-token logits depend only on the previous token: ``table[prev]``."""

    def __init__(self, transitions: dict[int, dict[int, float]], vocab: int = 10, default: float = -30.0) -> None:
        super().__init__()
        self.table = torch.full((vocab, vocab), default)
        for prev, row in transitions.items():
            for nxt, logit in row.items():
                self.table[prev, nxt] = logit

    def init_state(self, regions):
        return (regions.mean.new_zeros(regions.batch_size, 1),)

    def step(self, tokens, state, regions):
        weights = regions.mask.float() / regions.mask.float().sum(1, keepdim=True)
        return self.table[tokens], state, weights


def cycle_model() -> TableModel:
    """BOS->4->5->6->4..., with 7 as a clearly worse second choice and <eos> very unlikely."""
    second = {7: 0.0}
    return TableModel(
        {BOS: {4: 3.0, **second}, 4: {5: 3.0, **second}, 5: {6: 3.0, **second}, 6: {4: 3.0, **second},
         7: {4: 3.0, **second}},
        default=-3.0,
    )


def fake_regions(batch: int, regions: int = 3) -> Regions:
    return Regions(
        features=torch.zeros(batch, regions, 1),
        mean=torch.zeros(batch, 1),
        keys=torch.zeros(batch, regions, 1),
        mask=torch.ones(batch, regions, dtype=torch.bool),
    )


def trigrams(row: list[int]) -> list[tuple[int, ...]]:
    words = row[: caption_length(row)]
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


def test_greedy_shapes_early_stop_and_logprob():
    model = tiny_model()
    regions, _, mask = encoded(model)
    out = greedy_decode(model, regions, max_length=16)
    batch, steps = out.tokens.shape
    assert batch == 4 and steps <= 16 and out.attention.shape == (4, steps, 6)
    rows = out.tokens.tolist()
    assert any(EOS in r for r in rows)
    for r in rows:
        if EOS in r:
            assert all(t == PAD for t in r[r.index(EOS) + 1 :])
        assert BOS not in r
    assert len({caption_length(r) for r in rows}) > 1
    # Decoding stops as soon as every row has ended.
    first = greedy_decode(model, regions.index_select(torch.tensor([0])), max_length=16)
    assert first.tokens.shape[1] == caption_length(rows[0]) < 16
    assert first.tokens[0].tolist() == rows[0][: first.tokens.shape[1]]
    torch.testing.assert_close(out.logprob, rescore(model, regions, out.tokens))
    assert torch.all(out.attention[~mask.unsqueeze(1).expand_as(out.attention)] == 0)


def test_beam_size_one_equals_greedy():
    model = tiny_model()
    regions, _, _ = encoded(model)
    greedy = greedy_decode(model, regions, max_length=12)
    beam = beam_search(model, regions, beam_size=1, max_length=12)
    assert torch.equal(beam.tokens, greedy.tokens)
    assert torch.equal(beam.logprob, greedy.logprob)
    torch.testing.assert_close(beam.attention, greedy.attention)


@pytest.mark.parametrize("block", [False, True])
def test_batched_beam_search_equals_one_image_at_a_time(block):
    model = tiny_model()
    regions, features, mask = encoded(model)
    together = beam_search(model, regions, beam_size=3, max_length=14, block_trigrams=block)
    for b in range(4):
        real = int(mask[b].sum())
        alone_regions = model.encode(features[b : b + 1, :real], mask[b : b + 1, :real])
        alone = beam_search(model, alone_regions, beam_size=3, max_length=14, block_trigrams=block)
        length = together.alternatives.shape[-1]
        assert torch.equal(padded(alone.alternatives[0], length), together.alternatives[b])
        torch.testing.assert_close(alone.alternative_logprobs[0], together.alternative_logprobs[b])
        torch.testing.assert_close(padded(alone.attention[0].T, length).T[:, :real], together.attention[b, :, :real])


def test_beams_sorted_distinct_and_scores_match_teacher_forcing():
    model = tiny_model()
    regions, _, _ = encoded(model)
    out = beam_search(model, regions, beam_size=4, max_length=10)
    assert out.alternatives.shape[:2] == (4, 4) and out.alternative_logprobs.shape == (4, 4)
    scores = out.alternative_logprobs
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert torch.equal(out.tokens, out.alternatives[:, 0]) and torch.equal(out.logprob, scores[:, 0])
    for b in range(4):
        beams = [tuple(r) for r in out.alternatives[b].tolist()]
        assert len(set(beams)) == 4
        rescored = rescore(model, regions.index_select(torch.tensor([b] * 4)), out.alternatives[b])
        torch.testing.assert_close(rescored, scores[b])
    # Beam search finds a sequence at least as probable as greedy's.
    greedy = greedy_decode(model, regions, max_length=10)
    assert torch.all(out.logprob >= greedy.logprob - 1e-5)


def test_length_penalty_orders_by_normalised_score():
    model = tiny_model()
    regions, _, _ = encoded(model)
    alpha = 1.0
    out = beam_search(model, regions, beam_size=4, max_length=10, length_penalty=alpha)
    lengths = torch.tensor([[caption_length(r) for r in img] for img in out.alternatives.tolist()])
    normalised = out.alternative_logprobs / lengths.float().pow(alpha)
    assert torch.all(normalised[:, :-1] >= normalised[:, 1:] - 1e-6)


def test_length_penalty_can_prefer_the_longer_caption():
    # "<eos>" at once: log 0.6 (length 1); "4 5 <eos>": log 0.4 (length 3).
    model = TableModel({BOS: {EOS: math.log(0.6), 4: math.log(0.4)}, 4: {5: 0.0}, 5: {EOS: 0.0}})
    plain = beam_search(model, fake_regions(1), beam_size=2, max_length=5, min_length=0)
    assert plain.tokens[0].tolist()[:1] == [EOS]
    normalised = beam_search(model, fake_regions(1), beam_size=2, max_length=5, length_penalty=1.0, min_length=0)
    assert normalised.tokens[0].tolist() == [4, 5, EOS]
    torch.testing.assert_close(normalised.alternative_logprobs[0], torch.tensor([math.log(0.4), math.log(0.6)]))


class TimedTableModel(TableModel):
    """A TableModel whose logit of ``drift_token`` grows by ``drift`` per step (the step count is carried in the
    state, so beams reorder it). The drift makes the same detour cost differently at different steps, so no two
    different captions have equal scores: beam search then has no float ties to break."""

    def __init__(self, transitions, *, drift_token: int, drift: float, **kw) -> None:
        super().__init__(transitions, **kw)
        self.drift = nn.functional.one_hot(torch.tensor(drift_token), self.table.shape[1]).float() * drift

    def step(self, tokens, state, regions):
        logits, _, weights = super().step(tokens, state, regions)
        steps = state[0]  # [rows, 1]: steps taken so far
        return logits + steps * self.drift, (steps + 1,), weights


def repeating_model() -> TimedTableModel:
    """BOS->4->5->6->4... is clearly the best path; 7 (cheaper at later steps) and 8 are detours; <eos> never wins.

    Worked out in float64 for beam size 2 and 9 steps: at every step the two survivors and the best rejected
    candidate are >= 0.3 apart in summed log-prob, with and without trigram blocking (no ties to break).
    """
    return TimedTableModel(
        {BOS: {4: 4.0, 7: 1.0}, 4: {5: 4.0, 8: 1.5}, 5: {6: 4.0, 7: 2.0, 8: 0.8}, 6: {4: 4.0, 7: 0.5},
         7: {4: 3.0, 8: 2.2}, 8: {4: 2.6, 5: 1.3}},
        drift_token=7, drift=0.15, default=-4.0,
    )


def test_trigram_blocking_blocks_repeats():
    model = repeating_model()
    plain = beam_search(model, fake_regions(2), beam_size=2, max_length=9)
    assert plain.tokens[0].tolist() == [4, 5, 6, 4, 5, 6, 4, 5, 6]  # unblocked, the repeat is clearly the best
    assert plain.alternatives[0, 1].tolist() == [4, 5, 6, 4, 5, 6, 4, 5, 7]
    assert (plain.alternative_logprobs[:, 0] - plain.alternative_logprobs[:, 1] > 0.5).all()  # no tie

    blocked = beam_search(model, fake_regions(2), beam_size=2, max_length=9, block_trigrams=True)
    for row in blocked.alternatives.reshape(-1, blocked.alternatives.shape[-1]).tolist():
        grams = trigrams(row)
        assert len(grams) == len(set(grams)), row
    # Blocking changes the answer: after "4 5" the next word may be neither 6 (4 5 6 was said) nor, the second
    # time, 7 (4 5 7 was said); the beams take the next best word instead.
    assert blocked.tokens[0].tolist() == [4, 5, 6, 4, 5, 7, 4, 5, 8]
    assert blocked.alternatives[0, 1].tolist() == [4, 5, 7, 4, 5, 6, 4, 5, 8]
    assert (blocked.alternative_logprobs[:, 0] - blocked.alternative_logprobs[:, 1] > 0.4).all()  # no tie
    assert torch.equal(blocked.alternatives[0], blocked.alternatives[1])  # images of a batch decode alike
    torch.testing.assert_close(blocked.alternative_logprobs, scores_of(model, blocked.alternatives))
    # Beams that never emit <eos> are kept, at full length, without <eos>.
    assert blocked.alternatives.shape[-1] == 9 and not torch.any(blocked.alternatives == EOS)


def scores_of(model: TimedTableModel, captions: torch.Tensor) -> torch.Tensor:
    """[B, K, T] captions -> [B, K] summed log-probs under ``model``, step by step (independent of beam search)."""
    rows = captions.reshape(-1, captions.shape[-1])
    prev, state = torch.full((rows.shape[0],), BOS), model.init_state(fake_regions(rows.shape[0]))
    total = torch.zeros(rows.shape[0])
    for t in range(rows.shape[1]):
        logits, state, _ = model.step(prev, state, fake_regions(rows.shape[0]))
        total += next_token_logprobs(logits).gather(1, rows[:, t : t + 1]).squeeze(1)
        prev = rows[:, t]
    return total.view(captions.shape[:2])


def test_sample_shapes_mask_and_logprobs():
    model = tiny_model()
    regions, _, _ = encoded(model)
    out = sample(model, regions, num_samples=3, max_length=12, generator=torch.Generator().manual_seed(0))
    rows, steps = out.tokens.shape
    assert rows == 12 and steps <= 12 and out.token_logprobs.shape == out.mask.shape == (12, steps)
    for tokens, mask in zip(out.tokens.tolist(), out.mask.tolist()):
        length = caption_length(tokens)
        assert mask == [1.0] * length + [0.0] * (steps - length)
        assert BOS not in tokens and PAD not in tokens[:length]
    assert torch.all(out.token_logprobs[out.mask == 0] == 0)
    # Row i*n + j is a sample of image i: its log-probs are those of image i's distribution.
    expected = rescore(model, regions.repeat(3), out.tokens)
    torch.testing.assert_close((out.token_logprobs * out.mask).sum(1), expected)


def test_sample_top_k_one_equals_greedy():
    model = tiny_model()
    regions, _, _ = encoded(model)
    greedy = greedy_decode(model, regions, max_length=12)
    out = sample(model, regions, num_samples=2, max_length=12, top_k=1)
    assert torch.equal(out.tokens, greedy.tokens.repeat_interleave(2, 0))
    cold = sample(model, regions, num_samples=1, max_length=12, temperature=1e-4)
    assert torch.equal(cold.tokens, greedy.tokens)


def test_sample_reproducible_with_seeded_generator():
    model = tiny_model()
    regions, _, _ = encoded(model)
    first = sample(model, regions, num_samples=4, generator=torch.Generator().manual_seed(7))
    again = sample(model, regions, num_samples=4, generator=torch.Generator().manual_seed(7))
    other = sample(model, regions, num_samples=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(padded(first.tokens, 16), padded(other.tokens, 16))


def test_sample_draws_from_the_model_distribution():
    model = cycle_model()
    out = sample(model, fake_regions(1), num_samples=20000, max_length=1, generator=torch.Generator().manual_seed(1))
    probs = next_token_logprobs(model.table[BOS : BOS + 1]).exp()[0]
    counts = torch.bincount(out.tokens[:, 0], minlength=probs.numel()).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_sample_gradients_reach_the_model():
    model = tiny_model()
    model.train()
    regions, _, _ = encoded(model)
    out = sample(model, regions, num_samples=2, max_length=8)
    assert out.token_logprobs.requires_grad
    (-(out.token_logprobs * out.mask).sum()).backward()
    for name in ["logit.weight", "lang_lstm.weight_ih", "att_lstm.weight_hh", "attention.key.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.any(grad != 0), name


def test_filter_logprobs_top_p_and_temperature():
    logprobs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    nucleus = filter_logprobs(logprobs, temperature=1.0, top_k=0, top_p=0.7).exp()
    torch.testing.assert_close(nucleus, torch.tensor([[0.625, 0.375, 0.0]]))
    top2 = filter_logprobs(logprobs, temperature=1.0, top_k=2, top_p=1.0).exp()
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0]]))
    hot = filter_logprobs(logprobs, temperature=2.0, top_k=0, top_p=1.0).exp()
    expected = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    torch.testing.assert_close(hot, (expected / expected.sum()).unsqueeze(0))


class FakeVocab:
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


def test_to_results_cuts_to_words_and_real_regions():
    tokens = torch.tensor([[4, 5, EOS, PAD], [6, 7, 8, 9]])
    attention = torch.rand(2, 4, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    boxes = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    output = DecodeOutput(
        tokens=tokens,
        logprob=torch.tensor([-1.5, -3.0]),
        attention=attention,
        alternatives=torch.stack([tokens, tokens.flip(0)], 1),
        alternative_logprobs=torch.tensor([[-1.5, -2.0], [-3.0, -4.0]]),
    )
    results = to_results(output, FakeVocab(), image_ids=torch.tensor([42, 7]), boxes=boxes, region_mask=mask)
    first, second = results
    assert (first.image_id, first.caption, first.tokens) == (42, "w4 w5", [4, 5])
    assert math.isclose(first.logprob, -1.5)
    np.testing.assert_allclose(first.attention, attention[0, :2, :2].numpy())
    np.testing.assert_array_equal(first.boxes, boxes[0, :2].numpy())
    assert first.alternatives == [("w4 w5", -1.5), ("w6 w7 w8 w9", -2.0)]
    assert second.caption == "w6 w7 w8 w9" and second.attention.shape == (4, 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        to_results(output, FakeVocab(), image_ids=[1], boxes=boxes, region_mask=mask)


def test_min_length_forbids_the_empty_caption_but_keeps_model_logprobs():
    # The model prefers "<eos>" at once (0.6); with the default min_length=1 decoders emit "4 5 <eos>".
    model = TableModel({BOS: {EOS: math.log(0.6), 4: math.log(0.4)}, 4: {5: 0.0}, 5: {EOS: 0.0}})
    for out in (greedy_decode(model, fake_regions(1), max_length=5),
                beam_search(model, fake_regions(1), beam_size=2, max_length=5)):
        assert out.tokens[0].tolist()[:3] == [4, 5, EOS]
        torch.testing.assert_close(out.logprob, torch.tensor([math.log(0.4)]))
    assert greedy_decode(model, fake_regions(1), max_length=5, min_length=0).tokens[0].tolist() == [EOS]


@pytest.mark.parametrize("check_every", [1, 3, 4, 16])
def test_checking_for_the_end_less_often_changes_no_output(monkeypatch, check_every):
    """Decoders ask "has every row ended?" only every STOP_CHECK_EVERY steps (a host sync each); the extra steps
    they decode are all <pad> and are trimmed, so every output equals the check-every-step one."""
    import butd.decoding.common as common

    model = tiny_model()
    regions, _, _ = encoded(model)

    def decode():
        return (greedy_decode(model, regions, max_length=30),
                beam_search(model, regions, beam_size=3, max_length=30),
                sample(model, regions, num_samples=2, max_length=30, generator=torch.Generator().manual_seed(5)))

    monkeypatch.setattr(common, "STOP_CHECK_EVERY", 1)
    reference = decode()
    monkeypatch.setattr(common, "STOP_CHECK_EVERY", check_every)
    for expected, got in zip(reference, decode()):
        for field in ("tokens", "logprob", "attention", "alternatives", "alternative_logprobs", "token_logprobs",
                      "mask"):
            want, have = getattr(expected, field, None), getattr(got, field, None)
            if want is None:  # greedy has no alternatives, a sample no single logprob
                assert have is None, field
            else:
                assert want.shape == have.shape and torch.equal(want, have), field
    assert reference[0].tokens.shape[1] < 30  # the captions end early, so there were steps to trim
