"""butd.core.threads (the thread count the tools choose) and butd.metrics.repetition (the loop counts)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from butd.core.threads import (THREADS_ENV, choose_threads, configure_threads, physical_cores, thread_environment)
from butd.errors import ConfigError
from butd.metrics.repetition import repeats_bigram, repeats_word_at_once, repetition_report

ROOT = Path(__file__).resolve().parents[1]


def test_explicit_count_wins_then_the_environment_then_the_cores():
    assert choose_threads(3, environ={THREADS_ENV: "2"}, cores=8) == 3
    assert choose_threads(None, environ={THREADS_ENV: "2"}, cores=8) == 2
    assert choose_threads(None, environ={}, cores=8) == 8
    # DataLoader workers and the processes torchrun starts on one machine share the cores; never below 1.
    assert choose_threads(None, environ={}, cores=8, workers=2) == 6
    assert choose_threads(None, environ={"LOCAL_WORLD_SIZE": "4"}, cores=8) == 2
    assert choose_threads(None, environ={"LOCAL_WORLD_SIZE": "4"}, cores=8, workers=4) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_counts_are_refused_with_their_source(value):
    with pytest.raises(ConfigError, match=THREADS_ENV):
        choose_threads(None, environ={THREADS_ENV: value}, cores=4)
    with pytest.raises(ConfigError, match="--threads"):
        choose_threads(value, environ={}, cores=4)


def test_physical_cores_count_hyperthread_siblings_once(tmp_path):
    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3, 4], sysfs=tmp_path) == 3
    assert physical_cores([0, 1], sysfs=tmp_path) == 1
    assert physical_cores([0, 7], sysfs=tmp_path) == 2  # no topology for cpu7: logical count


def test_configure_threads_sets_torch_and_the_child_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        assert configure_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    env = thread_environment(1, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", THREADS_ENV: "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_demo_refuses_a_bad_thread_count(capsys):
    spec = importlib.util.spec_from_file_location("butd_tool_demo", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--threads", "0", "--output", "unused"])
    assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err


def test_repetition_counts():
    assert repeats_word_at_once("a man on on a horse".split())
    assert not repeats_word_at_once("a man on a horse".split())
    assert repeats_bigram("a bathroom with a bathroom".split())
    assert repeats_bigram("a a a".split())  # overlapping occurrences count
    assert not repeats_bigram("a man riding a horse".split())
    report = repetition_report(["a man on on a horse", "a bathroom with a bathroom with a sink", "a <unk> on a table",
                                ["a", "dog"]])
    assert (report.captions, report.word_at_once, report.bigram, report.unk) == (4, 1, 1, 1)
    assert report.to_json()["bigram_fraction"] == 0.25
    assert report.summary() == "1 of 4 with <unk>, 1 repeat a word at once, 1 repeat a bigram"
    assert repetition_report([]).fraction(0) == 0.0
