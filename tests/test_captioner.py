"""butd.Captioner, the attention figure and tools/caption.py, on CPU with the small random detector."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from butd.captioner import Alternative, Captioner, ImageCaption, Region
from butd.data.package_data import attribute_names, object_names
from butd.errors import ConfigError, DataError
from butd.models import load_model
from butd.visualize import attention_figure, save_attention_figure
from captioner_fixtures import (
    MAX_LENGTH,
    ROOT,
    WORDS,
    coco_image_paths,
    fast_detector,
    synthetic_image,
    write_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return Captioner(detector=fast_detector(), loaded=load_model(checkpoint), detector_name="random")


@pytest.fixture(scope="module")
def images():
    # Different sizes and aspect ratios: the batch pads them to a common shape.
    return [synthetic_image(160, 120, 1), synthetic_image(96, 144, 2)]


@pytest.fixture(scope="module")
def batched(captioner, images):
    """The images captioned together, in one batch (computed once: detection is the slow part on CPU)."""
    return captioner.caption(images, beam_size=3)


def test_caption_has_words_attention_regions_and_beams(batched, images):
    results = batched
    assert len(results) == len(images)
    objects = {names[0] for names in object_names()}
    attributes = {names[0] for names in attribute_names()}
    for image, result in zip(images, results):
        assert (result.width, result.height) == (image.shape[1], image.shape[0])
        assert 1 <= len(result.words) <= MAX_LENGTH
        assert result.caption == " ".join(result.words)
        assert all(word in WORDS[4:] for word in result.words)
        # One attention row per word, one column per detected region, each row a distribution.
        assert result.attention.shape == (len(result.words), len(result.regions))
        np.testing.assert_allclose(result.attention.sum(axis=1), 1.0, atol=1e-4)
        assert (result.attention >= 0).all()
        for region in result.regions:
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 <= x2 <= result.width and 0 <= y1 <= y2 <= result.height
            assert region.object in objects and "," not in region.object
            assert region.attribute is None or region.attribute in attributes
        # Every final beam, best first; the best one is the caption itself.
        assert len(result.alternatives) == 3
        logprobs = [alt.logprob for alt in result.alternatives]
        assert logprobs == sorted(logprobs, reverse=True)
        assert result.alternatives[0].caption == result.caption
        assert math.isclose(result.alternatives[0].logprob, result.logprob, abs_tol=1e-4)


def test_to_json_is_what_the_service_returns(batched):
    result = batched[0]
    data = json.loads(json.dumps(result.to_json()))
    assert data["name"] == "image 0"
    assert (data["width"], data["height"]) == (160, 120)
    assert data["caption"] == result.caption
    assert [w["word"] for w in data["words"]] == list(result.words)
    assert all(len(w["attention"]) == len(data["regions"]) for w in data["words"])
    assert [a["caption"] for a in data["alternatives"]] == [a.caption for a in result.alternatives]
    assert data["regions"][0]["object"] == result.regions[0].object
    assert len(data["regions"][0]["box"]) == 4


def test_batch_equals_one_by_one(captioner, images, batched):
    for image, together in zip(images, batched):
        (alone,) = captioner.caption([image], beam_size=3)
        assert alone.caption == together.caption
        assert [a.caption for a in alone.alternatives] == [a.caption for a in together.alternatives]
        np.testing.assert_allclose(alone.attention, together.attention, atol=1e-4)
        np.testing.assert_allclose([r.box for r in alone.regions], [r.box for r in together.regions], atol=1e-3)


def test_paths_bytes_and_pil_images_give_the_same_caption(captioner, tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(synthetic_image(120, 100, 7)).save(path)
    from_path, from_bytes, from_pil = captioner.caption([path, path.read_bytes(), Image.open(path)], beam_size=2)
    assert from_path.name == str(path)
    assert from_bytes.name == "image 1"
    assert from_path.caption == from_bytes.caption == from_pil.caption


def test_unreadable_or_unusable_images_are_named(captioner):
    with pytest.raises(DataError, match="broken.jpg"):
        captioner.caption([b"this is not an image"], names=["broken.jpg"])
    # Decodable, but a strip too thin for the detector's test-time resize: refused before any network runs.
    with pytest.raises(DataError, match="strip.png.*aspect ratio"):
        captioner.caption([synthetic_image(2000, 8, 1)], names=["strip.png"])


def test_detector_and_checkpoint_feature_sizes_must_match(tmp_path):
    wrong = write_tiny_checkpoint(tmp_path / "wrong.pt", feature_dim=7)
    with pytest.raises(ConfigError, match="7-d"):
        Captioner(detector=fast_detector(), loaded=load_model(wrong))


def _caption_with(words: list[str], size: tuple[int, int] = (160, 120)) -> ImageCaption:
    rng = np.random.default_rng(len(words))
    w, h = size
    regions = tuple(
        Region(box=(10.0 * i, 8.0 * i, 10.0 * i + 60, 8.0 * i + 50), object=f"thing{i}", object_confidence=0.5,
               attribute=None, attribute_confidence=None)
        for i in range(5)
    )
    attention = rng.dirichlet(np.ones(5), size=len(words)).astype(np.float32)
    return ImageCaption(name="x", width=w, height=h, caption=" ".join(words), logprob=-1.0, words=tuple(words),
                        attention=attention, regions=regions, alternatives=(Alternative(" ".join(words), -1.0),))


def test_figure_has_a_panel_per_word_and_grows_with_the_caption():
    image = synthetic_image(160, 120, 4)
    short = attention_figure(image, _caption_with(["a", "dog"]), columns=4, panel_width=200)
    long = attention_figure(image, _caption_with("a dog sitting on the grass next to a tree".split()),
                            columns=4, panel_width=200)
    # 3 panels fit in one row; 10 panels need three rows of four.
    assert long.height > 2 * short.height
    assert long.width > short.width  # 4 columns instead of 3
    colours = long.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100
    with pytest.raises(ValueError, match="80x60"):
        attention_figure(synthetic_image(80, 60, 1), _caption_with(["a"]))


def test_figure_is_written_atomically_as_png(tmp_path):
    out = save_attention_figure(synthetic_image(160, 120, 4), _caption_with(["a", "dog"]), tmp_path / "f" / "x.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]


def test_cli_prints_captions_and_writes_figures(checkpoint, tmp_path):
    real = coco_image_paths()[:1]
    if not real:
        pytest.skip(f"no COCO images under {ROOT.parent / 'shared' / 'data' / 'coco_images'}")
    out_dir = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "caption.py"), *map(str, real), "--detector", "random",
         "--small-detector", "--checkpoint", str(checkpoint), "--device", "cpu", "--beam-size", "2", "--json",
         "--visualize", str(out_dir)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "meaningless" in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["name"] for line in lines] == [str(p) for p in real]
    for path, line in zip(real, lines):
        figure_path = out_dir / f"{path.stem}.png"
        figure = Image.open(figure_path)
        panels = 1 + len(line["words"])
        rows = math.ceil(panels / 4)
        assert figure.width == 12 + min(4, panels) * (320 + 12)
        # Each row is at least a 320-pixel-wide panel of the picture plus the word under it.
        assert figure.height > rows * (320 * line["height"] / line["width"])
        assert figure_path.stat().st_size > 20_000
