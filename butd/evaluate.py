"""Leaderboard-style evaluation: a checkpoint on a split, a checkpoint on a COCO image-info file (server
submission), or an existing result file; plus the table that prints the scores as papers report them.

Files written to OUT_DIR (each atomically: temporary file, then ``os.replace``) are described in
docs/evaluation.md: ``metrics.json``, ``captions_<name>.jsonl`` (one line per image) and the COCO result
file ``captions_<split>_<alg>_results.json``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from butd.config import apply_overrides
from butd.core.devices import Precision, check_precision, resolve_device
from butd.core.files import write_atomic
from butd.data.captions import CaptionData
from butd.data.store import FeatureStore
from butd.decoding import CaptionResult, DecodeOptions
from butd.errors import ConfigError, DataError
from butd.inference import check_features, decode_images, unique_ids
from butd.metrics import METRIC_NAMES, load_coco_references, load_results, score_captions, write_results
from butd.models.loading import LoadedModel, load_model

_MAX_LISTED = 10
_SPLIT_NAME = re.compile(r"(train|val|test)(\d{4})")


@dataclass(frozen=True)
class EvalSettings:
    """How to run an evaluation. Decoding follows the checkpoint's ``eval`` config section, changed by
    ``overrides`` (``("eval.beam_size=5",)``, checked like any config override)."""

    overrides: tuple[str, ...] = ()
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "fp32"  # fp32 gives the reference numbers; bf16 / auto: bf16 autocast on CUDA


@dataclass(frozen=True)
class _Run:
    """A loaded checkpoint and the resolved settings of one evaluation."""

    loaded: LoadedModel
    options: DecodeOptions
    batch_size: int
    device: str
    precision: Precision


@dataclass
class Evaluation:
    """What one evaluation produced. ``metrics`` is empty when nothing was scored (image-info mode)."""

    label: str  # row name in the leaderboard table (the alg name, or the result file's name)
    metrics: dict[str, float | None]
    notes: list[str]
    num_images: int
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ImageInfo:
    """The images of a COCO image-info (or caption annotation) file and the split they belong to."""

    path: Path
    image_ids: list[int]
    split_name: str  # e.g. "test2014", "val2014": names the server result file


def format_leaderboard(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """A Markdown table, one row per entry of ``rows`` (e.g. XE and SCST), one column per metric, values x100
    with one decimal as papers report them; a missing or unavailable (None / NaN) metric shows as "—"."""
    header = ["model", *METRIC_NAMES]
    body = [[str(name), *(_percent(values.get(m)) for m in METRIC_NAMES)] for name, values in rows.items()]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2), *("-" * (w + 1) + ":" for w in widths[1:])]) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100.0 * value:.1f}"


def alg_name(name: str) -> str:
    """``name`` made safe for the COCO result file name: runs of anything but letters, digits and "-" become "-"
    (the server splits the file name on "_")."""
    safe = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")
    if not safe:
        raise ConfigError(f"algorithm name {name!r} has no letters or digits left for the result file name")
    return safe


def results_file_name(split_name: str, alg: str) -> str:
    """COCO's result file naming: ``captions_<split>_<alg>_results.json``."""
    return f"captions_{split_name}_{alg_name(alg)}_results.json"


