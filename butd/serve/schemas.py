"""Pydantic models of the service's JSON: they validate the responses and document them in the OpenAPI schema."""
from __future__ import annotations

from pydantic import BaseModel, Field


class RegionModel(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the (EXIF-rotated) image", min_length=4, max_length=4)
    object: str | None = Field(description="Visual Genome object class (first synonym)")
    object_confidence: float | None
    attribute: str | None = Field(description="Visual Genome attribute (first synonym)")
    attribute_confidence: float | None


class AlternativeModel(BaseModel):
    caption: str
    logprob: float = Field(description="summed log-probability of the words and <eos>")


class WordModel(BaseModel):
    word: str
    attention: list[float] = Field(description="weight of each region (same order as regions) while emitting the word")


class ImageCaptionModel(BaseModel):
    name: str = Field(description="the uploaded file's name")
    width: int
    height: int
    caption: str
    logprob: float
    alternatives: list[AlternativeModel] = Field(description="every final beam, best first")
    regions: list[RegionModel]
    words: list[WordModel]


class CaptionsResponse(BaseModel):
    beam_size: int
    captions: list[ImageCaptionModel] = Field(description="one per uploaded image, in upload order")


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. upload_too_large, undecodable_image")
    message: str = Field(description="what is wrong, naming the file when there is one")


class ErrorResponse(BaseModel):
    error: ErrorBody


class BatchingModel(BaseModel):
    max_batch: int
    max_wait_ms: float
    batches: int = Field(description="batches run since start")
    images: int = Field(description="images captioned since start")
    largest_batch: int
    queued: int = Field(description="images waiting for a batch")
    skipped: int = Field(description="images dropped before the model because their client hung up")
    abandoned_requests: int = Field(description="requests whose client hung up before their captions were ready")


class MemoryModel(BaseModel):
    max_pending_pixels: int = Field(description="the memory budget: decoded pixels admitted at once")
    pending_pixels: int = Field(description="pixels of the requests being decoded, queued or captioned now")
    peak_pending_pixels: int
    max_decodes: int = Field(description="images decoded at once at most")
    decoding: int
    admitted_requests: int
    refused_requests: int = Field(description="requests answered 503 because the budget was full")


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    device: str
    detector: str = Field(description='"random" (untrained: captions are meaningless) or "weights"')
    random_detector: bool
    boxes: str
    checkpoint: str | None
    model: str
    vocab_size: int
    max_upload_bytes: int
    max_pixels: int
    max_images: int
    max_beam_size: int
    batching: BatchingModel
    memory: MemoryModel
