"""Captioning models. ``build_model(cfg, vocab_size)`` builds the one named ``cfg.name``:
``updown`` (Anderson et al. 2018, the default), ``showtell`` (Vinyals et al. 2015) or
``showattendtell`` (Xu et al. 2015). Importing this package registers all three."""
from __future__ import annotations

from butd.models.attention import MaskedAdditiveAttention, MaskedDotAttention, masked_attend
from butd.models.layers import RegionEmbedding, StepCaptioner, WordEmbedding
from butd.models.loading import LoadedModel, load_model
from butd.models.regions import Regions, box_geometry, masked_mean
from butd.models.registry import MODEL_REGISTRY, build_model, load_state_checked, model_name_of, register_model
from butd.models.showattendtell import ShowAttendTellCaptioner, doubly_stochastic_penalty
from butd.models.showtell import ShowTellCaptioner
from butd.models.updown import UpDownCaptioner

__all__ = [
    "LoadedModel",
    "MODEL_REGISTRY",
    "MaskedAdditiveAttention",
    "MaskedDotAttention",
    "RegionEmbedding",
    "Regions",
    "ShowAttendTellCaptioner",
    "ShowTellCaptioner",
    "StepCaptioner",
    "UpDownCaptioner",
    "WordEmbedding",
    "box_geometry",
    "build_model",
    "doubly_stochastic_penalty",
    "load_model",
    "load_state_checked",
    "masked_attend",
    "masked_mean",
    "model_name_of",
    "register_model",
]
