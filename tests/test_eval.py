"""tools/eval.py and butd.evaluate: the official COCO example, refused inputs, split and image-info modes, the table."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from butd.config import config_to_dict
from butd import evaluate
from butd.evaluate import EvalSettings, evaluate_checkpoint, format_leaderboard, read_image_info
from butd.errors import DataError
from butd.metrics import METRIC_NAMES, score_captions
from butd.models import build_model
from butd.core.checkpoint import save_checkpoint
from train_fixtures import make_tiny_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "coco_caption_demo"
EXPECTED = {"BLEU-1": 0.5793995754573356, "BLEU-2": 0.40439129741018104, "BLEU-3": 0.2785363856619147,
            "BLEU-4": 0.1908290437674253, "METEOR": 0.19525467177780284, "ROUGE-L": 0.39625269357570847,
            "CIDEr-D": 0.5997905185184199}


def load_tool():
    spec = importlib.util.spec_from_file_location("butd_tool_eval", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_tool = load_tool()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """tools/eval.py as a user runs it (the package found through PYTHONPATH, as if installed)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


# --- mode 3: an existing result file -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    """One CLI run on the official COCO caption example (METEOR's JVM makes it the slow part of this file)."""
    if not DEMO.is_dir():
        pytest.skip(f"shared data not found at {DEMO}")
    out = tmp_path_factory.mktemp("official")
    empty_jars = tmp_path_factory.mktemp("no_jars")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("BUTD_SPICE_JARS", str(empty_jars))
        code = eval_tool.main(["--results", str(DEMO / "captions_val2014_fakecap_results.json"),
                               "--references", str(DEMO / "captions_val2014_fakecap_refs.json"),
                               "--output", str(out)])
    return code, stdout.getvalue(), out, empty_jars


def test_results_file_reproduces_the_official_coco_example(official):
    code, stdout, out, _ = official
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name, value in EXPECTED.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["num_images"] == 1000 and metrics["checkpoint"] is None
    assert "| fakecap " in stdout and "|   19.1 |" in stdout and "|    60.0 |" in stdout


def test_spice_without_jars_is_null_with_a_one_line_reason(official):
    _, _, out, empty_jars = official
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["SPICE"] is None
    (reason,) = [n for n in metrics["notes"] if n.startswith("SPICE")]
    assert str(empty_jars) in reason and "\n" not in reason


