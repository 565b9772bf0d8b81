"""Reading and writing the two published layouts of the bottom-up detector's weights, by parameter name.

* ``.pkl`` -- py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``: a pickle of ``{"model": {name: numpy
  array}}`` in detectron2 layout. It puts background *last* (classes 0..1599 then background; attributes 0..399 then
  "no attribute"), has ``num_classes * 4`` = 6400 box deltas (no background row), a single objectness logit per
  anchor, and orders anchors size-major (detectron2's anchor generator: for each size, each ratio).
* ``.pth`` -- bottom-up-attention.pytorch's ``bua-caffe-frcn-r101_with_attributes.pth`` (and ``_fix36``): a torch
  state dict (optionally under ``"model"``) in the Caffe layout: background first, 6404 box deltas, two softmax
  logits (background block, then object block) per anchor in Caffe anchor order; the attribute head is named
  ``cls_embed`` / ``attr_linear1`` / ``attr_linear2``.

Both are mapped onto this package's module (Caffe class order, one objectness logit, Caffe anchor order). Reading a
pickle cannot be avoided for the ``.pkl`` format; it is restricted to numpy's array reconstruction (anything else in
the file is refused before it can run).

Either file may carry the anchor generator's buffer ``proposal_generator.anchor_generator.cell_anchors.0`` [12, 4].
It holds no weights, but it says in which order the file's RPN channels are: it is checked against the order the
conversion assumes (see :func:`check_cell_anchors`) and then dropped. Any other unexpected key is an error.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from butd.core.files import write_atomic
from butd.errors import ConfigError, DataError
from feature_extraction.backbone import Bottleneck, ConvBN, FrozenBatchNorm
from feature_extraction.config import DetectorConfig

PKL, PTH = "d2-pkl", "bua-pth"
_RPN = "proposal_generator.rpn_head."
_PRED = "roi_heads.box_predictor."
# bottom-up-attention.pytorch names of the attribute head -> ours (= py-bottom-up-attention's = the Caffe layers').
_BUA_NAMES = {f"{_PRED}cls_embed.": f"{_PRED}cls_embedding.", f"{_PRED}attr_linear1.": f"{_PRED}fc_attr.",
              f"{_PRED}attr_linear2.": f"{_PRED}attr_score."}
# Keys a weights file may carry that hold no weights.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


# Where users are sent when their weights file is missing or wrong.
GET_WEIGHTS_HINT = ("docs/extraction.md lists the published files and where to download them; 'random' "
                    "(--weights random, --detector random) builds an untrained network for tests")


class CheckpointError(DataError):
    """Detector weights that do not fit the detector: unreadable, unsafe, or with missing/unexpected/misshapen
    keys."""


def checkpoint_format(path: str | Path) -> str:
    """``d2-pkl`` for ``.pkl`` files, ``bua-pth`` for ``.pth``/``.pt``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pkl":
        return PKL
    if suffix in (".pth", ".pt"):
        return PTH
    raise ConfigError(f"detector weights {path}: unknown file type {suffix!r}; expected a .pkl "
                      f"(py-bottom-up-attention) or .pth (bottom-up-attention.pytorch) file ({GET_WEIGHTS_HINT})")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; any other global is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise CheckpointError(f"refusing to unpickle {module}.{name}: a weights pickle holds only numpy arrays")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 moved the module (same functions)
        return super().find_class(module, name)


def _unwrap(obj: object, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"detector weights {path}: expected a mapping of parameter names to arrays "
                              f"({GET_WEIGHTS_HINT})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The raw ``{name: array}`` of a weights file, in the file's own layout."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if not path.is_file():
        raise ConfigError(f"detector weights {path} not found ({GET_WEIGHTS_HINT})")
    try:
        if fmt == PKL:
            with path.open("rb") as f:
                obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"detector weights {path}: unreadable {fmt} file ({exc}); download it again "
                              "(docs/extraction.md)") from None
    state = _unwrap(obj, path)
    arrays = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")
        arrays[name] = value
    return arrays


# --- layout conversions (file layout <-> this module) -----------------------------------------------------------

def _anchor_perm(cfg: DetectorConfig) -> np.ndarray:
    """perm[ours] = detectron2 index: ours is ratio-major (Caffe), detectron2 size-major."""
    n_scales, n_ratios = len(cfg.anchor_scales), len(cfg.anchor_ratios)
    return np.array([s * n_ratios + r for r in range(n_ratios) for s in range(n_scales)])


def _bg_last_to_first(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[-1:], a[:-1]])


def _bg_first_to_last(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[1:], a[:1]])


def _from_d2(raw: dict[str, np.ndarray], cfg: DetectorConfig) -> dict[str, np.ndarray]:
    perm = _anchor_perm(cfg)
    state = {}
    for name, a in raw.items():
        if name.startswith(f"{_RPN}objectness_logits.") and a.shape[0] == cfg.num_anchors:
            a = a[perm]
        elif name.startswith(f"{_RPN}anchor_deltas.") and a.shape[0] == 4 * cfg.num_anchors:
            a = a.reshape(cfg.num_anchors, 4, *a.shape[1:])[perm].reshape(a.shape)
        elif name in (f"{_PRED}cls_score.weight", f"{_PRED}cls_score.bias", f"{_PRED}cls_embedding.weight",
                      f"{_PRED}attr_score.weight", f"{_PRED}attr_score.bias"):
            a = _bg_last_to_first(a)
        elif name.startswith(f"{_PRED}bbox_pred.") and a.shape[0] == 4 * (cfg.num_classes - 1):
            a = np.concatenate([np.zeros((4, *a.shape[1:]), a.dtype), a])  # no background deltas in detectron2
        state[name] = a
    return state


