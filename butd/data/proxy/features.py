"""Synthetic region features of the COCO-proxy ("real language, synthetic vision").

Per image, :func:`layout_regions` turns the concepts of its captions into regions (object class, attributes,
strengths, confidences, boxes), padded with weaker distractor regions; :class:`FeatureSynthesizer` renders the
regions of a whole chunk of images at once into 2048-d non-negative features:

    feature = relu(s * OBJ[object] + a1 * ATTR[attr1] + a2 * ATTR[attr2] + NOISE1[n1] + NOISE2[n2] - 0.15)

with object strength s (0.75-1.1 for objects the captions mention, 0.3-0.6 for distractors), attribute strengths
a1, a2 (0.5-0.8; 0.15 for a guessed attribute; 0 when absent) and noise rows n1, n2 picked per region.

OBJ / ATTR are fixed sparse non-negative concept embeddings and NOISE1 / NOISE2 fixed Gaussian noise tables, all
drawn from a constant seed (the proxy's "detector" is the same for every dataset). Everything random about an image
comes from a numpy generator seeded by (seed, image id), so an image's features do not depend on the chunking or on
which other images are generated: on one device the output is byte-identical for a seed. (CPU and GPU may round
the float32 sums differently, so a few float16 values can differ in the last bit across devices.)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from butd.data.proxy.concepts import ImageConcepts

FEATURE_DIM = 2048
WORLD_SEED = 20180612
NOISE_ROWS = 4096
NOISE_STD = 0.25  # per table; the sum of two rows has std 0.35
THRESHOLD = 0.15
NO_ATTRIBUTE = -1
WEAK_ATTRIBUTE = 0.15  # strength of the guessed attribute of a region no caption describes


@dataclass(frozen=True)
class RegionLayout:
    """The regions of one image before rendering; arrays have one row per region, sorted by object_conf."""

    object_ids: np.ndarray  # [N] int32
    object_conf: np.ndarray  # [N] float32
    attr_ids: np.ndarray  # [N, 2] int32, second column NO_ATTRIBUTE when unused; column 0 is the reported one
    attr_conf: np.ndarray  # [N] float32
    strength: np.ndarray  # [N, 3] float32: object, attribute 1, attribute 2
    noise_rows: np.ndarray  # [N, 2] int64
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2
    from_captions: np.ndarray  # [N] bool: the region shows a concept the captions mention

    @property
    def num_boxes(self) -> int:
        return len(self.object_ids)


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The generator of everything random about one image (independent of every other image)."""
    return np.random.default_rng([seed, 0x1111, image_id])


