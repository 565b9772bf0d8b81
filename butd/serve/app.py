"""The captioning web service: ``POST /v1/captions``, ``GET /healthz`` and the page at ``/``.

This module is where butd's service joins the detector package (``feature_extraction``): uploads are decoded with
``feature_extraction.images`` here, and the ``Captioner`` runs the detector on them.

One ``Captioner`` is loaded once and used by one inference thread behind a ``MicroBatcher``. Uploads are checked
before they reach the model: request size (413) and read time (408), content type (415), pixel count read from the
image header before decoding (413), the server's memory budget in decoded pixels (503 with ``Retry-After`` when it is
full), decodability (422) — every refusal is ``{"error": {"code", "message"}}`` naming the file. Only admitted images
are decoded, a few at a time; a request whose client hung up is dropped before it reaches the model.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from butd.serve.admission import PixelBudget, admit, read_image_header
from butd.serve.batcher import MicroBatcher
from butd.serve.errors import install_error_handlers
from butd.serve.limits import ApiError, BodyLimitMiddleware, BodyTimeout, UploadTooLarge
from butd.serve.schemas import CaptionsResponse, ErrorResponse, HealthResponse
from feature_extraction.images import ImageError, load_image

log = logging.getLogger("butd.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BEAM_SIZE = 10
# application/octet-stream is what many clients send for a file of unknown type; decoding then decides.
ACCEPTED_TYPES = ("image/", "application/octet-stream")
# Seconds a client is asked to wait when the memory budget is full (a CPU batch takes seconds; a GPU one less).
RETRY_AFTER_S = 2
# Status of a request whose client hung up (nginx's convention; nobody reads the answer).
CLIENT_CLOSED = 499

_ERRORS = {code: {"model": ErrorResponse} for code in (408, 413, 415, 422, 503)}
Result = TypeVar("Result")
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
    max_pending_pixels: int = 100_000_000,
    max_decodes: int = 2,
    body_timeout_s: float | None = 60.0,
) -> FastAPI:
    """The FastAPI app serving ``captioner`` (a ``butd.Captioner``, or anything with its ``caption``/``info``).

    ``max_upload_bytes`` bounds a whole request body and ``body_timeout_s`` the time to receive it; ``max_pixels``
    bounds each image (checked from its header, so decompression bombs are refused before decoding), ``max_images``
    the files of one request. ``max_pending_pixels`` is the memory budget: the decoded pixels of all requests being
    decoded, queued or captioned (a request that does not fit gets 503 with Retry-After); ``max_decodes`` images are
    decoded at once at most. ``max_batch`` and ``max_wait_ms`` bound the micro-batches.
    """

    def run_batch(images: list[Any], names: list[str], beam_size: int) -> list[dict[str, Any]]:
        return [r.to_json() for r in captioner.caption(images, beam_size=beam_size, names=names)]

    batcher = MicroBatcher(run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms)
    budget = PixelBudget(max_pixels=max_pending_pixels, max_decodes=max_decodes)
    abandoned = _Counter()

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
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes, timeout_s=body_timeout_s)
    install_error_handlers(app, log=log, crash_detail=True)
    app.state.batcher = batcher
    app.state.budget = budget

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> dict[str, Any]:
        """Whether the model is loaded, on which device, and which detector (a random one makes captions meaningless)."""
        info = captioner.info()
        stats, memory = batcher.stats, budget.stats
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
                "queued": batcher.queued,
                "skipped": stats.skipped,
                "abandoned_requests": abandoned.value,
            },
            "memory": {
                "max_pending_pixels": budget.max_pixels,
                "pending_pixels": memory.pending_pixels,
                "peak_pending_pixels": memory.peak_pixels,
                "max_decodes": budget.max_decodes,
                "decoding": memory.decoding,
                "admitted_requests": memory.admitted,
                "refused_requests": memory.refused,
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
        form = await _read_form(request, max_images)
        try:
            beam = _beam_size(form.get("beam_size"), beam_size)
            uploads = _uploads(form, max_images)
            names = [u.filename or "upload" for u in uploads]
            sizes = [await run_in_threadpool(_measure, upload, name, max_pixels, captioner)
                     for upload, name in zip(uploads, names)]
            # The pixels stay granted until the captions are answered: the arrays wait in the batcher's queue.
            with admit(budget, names, sizes, retry_after_s=RETRY_AFTER_S):
                arrays = []
                for upload, name in zip(uploads, names):
                    if await request.is_disconnected():  # the client left while its upload was read: stop decoding
                        raise _client_gone(abandoned)
                    async with budget.decode_slot():
                        arrays.append(await _decode(upload, name, max_pixels))
                await form.close()  # the encoded uploads are not needed while the arrays wait
                if await request.is_disconnected():  # gone while its images were decoded: do not queue them
                    raise _client_gone(abandoned)
                results = await _unless_disconnected(request, batcher.submit(arrays, names, beam), abandoned)
                del arrays
        finally:
            await form.close()
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


class _Counter:
    """A count kept by the event loop's tasks (no locking needed: they never run at the same time)."""

    value = 0

    def add(self) -> None:
        self.value += 1


