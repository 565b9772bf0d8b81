"""The three captioners (updown, showtell, showattendtell) behind one registry and one decoding interface.

Every model is checked the same way: teacher forcing equals a loop of ``step``, beam 1 equals greedy, sampling
and SCST work, gradients reach every parameter, padding changes nothing, and the model learns a tiny synthetic
captioning task. Plus the doubly stochastic regulariser on a hand-made attention matrix and the checkpoint
architecture check.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from butd.config.defaults import ModelConfig
from butd.decoding import BOS, EOS, beam_search, greedy_decode, sample, to_results
from butd.errors import ConfigError
from butd.models import (
    MODEL_REGISTRY,
    ShowAttendTellCaptioner,
    ShowTellCaptioner,
    UpDownCaptioner,
    build_model,
    doubly_stochastic_penalty,
    load_state_checked,
)

VOCAB, FEAT, REGIONS = 12, 12, 6
CASES = {
    "updown": dict(name="updown"),
    "showtell": dict(name="showtell"),
    "showtell-init-state": dict(name="showtell", init_state_from_image=True),
    "showattendtell": dict(name="showattendtell"),
    "showattendtell-dot": dict(name="showattendtell", attention="dot"),
}
HAS_ATTENTION = {"updown": True, "showtell": False, "showattendtell": True}


def config(case: str, **overrides) -> ModelConfig:
    base = dict(feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10, dropout=0.0)
    return ModelConfig(**{**base, **CASES[case], **overrides})


def tiny(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(case, **overrides), VOCAB)


def images(num: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num, REGIONS, FEAT, generator=g) * 2
    mask = torch.ones(num, REGIONS, dtype=torch.bool)
    mask[1, 3:] = False  # image 1 has 3 real regions
    return features, mask


def warmed(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode after one training forward, so BatchNorm's running statistics are not the identity."""
    features, mask = images(8, seed=7)
    model.train()
    with torch.no_grad():
        model(model.encode(features, mask), torch.full((8, 2), BOS))
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_build_by_name(case):
    model = tiny(case)
    expected = {"updown": UpDownCaptioner, "showtell": ShowTellCaptioner, "showattendtell": ShowAttendTellCaptioner}
    assert type(model) is expected[CASES[case]["name"]] and model.name == CASES[case]["name"]
    assert ModelConfig().name == "updown"
    assert set(expected) <= set(MODEL_REGISTRY)


def test_unknown_name_and_attention_kind_are_config_errors():
    with pytest.raises(ConfigError, match="'nic'.*showattendtell.*showtell.*updown"):
        build_model(dataclasses.replace(config("updown"), name="nic"), VOCAB)
    with pytest.raises(ConfigError, match="model.attention.*'cosine'"):
        build_model(config("showattendtell", attention="cosine"), VOCAB)


@pytest.mark.parametrize("case", CASES)
def test_teacher_forcing_equals_step_loop_and_image_matters(case):
    model = warmed(tiny(case))
    features, mask = images()
    regions = model.encode(features, mask)
    inputs = torch.randint(3, VOCAB, (4, 5))
    inputs[:, 0] = BOS
    logits, attention = model(regions, inputs)
    assert logits.shape == (4, 5, VOCAB)
    state = model.init_state(regions)
    for t in range(5):
        step_logits, state, weights = model.step(inputs[:, t], state, regions)
        torch.testing.assert_close(logits[:, t], step_logits)
        if HAS_ATTENTION[model.name]:
            torch.testing.assert_close(attention[:, t], weights)
        else:
            assert weights is None
    if HAS_ATTENTION[model.name]:
        assert attention.shape == (4, 5, REGIONS)
        torch.testing.assert_close(attention.sum(-1), torch.ones(4, 5))
        assert torch.all(attention[1, :, 3:] == 0)
    else:
        assert attention is None
    # The image reaches the first word (for showtell through init_state alone).
    other = model.encode(torch.flip(features, dims=[0]), torch.flip(mask, dims=[0]))
    assert not torch.allclose(model(other, inputs[:, :1])[0][0], logits[:, 0][0])