def read_image_info(path: str | Path) -> ImageInfo:
    """Read any COCO file with an ``"images": [{"id": ...}, ...]`` list (image_info_test2014.json,
    captions_val2014.json, ...). The split name comes from the images' ``file_name`` (``COCO_val2014_...``),
    else from the file's own name (``image_info_test2014.json``); DataError when neither tells."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"image-info file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise DataError(f"{path}: expected a COCO file with a non-empty \"images\" list of {{\"id\": int, ...}}")
    bad = [n for n, image in enumerate(images) if not isinstance(image, dict) or type(image.get("id")) is not int]
    if bad:
        raise DataError(f"{path}: {len(bad)} entries of \"images\" lack an integer \"id\", "
                        f"first at index {bad[:_MAX_LISTED]}")
    # An image listed twice is still captioned (and submitted) once.
    ids = unique_ids(image["id"] for image in images)
    names = {m.group(0) for image in images if (m := _SPLIT_NAME.search(str(image.get("file_name", ""))))}
    if len(names) > 1:
        raise DataError(f"{path}: the images' file names mix splits {sorted(names)}; use one file per split")
    if not names and (m := _SPLIT_NAME.search(path.name)):
        names = {m.group(0)}
    if not names:
        raise DataError(f"{path}: cannot tell the split (e.g. test2014) from the images' file_name nor from the "
                        f"file name; rename the file to contain it, e.g. image_info_test2014.json")
    return ImageInfo(path=path, image_ids=ids, split_name=names.pop())


def evaluate_checkpoint(checkpoint: str | Path, *, data_dir: str | Path, features: str | Path, split: str = "test",
                        output_dir: str | Path | None = None, settings: EvalSettings | None = None,
                        spice_jars: str | Path | None = None, alg: str | None = None) -> dict[str, float | None]:
    """Decode ``split`` of DATA_DIR with a checkpoint and score it; returns the raw (0-1) metrics by name
    (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE; None when unavailable). See :func:`evaluate_split`."""
    return evaluate_split(checkpoint, data_dir=data_dir, features=features, split=split, output_dir=output_dir,
                          settings=settings, spice_jars=spice_jars, alg=alg).metrics


def evaluate_split(checkpoint: str | Path, *, data_dir: str | Path, features: str | Path, split: str = "test",
                   output_dir: str | Path | None = None, settings: EvalSettings | None = None,
                   spice_jars: str | Path | None = None, alg: str | None = None) -> Evaluation:
    """Decode every image of ``split`` and score the captions against DATA_DIR's references with the COCO
    toolkit. With ``output_dir``, writes metrics.json, captions_<split>.jsonl and the COCO result file."""
    data = CaptionData.load(data_dir)
    image_ids = [int(i) for i in data.split_ids(split)]
    if not image_ids:
        raise DataError(f"split {split!r} of {data_dir} has no images")
    run = _load(checkpoint, settings)
    alg = alg_name(alg or _default_alg(run.loaded))
    results = _decode(run, features, image_ids, source=f"split {split!r} of {data_dir}")
    captions = _captions(results)
    try:
        references = {i: data.references(i) for i in image_ids}
    except KeyError as error:  # CaptionData names the image and the file
        raise DataError(error.args[0]) from None
    report = score_captions(captions, references, spice_jars=spice_jars)
    metrics = {name: _finite(report.metrics.get(name)) for name in METRIC_NAMES}
    evaluation = Evaluation(label=alg, metrics=metrics, notes=list(report.notes), num_images=len(captions))
    if output_dir is not None:
        out = Path(output_dir)
        extra = {"split": split, "alg": alg, **_settings_json(run)}
        # metrics.json last: its presence marks a complete output directory.
        evaluation.files = [
            _write_jsonl(out / f"captions_{split}.jsonl", results, references, report.per_image),
            _write_results(out / results_file_name(split, alg), captions),
            _write_metrics(out, evaluation, checkpoint=str(run.loaded.path), beam_size=run.options.beam_size,
                           extra=extra),
        ]
    return evaluation


def caption_image_info(checkpoint: str | Path, *, image_info: str | Path, features: str | Path,
                       output_dir: str | Path, settings: EvalSettings | None = None,
                       alg: str | None = None) -> Evaluation:
    """Caption every image of a COCO image-info file for the evaluation server (no scoring: no references).
    Writes ``captions_<split>_<alg>_results.json`` (every listed image once) and ``captions_<split>.jsonl``."""
    info = read_image_info(image_info)
    run = _load(checkpoint, settings)
    alg = alg_name(alg or _default_alg(run.loaded))
    results = _decode(run, features, info.image_ids, source=str(info.path))
    captions = _captions(results)
    out = Path(output_dir)
    files = [_write_jsonl(out / f"captions_{info.split_name}.jsonl", results, None, None),
             _write_results(out / results_file_name(info.split_name, alg), captions)]
    return Evaluation(label=alg, metrics={}, notes=[], num_images=len(captions), files=files)


def evaluate_results_file(results: str | Path, *, references: str | Path, output_dir: str | Path | None = None,
                          spice_jars: str | Path | None = None) -> Evaluation:
    """Score an existing COCO result file against a COCO caption annotation file. Only the images in the result
    file are scored (as ``COCOEvalCap`` with the result's image ids); invalid entries are refused (DataError)."""
    for what, path in (("result file", results), ("reference file", references)):
        if not Path(path).is_file():
            raise DataError(f"{what} {path} does not exist")
    refs = load_coco_references(references)
    captions = load_results(results, refs)
    refs = {i: refs[i] for i in captions}
    report = score_captions(captions, refs, spice_jars=spice_jars)
    metrics = {name: _finite(report.metrics.get(name)) for name in METRIC_NAMES}
    # Row label: the <alg> part of a COCO-named file (captions_val2014_fakecap_results.json), else the file stem.
    match = re.fullmatch(r"captions_[a-z]+\d{4}_(.+)_results", Path(results).stem)
    evaluation = Evaluation(label=match.group(1) if match else Path(results).stem, metrics=metrics,
                            notes=list(report.notes), num_images=len(captions))
    if output_dir is not None:
        out = Path(output_dir)
        extra = {"results": str(results), "references": str(references)}
        evaluation.files = [
            _write_jsonl(out / "captions_scored.jsonl", captions, refs, report.per_image),
            _write_metrics(out, evaluation, checkpoint=None, beam_size=None, extra=extra),
        ]
    return evaluation


# --- decoding -------------------------------------------------------------------------------------------------

def _load(checkpoint: str | Path, settings: EvalSettings | None) -> _Run:
    settings = settings or EvalSettings()
    precision = check_precision(settings.precision)
    device = resolve_device(settings.device)
    loaded = load_model(checkpoint, device=device)
    cfg = apply_overrides(loaded.config, settings.overrides, source="evaluation settings").eval
    return _Run(loaded=loaded, options=DecodeOptions.from_config(cfg), batch_size=cfg.batch_size,
                device=str(device), precision=precision)


def _default_alg(loaded: LoadedModel) -> str:
    return f"{loaded.config.model.name}-{loaded.stage}"


def _decode(run: _Run, features: str | Path, image_ids: list[int], *, source: str) -> dict[int, CaptionResult]:
    store = FeatureStore(features)
    try:
        check_features(store, image_ids, source=source)
        return decode_images(run.loaded.model, store, image_ids, run.loaded.vocab, options=run.options,
                             batch_size=run.batch_size, device=run.device, precision=run.precision,
                             max_boxes=run.loaded.config.data.max_boxes, progress=True)
    finally:
        store.close()


def _captions(results: Mapping[int, CaptionResult]) -> dict[int, str]:
    """``{image_id: caption}``; DataError when the model ended a caption at once (COCO refuses empty captions)."""
    empty = [i for i, r in results.items() if not r.caption.strip()]
    if empty:
        listed = ", ".join(map(str, empty[:_MAX_LISTED]))
        raise DataError(f"the model produced an empty caption (<eos> first) for {len(empty)} of {len(results)} "
                        f"images: {listed}{', ...' if len(empty) > _MAX_LISTED else ''}; COCO scoring and the "
                        f"evaluation server refuse empty captions (is the checkpoint trained?)")
    return {i: r.caption for i, r in results.items()}


# --- output files ---------------------------------------------------------------------------------------------

def _finite(value: float | None) -> float | None:
    """JSON has no NaN: an undefined score (SPICE on a caption without a scene graph) is written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _settings_json(run: _Run) -> dict[str, Any]:
    return {**run.options.to_json(), "precision": run.precision}


def _write_metrics(out: Path, evaluation: Evaluation, *, checkpoint: str | None, beam_size: int | None,
                   extra: dict[str, Any]) -> Path:
    document = {**evaluation.metrics, "num_images": evaluation.num_images, "beam_size": beam_size,
                "checkpoint": checkpoint, "notes": evaluation.notes, **extra}
    return write_atomic(out / "metrics.json", json.dumps(document, indent=2) + "\n")


def _write_jsonl(path: Path, results: Mapping[int, CaptionResult | str],
                 references: Mapping[int, list[str]] | None, per_image: Mapping[int, Mapping[str, float]] | None
                 ) -> Path:
    lines = []
    for image_id, result in results.items():
        entry: dict[str, Any] = {"image_id": image_id}
        if isinstance(result, CaptionResult):
            entry.update(caption=result.caption, logprob=result.logprob)
        else:
            entry["caption"] = result
        if references is not None:
            entry["references"] = list(references[image_id])
        if per_image is not None:
            entry["scores"] = {name: _finite(value) for name, value in per_image.get(image_id, {}).items()}
        if isinstance(result, CaptionResult) and result.alternatives:
            entry["alternatives"] = [{"caption": c, "logprob": lp} for c, lp in result.alternatives]
        lines.append(json.dumps(entry, ensure_ascii=False))
    return write_atomic(path, "".join(line + "\n" for line in lines))


def _write_results(path: Path, captions: Mapping[int, str]) -> Path:
    write_results(path, captions)
    return path


