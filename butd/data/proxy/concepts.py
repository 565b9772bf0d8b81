"""Visual concepts of the COCO-proxy: which Visual Genome objects and attributes an image's captions mention.

Caption tokens are matched against the packaged VG class names (all comma-separated synonyms, multi-word names
included, tokenised like captions), plus the simple plurals ``+s`` / ``+es`` of object names. The result says,
per object, how many captions mention it, how many instances they imply ("two dogs" -> 2, "dogs" -> 2) and which
attributes describe it ("a small white dog": small, white).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from butd.data.captions import tokenize
from butd.data.package_data import attribute_names, object_names

# Names that COCO captions mostly use as relations, quantities or framing ("in front of", "a picture of",
# "a group of"), not as visible things; matching them would put regions where a detector would not.
OBJECT_STOPLIST = frozenset({"front", "top", "back", "bottom", "view", "background", "picture", "photo", "image",
                             "group", "couple", "bunch", "lot", "line", "piece", "number", "half", "distance",
                             "air", "day", "herd"})
ATTRIBUTE_STOPLIST = frozenset({"up", "down", "off", "above", "still", "back", "made", "half", "number", "bunch",
                                "herd", "alone"})
COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6,
               "pair": 2, "couple": 2, "several": 3, "few": 3, "multiple": 3, "many": 4, "group": 3, "bunch": 3,
               "herd": 4, "flock": 4, "lots": 4}
IRREGULAR_PLURALS = frozenset({"people", "men", "women", "children", "geese", "mice", "feet", "teeth"})
MAX_INSTANCES = 6
ATTACH_WINDOW = 3  # an attribute describes an object mentioned at most this many tokens after (or before) it


@dataclass(frozen=True)
class Mention:
    """A concept found in one caption: tokens ``start:end``; ``plural`` for a plural form of an object."""

    kind: str  # "object" | "attribute"
    concept: int
    start: int
    end: int
    plural: bool = False


@dataclass
class ObjectConcept:
    """An object class mentioned by an image's captions."""

    object_id: int
    captions: int = 0  # number of captions that mention it
    instances: int = 1  # largest instance count any caption implies
    attributes: Counter = field(default_factory=Counter)  # attribute id -> mentions describing this object


@dataclass(frozen=True)
class ImageConcepts:
    """Objects (most mentioned first) and attributes not attached to any object, of one image's captions."""

    objects: list[ObjectConcept]
    loose_attributes: list[int]
    num_captions: int


