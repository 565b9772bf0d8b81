"""tools/caption.py with bad images among good ones: the good ones are captioned, each bad one is named on stderr
(one line), and the exit status says that some were skipped. CPU, the small random detector."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from butd.captioner import Captioner
from butd.models import load_model
from captioner_fixtures import ROOT, fast_detector, synthetic_image, write_tiny_checkpoint

TOOL = ROOT / "tools" / "caption.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("caption_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Two good pictures, a 2000x8 strip the detector cannot take, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = {name: folder / f"{name}.png" for name in ("good1", "strip", "good2")}
    Image.fromarray(synthetic_image(160, 120, 1)).save(paths["good1"])
    Image.fromarray(synthetic_image(2000, 8, 2)).save(paths["strip"])
    Image.fromarray(synthetic_image(96, 144, 3)).save(paths["good2"])
    paths["broken"] = folder / "broken.jpg"
    paths["broken"].write_bytes(b"not a JPEG at all")
    return paths


def run_in_process(monkeypatch, capsys, checkpoint: Path, images: list[Path], *extra: str):
    """main() of the tool with the fast test configuration of the random detector; (status, stdout, stderr)."""
    tool = load_tool()
    captioner = Captioner(detector=fast_detector(), loaded=load_model(checkpoint), detector_name="random",
                          batch_size=8)
    monkeypatch.setattr(tool.Captioner, "from_files", classmethod(lambda cls, *a, **kw: captioner))
    status = tool.main([*map(str, images), "--detector", "random", "--checkpoint", str(checkpoint),
                        "--device", "cpu", "--beam-size", "2", *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_bad_images_are_named_and_skipped_and_the_good_ones_captioned(monkeypatch, capsys, checkpoint, pictures):
    order = [pictures["good1"], pictures["strip"], pictures["broken"], pictures["good2"]]
    status, out, err = run_in_process(monkeypatch, capsys, checkpoint, order, "--json")
    assert status == 1
    captions = [json.loads(line) for line in out.splitlines()]
    assert [c["name"] for c in captions] == [str(pictures["good1"]), str(pictures["good2"])]
    assert all(c["caption"] for c in captions)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, err
    assert str(pictures["strip"]) in errors[0] and "2000x8" in errors[0] and "skipped" in errors[0]
    assert str(pictures["broken"]) in errors[1] and "skipped" in errors[1]
    assert "Traceback" not in err and "2 of 4 images skipped" in err

    # The bad images change nothing for the good ones: the same captions as without them.
    alone_status, alone_out, alone_err = run_in_process(
        monkeypatch, capsys, checkpoint, [pictures["good1"], pictures["good2"]], "--json")
    assert alone_status == 0 and "error" not in alone_err
    assert [json.loads(line)["caption"] for line in alone_out.splitlines()] == [c["caption"] for c in captions]


def test_a_batch_of_only_bad_images_still_lets_the_next_batch_run(monkeypatch, capsys, checkpoint, pictures):
    missing = pictures["good2"].parent / "missing.png"
    status, out, err = run_in_process(monkeypatch, capsys, checkpoint,
                                      [pictures["strip"], missing, pictures["good2"]], "--batch-size", "2")
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(pictures["good2"])]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[1] == f"error: {missing}: file not found; skipped"


def test_an_image_the_captioner_refuses_in_a_batch_is_captioned_around(monkeypatch, capsys, checkpoint, pictures):
    """Should the captioner refuse an image that passed the tool's own check, the others still get captions."""
    from feature_extraction.images import ImageError

    real_caption = Captioner.caption

    def refuse_good1(self, images, *, beam_size=3, names=None):
        if any(name.endswith("good1.png") for name in names):
            raise ImageError(names[[n.endswith("good1.png") for n in names].index(True)], "refused by the stub")
        return real_caption(self, images, beam_size=beam_size, names=names)

    monkeypatch.setattr(Captioner, "caption", refuse_good1)
    status, out, err = run_in_process(monkeypatch, capsys, checkpoint, [pictures["good1"], pictures["good2"]])
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(pictures["good2"])]
    assert f"error: {pictures['good1']}: refused by the stub; skipped" in err.splitlines()


def test_the_tool_itself_exits_non_zero_without_a_traceback(checkpoint, pictures):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(pictures["strip"]), str(pictures["good2"]), "--detector", "random",
         "--small-detector", "--checkpoint", str(checkpoint), "--device", "cpu", "--beam-size", "1"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(pictures["good2"])]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in proc.stderr.splitlines() if str(pictures["strip"]) in line)]