@pytest.mark.parametrize("case", CASES)
def test_padding_changes_nothing(case):
    model = warmed(tiny(case))
    features, mask = images()
    inputs = torch.randint(3, VOCAB, (4, 4))
    logits, _ = model(model.encode(features, mask), inputs)
    garbage = torch.randn(4, 3, FEAT) * 1e4
    padded = torch.cat([features, garbage], 1), torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    logits_padded, _ = model(model.encode(*padded), inputs)
    torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_beam_one_equals_greedy_and_to_results(case):
    model = warmed(tiny(case))
    features, mask = images()
    regions = model.encode(features, mask)
    greedy = greedy_decode(model, regions, max_length=7)
    beam = beam_search(model, regions, beam_size=1, max_length=7)
    assert torch.equal(beam.tokens, greedy.tokens)
    torch.testing.assert_close(beam.logprob, greedy.logprob)
    wide = beam_search(model, regions, beam_size=3, max_length=7)
    assert wide.alternatives.shape[:2] == (4, 3) and torch.all(wide.logprob >= greedy.logprob - 1e-5)
    for output in (greedy, wide):
        assert (output.attention is None) == (not HAS_ATTENTION[model.name])
        results = to_results(output, _Words(), image_ids=[10, 11, 12, 13], boxes=torch.rand(4, REGIONS, 4),
                             region_mask=mask)
        assert results[1].attention.shape == (len(results[1].tokens), 3)
        if output.attention is None:
            assert not np.any(results[1].attention)  # no attention to show: all-zero rows, same shape


@pytest.mark.parametrize("case", CASES)
def test_sampling_shapes_and_scst_step(case):
    from butd.train.scst import ScstObjective

    model = tiny(case)
    features, mask = images()
    regions = model.train().encode(features, mask)
    drawn = sample(model, regions, num_samples=3, max_length=6, generator=torch.Generator().manual_seed(0))
    assert drawn.tokens.shape[0] == 12 and drawn.tokens.shape == drawn.token_logprobs.shape == drawn.mask.shape
    assert drawn.tokens.shape[1] <= 6 and torch.all(drawn.mask[:, 0] == 1)

    def reward(image_ids, tokens):  # favours word 5: a deterministic stand-in for CIDEr-D
        return (tokens == 5).float().sum(dim=1)

    batch = _Batch(image_ids=torch.arange(4), features=features, region_mask=mask)
    for baseline in ("mean", "greedy"):
        model.zero_grad()
        out = ScstObjective(model, reward, num_samples=3, baseline=baseline, max_length=6)(batch)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert model.logit.weight.grad is not None and torch.any(model.logit.weight.grad != 0)
    assert model.training  # the greedy baseline restored training mode


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case):
    model = tiny(case, box_geometry=True).train()
    features, mask = images()
    regions = model.encode(features, mask, torch.rand(4, REGIONS, 4) * 50, torch.full((4, 2), 100.0))
    inputs = torch.randint(3, VOCAB, (4, 5))
    logits, attention = model(regions, inputs)
    token_mask = torch.ones(4, 5)
    loss = logits.logsumexp(-1).sum() + model.regularization_loss(attention, token_mask, regions.mask)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_doubly_stochastic_penalty_by_hand():
    attention = torch.tensor([
        # caption 0: steps 0-1 are real; region 2 is padding (its weights must not count)
        [[0.4, 0.4, 0.2], [0.2, 0.7, 0.1], [0.9, 0.1, 0.0]],
        # caption 1: three real steps, three real regions
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
    ])
    token_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    region_mask = torch.tensor([[True, True, False], [True, True, True]])
    # caption 0: sums over real steps 0.6, 1.1 -> 0.4^2 + 0.1^2 = 0.17; caption 1: 2, 0, 1 -> 1 + 1 + 0 = 2
    expected = (0.17 + 2.0) / 2
    penalty = doubly_stochastic_penalty(attention, token_mask, region_mask)
    assert penalty.shape == () and penalty.item() == pytest.approx(expected)
    sat = ShowAttendTellCaptioner(vocab_size=VOCAB, feature_dim=FEAT, rnn_size=8, att_hid_size=4,
                                  input_encoding_size=4, doubly_stochastic_weight=0.5)
    assert sat.regularization_loss(attention, token_mask, region_mask).item() == pytest.approx(0.5 * expected)
    for case in ("updown", "showtell"):
        assert tiny(case).regularization_loss(attention, token_mask, region_mask).item() == 0.0
    assert tiny("showtell").regularization_loss(None, token_mask, region_mask).item() == 0.0
    with pytest.raises(ValueError, match="token_mask"):
        doubly_stochastic_penalty(attention, token_mask[:, :2], region_mask)


