"""The gallery: upload (captioned, stored), list and search, one image with its attention, its files, favourites,
deletion and clear-all. Every route is scoped to the signed-in user; another user's image is a 404."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from butd.gallery.auth import CurrentUser
from butd.gallery.deps import context, csrf_user, current_user
from butd.gallery.images import check_content_type, prepare_image
from butd.gallery.models import Image
from butd.gallery.schemas import Cleared, ErrorResponse, ImageDetail, ImageList, ImageSummary, UploadResponse
from butd.gallery.store import NewImage, not_found
from butd.serve.app import MAX_BEAM_SIZE
from butd.serve.limits import ApiError, UploadTooLarge

router = APIRouter(prefix="/api/images", tags=["gallery"])
# User-uploaded bytes are served as the image type they were checked to be, never sniffed, never run as a page.
# "no-cache": the browser may keep a copy but asks again (a cheap 304) each time, so after log-out or deletion the
# cached image is not shown without a session.
FILE_HEADERS = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox"}
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                   "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE}}}}}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in (401, *codes)}


def summary(row: Image) -> dict[str, Any]:
    return {"id": row.id, "name": row.original_name, "created_at": row.created_at, "caption": row.caption,
            "favourite": row.favourite, "width": row.width, "height": row.height, "bytes": row.bytes,
            "model": row.model, "image_url": f"/api/images/{row.id}/file",
            "thumbnail_url": f"/api/images/{row.id}/thumbnail"}


def detail(row: Image) -> dict[str, Any]:
    return {**summary(row), "logprob": row.logprob, "beam_size": row.beam_size, **row.result}


@router.post("", status_code=201, response_model=UploadResponse, openapi_extra=UPLOAD_SCHEMA,
             responses=_errors(403, 413, 415, 422, 502, 503))
async def upload(request: Request, user: CurrentUser = Depends(csrf_user),
                 beam_size: int | None = Query(None, ge=1, le=MAX_BEAM_SIZE)) -> dict[str, Any]:
    """Caption and store the uploaded images (multipart field ``images``): all of them, or none on any refusal."""
    ctx = context(request)
    settings = ctx.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send the images as multipart/form-data (field 'images'), not {content_type or 'no body'}")
    try:
        form = await request.form(max_files=settings.max_images + 1, max_fields=16)
    except UploadTooLarge as err:
        raise ApiError(413, "upload_too_large", str(err)) from err
    except StarletteHTTPException as err:  # malformed multipart body, too many parts
        raise ApiError(422, "malformed_form", str(err.detail)) from err
    try:
        beam = _beam_size(form.get("beam_size"), beam_size, settings.default_beam_size)
        uploads = _files(form, settings.max_images)
        received = [(u.filename or "upload", u.content_type, await u.read()) for u in uploads]
    finally:
        await form.close()
    for name, kind, _ in received:
        check_content_type(name, kind)
    # Before spending decoding and model time: would the files alone already break the quota?
    await run_in_threadpool(ctx.gallery.check_room, user.id, sum(len(data) for _, _, data in received),
                            len(received))
    prepared = [await run_in_threadpool(prepare_image, name, data, max_pixels=settings.max_pixels,
                                        thumbnail_size=settings.thumbnail_size) for name, _, data in received]
    for image in prepared:
        ctx.model.check_image(image)
    captions = await ctx.model.caption(prepared, beam)
    items = [NewImage(original_name=image.name, content_type=image.content_type, extension=image.extension,
                      data=image.data, thumbnail=image.thumbnail, width=image.width, height=image.height,
                      caption=caption, beam_size=beam, model=ctx.model.description)
             for image, caption in zip(prepared, captions)]
    rows = await run_in_threadpool(ctx.gallery.add, user.id, items)
    used = await run_in_threadpool(ctx.gallery.used_bytes, user.id)
    return {"images": [detail(row) for row in rows], "used_bytes": used}


@router.get("", response_model=ImageList, responses=_errors(422))
def list_images(request: Request, user: CurrentUser = Depends(current_user),
                limit: int | None = Query(None, ge=1, le=100, description="images per page (default 24)"),
                cursor: str | None = Query(None, description="next_cursor of the previous page"),
                q: str | None = Query(None, max_length=200, description="caption words (each must start a word)"),
                favourites: bool = Query(False, description="only the favourites")) -> dict[str, Any]:
    """The user's images, newest first, one page at a time."""
    ctx = context(request)
    page = ctx.gallery.page(user.id, limit=min(limit or ctx.settings.page_size, ctx.settings.max_page_size),
                            cursor=cursor, query=q, favourites=favourites)
    return {"images": [summary(row) for row in page.images], "total": page.total, "next_cursor": page.next_cursor}


