"""Leaderboard evaluation (pycocoevalcap) and COCO result / reference files."""
from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest

import butd.metrics.coco_eval as coco_eval
from butd.errors import DataError
from butd.metrics import METRIC_NAMES, load_coco_references, load_results, score_captions, write_results

DEMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_caption_demo"
EXPECTED = {"BLEU-1": 0.5793995754573356, "BLEU-2": 0.40439129741018104, "BLEU-3": 0.2785363856619147,
            "BLEU-4": 0.1908290437674253, "METEOR": 0.19525467177780284, "ROUGE-L": 0.39625269357570847,
            "CIDEr-D": 0.5997905185184199}


@pytest.fixture(scope="module")
def demo() -> tuple[dict[int, str], dict[int, list[str]]]:
    if not DEMO.exists():
        pytest.skip(f"COCO caption demo not found at {DEMO}")
    references = load_coco_references(DEMO / "captions_val2014_fakecap_refs.json")
    results = load_results(DEMO / "captions_val2014_fakecap_results.json", references)
    return results, references


@pytest.fixture(scope="module")
def demo_report(demo):
    """One full run with Java (PTB tokenizer, METEOR); no CoreNLP jars, and downloading forbidden."""
    if shutil.which("java") is None:
        pytest.skip("java is needed for the official PTB tokenizer and METEOR")
    import pycocoevalcap.spice.get_stanford_models as downloader

    def no_download(*args, **kwargs):
        raise AssertionError("score_captions tried to download Stanford CoreNLP")

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(coco_eval.SPICE_JARS_ENV, raising=False)
        mp.setattr(downloader, "urlretrieve", no_download)
        if all((coco_eval._SPICE_DIR / "lib" / j).exists() for j in coco_eval.CORENLP_JARS):
            pytest.skip("CoreNLP jars are installed in pycocoevalcap: the jar-less path cannot be tested")
        return score_captions(*demo)


def test_reproduces_the_official_coco_example(demo_report, demo):
    assert list(demo_report.metrics) == list(METRIC_NAMES)
    for name, value in EXPECTED.items():
        assert demo_report.metrics[name] == pytest.approx(value, abs=1e-9), name
    results, _ = demo
    assert set(demo_report.per_image) == set(results)
    cider = [scores["CIDEr-D"] for scores in demo_report.per_image.values()]
    assert sum(cider) / len(cider) == pytest.approx(EXPECTED["CIDEr-D"], abs=1e-12)
    assert json.loads(json.dumps(demo_report.to_dict()))["metrics"]["BLEU-4"] == demo_report.metrics["BLEU-4"]


def test_spice_is_none_with_a_reason_without_corenlp_jars(demo_report):
    assert demo_report.metrics["SPICE"] is None
    assert len(demo_report.notes) == 1 and demo_report.notes[0].startswith("SPICE unavailable")
    assert coco_eval.SPICE_JARS_ENV in demo_report.notes[0] and "stanford-corenlp-3.6.0.jar" in demo_report.notes[0]


def test_spice_jar_location(tmp_path, monkeypatch):
    monkeypatch.delenv(coco_eval.SPICE_JARS_ENV, raising=False)
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    found, reason = coco_eval.find_corenlp_jars(tmp_path)
    assert found is None and "lacks stanford-corenlp-3.6.0-models.jar" in reason and str(tmp_path) in reason
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert coco_eval.find_corenlp_jars(tmp_path) == (tmp_path, "")
    monkeypatch.setenv(coco_eval.SPICE_JARS_ENV, str(tmp_path))
    assert coco_eval.find_corenlp_jars() == (tmp_path, "")
    command = coco_eval.spice_command(tmp_path, tmp_path / "in.json", tmp_path / "out.json")
    class_path = command[command.index("-cp") + 1]
    assert str(tmp_path / "stanford-corenlp-3.6.0-models.jar") in class_path
    assert "spice-1.0.jar" in class_path and command[-2:] == ["-subset", "-silent"]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java")
def test_spice_failure_becomes_a_reason_not_a_crash(tmp_path):
    for jar in coco_eval.CORENLP_JARS:  # unreadable jars: the SPICE JVM fails to load CoreNLP
        (tmp_path / jar).write_bytes(b"not a jar")
    scores, reason = coco_eval._run_spice({1: ["a dog runs"]}, {1: ["a dog is running"]}, tmp_path)
    assert scores is None and "exited with status" in reason


def test_without_java_bleu_rouge_cider_are_still_reported(demo, monkeypatch):
    results, references = demo
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    report = score_captions(results, references)
    assert report.metrics["METEOR"] is None and report.metrics["SPICE"] is None
    assert any("pure-Python" in n for n in report.notes) and any(n.startswith("METEOR") for n in report.notes)
    # The PTB-like tokenizer is close to Java's PTB tokenizer: scores agree to about 1e-3.
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert report.metrics[name] == pytest.approx(EXPECTED[name], abs=2e-3), name


def test_ptb_like_tokenizer_matches_java_ptb_on_typical_cases():
    cases = {
        "A man's dog doesn't sit.": "a man 's dog does n't sit",
        'A sign reads "STOP" (in red), near Main St.': "a sign reads stop -lrb- in red -rrb- near main st.",
        "A T.V. on a stand, a couch... and a lamp!!": "a t.v. on a stand a couch and a lamp !!",
        "A black-and-white photo of 1,000 birds;\n flying": "a black-and-white photo of 1,000 birds flying",
        "Dogs' toys: balls, and -- a 3:30 clock; it's 5% off? I'm sure we'll go.":
            "dogs toys balls and a 3:30 clock it 's 5 % off i 'm sure we 'll go",
    }  # outputs of pycocoevalcap's PTBTokenizer (Java) on these captions
    for raw, expected in cases.items():
        assert coco_eval.ptb_like_tokenize(raw) == expected


