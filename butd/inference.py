"""Decoding a set of stored images: the loop shared by validation during training and ``tools/eval.py``.

Images are read from the feature store in batches of ``batch_size``, padded exactly as training batches are
(``butd.core.batch.collate``: first ``max_boxes`` regions, zero padding, a region mask), encoded once and
decoded with beam search (``beam_size > 1``) or greedy decoding (``beam_size == 1``). The region mask keeps
padding out of the attention and of the mean feature, so an image gets the same caption whatever batch it
lands in.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from butd.core.devices import autocast_context, resolve_device
from butd.core.batch import Example, collate
from butd.data.store import FeatureStore
from butd.decoding import CaptionResult, DecodeOptions, decode, to_results
from butd.decoding.result import Decoder
from butd.errors import ConfigError, DataError

_MAX_LISTED = 10
GREEDY = DecodeOptions(beam_size=1)  # what validation during training decodes with


def unique_ids(image_ids: Iterable[int]) -> list[int]:
    """Image ids as Python ints, first occurrence kept (every image is decoded once)."""
    seen: dict[int, None] = {}
    for image_id in image_ids:
        seen.setdefault(int(image_id), None)
    return list(seen)


def check_features(store: FeatureStore, image_ids: list[int], *, source: str = "") -> None:
    """DataError listing (first ids + count) the images of ``image_ids`` that ``store`` has no features for."""
    missing = [i for i in image_ids if i not in store]
    if missing:
        listed = ", ".join(map(str, missing[:_MAX_LISTED]))
        more = f", ... ({len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        origin = f" listed in {source}" if source else ""
        raise DataError(f"{len(missing)} of {len(image_ids)} images{origin} have no features in {store.path}: "
                        f"{listed}{more}")


def _batch_device(model: nn.Module, device: str | torch.device) -> torch.device:
    """Where batches go: the model's device, which ``device`` must name (``"auto"`` names any)."""
    param = next(model.parameters(), None)
    model_device = None if param is None else param.device
    if str(device) == "auto":
        return model_device or resolve_device("auto")
    target = resolve_device(device)
    if model_device is not None and (model_device.type != target.type
                                     or target.index not in (None, model_device.index)):
        raise ConfigError(f"decode_images: the model is on {model_device} but device={str(device)!r}; "
                          f"move the model there or pass device='auto'")
    return model_device or target


def decode_images(
    model: nn.Module,
    store: FeatureStore,
    image_ids: Iterable[int],
    vocab: Decoder,
    *,
    options: DecodeOptions = GREEDY,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    max_boxes: int = 0,
    progress: bool = False,
) -> dict[int, CaptionResult]:
    """Caption every image of ``image_ids`` (duplicates decoded once) from its stored region features.

    ``options`` says how (greedy for beam 1, beam search otherwise; see ``DecodeOptions``). ``device`` is where the batches go and must be the model's
    device (``"auto"``: the model's device). ``precision``: ``fp32``, or ``bf16`` / ``auto`` for bf16 autocast on
    CUDA. ``max_boxes`` keeps the first regions of each image, as training does with ``data.max_boxes``.
    ``progress`` shows a progress bar on stderr.
    The model is put in eval mode for the call and its previous mode is restored afterwards.

    Returns ``{image_id: CaptionResult}`` in the order of ``image_ids``. Raises DataError listing the images
    the store has no features for before decoding anything.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    ids = unique_ids(image_ids)
    check_features(store, ids)
    target = _batch_device(model, device)
    autocast = autocast_context(target, precision)
    was_training = model.training
    model.eval()
    results: dict[int, CaptionResult] = {}
    bar = tqdm(total=len(ids), unit="img", desc="decoding", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                batch = collate([Example.from_record(store[i], max_boxes=max_boxes) for i in chunk]).to(target)
                with autocast:
                    regions = model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
                    output = decode(model, regions, options)
                for result in to_results(output, vocab, image_ids=chunk, boxes=batch.boxes,
                                         region_mask=batch.region_mask):
                    results[result.image_id] = result
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results
