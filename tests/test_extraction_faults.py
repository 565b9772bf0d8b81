"""Faults: a killed run loses at most --commit-every images and resumes; DataLoader workers die with their parent;
a failures file cut short is repaired."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from butd.data.store import FeatureStore
from butd.errors import DataError
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.extract import ExtractionConfig, run_extraction
from feature_extraction.loading import _parent_alive
from feature_extraction.sources import Failure, FailureLog
from feature_extraction.weights import initialize_random

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES, BATCH, COMMIT_EVERY, KILL_AT_BATCH = 24, 2, 4, 8
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and FIFOs (Linux)")

# The network and run of the kill test; the child process and the test build the same ones.
SETUP = """
from dataclasses import replace
from pathlib import Path
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.extract import ExtractionConfig
from feature_extraction.weights import initialize_random

def make_detector():
    config = replace(DetectorConfig.small(), test_scale=64, test_max_size=100, rpn_pre_nms_topk=200,
                     rpn_post_nms_topk=30)
    model = BottomUpDetector(config=config)
    initialize_random(model, seed=0)
    return model

def make_config(root):
    return ExtractionConfig(images=Path(root) / "images", weights="random", output=Path(root) / "feats.lmdb",
                            batch_size=%d, device="cpu", num_workers=0, progress=False, commit_every=%d)
""" % (BATCH, COMMIT_EVERY)

KILLED_RUN = SETUP + """
import os, signal, sys
from feature_extraction.extract import run_extraction

detector = make_detector()
plain_detect, calls = detector.detect, []

def detect(images, **kwargs):
    calls.append(1)
    if len(calls) == %d:  # the power goes off while this batch is on the detector
        os.kill(os.getpid(), signal.SIGKILL)
    return plain_detect(images, **kwargs)

detector.detect = detect
run_extraction(make_config(sys.argv[1]), detector=detector)
""" % KILL_AT_BATCH


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_a_killed_run_loses_at_most_commit_every_images_and_resumes(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for image_id in range(1, NUM_IMAGES + 1):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"COCO_val2014_{image_id:012d}.png")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    handed_over = BATCH * (KILL_AT_BATCH - 1)  # detected before the kill
    with FeatureStore(tmp_path / "feats.lmdb") as store:
        stored = store.image_ids()
    assert handed_over - COMMIT_EVERY <= len(stored) <= handed_over
    assert stored == list(range(1, len(stored) + 1))  # in id order, nothing half-written

    namespace: dict = {}
    exec(SETUP, namespace)  # the same network and options, in this process
    stats = run_extraction(namespace["make_config"](tmp_path), detector=namespace["make_detector"]())
    assert (stats.already_done, stats.extracted, stats.failed) == (len(stored), NUM_IMAGES - len(stored), 0)
    with FeatureStore(tmp_path / "feats.lmdb") as store:
        assert store.image_ids() == list(range(1, NUM_IMAGES + 1))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@linux_only
def test_loader_workers_die_with_their_parent(tmp_path):
    fifos = [tmp_path / f"image{i}.jpg" for i in range(4)]
    for fifo in fifos:
        os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from feature_extraction.loading import ImageDataset, make_loader
        from feature_extraction.sources import ImageItem
        items = [ImageItem(Path(p), i) for i, p in enumerate({[str(f) for f in fifos]!r})]
        loader = make_loader(ImageDataset(items, max_pixels=10**6, scale=600, max_size=1000), batch_size=1,
                             num_workers=2)
        for batch in loader:
            pass
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env=child_env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writers: list[int] = []
    workers: list[int] = []
    try:
        # Each worker opens its FIFO for reading and blocks; once we hold the write end too it blocks in read().
        deadline = time.monotonic() + 120
        while len(writers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            try:
                writers.append(os.open(fifos[len(writers)], os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet
                time.sleep(0.05)
        assert len(writers) == 2, "the DataLoader workers did not start"
        workers = _children(parent.pid)
        assert len(workers) == 2
        parent.kill()  # SIGKILL: no clean-up code of the parent runs
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their killed parent"
    finally:
        for fd in writers:
            os.close(fd)
        for pid in workers:  # only if the test failed: do not leave them behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


@linux_only
def test_the_parent_probe_sees_dead_and_zombie_parents():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _parent_alive(child.pid, forked=False)
        assert not _parent_alive(child.pid, forked=True)  # this process's parent is not the child
        child.kill()
        deadline = time.monotonic() + 10
        while _alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _parent_alive(child.pid, forked=False)  # a zombie until reaped: dead all the same
    finally:
        child.kill()
        child.wait()
    assert not _parent_alive(child.pid, forked=False)


def write_failures(path: Path, lines: list[str], tail: bytes) -> None:
    path.write_bytes("".join(line + "\n" for line in lines).encode() + tail)


def record(image_id: int) -> str:
    return json.dumps({"path": f"/img/{image_id}.jpg", "id": image_id, "reason": "truncated image"})


def test_a_failures_file_cut_short_is_repaired(tmp_path, caplog):
    path = tmp_path / "feats.lmdb.failures.jsonl"
    write_failures(path, [record(1), record(2)], record(3).encode()[:17])  # the kill hit mid-line
    with caplog.at_level(logging.WARNING):
        log = FailureLog(path)
    assert sorted(log.previous) == [1, 2]
    assert "incomplete last line" in caplog.text
    assert path.read_text() == record(1) + "\n" + record(2) + "\n"  # repaired on disk at once
    log.add(Failure("/img/4.jpg", 4, "not an image"))
    assert sorted(FailureLog(path).previous) == [1, 2, 4]  # the next run reads every line


def test_a_cut_inside_a_utf8_character_or_before_the_newline(tmp_path):
    path = tmp_path / "failures.jsonl"
    write_failures(path, [record(1)], '{"path": "/img/caf\u00e9.jpg"'.encode()[:-6])  # half of "é"
    assert sorted(FailureLog(path).previous) == [1]
    write_failures(path, [record(1)], record(2).encode())  # complete, but its newline was lost
    log = FailureLog(path)
    assert sorted(log.previous) == [1, 2]
    log.add(Failure("/img/5.jpg", 5, "not an image"))
    assert sorted(FailureLog(path).previous) == [1, 2, 5]


def test_a_broken_line_in_the_middle_is_still_an_error(tmp_path):
    path = tmp_path / "failures.jsonl"
    write_failures(path, [record(1), "garbage", record(2)], b"")
    with pytest.raises(DataError, match=r"failures.jsonl:2: not a failure record"):
        FailureLog(path)


def test_the_extraction_starts_after_a_cut_failures_file(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "images" / "COCO_x_000000000009.png")
    (tmp_path / "images" / "COCO_x_000000000010.jpg").write_bytes(b"not a jpeg")
    config = ExtractionConfig(images=tmp_path / "images", weights="random", output=tmp_path / "feats.lmdb",
                              device="cpu", num_workers=0, progress=False)
    write_failures(config.failures_path, [], record(10).encode()[:30])
    detector = BottomUpDetector(config=replace(DetectorConfig.small(), test_scale=64, test_max_size=100))
    initialize_random(detector, seed=0)
    stats = run_extraction(config, detector=detector)
    assert (stats.extracted, stats.failed) == (1, 1)
    assert [json.loads(line)["id"] for line in config.failures_path.read_text().splitlines()] == [10]