class ConceptLexicon:
    """Token-sequence lookup of the 1,600 object and 400 attribute names."""

    def __init__(self, *, objects: Sequence[Sequence[str]], attributes: Sequence[Sequence[str]]) -> None:
        self.num_objects, self.num_attributes = len(objects), len(attributes)
        self.objects: dict[tuple[str, ...], tuple[int, bool]] = {}
        self.attributes: dict[tuple[str, ...], int] = {}
        for cid, names in enumerate(objects):
            for name in names:
                key = tuple(tokenize(name))
                if key and " ".join(key) not in OBJECT_STOPLIST:
                    self.objects.setdefault(key, (cid, False))
        exact = set(self.objects)
        for key, (cid, _) in list(self.objects.items()):
            # VG also lists plural names ("giraffes", "people"): plural when the singular is a name too.
            last = key[-1]
            if last in IRREGULAR_PLURALS or any(key[:-1] + (last[:-n],) in exact
                                                for n in (1, 2) if last.endswith("es"[2 - n:])):
                self.objects[key] = (cid, True)
            for suffix in ("s", "es"):  # exact names win over plural forms ("glasses" is its own class)
                self.objects.setdefault(key[:-1] + (key[-1] + suffix,), (cid, True))
        for cid, names in enumerate(attributes):
            for name in names:
                key = tuple(tokenize(name))
                if key and " ".join(key) not in ATTRIBUTE_STOPLIST:
                    self.attributes.setdefault(key, cid)
        # Most tokens ("a", "on", "the") start no name: one set lookup rules them out.
        self._first = {k[0] for k in self.objects} | {k[0] for k in self.attributes}
        self._max_len = max(len(k) for k in [*self.objects, *self.attributes])

    @classmethod
    @lru_cache(maxsize=1)
    def packaged(cls) -> ConceptLexicon:
        """The lexicon of the packaged VG vocabularies (cached)."""
        return cls(objects=object_names(), attributes=attribute_names())

    def _longest(self, tokens: Sequence[str], i: int, table: dict) -> tuple[int, object]:
        for n in range(min(self._max_len, len(tokens) - i), 0, -1):
            hit = table.get(tuple(tokens[i:i + n]))
            if hit is not None:
                return n, hit
        return 0, None

    def mentions(self, tokens: Sequence[str]) -> list[Mention]:
        """Concept mentions in one tokenised caption, left to right, longest match first.

        A word that is both an attribute and an object ("glass") is an attribute when an object follows it
        ("glass table") and an object otherwise ("a glass of wine").
        """
        out: list[Mention] = []
        i = 0
        while i < len(tokens):
            if tokens[i] not in self._first:
                i += 1
                continue
            o_len, o_hit = self._longest(tokens, i, self.objects)
            a_len, a_hit = self._longest(tokens, i, self.attributes)
            if a_len and (a_len > o_len or (a_len == o_len and self._longest(tokens, i + a_len, self.objects)[0])):
                out.append(Mention("attribute", a_hit, i, i + a_len))
                i += a_len
            elif o_len:
                cid, plural = o_hit
                out.append(Mention("object", cid, i, i + o_len, plural))
                i += o_len
            else:
                i += 1
        return out

    def image_concepts(self, captions: Sequence[Sequence[str]]) -> ImageConcepts:
        """Aggregate the mentions of all captions (token lists) of one image."""
        objects: dict[int, ObjectConcept] = {}
        first_seen: dict[int, int] = {}
        loose: Counter = Counter()
        for tokens in captions:
            mentions = self.mentions(tokens)
            objs = [m for m in mentions if m.kind == "object"]
            previous_end = 0
            for m in objs:
                concept = objects.setdefault(m.concept, ObjectConcept(m.concept, captions=0))
                first_seen.setdefault(m.concept, len(first_seen))
                concept.instances = max(concept.instances, _instances(tokens, m, previous_end))
                previous_end = m.end
            for cid in {m.concept for m in objs}:
                objects[cid].captions += 1
            for m in mentions:
                if m.kind != "attribute":
                    continue
                target = _attached_object(m, objs, tokens)
                if target is None:
                    loose[m.concept] += 1
                else:
                    objects[target].attributes[m.concept] += 1
        ordered = sorted(objects.values(), key=lambda c: (-c.captions, first_seen[c.object_id]))
        return ImageConcepts(objects=ordered, loose_attributes=[a for a, _ in loose.most_common()],
                             num_captions=len(captions))


def _instances(tokens: Sequence[str], m: Mention, previous_end: int) -> int:
    # "two men playing frisbee": the count word belongs to "men", not to "frisbee" after it.
    for word in tokens[max(previous_end, m.start - 3):m.start]:
        if word in COUNT_WORDS:
            return min(COUNT_WORDS[word], MAX_INSTANCES)
    return 2 if m.plural else 1


def _attached_object(attr: Mention, objects: list[Mention], tokens: Sequence[str]) -> int | None:
    after = [o for o in objects if 0 <= o.start - attr.end < ATTACH_WINDOW]
    before = [o for o in objects if 0 <= attr.start - o.end < ATTACH_WINDOW]
    # Verb-like ("a man riding a bus") and predicative ("the dog is brown") attributes describe the object
    # before them; adjectives ("a small white dog") the object after them.
    prefer_before = tokens[attr.end - 1].endswith("ing") or (attr.start > 0 and tokens[attr.start - 1] in
                                                              ("is", "are"))
    for group in ((before, after) if prefer_before else (after, before)):
        if group:
            nearest = min(group, key=lambda o: o.start - attr.end if o.start >= attr.end else attr.start - o.end)
            return nearest.concept
    return None