def _boxes(rng: np.random.Generator, area_frac: np.ndarray, width: int, height: int) -> np.ndarray:
    aspect = np.exp(rng.uniform(-0.7, 0.7, len(area_frac)))  # w / h
    area = area_frac * width * height
    w = np.clip(np.sqrt(area * aspect), 2.0, width)
    h = np.clip(np.sqrt(area / aspect), 2.0, height)
    x1 = rng.uniform(0.0, 1.0, len(w)) * (width - w)
    y1 = rng.uniform(0.0, 1.0, len(h)) * (height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def _caption_regions(concepts: ImageConcepts) -> tuple[np.ndarray, ...]:
    """Per caption-concept region: object id, mention fraction, instances, attribute ids [2], attribute fractions."""
    obj, frac, inst, attrs, attr_frac = [], [], [], [], []
    n_captions = max(concepts.num_captions, 1)
    for concept in concepts.objects:
        ranked = [a for a, _ in concept.attributes.most_common()]
        for j in range(concept.instances):
            # Instance j shows the j-th most mentioned attribute and the next one ("black and white cat").
            pair = [ranked[j % len(ranked)] if ranked else NO_ATTRIBUTE,
                    ranked[(j + 1) % len(ranked)] if len(ranked) >= 2 else NO_ATTRIBUTE]
            obj.append(concept.object_id)
            frac.append(min(concept.captions / n_captions, 1.0))
            inst.append(concept.instances)
            attrs.append(pair)
            attr_frac.append([min(concept.attributes[a] / n_captions, 1.0) if a != NO_ATTRIBUTE else 0.0
                              for a in pair])
    return (np.asarray(obj, dtype=np.int32), np.asarray(frac, dtype=np.float64), np.asarray(inst, dtype=np.float64),
            np.asarray(attrs, dtype=np.int32).reshape(-1, 2), np.asarray(attr_frac, dtype=np.float64).reshape(-1, 2))


def layout_regions(concepts: ImageConcepts, *, rng: np.random.Generator, width: int, height: int,
                   boxes: tuple[int, int], num_objects: int, num_attributes: int) -> RegionLayout:
    """Regions of one image: caption concepts first (more captions -> stronger, larger), then distractors.

    ``boxes`` is (min, max) regions; min == max gives exactly that many. Concepts beyond the maximum are dropped,
    least mentioned first.
    """
    lo, hi = boxes
    obj, frac, inst, attrs, attr_frac = _caption_regions(concepts)
    total = max(int(rng.integers(lo, hi + 1)), min(len(obj), hi))
    obj, frac, inst, attrs, attr_frac = obj[:total], frac[:total], inst[:total], attrs[:total], attr_frac[:total]
    n_cap, n_dis = len(obj), total - len(obj)
    u = rng.random((n_cap, 4))
    has_attr = attrs != NO_ATTRIBUTE
    strength_cap = np.column_stack([0.75 + 0.35 * frac + 0.2 * (u[:, 0] - 0.5),
                                    np.where(has_attr, 0.5 + 0.3 * attr_frac, 0.0)])
    conf_cap = np.minimum(0.55 + 0.4 * frac + 0.16 * (u[:, 1] - 0.5), 0.99)
    area_cap = (0.04 + 0.4 * frac) / np.maximum(inst, 1) * (0.6 + 0.8 * u[:, 2])
    attr_conf_cap = np.where(has_attr[:, 0], np.minimum(0.5 + 0.4 * attr_frac[:, 0] + 0.1 * (u[:, 3] - 0.5), 0.99), 0)

    # Distractors: objects the captions do not mention, weaker, less confident and smaller.
    mentioned = set(obj.tolist())
    dis: list[int] = []
    while len(dis) < n_dis:
        dis.extend(c for c in rng.integers(num_objects, size=2 * n_dis + 4).tolist() if c not in mentioned)
    v = rng.random((n_dis, 3))
    object_ids = np.concatenate([obj, np.asarray(dis[:n_dis], dtype=np.int32)])
    attr_ids = np.concatenate([attrs, np.full((n_dis, 2), NO_ATTRIBUTE, dtype=np.int32)])
    strength = np.zeros((total, 3))
    strength[:n_cap, 0], strength[:n_cap, 1:] = strength_cap[:, 0], strength_cap[:, 1:]
    strength[n_cap:, 0] = 0.3 + 0.3 * v[:, 0]
    object_conf = np.concatenate([conf_cap, 0.1 + 0.4 * v[:, 1]])
    area = np.clip(np.concatenate([area_cap, 0.003 + 0.117 * v[:, 2]]), 0.002, 0.9)
    attr_conf = np.concatenate([attr_conf_cap, np.zeros(n_dis)])

    # Attributes no object could be tied to go to a random caption region (any region if there is none).
    for a in concepts.loose_attributes:
        r = int(rng.integers(n_cap if n_cap else total))
        slot = 0 if attr_ids[r, 0] == NO_ATTRIBUTE else 1 if attr_ids[r, 1] == NO_ATTRIBUTE else None
        if slot is not None and a not in attr_ids[r]:
            attr_ids[r, slot], strength[r, 1 + slot] = a, 0.5
            if slot == 0:
                attr_conf[r] = 0.45 + 0.1 * rng.random()
    # A region no caption describes still reports some (weak, low-confidence) attribute, as a detector would.
    bare = np.flatnonzero(attr_ids[:, 0] == NO_ATTRIBUTE)
    attr_ids[bare, 0] = rng.integers(num_attributes, size=len(bare))
    strength[bare, 1] = WEAK_ATTRIBUTE
    attr_conf[bare] = 0.05 + 0.15 * rng.random(len(bare))

    order = np.argsort(-object_conf, kind="stable")  # detectors list boxes by confidence
    return RegionLayout(
        object_ids=object_ids[order], object_conf=object_conf.astype(np.float32)[order],
        attr_ids=attr_ids[order], attr_conf=attr_conf.astype(np.float32)[order],
        strength=strength.astype(np.float32)[order],
        noise_rows=rng.integers(0, NOISE_ROWS, size=(total, 2))[order],
        boxes=_boxes(rng, area, width, height)[order], from_captions=(np.arange(total) < n_cap)[order])


@lru_cache(maxsize=2)
def _world(num_objects: int, num_attributes: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed table [objects; attributes; no-attribute zero row; noise1; noise2] (float32) and the first row of
    each block after the objects. Identical for every dataset: it stands for the proxy's "detector"."""
    rng = np.random.default_rng(WORLD_SEED)
    table = np.zeros((num_objects + num_attributes + 1 + 2 * NOISE_ROWS, FEATURE_DIM), dtype=np.float32)
    objects = table[:num_objects]
    attributes = table[num_objects:num_objects + num_attributes]
    noise = table[num_objects + num_attributes + 1:]
    rng.standard_normal(dtype=np.float32, out=objects)
    np.maximum(1.6 * (objects - 0.5), 0, out=objects)  # sparse non-negative, like ReLU outputs
    rng.standard_normal(dtype=np.float32, out=attributes)
    np.maximum(1.2 * (attributes - 0.8), 0, out=attributes)
    rng.standard_normal(dtype=np.float32, out=noise)
    noise *= NOISE_STD
    first_noise = num_objects + num_attributes + 1
    return table, np.array([num_objects, first_noise, first_noise + NOISE_ROWS], dtype=np.int64)


class FeatureSynthesizer:
    """Renders the regions of many images at once on ``device`` (float32 math, float16 output)."""

    def __init__(self, *, num_objects: int, num_attributes: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.num_attributes = num_attributes
        table, self._offsets = _world(num_objects, num_attributes)
        self._table = torch.from_numpy(table).to(self.device)

    def object_embeddings(self) -> np.ndarray:
        """The fixed object-class embeddings, float32 [num_objects, FEATURE_DIM] (to inspect rendered features)."""
        return self._table[:self._offsets[0]].cpu().numpy().copy()  # never a view of the cached table

    def render(self, layouts: list[RegionLayout]) -> list[np.ndarray]:
        """Features of each layout, float16 [N_i, FEATURE_DIM]."""
        if not layouts:
            return []
        cat = np.concatenate
        # Rows of the stacked table [objects; attributes + none; noise1; noise2] and their weights, per region.
        attr = cat([lay.attr_ids for lay in layouts]).astype(np.int64)
        attr[attr == NO_ATTRIBUTE] = self.num_attributes
        noise = cat([lay.noise_rows for lay in layouts])
        rows = np.column_stack([cat([lay.object_ids for lay in layouts]), self._offsets[0] + attr,
                                self._offsets[1] + noise[:, 0], self._offsets[2] + noise[:, 1]]).astype(np.int64)
        weights = np.column_stack([cat([lay.strength for lay in layouts]), np.ones((len(rows), 2), np.float32)])
        # embedding_bag: one pass that gathers the 5 rows of each region and sums them with their weights.
        f = torch.nn.functional.embedding_bag(torch.from_numpy(rows).to(self.device), self._table,
                                              per_sample_weights=torch.from_numpy(weights).to(self.device),
                                              mode="sum")
        out = f.sub_(THRESHOLD).clamp_(min=0).to(torch.float16).cpu().numpy()
        return np.split(out, np.cumsum([lay.num_boxes for lay in layouts])[:-1])
