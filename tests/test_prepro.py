"""Caption preprocessing: Karpathy JSON and COCO annotations -> DATA_DIR, and CaptionData reading it back."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import zipfile
from pathlib import Path

import numpy as np
import pytest

from butd.data import package_data
from butd.data.prep import coco_source
from butd.data.captions import CaptionData, Vocabulary, tokenize
from butd.data.prep.coco_source import load_coco_captions, read_karpathy_split
from butd.data.prep.prepro import images_from_coco, prepro_coco, prepro_karpathy
from butd.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COCO_FILES = [SHARED / "coco_annotations" / f"captions_{s}2014.json.xz" for s in ("train", "val")]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_coco():
    if not all(p.is_file() for p in COCO_FILES):
        pytest.skip(f"real COCO caption annotations not found under {SHARED / 'coco_annotations'}")
    return load_coco_captions(COCO_FILES)


def _sentence(raw: str) -> dict:
    return {"raw": raw, "tokens": tokenize(raw)}


def _karpathy_doc() -> dict:
    # min_count=2 below: "giraffe" appears 3 times in train+restval captions (kept), "zebra" exactly 2 (UNK),
    # "elephant" 9 times but only in val/test captions, which do not count.
    return {"images": [
        {"split": "train", "cocoid": 10, "imgid": 0, "filename": "a.jpg", "sentences": [
            _sentence("A giraffe and a zebra."), _sentence("the giraffe is tall"),
            _sentence("one two three four five six seven eight nine ten eleven twelve")]},
        {"split": "restval", "cocoid": 7, "imgid": 1, "filename": "b.jpg", "sentences": [
            _sentence("  A giraffe near a zebra.  "), _sentence("a a a the the")]},
        {"split": "val", "cocoid": 30, "imgid": 2, "filename": "c.jpg",
         "sentences": [_sentence("elephant elephant elephant elephant elephant")]},
        {"split": "test", "cocoid": 20, "imgid": 3, "filename": "d.jpg",
         "sentences": [_sentence("an elephant elephant elephant elephant"), _sentence("a giraffe")]},
    ]}


def _write(tmp_path: Path, doc: object, name: str = "dataset_test.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_tokenize_lowercases_deletes_punctuation_and_splits():
    assert tokenize("A man's Black-and-white  DOG,\tsits.\n") == ["a", "mans", "blackandwhite", "dog", "sits"]
    assert tokenize("  ?! ") == []


def test_vocabulary_encode_decode_and_json_round_trip():
    vocab = Vocabulary(words=["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"])
    assert vocab.encode(["a", "cat", "dog"]) == [4, Vocabulary.UNK, 5]
    assert vocab.decode([1, 4, 5, 0, 2, 4]) == "a dog"  # skips bos/pad, stops at eos
    assert Vocabulary.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
    with pytest.raises(DataError, match="must start with"):
        Vocabulary(words=["a", "<pad>", "<bos>", "<eos>", "<unk>"])
    with pytest.raises(DataError, match="'dog' twice"):
        Vocabulary(words=["<pad>", "<bos>", "<eos>", "<unk>", "dog", "dog"])


def test_karpathy_json_to_data_dir(tmp_path):
    summary = prepro_karpathy(_write(tmp_path, _karpathy_doc()), tmp_path / "data", min_count=2, max_length=8)
    data = CaptionData.load(tmp_path / "data")
    # Count 3 > min_count 2 is kept, count 2 is not; val/test-only words never enter; ties sort alphabetically.
    assert data.vocab.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "giraffe", "the"]  # a: 7, others: 3
    assert summary.info["vocab_size"] == 7
    assert data.split_ids("train").tolist() == [7, 10]  # restval joins train; cocoid preferred to imgid
    assert data.split_ids("val").tolist() == [30] and data.split_ids("test").tolist() == [20]
    assert data.all_image_ids().tolist() == [7, 10, 20, 30]
    assert data.max_length == 8

    labels = data.labels(10)
    assert labels.shape == (3, 8) and labels.dtype == np.int64
    assert data.vocab.decode(labels[0]) == "a giraffe <unk> a <unk>"  # "and", "zebra" (count 2) unknown
    assert labels[2].tolist() == [3] * 8  # 12 words truncated to 8, no bos/eos stored
    assert labels[1].tolist() == [6, 5, 3, 3, 0, 0, 0, 0]  # "the giraffe is tall", zero padded
    assert summary.info["fraction_truncated"] == pytest.approx(1 / 8)  # 1 of 8 captions
    assert summary.info["images"] == {"train": 2, "val": 1, "test": 1}
    assert summary.info["captions"] == {"train": 5, "val": 1, "test": 2}

    assert data.references(7) == ["A giraffe near a zebra.", "a a a the the"]  # raw, stripped
    with pytest.raises(KeyError, match="image 99"):
        data.labels(99)
    with pytest.raises(DataError, match="no split 'restval'"):
        data.split_ids("restval")


def test_data_dir_files_are_complete_and_missing_file_is_named(tmp_path):
    prepro_karpathy(_write(tmp_path, _karpathy_doc()), tmp_path / "data", min_count=0, max_length=16)
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == ["captions.h5", "info.json", "references.json", "splits.json", "vocab.json"]  # no temp files
    (tmp_path / "data" / "captions.h5").unlink()
    with pytest.raises(DataError, match="captions.h5 is missing"):
        CaptionData.load(tmp_path / "data")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"][1]["sentences"][0].pop("tokens"), r"images\[1\] \(image 7\): sentences\[0\] lacks"),
    (lambda d: d["images"][2].update(cocoid=10), r"images\[2\] \(image 10\): duplicate image id .*images\[0\]"),
    (lambda d: d["images"][3].update(sentences=[]), r"images\[3\] \(image 20\): image has no captions"),
    (lambda d: d["images"][0].update(split="dev"), r"images\[0\] \(image 10\): 'split' must be"),
    (lambda d: d["images"][0].pop("sentences"), r"images\[0\] \(image 10\): missing 'sentences'"),
])
def test_karpathy_json_errors_name_file_index_and_image(tmp_path, mutate, message):
    doc = _karpathy_doc()
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=message) as info:
        prepro_karpathy(path, tmp_path / "data")
    assert str(path) in str(info.value)
    assert not (tmp_path / "data" / "info.json").exists()


def test_malformed_json_is_a_data_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        prepro_karpathy(path, tmp_path / "data")


def test_packaged_karpathy_ids_match_the_official_lists():
    split_dir = SHARED / "karpathy_split"
    if not split_dir.is_dir():
        pytest.skip(f"{split_dir} not found")
    official = read_karpathy_split(split_dir)
    packaged = read_karpathy_split(None)
    assert official.val == packaged.val and official.test == packaged.test
    assert len(packaged.val) == len(packaged.test) == 5000
    assert len(package_data.object_names()) == 1600 and len(package_data.attribute_names()) == 400
    assert package_data.object_names()[16] == ["stop sign", "stopsign"]


def test_karpathy_split_file_errors_name_file_and_line(tmp_path):
    (tmp_path / "karpathy_val_images.txt").write_text("val2014/x.jpg 5\nval2014/y.jpg seven\n")
    (tmp_path / "karpathy_test_images.txt").write_text("val2014/z.jpg 6\n")
    with pytest.raises(DataError, match=r"karpathy_val_images.txt:2: expected"):
        read_karpathy_split(tmp_path)


def test_real_coco_annotations_give_the_karpathy_split_sizes(real_coco):
    images = images_from_coco(real_coco, read_karpathy_split(None))
    sizes = {name: sum(im.split == name for im in images) for name in ("train", "val", "test")}
    assert sizes == {"train": 113287, "val": 5000, "test": 5000}
    assert sum(len(im.tokens) for im in images) == 414113 + 202654


def test_coco_annotations_to_data_dir_via_tool(tmp_path, real_coco):
    # A subset of the real annotations: 4 train2014 images, 2 Karpathy val, 2 test and 2 restval images.
    split = read_karpathy_split(None)
    val, test = sorted(split.val)[:2], sorted(split.test)[:2]
    train = [i for i in sorted(real_coco.images) if "train2014" in real_coco.images[i].file_name][:4]
    restval = [i for i in sorted(real_coco.images) if "val2014" in real_coco.images[i].file_name
               and i not in split.val and i not in split.test][:2]
    files = []
    for name, ids in (("train", train), ("val", val + test + restval)):
        imgs = [real_coco.images[i] for i in ids]
        doc = {"images": [{"id": im.image_id, "file_name": im.file_name} for im in imgs],
               "annotations": [{"image_id": im.image_id, "id": k, "caption": c}
                               for k, im in enumerate(imgs) for c in im.captions]}
        path = tmp_path / (f"captions_{name}.json" + (".xz" if name == "val" else ""))
        with (lzma.open(path, "wt") if name == "val" else open(path, "w")) as f:
            json.dump(doc, f)
        files.append(str(path))
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    for name, ids in (("val", val), ("test", test)):
        (split_dir / f"karpathy_{name}_images.txt").write_text(
            "".join(f"val2014/{real_coco.images[i].file_name} {i}\n" for i in ids))

    tool = _load_tool("prepro_captions")
    assert tool.main(["--coco-captions", *files, "--karpathy-split", str(split_dir),
                      "--output", str(tmp_path / "data"), "--min-count", "0"]) == 0
    data = CaptionData.load(tmp_path / "data")
    assert data.split_ids("train").tolist() == sorted(train + restval)
    assert data.split_ids("val").tolist() == val and data.split_ids("test").tolist() == test
    first = real_coco.images[val[0]]
    assert data.references(val[0]) == [c.strip() for c in first.captions]
    trained = real_coco.images[train[0]]  # min-count 0: every train word is in the vocabulary
    decoded = [data.vocab.decode(row) for row in data.labels(train[0])]
    assert decoded == [" ".join(tokenize(c)[:16]) for c in trained.captions]
    info = json.loads((tmp_path / "data" / "info.json").read_text())
    assert info["sources"][:2] == files and "punctuation" in info["tokenization"]

    # A caption file that lacks the listed Karpathy val images is refused, naming an image.
    with pytest.raises(DataError, match=f"image {val[0]}"):
        prepro_coco(load_coco_captions(files[:1]), read_karpathy_split(split_dir), tmp_path / "other")


def test_coco_annotation_errors_name_file_and_image(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(DataError, match=r"caps.json: image 2 has no captions"):
        load_coco_captions([path])
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 3, "caption": "a dog"}]}))
    with pytest.raises(DataError, match=r"caps.json: annotations\[0\] refers to image 3"):
        load_coco_captions([path])
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(DataError, match=r"image 1 is also in"):
        load_coco_captions([path, path])


def test_default_source_reads_the_annotations_inside_the_spice_jar(tmp_path, monkeypatch):
    jar = coco_source.spice_jar_path()
    with zipfile.ZipFile(jar) as z:
        digests = [hashlib.md5(z.read(entry)).hexdigest() for entry in coco_source.JAR_ENTRIES]
    # The md5s of the official files (see ../shared/data/README.md): the jar holds the real COCO annotations.
    assert digests == ["fd9c736f3d70b2b091baa5c38c3a0df1", "60ba09171727a5d6bddbbf9906fa808b"]

    fake = tmp_path / "spice-1.0.jar"  # the same reading path on a small jar
    with zipfile.ZipFile(fake, "w") as z:
        for k, entry in enumerate(coco_source.JAR_ENTRIES):
            z.writestr(entry, json.dumps({"images": [{"id": k, "file_name": f"{k}.jpg", "width": 5, "height": 4}],
                                          "annotations": [{"image_id": k, "caption": "A cat."}]}))
    monkeypatch.setattr(coco_source, "spice_jar_path", lambda: fake)
    coco = load_coco_captions(None)
    assert sorted(coco.images) == [0, 1] and coco.images[1].captions == ("A cat.",)
    assert coco.images[0].width == 5 and coco.sources[0].endswith("!coco/annotations/captions_train2014.json")