def test_score_captions_refuses_results_without_references():
    with pytest.raises(DataError, match="have no references: \\[3\\]"):
        score_captions({3: "a cat"}, {4: ["a dog"]})


# --- result and reference files ----------------------------------------------------------------


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"image_id": 1, "caption": "a cat"}, "expected a JSON list"),
    ([], "result list is empty"),
    ([["image_id", 1]], "entry 0 is not an object"),
    ([{"image_id": 1}], "entry 0 is not an object with \"image_id\" and \"caption\""),
    ([{"image_id": "1", "caption": "a cat"}], "entry 0: image_id '1' is not an integer"),
    ([{"image_id": 1.0, "caption": "a cat"}], "image_id 1.0 is not an integer"),
    ([{"image_id": True, "caption": "a cat"}], "image_id True is not an integer"),
    ([{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "a dog"}],
     "entry 1 \\(image 1\\): duplicate image id, first at entry 0"),
    ([{"image_id": 1, "caption": "  "}], "image 1\\): caption is empty"),
    ([{"image_id": 1, "caption": None}], "caption is NoneType, not a string"),
    ([{"image_id": 1, "caption": " \n\r\n "}], "image 1\\): caption is empty"),
    ([{"image_id": 9, "caption": "a cat"}], "entry 0 \\(image 9\\): image id not in the references"),
])
def test_load_results_refuses(tmp_path, data, message):
    path = write_json(tmp_path / "results.json", data)
    with pytest.raises(DataError, match=message) as info:
        load_results(path, references={1: ["a cat"], 2: ["a dog"]})
    assert str(path) in str(info.value)


def test_line_breaks_in_captions_become_spaces_as_in_pycocoevalcap(tmp_path):
    path = write_json(tmp_path / "results.json", [
        {"image_id": 1, "caption": "Some tasty and nice food ready to eat.\n"},  # as in captions_train2014.json
        {"image_id": 2, "caption": "a cat\nsits"},
        {"image_id": 3, "caption": "a cat\r\non a mat\u2028today "},
    ])
    assert load_results(path) == {1: "Some tasty and nice food ready to eat.", 2: "a cat sits",
                                   3: "a cat on a mat today"}
    write_results(tmp_path / "again.json", {1: "a dog\n", 2: "two\ncats"})
    assert json.loads((tmp_path / "again.json").read_text()) == [{"image_id": 1, "caption": "a dog"},
                                                                 {"image_id": 2, "caption": "two cats"}]


def test_official_example_with_line_breaks_scores_as_the_official_one(tmp_path, demo):
    """The official results with a line break added to every caption (at the end, or between two words) load as
    the same captions, so they get the official scores (test_reproduces_the_official_coco_example)."""
    results, references = demo
    broken = [{"image_id": i, "caption": c + "\n" if n % 2 else c.replace(" ", "\n", 1)}
              for n, (i, c) in enumerate(results.items())]
    assert sum("\n" in e["caption"] for e in broken) == len(results)
    path = write_json(tmp_path / "results.json", broken)
    assert load_results(path, references) == results


def test_load_results_lists_ten_problems_and_counts_the_rest(tmp_path):
    path = write_json(tmp_path / "r.json", [{"image_id": i, "caption": ""} for i in range(25)])
    with pytest.raises(DataError) as info:
        load_results(path)
    message = str(info.value)
    assert "25 invalid result entries" in message and "and 15 more" in message
    assert "(image 9)" in message and "(image 10)" not in message


def test_load_results_refuses_invalid_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"image_id": 1, "caption": "a cat"')
    with pytest.raises(DataError, match="not valid JSON"):
        load_results(path)


def test_write_then_load_results_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results(path, {42: "a dog on a couch", 7: "a cat é"})
    assert [e["image_id"] for e in json.loads(path.read_text(encoding="utf-8"))] == [7, 42]
    assert load_results(path, references={7: ["x"], 42: ["y"]}) == {7: "a cat é", 42: "a dog on a couch"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
    with pytest.raises(DataError, match="image 3: caption is empty"):
        write_results(path, {3: ""})
    assert load_results(path) == {7: "a cat é", 42: "a dog on a couch"}  # the old file is intact


def test_load_coco_references_plain_and_xz(tmp_path):
    data = {"images": [{"id": 5}], "annotations": [{"image_id": 3, "caption": "b"}, {"image_id": 1, "caption": "a"},
                                                   {"image_id": 3, "caption": "c"}]}
    plain = write_json(tmp_path / "refs.json", data)
    packed = tmp_path / "refs.json.xz"
    with lzma.open(packed, "wt") as f:
        json.dump(data, f)
    for path in (plain, packed):
        assert load_coco_references(path) == {1: ["a"], 3: ["b", "c"]}
    with pytest.raises(DataError, match="annotation 0 lacks an integer"):
        load_coco_references(write_json(tmp_path / "bad.json", {"annotations": [{"image_id": "3", "caption": "b"}]}))
    with pytest.raises(DataError, match="expected a COCO caption file"):
        load_coco_references(write_json(tmp_path / "list.json", [{"image_id": 3, "caption": "b"}]))