def _to_d2(state: dict[str, np.ndarray], cfg: DetectorConfig) -> dict[str, np.ndarray]:
    inverse = np.argsort(_anchor_perm(cfg))
    raw = {}
    for name, a in state.items():
        if name.startswith(f"{_RPN}objectness_logits."):
            a = a[inverse]
        elif name.startswith(f"{_RPN}anchor_deltas."):
            a = a.reshape(cfg.num_anchors, 4, *a.shape[1:])[inverse].reshape(a.shape)
        elif name in (f"{_PRED}cls_score.weight", f"{_PRED}cls_score.bias", f"{_PRED}cls_embedding.weight",
                      f"{_PRED}attr_score.weight", f"{_PRED}attr_score.bias"):
            a = _bg_first_to_last(a)
        elif name.startswith(f"{_PRED}bbox_pred."):
            a = a[4:]
        raw[name] = a
    return raw


def _from_bua(raw: dict[str, np.ndarray], cfg: DetectorConfig) -> dict[str, np.ndarray]:
    state = {}
    for name, a in raw.items():
        for old, new in _BUA_NAMES.items():
            if name.startswith(old):
                name = new + name[len(old):]
        if name.startswith(f"{_RPN}objectness_logits.") and a.shape[0] == 2 * cfg.num_anchors:
            # softmax([bg, obj])[obj] == sigmoid(obj - bg): keep the difference as the single logit.
            a = a[cfg.num_anchors:].astype(np.float64) - a[: cfg.num_anchors]
        state[name] = a
    return state


def _to_bua(state: dict[str, np.ndarray], cfg: DetectorConfig) -> dict[str, np.ndarray]:
    renames = {new: old for old, new in _BUA_NAMES.items()}
    raw = {}
    for name, a in state.items():
        if name.startswith(f"{_RPN}objectness_logits."):
            a = np.concatenate([np.zeros_like(a), a])  # background logit 0: sigmoid(obj - 0)
        for new, old in renames.items():
            if name.startswith(new):
                name = old + name[len(new):]
        raw[name] = a
    return raw


# --- module <-> state ---------------------------------------------------------------------------------------------

def _limited(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def apply_state(model: nn.Module, state: dict[str, np.ndarray], *, source: str) -> None:
    """Copy ``state`` (this module's layout) into ``model``; CheckpointError listing every mismatch."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
                       for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshapen:
        problems = [f"{label} ({len(names)}): {_limited(names)}" for label, names in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)) if names]
        raise CheckpointError(f"detector weights {source} do not match the network: " + "; ".join(problems)
                              + f" ({GET_WEIGHTS_HINT})")
    tensors = {k: torch.as_tensor(np.asarray(v), dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load published weights (.pkl or .pth) into ``model`` by parameter name; an anchors buffer in the file is
    checked against the anchor order of its layout, then dropped."""
    from feature_extraction.published import ANCHORS_KEY, check_cell_anchors  # published imports this module

    path = Path(path)
    raw = read_checkpoint(path)
    cfg = model.config
    fmt = checkpoint_format(path)
    anchors = raw.pop(ANCHORS_KEY, None)
    if anchors is not None:
        check_cell_anchors(anchors, cfg, size_major=fmt == PKL, source=str(path))
    state = _from_d2(raw, cfg) if fmt == PKL else _from_bua(raw, cfg)
    apply_state(model, state, source=str(path))


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights as a .pkl (py-bottom-up-attention layout) or .pth (bottom-up-attention.pytorch
    layout), chosen by the suffix, with the anchors buffer; the file is replaced atomically."""
    from feature_extraction.published import ANCHORS_KEY, caffe_cell_anchors, detectron2_cell_anchors

    path = Path(path)
    fmt = checkpoint_format(path)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    raw = _to_d2(state, model.config) if fmt == PKL else _to_bua(state, model.config)
    # Like the published files, carry the anchor generator's buffer in the layout's own anchor order.
    raw[ANCHORS_KEY] = (detectron2_cell_anchors if fmt == PKL else caffe_cell_anchors)(model.config)

    def write(tmp: Path) -> None:
        if fmt == PKL:
            tmp.write_bytes(pickle.dumps({"model": raw, "__author__": "butd"}, protocol=4))
        else:
            torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}}, tmp)

    write_atomic(path, write)


def initialize_random(model: nn.Module, *, seed: int = 0) -> None:
    """Seeded random weights (same seed, same network in every process); the features carry no meaning."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, ConvBN):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, FrozenBatchNorm):
                for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                    getattr(module, name).fill_(value)
            elif isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.01)  # the Caffe fillers of these layers
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # Keep activations O(1) like the trained network's: mean-subtracted pixels have a std of about 64, and each
        # residual branch is damped so that 30+ random blocks do not blow up.
        model.backbone.stem.conv1.norm.weight.fill_(1.0 / 64)
        for module in model.modules():
            if isinstance(module, Bottleneck):
                module.conv3.norm.weight.fill_(0.2)