@router.delete("", response_model=Cleared, responses=_errors(403, 422))
def clear(request: Request, user: CurrentUser = Depends(csrf_user),
          confirm: bool = Query(False, description="must be true: this removes every image")) -> dict[str, Any]:
    """Remove all of the user's images, thumbnails and rows in one action (the account stays)."""
    if not confirm:
        raise ApiError(422, "confirmation_required", "add ?confirm=true to delete every image of your gallery")
    ctx = context(request)
    deleted = ctx.gallery.clear(user.id)
    return {"deleted": deleted, "used_bytes": ctx.gallery.used_bytes(user.id)}


@router.get("/{image_id}", response_model=ImageDetail, responses=_errors(404))
def get_image(image_id: str, request: Request, user: CurrentUser = Depends(current_user)) -> dict[str, Any]:
    """One image: caption, beam alternatives, regions and the attention of every word."""
    return detail(context(request).gallery.get(user.id, image_id))


@router.get("/{image_id}/file", response_class=FileResponse, responses=_errors(404))
def image_file(image_id: str, request: Request, user: CurrentUser = Depends(current_user)) -> FileResponse:
    """The stored image, as uploaded (or as PNG for formats browsers cannot show)."""
    return _file(request, user, image_id, thumbnail=False)


@router.get("/{image_id}/thumbnail", response_class=FileResponse, responses=_errors(404))
def thumbnail_file(image_id: str, request: Request, user: CurrentUser = Depends(current_user)) -> FileResponse:
    """A JPEG thumbnail (longest side 320 pixels by default)."""
    return _file(request, user, image_id, thumbnail=True)


@router.put("/{image_id}/favourite", response_model=ImageSummary, responses=_errors(403, 404))
def add_favourite(image_id: str, request: Request, user: CurrentUser = Depends(csrf_user)) -> dict[str, Any]:
    """Mark the image as a favourite (idempotent)."""
    return summary(context(request).gallery.set_favourite(user.id, image_id, True))


@router.delete("/{image_id}/favourite", response_model=ImageSummary, responses=_errors(403, 404))
def remove_favourite(image_id: str, request: Request, user: CurrentUser = Depends(csrf_user)) -> dict[str, Any]:
    """Unmark the image as a favourite (idempotent)."""
    return summary(context(request).gallery.set_favourite(user.id, image_id, False))


@router.delete("/{image_id}", status_code=204, responses=_errors(403, 404))
def delete_image(image_id: str, request: Request, user: CurrentUser = Depends(csrf_user)) -> Response:
    """Remove one image: its row, file and thumbnail."""
    context(request).gallery.delete(user.id, image_id)
    return Response(status_code=204)


def _file(request: Request, user: CurrentUser, image_id: str, *, thumbnail: bool) -> FileResponse:
    ctx = context(request)
    row = ctx.gallery.get(user.id, image_id)
    path = ctx.files.path(user.id, row.thumb_name if thumbnail else row.file_name)
    if not path.is_file():  # deleted since the row was read
        raise not_found(image_id)
    return FileResponse(path, media_type="image/jpeg" if thumbnail else row.content_type, headers=FILE_HEADERS)


def _beam_size(form_value: Any, query_value: int | None, default: int) -> int:
    if form_value is None:
        return query_value if query_value is not None else default
    try:
        value = int(str(form_value))
    except ValueError:
        raise ApiError(422, "invalid_beam_size",
                       f"beam_size must be an integer, got {str(form_value)[:40]!r}") from None
    if not 1 <= value <= MAX_BEAM_SIZE:
        raise ApiError(422, "invalid_beam_size", f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {value}")
    return value


def _files(form: Any, max_images: int) -> list[UploadFile]:
    values = form.getlist("images")
    if not values:
        raise ApiError(422, "no_file", "no image uploaded: send one or more files in the form field 'images'")
    if not all(isinstance(value, UploadFile) for value in values):
        raise ApiError(422, "not_a_file", "the form field 'images' must hold files, not text")
    if len(values) > max_images:
        raise ApiError(422, "too_many_images", f"{len(values)} images in one request; the limit is {max_images}")
    return values
