"""Leaderboard evaluation with the COCO caption toolkit (pycocoevalcap).

``score_captions`` reproduces ``COCOEvalCap.evaluate()``: PTB tokenisation (Java), then BLEU-1..4,
METEOR (Java), ROUGE-L, CIDEr-D and SPICE (Java + Stanford CoreNLP 3.6.0). CIDEr-D is computed by
:class:`butd.metrics.CiderD`, identical to pycocoevalcap's ``Cider``.

Unavailable pieces never crash the evaluation; the metric is ``None`` and ``notes`` says why:

* no ``java`` on PATH: METEOR and SPICE are ``None`` and captions are tokenised by
  :func:`ptb_like_tokenize`, a pure-Python imitation of the PTB tokenizer (it agrees with it on
  more than 99.9% of COCO captions, so BLEU/ROUGE-L/CIDEr-D may differ in the 4th decimal);
* no CoreNLP jars: SPICE is ``None``. pycocoevalcap would download them on first use; we never
  do. Point ``spice_jars=`` or the ``BUTD_SPICE_JARS`` environment variable at a directory holding
  ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` (jars already placed in
  pycocoevalcap's ``spice/lib`` are found too). SPICE then runs pycocoevalcap's ``spice-1.0.jar``
  with those jars added to the Java class path and its input/output in a temporary directory, so
  site-packages is never modified. The parse cache (``-cache``) is not used: it changes no score.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pycocoevalcap.spice

from butd.errors import DataError
from butd.metrics.cider import CiderD

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_JARS_ENV = "BUTD_SPICE_JARS"
_SPICE_DIR = Path(pycocoevalcap.spice.__file__).resolve().parent


@dataclass
class EvalReport:
    """Scores of one result set: raw 0-1 values (CIDEr-D is 0-10), ``None`` when unavailable."""

    metrics: dict[str, float | None]
    per_image: dict[int, dict[str, float]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (per-image keys become strings)."""
        return {"metrics": dict(self.metrics), "notes": list(self.notes),
                "per_image": {str(i): dict(s) for i, s in self.per_image.items()}}


