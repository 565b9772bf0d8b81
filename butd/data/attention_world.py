"""The attention world: a small synthetic captioning task that only attention solves, for tests and benchmarks.

Every image has 8 to 30 regions; one to three of them are *objects*, each a coloured shape, and the rest are noise.
The captions name the objects, shapes in a fixed order, each with its colour: "a red cube and a blue ball". An
object region's feature is ``colour + shape + object`` (three fixed random directions) plus noise; a noise region is
noise of the same size. The mean of the regions (all that Show-and-Tell sees) tells which colours and which shapes
are present, but not which colour belongs to which shape: red cube + blue ball and blue cube + red ball have the same
sum. Attending to one region at a time tells. Box positions carry nothing.

``make_attention_world(output, AttentionWorldConfig(...))`` writes ``output/data`` (a DATA_DIR, as
``tools/prepro_captions.py`` writes it) and ``output/features.lmdb`` (a feature store), both fixed by the seed. A
rerun with the same parameters finds them complete and returns at once; other parameters are refused.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from butd.core.files import rename_durably, write_json_atomic
from butd.data.prep.prepro import SourceImage, build_data_dir
from butd.data.store import FeatureRecord, FeatureWriter
from butd.errors import ConfigError, DataError

GENERATOR_VERSION = 1
COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SHAPES = ("cube", "ball", "cone", "ring", "star", "box")
TEMPLATES = ("{}", "there is {}", "a picture of {}")  # the three references of an image
IMAGE_SIZE = 100  # pixels, width and height


@dataclass(frozen=True)
class AttentionWorldConfig:
    """Generation parameters; ``regions`` and ``objects`` are (min, max) per image, both inclusive."""

    num_images: int = 1200  # 80% train, 10% val, 10% test
    regions: tuple[int, int] = (8, 30)
    objects: tuple[int, int] = (1, 3)
    feature_dim: int = 32
    noise: float = 0.3  # standard deviation of the noise added to every object region, per dimension
    seed: int = 0

    def check(self) -> None:
        lo, hi = self.objects
        if not 1 <= lo <= hi <= len(SHAPES):
            raise ConfigError(f"attention world: objects must satisfy 1 <= min <= max <= {len(SHAPES)}, got "
                              f"{self.objects}")
        if not hi <= self.regions[0] <= self.regions[1]:
            raise ConfigError(f"attention world: need objects max <= regions min <= regions max, got objects "
                              f"{self.objects}, regions {self.regions}")
        if self.num_images < 10 or self.feature_dim < 4:
            raise ConfigError(f"attention world: need num_images >= 10 and feature_dim >= 4, got "
                              f"{self.num_images}, {self.feature_dim}")

    def identity(self) -> dict:
        """The parameters as world.json records them (JSON types: tuples become lists)."""
        return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}))


@dataclass(frozen=True)
class AttentionWorld:
    """Where a generated world is: ``data_dir`` (DATA_DIR) and ``features`` (the LMDB store)."""

    data_dir: Path
    features: Path


def describe(objects: list[tuple[int, int]]) -> str:
    """The caption body of (colour, shape) pairs, shapes in their fixed order: "a red cube and a blue ball"."""
    return " and ".join(f"a {COLOURS[c]} {SHAPES[s]}" for c, s in sorted(objects, key=lambda o: o[1]))


def _directions(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """``count`` random unit vectors of size ``dim``."""
    vectors = rng.normal(size=(count, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _image(rng: np.random.Generator, config: AttentionWorldConfig, colour_dirs: np.ndarray, shape_dirs: np.ndarray,
           object_dir: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """One image: its objects, region features [N, D] (float32) and boxes [N, 4]."""
    count = int(rng.integers(config.regions[0], config.regions[1] + 1))
    num_objects = int(rng.integers(config.objects[0], config.objects[1] + 1))
    shapes = rng.choice(len(SHAPES), size=num_objects, replace=False)  # distinct shapes: the order is defined
    colours = rng.integers(0, len(COLOURS), size=num_objects)
    objects = [(int(c), int(s)) for c, s in zip(colours, shapes)]
    # Noise regions have the norm of an object region (three unit directions, nearly orthogonal: about sqrt(3)).
    features = rng.normal(size=(count, config.feature_dim)) * np.sqrt(3.0 / config.feature_dim)
    slots = rng.choice(count, size=num_objects, replace=False)
    for slot, (c, s) in zip(slots, objects):
        features[slot] = (colour_dirs[c] + shape_dirs[s] + object_dir
                          + config.noise * rng.normal(size=config.feature_dim))
    corners = rng.uniform(0, IMAGE_SIZE * 0.7, size=(count, 2))
    sizes = rng.uniform(IMAGE_SIZE * 0.1, IMAGE_SIZE * 0.3, size=(count, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    return objects, features.astype(np.float32), boxes.astype(np.float32)


def make_attention_world(output: str | Path, config: AttentionWorldConfig = AttentionWorldConfig()) -> AttentionWorld:
    """Write (or find complete) the world of ``config`` under ``output``; see the module docstring."""
    config.check()
    out = Path(output)
    world = AttentionWorld(data_dir=out / "data", features=out / "features.lmdb")
    info_path = out / "world.json"
    if info_path.is_file():
        try:
            previous = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{info_path}: unreadable ({error}); remove {out} or pick another output") from None
        if previous != config.identity():
            raise DataError(f"{out} holds an attention world made with {previous}, not {config.identity()}; "
                            f"pick another output directory")
        return world
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and holds no attention world (no world.json); pick an empty or new directory")
    # Built beside the output and renamed into place: a killed run leaves no half-written world behind.
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    _generate(building, config)
    if out.exists():
        out.rmdir()  # empty, checked above
    rename_durably(building, out)
    return world


def _generate(out: Path, config: AttentionWorldConfig) -> None:
    rng = np.random.default_rng([config.seed, 0xA77])
    colour_dirs = _directions(rng, len(COLOURS), config.feature_dim)
    shape_dirs = _directions(rng, len(SHAPES), config.feature_dim)
    object_dir = _directions(rng, 1, config.feature_dim)[0]
    n_held_out = max(config.num_images // 10, 1)
    images: list[SourceImage] = []
    with FeatureWriter(out / "features.lmdb", dtype="float32") as writer:
        for index in range(config.num_images):
            image_id = index + 1
            objects, features, boxes = _image(rng, config, colour_dirs, shape_dirs, object_dir)
            split = ("val" if index < n_held_out else "test" if index < 2 * n_held_out else "train")
            raw = tuple(template.format(describe(objects)) for template in TEMPLATES)
            images.append(SourceImage(image_id=image_id, split=split, tokens=tuple(tuple(r.split()) for r in raw),
                                      raw=raw))
            writer.put(FeatureRecord(image_id=image_id, features=features, boxes=boxes, image_w=IMAGE_SIZE,
                                     image_h=IMAGE_SIZE))
    build_data_dir(images, out / "data", min_count=0, max_length=16, sources=["butd.data.attention_world"],
                   tokenization="whitespace")
    write_json_atomic(out / "world.json", config.identity())  # last: marks the world complete
