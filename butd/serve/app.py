"""The captioning web service: ``POST /v1/captions``, ``GET /healthz`` and the page at ``/``.

One ``Captioner`` is loaded once and used by one inference thread behind a ``MicroBatcher``. Uploads are checked
before they reach the model: request size (413), content type (415), pixel count read from the image header before
decoding (413), decodability (422) — every refusal is ``{"error": {"code", "message"}}`` naming the file.
"""
from __future__ import annotations

import io
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from butd.serve.batcher import MicroBatcher, QueueFull
from butd.serve.limits import ApiError, BodyLimitMiddleware, UploadTooLarge
from butd.serve.schemas import CaptionsResponse, ErrorResponse, HealthResponse

log = logging.getLogger("butd.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BEAM_SIZE = 10
# application/octet-stream is what many clients send for a file of unknown type; decoding then decides.
ACCEPTED_TYPES = ("image/", "application/octet-stream")

_ERRORS = {code: {"model": ErrorResponse} for code in (413, 415, 422, 503)}
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE},
                    },
                }
            }
        },
    }
}


def create_app(
    captioner: Any,
    *,
    max_upload_bytes: int = 20_000_000,
    max_pixels: int = 40_000_000,
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    max_images: int = 16,
    max_queue: int = 256,
) -> FastAPI:
    """The FastAPI app serving ``captioner`` (a ``butd.Captioner``, or anything with its ``caption``/``info``).

    ``max_upload_bytes`` bounds a whole request body, ``max_pixels`` each image (checked from its header, so
    decompression bombs are refused before decoding), ``max_images`` the files of one request; ``max_batch`` and
    ``max_wait_ms`` bound the micro-batches; ``max_queue`` images may wait before requests get 503.
    """

    def run_batch(images: list[Any], names: list[str], beam_size: int) -> list[dict[str, Any]]:
        return [r.to_json() for r in captioner.caption(images, beam_size=beam_size, names=names)]

    batcher = MicroBatcher(run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        log.info("butd service ready: %s", captioner.info())
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="butd captioner",
        version="1",
        description="Bottom-Up and Top-Down attention image captioning with per-word attention over detected regions.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes)
    _install_error_handlers(app)
    app.state.batcher = batcher

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> dict[str, Any]:
        """Whether the model is loaded, on which device, and which detector (a random one makes captions meaningless)."""
        info = captioner.info()
        stats = batcher.stats
        return {
            "status": "ok",
            "model_loaded": True,
            "device": info["device"],
            "detector": info["detector"],
            "random_detector": info["detector"] == "random",
            "boxes": str(info["boxes"]),
            "checkpoint": info["checkpoint"],
            "model": info["model"],
            "vocab_size": info["vocab_size"],
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "max_images": max_images,
            "max_beam_size": MAX_BEAM_SIZE,
            "batching": {
                "max_batch": max_batch,
                "max_wait_ms": max_wait_ms,
                "batches": stats.batches,
                "images": stats.images,
                "largest_batch": stats.largest_batch,
            },
        }

    @app.post(
        "/v1/captions", response_model=CaptionsResponse, responses=_ERRORS, openapi_extra=_UPLOAD_SCHEMA
    )
    async def captions(
        request: Request, beam_size: int | None = Query(None, ge=1, le=MAX_BEAM_SIZE)
    ) -> dict[str, Any]:
        """Caption the uploaded images (multipart field ``images``, one or several files).

        ``beam_size`` (1–10, default 3) may be a query parameter or a form field (the form field wins).
        """
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type",
                           f"send the images as multipart/form-data (field 'images'), not {content_type or 'no body'}")
        try:
            form = await request.form(max_files=max_images + 1, max_fields=16)
        except UploadTooLarge as err:
            raise ApiError(413, "upload_too_large", str(err)) from err
        except StarletteHTTPException as err:  # malformed multipart body, too many parts
            raise ApiError(422, "malformed_form", str(err.detail)) from err
        try:
            beam = _beam_size(form.get("beam_size"), beam_size)
            uploads = _uploads(form, max_images)
            arrays = [await _decode(upload, max_pixels, captioner) for upload in uploads]
        finally:
            await form.close()
        try:
            results = await batcher.submit(arrays, [u.filename or "upload" for u in uploads], beam)
        except QueueFull as err:
            raise ApiError(503, "busy", f"the server is busy: {err}; retry shortly") from err
        return {"beam_size": beam, "captions": results}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _beam_size(form_value: Any, query_value: int | None) -> int:
    if form_value is None:
        return query_value if query_value is not None else 3
    try:
        value = int(str(form_value))
    except ValueError:
        raise ApiError(422, "invalid_beam_size", f"beam_size must be an integer, got {str(form_value)[:40]!r}") from None
    if not 1 <= value <= MAX_BEAM_SIZE:
        raise ApiError(422, "invalid_beam_size", f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {value}")
    return value


def _uploads(form: Any, max_images: int) -> list[UploadFile]:
    values = form.getlist("images")
    if not values:
        others = sorted(key for key, value in form.multi_items() if isinstance(value, UploadFile))
        hint = f" (files were sent in field(s) {', '.join(others)})" if others else ""
        raise ApiError(422, "no_file", f"no image uploaded: send one or more files in the form field 'images'{hint}")
    for value in values:
        if not isinstance(value, UploadFile):
            raise ApiError(422, "not_a_file", "the form field 'images' must hold files, not text")
    if len(values) > max_images:
        raise ApiError(422, "too_many_images", f"{len(values)} images in one request; the limit is {max_images}")
    for upload in values:
        kind = (upload.content_type or "").lower()
        if not kind.startswith(ACCEPTED_TYPES):
            raise ApiError(415, "unsupported_media_type",
                           f"{upload.filename or 'upload'}: content type {kind or '(none)'} is not an image")
    return values


async def _decode(upload: UploadFile, max_pixels: int, captioner: Any) -> Any:
    """Read the image header, refuse it if it has too many pixels, then decode to an RGB array off the event loop."""
    from feature_extraction.images import ImageError, load_image

    name = upload.filename or "upload"
    data = await upload.read()
    if not data:
        raise ApiError(422, "empty_file", f"{name}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise ApiError(413, "too_many_pixels", f"{name}: {err}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ApiError(422, "undecodable_image", f"{name}: not an image this server can decode ({err})") from err
    if width * height > max_pixels:
        raise ApiError(413, "too_many_pixels",
                       f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    try:
        array = await run_in_threadpool(load_image, data, max_pixels=max_pixels)
    except ImageError as err:
        raise ApiError(422, "undecodable_image", f"{name}: {err.reason}") from err
    try:
        captioner.check_image(array.shape[1], array.shape[0], name)
    except ImageError as err:
        raise ApiError(422, "unusable_image", str(err)) from err
    return array


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answers ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(err.status_code, codes.get(err.status_code, f"http_{err.status_code}"), str(err.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return _error(500, "internal_error", f"internal error: {type(err).__name__}: {err}")