def score_captions(results: Mapping[int, str], references: Mapping[int, Sequence[str]], *,
                   spice_jars: str | Path | None = None) -> EvalReport:
    """Evaluate ``{image_id: caption}`` against ``{image_id: [reference, ...]}`` like the COCO server.

    Only the images of ``results`` are scored (and their references form the CIDEr-D corpus); every
    one of them needs references. ``spice_jars``: directory holding the CoreNLP 3.6.0 jars.
    """
    image_ids = sorted(results)
    _check_inputs(image_ids, results, references)
    notes: list[str] = []
    java = shutil.which("java")
    raw = {("ref", i): [{"caption": _one_line(c)} for c in references[i]] for i in image_ids}
    raw.update({("res", i): [{"caption": _one_line(results[i])}] for i in image_ids})
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenized = PTBTokenizer().tokenize(raw)  # one JVM start for references and results
    else:
        tokenized = {k: [ptb_like_tokenize(c["caption"]) for c in v] for k, v in raw.items()}
        notes.append("java not found: captions tokenised by butd's pure-Python PTB-like tokenizer, "
                     "so scores may differ slightly from the official ones")
    gts = {i: tokenized[("ref", i)] for i in image_ids}
    res = {i: tokenized[("res", i)] for i in image_ids}

    metrics: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    per_image: dict[int, dict[str, float]] = {i: {} for i in image_ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        metrics[name] = float(score)
        for i, s in zip(image_ids, scores):
            per_image[i][name] = float(s)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        record(f"BLEU-{k + 1}", bleu[k], bleu_per_image[k])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor = Meteor()
        try:
            record("METEOR", *meteor.compute_score(gts, res))
        finally:
            _stop_meteor(meteor)
    else:
        notes.append("METEOR unavailable: java not found")
    record("ROUGE-L", *Rouge().compute_score(gts, res))
    record("CIDEr-D", *CiderD().compute_score(gts, res))
    if not java:
        notes.append("SPICE unavailable: java not found")
    else:
        jar_dir, reason = find_corenlp_jars(spice_jars)
        if jar_dir is None:
            notes.append(f"SPICE unavailable: {reason}")
        else:
            spice, reason = _run_spice(gts, res, jar_dir)
            if spice is None:
                notes.append(f"SPICE unavailable: {reason}")
            else:
                record("SPICE", *spice)
    return EvalReport(metrics=metrics, per_image=per_image, notes=notes)


def _check_inputs(image_ids: list[int], results: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> None:
    if not image_ids:
        raise DataError("no results to evaluate")
    missing = [i for i in image_ids if not references.get(i)]
    if missing:
        raise DataError(f"{len(missing)} result image ids have no references: {missing[:10]}")
    bad = [i for i in image_ids if not isinstance(results[i], str) or not results[i].strip()]
    if bad:
        raise DataError(f"{len(bad)} results are not non-empty strings, image ids: {bad[:10]}")


def _stop_meteor(meteor: object) -> None:
    """Stop the METEOR JVM now. pycocoevalcap's ``Meteor.__del__`` would wait forever for its lock
    if ``compute_score`` failed while holding it, so release the lock too."""
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def _one_line(caption: str) -> str:
    """The PTB tokenizer maps input lines to output lines: no caption may contain a line break."""
    return " ".join(caption.splitlines())


def find_corenlp_jars(spice_jars: str | Path | None = None) -> tuple[Path | None, str]:
    """Directory holding both CoreNLP 3.6.0 jars: ``spice_jars``, else ``$BUTD_SPICE_JARS``, else
    pycocoevalcap's ``spice/lib``. Returns ``(directory, "")`` or ``(None, one-line reason)``."""
    given = spice_jars if spice_jars is not None else os.environ.get(SPICE_JARS_ENV) or None
    where = Path(given) if given is not None else _SPICE_DIR / "lib"
    missing = [j for j in CORENLP_JARS if not (where / j).is_file()]
    if not missing:
        return where, ""
    if given is None:
        return None, (f"Stanford CoreNLP 3.6.0 jars not found; pass spice_jars= or set {SPICE_JARS_ENV} "
                      f"to a directory holding {' and '.join(CORENLP_JARS)}")
    return None, f"{where} lacks {', '.join(missing)}"


def spice_command(jar_dir: Path, input_json: Path, output_json: Path) -> list[str]:
    """pycocoevalcap's SPICE command line, with the CoreNLP jars put on the class path explicitly."""
    class_path = os.pathsep.join([str(_SPICE_DIR / "spice-1.0.jar"), str(_SPICE_DIR / "lib" / "*"),
                                  *(str(jar_dir / j) for j in CORENLP_JARS)])
    return ["java", "-Xmx8G", "-cp", class_path, "edu.anu.spice.SpiceScorer", str(input_json),
            "-out", str(output_json), "-subset", "-silent"]


def _run_spice(gts: Mapping[int, list[str]], res: Mapping[int, list[str]], jar_dir: Path
               ) -> tuple[tuple[float, list[float]] | None, str]:
    """Run SPICE; ``((mean, per_image), "")`` or ``(None, reason)`` when the Java process fails."""
    image_ids = list(gts)
    with tempfile.TemporaryDirectory(prefix="butd-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_file.write_text(json.dumps([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in image_ids]))
        proc = subprocess.run(spice_command(jar_dir, in_file, out_file), cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
            return None, f"SPICE java process exited with status {proc.returncode}: {last}"
        items = json.loads(out_file.read_text())
    by_id = {item["image_id"]: _as_float(item["scores"]["All"]["f"]) for item in items}
    scores = [by_id[i] for i in image_ids]
    return (sum(scores) / len(scores), scores), ""


def _as_float(value: object) -> float:
    """SPICE writes null for undefined F-scores; pycocoevalcap turns them into NaN."""
    return math.nan if value is None else float(value)


# --- pure-Python stand-in for the PTB tokenizer (used only when Java is missing) -----------------

# Tokens pycocoevalcap drops after PTB tokenisation (the PTB tokenizer turns '"' into `` and '').
_DROPPED = {'"', "''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTB keeps with their final period ("st." stays one token, "cat." becomes "cat" ".").
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "rd", "ave", "blvd", "jr", "sr", "co", "inc", "ltd", "mt",
                  "ft", "vs", "etc", "no", "prof", "gen", "sgt", "capt", "lt", "col", "hwy", "ln", "ct", "pl"}
_SEPARATE = re.compile(r"([*+=<>@#$%^~|\\\"()\[\]{}]|(?<=\D),|,(?=\D)|;|:(?!\d)|\?+|!+|\.{2,})")
_CONTRACTION = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")


def _split_final_period(word: str) -> list[str]:
    if not word.endswith(".") or len(word) == 1:
        return [word]
    stem = word[:-1]
    dotted = "." in stem and all(0 < len(part) <= 2 for part in stem.split("."))  # "d.c.", "t.v."
    if dotted or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
        return [word]
    return [stem, "."]


def ptb_like_tokenize(caption: str) -> str:
    """Lowercase PTB-style tokenisation with pycocoevalcap's punctuation removal, in pure Python."""
    text = _SEPARATE.sub(r" \1 ", " ".join(caption.splitlines()).lower())
    text = re.sub(r"\bcannot\b", "can not", text)
    tokens: list[str] = []
    for word in text.split():
        if word in _BRACKETS:
            tokens.append(_BRACKETS[word])
            continue
        if len(word) > 1 and word[0] in "'`-" and not word.startswith("'s"):
            tokens.append(word[0])  # opening quote or dash
            word = word[1:]
        for piece in _split_final_period(word):
            m = _CONTRACTION.match(piece)
            if m and m.group(1) != "'":
                tokens.extend([m.group(1), m.group(2)])  # "don't" -> "do n't", "man's" -> "man 's"
            elif len(piece) > 1 and piece[-1] in "'-/":
                tokens.extend([piece[:-1], piece[-1]])
            else:
                tokens.append(piece)
    return " ".join(t for t in tokens if t and t not in _DROPPED and not re.fullmatch(r"\.{2,}", t))