class _SmallSpoolParser(MultiPartParser):
    """Starlette's multipart parser with uploads moved to disk past 64 KB instead of 1 MB: a request of 16 files in
    flight then holds about 1 MB of memory, not 16 MB (the connection limit multiplies it)."""

    spool_max_size = 64 * 1024


async def _read_form(request: Request, max_images: int) -> FormData:
    """The multipart form, its files spooled to disk; the body's size and time limits become 413 and 408."""
    try:
        async with aclosing(request.stream()) as stream:
            return await _SmallSpoolParser(request.headers, stream, max_files=max_images + 1, max_fields=16).parse()
    except UploadTooLarge as err:
        raise ApiError(413, "upload_too_large", str(err)) from err
    except BodyTimeout as err:
        raise ApiError(408, "request_timeout", f"{err}; send it faster, or in several smaller requests") from err
    except MultiPartException as err:  # malformed multipart body, too many parts
        raise ApiError(422, "malformed_form", err.message) from err
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "client_closed", "the client closed the connection during the upload") from None


def _measure(upload: UploadFile, name: str, max_pixels: int, captioner: Any) -> tuple[int, int]:
    """The image's width and height from its header alone (nothing is decoded); refuses what could never be used."""
    if not upload.size:
        raise ApiError(422, "empty_file", f"{name}: the file is empty")
    upload.file.seek(0)
    header = read_image_header(upload.file, name, max_pixels=max_pixels)
    try:
        captioner.check_image(header.width, header.height, name)  # symmetric in width and height: EXIF cannot matter
    except ImageError as err:
        raise ApiError(422, "unusable_image", str(err)) from err
    return header.width, header.height


async def _decode(upload: UploadFile, name: str, max_pixels: int) -> Any:
    """Decode an admitted upload to an RGB array off the event loop (its encoded bytes are read only now)."""
    await upload.seek(0)
    data = await upload.read()
    try:
        return await run_in_threadpool(load_image, data, max_pixels=max_pixels)
    except ImageError as err:
        raise ApiError(422, "undecodable_image", f"{name}: {err.reason}") from err


async def _unless_disconnected(request: Request, work: Awaitable[Result], abandoned: _Counter) -> Result:
    """Await ``work`` unless the client hangs up first: then cancel it (its images never reach the model)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # cancelled just above: the client hung up first
        raise _client_gone(abandoned)
    return task.result()


async def _until_disconnected(request: Request) -> None:
    """Return when the client hangs up. Called once the body is read: the server then only reports disconnection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_gone(abandoned: _Counter) -> ApiError:
    abandoned.add()
    return ApiError(CLIENT_CLOSED, "client_closed", "the client closed the connection before its captions were ready")