def test_checkpoint_architecture_mismatch_is_named():
    updown, showtell = tiny("updown"), tiny("showtell")
    with pytest.raises(ConfigError, match=r"checkpoint runs/st/best.pt was trained with model.name=showtell, "
                                          r"cannot load into updown"):
        load_state_checked(updown, showtell.state_dict(), source="runs/st/best.pt", checkpoint_model_name="showtell")
    # Same name, other options: the differing parameter names or shapes are listed.
    additive, dot = tiny("showattendtell"), tiny("showattendtell-dot")
    with pytest.raises(ConfigError, match=r"run.pt.*not in a showattendtell model: attention.key.bias"):
        load_state_checked(dot, additive.state_dict(), source="run.pt", checkpoint_model_name="showattendtell")
    with pytest.raises(ConfigError, match=r"a.pt: parameter shapes differ.*: embed.embed.weight \(12, 10\) vs "
                                          r"\(14, 10\), logit.weight \(12, 16\) vs \(14, 16\), logit.bias"):
        load_state_checked(build_model(config("updown"), VOCAB + 2), updown.state_dict(), source="a.pt",
                           checkpoint_model_name="updown")
    fresh = tiny("showtell", seed=5)
    load_state_checked(fresh, showtell.state_dict(), source="ok.pt", checkpoint_model_name="showtell")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), showtell.state_dict().values()))


# --- a tiny synthetic captioning task every model must learn -------------------------------------------------

CLASSES, CAPTION = 4, 4
_g = torch.Generator().manual_seed(123)
PROTOTYPES = torch.randn(CLASSES, FEAT, generator=_g) * 2.0
TARGETS = torch.randint(4, VOCAB, (CLASSES, CAPTION), generator=_g)  # the caption of each class


def synthetic(num: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images whose regions are noise except one, the class prototype; 3 to 6 real regions."""
    classes = torch.randint(0, CLASSES, (num,), generator=g)
    features = torch.randn(num, REGIONS, FEAT, generator=g) * 0.3
    real = torch.randint(3, REGIONS + 1, (num,), generator=g)
    mask = torch.arange(REGIONS).unsqueeze(0) < real.unsqueeze(1)
    where = (torch.rand(num, generator=g) * real).long()
    features[torch.arange(num), where] = PROTOTYPES[classes]
    return features, mask, classes


def xe_loss(model, features, mask, classes) -> tuple[torch.Tensor, torch.Tensor]:
    regions = model.encode(features, mask)
    words = TARGETS[classes]
    inputs = torch.cat([torch.full((len(classes), 1), BOS), words], 1)
    targets = torch.cat([words, torch.full((len(classes), 1), EOS)], 1)
    logits, attention = model(regions, inputs)
    xe = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    return xe, model.regularization_loss(attention, torch.ones_like(targets, dtype=torch.float), regions.mask)


def exact_match(model, features, mask, classes) -> float:
    model.eval()
    tokens = greedy_decode(model, model.encode(features, mask), max_length=CAPTION + 2).tokens
    model.train()
    if tokens.shape[1] < CAPTION + 1:
        return 0.0
    expected = torch.cat([TARGETS[classes], torch.full((len(classes), 1), EOS)], 1)
    return (tokens[:, : CAPTION + 1] == expected).all(dim=1).float().mean().item()


@pytest.mark.parametrize("case", CASES)
def test_each_model_learns_a_tiny_task(case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are fastest on one thread; the machine is shared
    try:
        start = time.perf_counter()
        model = tiny(case, rnn_size=32, att_hid_size=16, input_encoding_size=16).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        g = torch.Generator().manual_seed(0)
        held_out = synthetic(64, torch.Generator().manual_seed(99))
        before = exact_match(model, *held_out)
        with torch.no_grad():
            first, _ = xe_loss(model, *held_out)
        for _ in range(60):  # learnt in < 50 steps; a model that ignores the image never is
            xe, regularizer = xe_loss(model, *synthetic(32, g))
            optimizer.zero_grad()
            (xe + regularizer).backward()  # as the XE step will add it
            optimizer.step()
        model.eval()
        with torch.no_grad():
            last, _ = xe_loss(model, *held_out)
        after = exact_match(model, *held_out)
        assert last.item() < 0.2 * first.item(), (first.item(), last.item())
        assert before < 0.5 and after >= 0.9, (before, after)
        assert time.perf_counter() - start < 60
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class _Batch:
    """The fields of ``butd.data.Batch`` that the SCST step reads."""

    image_ids: torch.Tensor
    features: torch.Tensor
    region_mask: torch.Tensor
    boxes: torch.Tensor | None = None
    image_size: torch.Tensor | None = None


class _Words:
    def decode(self, ids) -> str:
        return " ".join(f"w{i}" for i in ids)
