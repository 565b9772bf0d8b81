"""Pydantic models of the gallery's JSON: they validate requests and responses and document them in OpenAPI."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from butd.serve.schemas import AlternativeModel, ErrorResponse, RegionModel, WordModel

__all__ = ["ErrorResponse"]


class Credentials(BaseModel):
    username: str = Field(max_length=256,
                          description="3-32 characters: letters, digits, '.', '_', '-' (case-insensitive)")
    password: str = Field(max_length=4096)


class UserModel(BaseModel):
    username: str
    used_bytes: int = Field(description="bytes of images and thumbnails stored")
    quota_bytes: int


class SessionResponse(BaseModel):
    user: UserModel
    csrf_token: str = Field(description="send it back as the X-CSRF-Token header on POST, PUT and DELETE requests")


class ImageSummary(BaseModel):
    id: str
    name: str = Field(description="the uploaded file's name (display only)")
    created_at: datetime
    caption: str
    favourite: bool
    width: int
    height: int
    bytes: int = Field(description="image + thumbnail, counted against the quota")
    model: str = Field(description="the model that wrote the caption")
    image_url: str
    thumbnail_url: str


class ImageDetail(ImageSummary):
    logprob: float
    beam_size: int
    alternatives: list[AlternativeModel] = Field(description="every final beam, best first")
    regions: list[RegionModel]
    words: list[WordModel]


class ImageList(BaseModel):
    images: list[ImageSummary] = Field(description="newest first")
    total: int = Field(description="images matching the filters (all pages)")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class UploadResponse(BaseModel):
    images: list[ImageDetail] = Field(description="one per uploaded file, in upload order")
    used_bytes: int


class Cleared(BaseModel):
    deleted: int = Field(description="images removed (rows, files and thumbnails)")
    used_bytes: int


class GalleryHealth(BaseModel):
    status: str
    database: str = Field(description='"ok" or "unreachable"')
    database_backend: str = Field(description='"sqlite" or "postgresql"')
    model: str
    random_detector: bool
    max_upload_bytes: int
    max_pixels: int
    max_images: int
    max_beam_size: int
    quota_bytes: int
    password_min_length: int
