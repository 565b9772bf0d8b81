"""Decoding rules: <unk> suppression, no word twice in a row, trigram blocking in greedy decoding; the options that
carry them from the config to every decoder, SCST's sampling and tools/eval.py's metrics.json."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from butd.config import EvalConfig, config_to_dict
from butd.core.tokens import BOS, EOS, PAD, UNK
from butd.decoding import DecodeOptions, beam_search, decode, greedy_decode, sample
from butd.decoding.common import forbidden_tokens, next_token_logprobs
from butd.models import Regions, build_model
from butd.core.checkpoint import save_checkpoint
from butd.train.scst import ScstObjective
from train_fixtures import make_tiny_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 10


class TableModel(nn.Module):
    """A fake captioner whose next-token logits depend only on the previous token: ``table[prev]``."""

    def __init__(self, transitions: dict[int, dict[int, float]], default: float = -20.0) -> None:
        super().__init__()
        self.table = torch.full((VOCAB, VOCAB), default)
        for prev, row in transitions.items():
            for nxt, logit in row.items():
                self.table[prev, nxt] = logit

    def init_state(self, regions):
        return (regions.mean.new_zeros(regions.batch_size, 1),)

    def step(self, tokens, state, regions):
        weights = regions.mask.float() / regions.mask.float().sum(1, keepdim=True)
        return self.table[tokens], state, weights


def regions(batch: int = 2) -> Regions:
    return Regions(features=torch.zeros(batch, 3, 1), mean=torch.zeros(batch, 1), keys=torch.zeros(batch, 3, 1),
                   mask=torch.ones(batch, 3, dtype=torch.bool))


def unk_model() -> TableModel:
    """<unk> is by far the best token after every word: "a <unk> <unk> <unk> ..."; 5 is the clear second best,
    and <eos> becomes likely after 5."""
    rows = {prev: {UNK: 5.0, 5: 2.0, 6: 0.0} for prev in (BOS, UNK, 4, 6)}
    rows[5] = {UNK: 5.0, EOS: 4.0, 6: 1.0}
    return TableModel(rows)


def loop_model() -> TableModel:
    """Word 4 wants to follow itself ("on on on"); 5 is the clear second best, and <eos> follows 5 well."""
    return TableModel({BOS: {4: 5.0, 5: 1.0}, 4: {4: 5.0, 5: 2.0}, 5: {EOS: 4.0, 4: 1.0, 6: 0.0},
                       6: {EOS: 4.0}})


def cycle_model() -> TableModel:
    """4 -> 5 -> 6 -> 4 ... with 7 a clearly worse second choice and <eos> unlikely: a trigram loop."""
    second = {7: 0.0}
    return TableModel({BOS: {4: 3.0, **second}, 4: {5: 3.0, **second}, 5: {6: 3.0, **second},
                       6: {4: 3.0, **second}, 7: {4: 3.0, **second}}, default=-3.0)


def words(tokens: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in tokens.tolist():
        rows.append([t for t in row[:row.index(EOS)] if t != PAD] if EOS in row else [t for t in row if t != PAD])
    return rows


def test_forbidden_tokens_mask():
    prev = torch.tensor([4, 5])
    assert forbidden_tokens(VOCAB, prev=prev) is None  # no rule: nothing to mask
    banned = forbidden_tokens(VOCAB, prev=prev, suppress_unk=True, decoding_constraint=True)
    assert banned[0].nonzero().flatten().tolist() == [UNK, 4] and banned[1].nonzero().flatten().tolist() == [UNK, 5]
    history = torch.tensor([[4, 5, 6, 4, 5], [4, 5, 6, 7, 8]])
    trigram = forbidden_tokens(VOCAB, prev=history[:, -1], history=history, block_trigrams=True)
    assert trigram[0].nonzero().flatten().tolist() == [6] and not trigram[1].any()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_unk_is_never_decoded_by_default(beam_size):
    model = unk_model()
    raw = decode(model, regions(), DecodeOptions(beam_size=beam_size, max_length=6, suppress_unk=False,
                                                 decoding_constraint=False, block_trigrams=False))
    assert (raw.tokens == UNK).any()  # the model's own choice is <unk>
    clean = decode(model, regions(), DecodeOptions(beam_size=beam_size, max_length=6))
    assert not (clean.tokens == UNK).any()
    if clean.alternatives is not None:
        assert not (clean.alternatives == UNK).any()
    assert words(clean.tokens)[0] == [5]  # the next best word, then <eos>
    # Scores stay the model's own log-probs (no renormalisation): <unk>'s mass is simply not used.
    expected = next_token_logprobs(model.table[BOS])[5] + next_token_logprobs(model.table[5])[EOS]
    torch.testing.assert_close(clean.logprob[0], expected)


def test_sampling_never_draws_unk_and_renormalises():
    model = unk_model()
    generator = torch.Generator().manual_seed(0)
    raw = sample(model, regions(4), num_samples=8, max_length=6, generator=generator)
    assert (raw.tokens == UNK).float().mean() > 0.5  # <unk> holds about 94% of the mass after every word
    drawn = sample(model, regions(4), num_samples=8, max_length=6, generator=generator, suppress_unk=True)
    assert not (drawn.tokens == UNK).any()
    # The log-prob of the first token is that of the distribution renormalised without <unk> (and <pad>/<bos>).
    allowed = model.table[BOS].clone()
    allowed[[PAD, BOS, UNK]] = float("-inf")
    expected = torch.log_softmax(allowed, -1)[drawn.tokens[:, 0]]
    torch.testing.assert_close(drawn.token_logprobs[:, 0], expected)


def test_decoding_constraint_forbids_a_word_twice_in_a_row():
    model = loop_model()
    for beam_size in (1, 2):
        loop = decode(model, regions(), DecodeOptions(beam_size=beam_size, max_length=5, decoding_constraint=False,
                                                      block_trigrams=False))
        assert words(loop.tokens)[0] == [4, 4, 4, 4, 4]
        fixed = decode(model, regions(), DecodeOptions(beam_size=beam_size, max_length=5, block_trigrams=False))
        assert words(fixed.tokens)[0] == [4, 5]
    drawn = sample(model, regions(4), num_samples=8, max_length=6, generator=torch.Generator().manual_seed(0),
                   decoding_constraint=True)
    for row in words(drawn.tokens):
        assert all(a != b for a, b in zip(row, row[1:])), row


def test_greedy_blocks_repeated_trigrams():
    model = cycle_model()
    assert words(greedy_decode(model, regions(), max_length=9).tokens)[0] == [4, 5, 6, 4, 5, 6, 4, 5, 6]
    blocked = words(greedy_decode(model, regions(), max_length=9, block_trigrams=True).tokens)[0]
    grams = [tuple(blocked[i:i + 3]) for i in range(len(blocked) - 2)]
    assert blocked[:3] == [4, 5, 6] and len(grams) == len(set(grams))
    # Through the options: block_trigrams now applies to beam 1 (greedy) as well as to beam search.
    via_options = decode(model, regions(), DecodeOptions(beam_size=1, max_length=9, block_trigrams=True))
    assert words(via_options.tokens)[0] == blocked


def test_beam_size_limit_counts_the_suppressed_unk():
    model = TableModel({BOS: {4: 1.0}}, default=0.0)
    beam_search(model, regions(), beam_size=VOCAB - 2, max_length=2)  # every token but <pad>, <bos>
    with pytest.raises(ValueError, match="exceeds the 7 emittable tokens"):
        beam_search(model, regions(), beam_size=VOCAB - 2, max_length=2, suppress_unk=True)


def test_options_come_from_the_config_and_are_recorded():
    options = DecodeOptions.from_config(EvalConfig())
    assert options.suppress_unk and options.decoding_constraint and options.block_trigrams  # docs/evaluation.md
    recorded = options.with_overrides(suppress_unk=False, decoding_constraint=False).to_json()
    assert recorded["suppress_unk"] is False and recorded["decoding_constraint"] is False


def test_scst_samples_and_greedy_baseline_never_contain_unk():
    torch.manual_seed(0)
    model = build_model(tiny_config().model, 12)
    with torch.no_grad():
        model.logit.bias[UNK] = 8.0  # <unk> dominates every step
    features = torch.randn(3, 4, 16)
    mask = torch.ones(3, 4, dtype=torch.bool)
    seen = {}

    def reward(image_ids, tokens):
        seen.setdefault("tokens", []).append(tokens)
        return torch.zeros(tokens.shape[0])

    batch = type("B", (), {"features": features, "region_mask": mask, "boxes": None, "image_size": None,
                           "image_ids": torch.arange(3)})()
    for suppress, expect_unk in ((False, True), (True, False)):
        seen.clear()
        objective = ScstObjective(model, reward, num_samples=2, baseline="greedy", max_length=6,
                                  suppress_unk=suppress)
        objective(batch)
        sampled, greedy = seen["tokens"]
        assert bool((sampled == UNK).any()) is expect_unk and bool((greedy == UNK).any()) is expect_unk


def load_eval_tool():
    spec = importlib.util.spec_from_file_location("butd_tool_eval_rules", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_tool_suppresses_unk_by_default_and_records_it(tmp_path, monkeypatch, capsys):
    data_dir, features = make_tiny_dataset(tmp_path)
    config = tiny_config()
    vocab = json.loads((data_dir / "vocab.json").read_text())["words"]
    torch.manual_seed(0)
    model = build_model(config.model, len(vocab))
    with torch.no_grad():
        model.logit.bias[UNK] = 8.0
        model.logit.bias[EOS] = -8.0
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"format_version": 1, "stage": "xe", "model_name": "updown",
                                 "model": model.state_dict(), "config": config_to_dict(config), "vocab": vocab,
                                 "epoch": 1})
    monkeypatch.setenv("PATH", str(tmp_path / "no-java"))  # pure-Python scoring: no JVM start
    tool = load_eval_tool()
    common = ["--checkpoint", str(checkpoint), "--data", str(data_dir), "--features", str(features),
              "--split", "test", "--beam-size", "2", "--threads", "1"]
    assert tool.main([*common, "--output", str(tmp_path / "clean")]) == 0
    assert tool.main([*common, "--set", "eval.suppress_unk=false", "--output", str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    for name, suppressed in (("clean", True), ("raw", False)):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["suppress_unk"] is suppressed and metrics["decoding_constraint"] is True
        captions = [json.loads(line)["caption"] for line in
                    (tmp_path / name / "captions_test.jsonl").read_text().splitlines()]
        assert any("<unk>" in c.split() for c in captions) is not suppressed