def test_results_file_per_image_scores(official):
    _, _, out, _ = official
    rows = [json.loads(line) for line in (out / "captions_scored.jsonl").read_text().splitlines()]
    assert len(rows) == 1000 and len({r["image_id"] for r in rows}) == 1000
    first = rows[0]
    assert first["image_id"] == 404464 and len(first["references"]) == 5
    assert set(first["scores"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}
    mean_cider = sum(r["scores"]["CIDEr-D"] for r in rows) / len(rows)
    assert mean_cider == pytest.approx(EXPECTED["CIDEr-D"], abs=1e-9)


REFERENCES = {"annotations": [{"image_id": 1, "caption": "A dog on the grass."},
                              {"image_id": 2, "caption": "A man riding a bike."}]}


@pytest.mark.parametrize("results, expected", [
    ([{"image_id": 1, "caption": "a dog"}, {"image_id": 99, "caption": "a cat"}],
     "image 99): image id not in the references"),
    ([{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}], "duplicate image id"),
    ([{"image_id": 1, "caption": "  "}], "image 1): caption is empty"),
    ([{"image_id": 2, "caption": "\n \n"}], "image 2): caption is empty"),
    ({"image_id": 1, "caption": "a dog"}, "expected a JSON list"),
    (None, "does not exist"),
])
def test_refused_result_files_exit_2_with_a_message(tmp_path, capsys, results, expected):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(REFERENCES))
    res = tmp_path / "res.json"
    if results is not None:
        res.write_text(json.dumps(results))
    code = eval_tool.main(["--results", str(res), "--references", str(refs), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and str(res) in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_refusal_from_the_command_line_has_no_traceback(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(REFERENCES))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a dog"}]))
    proc = run_cli("--results", str(res), "--references", str(refs), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "duplicate image id" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--results", "r.json"], "--results needs --references"),
    (["--results", "r.json", "--references", "c.json", "--checkpoint", "x.pt"], "does not use --checkpoint"),
    (["--checkpoint", "x.pt", "--features", "f"], "split evaluation needs --data"),
    (["--image-info", "i.json", "--checkpoint", "x.pt"], "--image-info needs --features"),
])
def test_mixed_or_missing_mode_arguments_are_usage_errors(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        eval_tool.main([*args, "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


# --- modes 1 and 2: a checkpoint ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny DATA_DIR + feature store (24 images, test split of 4) and an untrained checkpoint whose captions are
    several words long (sharpened logits, penalised <eos>)."""
    root = tmp_path_factory.mktemp("tiny")
    data_dir, features = make_tiny_dataset(root)
    config = tiny_config()
    config.eval.beam_size = 2
    vocab = json.loads((data_dir / "vocab.json").read_text())["words"]
    torch.manual_seed(0)
    model = build_model(config.model, len(vocab))
    with torch.no_grad():
        model.logit.weight.mul_(10.0)
        model.logit.bias[2] = -4.0
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, {"format_version": 1, "stage": "scst", "model_name": "updown",
                                 "model": model.state_dict(), "config": config_to_dict(config), "vocab": vocab,
                                 "epoch": 1})
    splits = json.loads((data_dir / "splits.json").read_text())
    return data_dir, features, checkpoint, splits


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """A machine without java: scoring falls back to pure Python (no METEOR JVM start, which takes ~30 s); the real
    toolkit path is covered by the official example above. Records the arguments score_captions receives."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    calls = []

    def spy(results, references, *, spice_jars=None):
        calls.append({"results": dict(results), "references": dict(references), "spice_jars": spice_jars})
        return score_captions(results, references, spice_jars=spice_jars)

    monkeypatch.setattr(evaluate, "score_captions", spy)
    return calls


def test_result_file_with_line_breaks_is_scored_like_without(tmp_path, capsys, no_java):
    """A caption ending in a line break, as real COCO annotations have them, is scored, not refused."""
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(REFERENCES))
    scored = {}
    for name, space, end in (("plain", " ", ""), ("newline", "\n", "\n")):
        res = tmp_path / f"{name}.json"
        res.write_text(json.dumps([{"image_id": 1, "caption": "A dog on the grass." + end},
                                   {"image_id": 2, "caption": f"A man{space}riding a bike.{end}"}]))
        code = eval_tool.main(["--results", str(res), "--references", str(refs), "--output", str(tmp_path / name),
                               "--spice-jars", str(tmp_path)])
        assert code == 0, capsys.readouterr().err
        scored[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        rows = [json.loads(line) for line in (tmp_path / name / "captions_scored.jsonl").read_text().splitlines()]
        assert [r["caption"] for r in rows] == ["A dog on the grass.", "A man riding a bike."]
    assert {m: scored["newline"][m] for m in METRIC_NAMES} == {m: scored["plain"][m] for m in METRIC_NAMES}
    assert scored["plain"]["CIDEr-D"] > 0


def test_split_evaluation_writes_metrics_captions_and_result_file(tiny, tmp_path, capsys, no_java):
    data_dir, features, checkpoint, splits = tiny
    out = tmp_path / "out"
    code = eval_tool.main(["--checkpoint", str(checkpoint), "--data", str(data_dir), "--features", str(features),
                           "--split", "test", "--beam-size", "3", "--output", str(out),
                           "--spice-jars", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| updown-scst |" in stdout and "CIDEr-D" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    test_ids = splits["test"]
    assert metrics["num_images"] == len(test_ids) and metrics["beam_size"] == 3
    assert metrics["checkpoint"] == str(checkpoint) and metrics["split"] == "test"
    assert metrics["max_length"] == 8  # not given on the command line: the checkpoint's eval.max_length
    assert all(0.0 <= metrics[m] <= 10.0 for m in METRIC_NAMES if m not in ("METEOR", "SPICE"))
    assert metrics["METEOR"] is None and metrics["SPICE"] is None
    assert any("java not found" in n for n in metrics["notes"])
    (call,) = no_java
    assert call["spice_jars"] == tmp_path and sorted(call["results"]) == sorted(splits["test"])
    assert call["references"][splits["test"][0]][0].endswith(".")  # raw references from DATA_DIR

    rows = [json.loads(line) for line in (out / "captions_test.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == test_ids
    for row in rows:
        assert row["caption"] and row["references"] and "CIDEr-D" in row["scores"]
        assert len(row["alternatives"]) == 3 and row["alternatives"][0]["caption"] == row["caption"]
        assert isinstance(row["alternatives"][0]["logprob"], float)
    server = json.loads((out / "captions_test_updown-scst_results.json").read_text())
    assert sorted(e["image_id"] for e in server) == sorted(test_ids)
    assert {e["image_id"]: e["caption"] for e in server} == {r["image_id"]: r["caption"] for r in rows}


def test_evaluate_checkpoint_returns_the_metrics_by_name(tiny, no_java):
    data_dir, features, checkpoint, splits = tiny
    metrics = evaluate_checkpoint(checkpoint, data_dir=data_dir, features=features, split="val",
                                  settings=EvalSettings(overrides=("eval.beam_size=1",)))
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics["CIDEr-D"] is not None and metrics["SPICE"] is None
    assert sorted(no_java[0]["results"]) == sorted(splits["val"])


def test_image_info_mode_writes_the_server_file_with_every_image_once(tiny, tmp_path, capsys):
    data_dir, features, checkpoint, splits = tiny
    ids = splits["val"] + splits["test"]
    info = tmp_path / "image_info_test2014.json"
    info.write_text(json.dumps({"info": {"year": 2014}, "images": [{"id": i} for i in ids + ids[:2]]}))
    out = tmp_path / "out"
    code = eval_tool.main(["--checkpoint", str(checkpoint), "--image-info", str(info), "--features", str(features),
                           "--output", str(out), "--beam-size", "1"])
    assert code == 0, capsys.readouterr().err
    entries = json.loads((out / "captions_test2014_updown-scst_results.json").read_text())
    assert sorted(e["image_id"] for e in entries) == sorted(ids)
    assert all(set(e) == {"image_id", "caption"} and e["caption"].strip() for e in entries)
    assert not (out / "metrics.json").exists()


def test_image_info_split_from_file_names_and_sanitized_alg(tiny, tmp_path, capsys):
    data_dir, features, checkpoint, splits = tiny
    info = tmp_path / "subset.json"
    info.write_text(json.dumps({"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"}
                                           for i in splits["test"]]}))
    code = eval_tool.main(["--checkpoint", str(checkpoint), "--image-info", str(info), "--features", str(features),
                           "--output", str(tmp_path / "out"), "--alg", "My model_v2!"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "captions_val2014_My-model-v2_results.json").is_file()


def test_image_info_images_without_features_are_listed(tiny, tmp_path, capsys):
    data_dir, features, checkpoint, splits = tiny
    info = tmp_path / "image_info_val2014.json"
    info.write_text(json.dumps({"images": [{"id": i} for i in [splits["test"][0], 999991, 999992]]}))
    code = eval_tool.main(["--checkpoint", str(checkpoint), "--image-info", str(info), "--features", str(features),
                           "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 of 3 images listed in" in err and str(info) in err and "999991, 999992" in err
    assert not (tmp_path / "out").exists()


def test_image_info_without_a_split_name_is_refused(tmp_path):
    info = tmp_path / "images.json"
    info.write_text(json.dumps({"images": [{"id": 1, "file_name": "photo.jpg"}]}))
    with pytest.raises(DataError, match="cannot tell the split"):
        read_image_info(info)
    info.write_text(json.dumps({"images": [{"id": "1"}]}))
    with pytest.raises(DataError, match="lack an integer \"id\""):
        read_image_info(info)


# --- the table ------------------------------------------------------------------------------------------------

def test_leaderboard_shows_percent_one_decimal_and_a_dash_for_missing():
    xe = {"BLEU-1": 0.7712, "BLEU-4": 0.3621, "METEOR": 0.2701, "ROUGE-L": 0.5640, "CIDEr-D": 1.1345, "SPICE": None}
    scst = {**xe, "BLEU-4": 0.3805, "CIDEr-D": 1.2049, "SPICE": 0.2143}
    lines = format_leaderboard({"XE": xe, "SCST": scst}).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", *METRIC_NAMES]
    cells = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in lines[2:]}
    assert cells["XE"] == ["77.1", "—", "—", "36.2", "27.0", "56.4", "113.5", "—"]
    assert cells["SCST"][3] == "38.0" and cells["SCST"][6] == "120.5" and cells["SCST"][7] == "21.4"
    assert len({len(line) for line in lines}) == 1, "columns are aligned"
