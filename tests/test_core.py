"""The floor of butd: atomic writes and their leftovers, token helpers, device and precision resolution."""
from __future__ import annotations

import json
import os

import pytest
import torch

from butd.core.devices import autocast_context, check_precision, resolve_device, uses_bf16
from butd.core.files import remove_stale_temporaries, rename_durably, write_atomic, write_json_atomic
from butd.core.tokens import EOS, PAD, UNK, Vocabulary, words_of
from butd.errors import ConfigError


def test_write_atomic_text_bytes_and_writer(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    assert write_atomic(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_atomic(target, lambda tmp: tmp.write_text("from a writer"))
    assert target.read_text() == "from a writer"
    write_json_atomic(tmp_path / "d.json", {"a": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "d.json", "sub"]


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_remove_stale_temporaries_removes_only_that_files_leftovers(tmp_path):
    target = tmp_path / "last.pt"
    mine = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.zz.tmp"]
    others = [tmp_path / ".best.pt.abc.tmp", tmp_path / "last.pt", tmp_path / ".last.ptx.q.tmp"]
    for p in mine + others:
        p.write_text("x")
    assert remove_stale_temporaries(target) == sorted(mine)
    assert all(p.exists() for p in others) and not any(p.exists() for p in mine)
    assert remove_stale_temporaries(tmp_path / "missing" / "x") == []


def test_words_of_stops_at_eos_or_pad():
    assert words_of([5, 6, EOS, 7]) == [5, 6]
    assert words_of(torch.tensor([5, PAD, 6])) == [5]
    assert words_of([]) == []


def test_vocabulary_uses_the_shared_ids():
    vocab = Vocabulary(words=["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"])
    assert (vocab.PAD, vocab.EOS, vocab.UNK) == (PAD, EOS, UNK)
    assert vocab.encode(["a", "cat"]) == [4, UNK]
    assert vocab.decode([4, 5, EOS, 4]) == "a dog"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda", local_rank=1)


def test_precision_choices():
    assert check_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        check_precision("fp8")
    cpu = torch.device("cpu")
    assert not uses_bf16(cpu, "bf16") and not uses_bf16(cpu, "auto")
    assert uses_bf16(torch.device("cuda"), "auto") and not uses_bf16(torch.device("cuda"), "fp32")
    with autocast_context(cpu, "bf16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_rename_durably_replaces_the_destination(tmp_path):
    source, destination = tmp_path / ".a.partial", tmp_path / "a"
    source.write_text("new")
    destination.write_text("old")
    rename_durably(source, destination)
    assert destination.read_text() == "new" and not source.exists()
    with pytest.raises(FileNotFoundError):
        rename_durably(source, destination)
