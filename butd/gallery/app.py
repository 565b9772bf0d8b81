"""The gallery application: accounts, each user's captioned images on a real database, and its page at ``/``.

``create_gallery_app(settings, model)`` wires the parts together. At start-up it migrates the database to the
newest schema, reconciles the data folder with it (``butd.gallery.reconcile``) and starts the model; every refusal
is ``{"error": {"code", "message"}}`` like the model service's, with the same upload limits.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool

from butd.errors import ConfigError
from butd.gallery.auth import Accounts
from butd.gallery.db import Database
from butd.gallery.deps import GalleryContext, context
from butd.gallery.model_client import CaptionModel
from butd.gallery.reconcile import reconcile
from butd.gallery.routes_auth import router as auth_router
from butd.gallery.routes_images import router as images_router
from butd.gallery.schemas import GalleryHealth
from butd.gallery.settings import GallerySettings
from butd.gallery.storage import ImageFiles
from butd.gallery.store import Gallery
from butd.serve.app import MAX_BEAM_SIZE
from butd.serve.errors import install_error_handlers
from butd.serve.limits import BodyLimitMiddleware

log = logging.getLogger("butd.gallery")
STATIC_DIR = Path(__file__).resolve().parent / "static"
SERVICE_STATIC_DIR = Path(__file__).resolve().parents[1] / "serve" / "static"
# The page loads only its own scripts and styles; images come from the API or from local previews (blob:).
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'self'")


def prepare_storage(settings: GallerySettings) -> None:
    """Migrate the database to the newest schema and reconcile the data folder with it.

    ``tools/gallery.py`` calls it before loading the model, so that a wrong ``--database`` is one clear line
    (``ConfigError``) instead of a failed start-up; the app's start-up then skips it.
    """
    db = Database(settings.database_url)
    try:
        files = ImageFiles(settings.data_dir)
        db.migrate()
        reconcile(db, files, Gallery(db=db, files=files, settings=settings))
    except (OperationalError, InterfaceError) as err:
        raise ConfigError(f"database {db.safe_url}: {err.orig}".strip()) from None
    except OSError as err:
        raise ConfigError(f"data folder {settings.data_dir}: {err}") from None
    finally:
        db.dispose()


def create_gallery_app(settings: GallerySettings, model: CaptionModel, *, prepared: bool = False) -> FastAPI:
    """The FastAPI app of the gallery over ``settings.database_url`` and ``settings.data_dir``, captioning with
    ``model`` (a ``LocalModel`` or a ``RemoteModel``). Its start-up runs ``prepare_storage`` unless ``prepared``."""
    db = Database(settings.database_url)
    files = ImageFiles(settings.data_dir)
    gallery = Gallery(db=db, files=files, settings=settings)
    ctx = GalleryContext(settings=settings, db=db, files=files, accounts=Accounts(db=db, settings=settings),
                         gallery=gallery, model=model)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if not prepared:
            await run_in_threadpool(db.migrate)
            await run_in_threadpool(reconcile, db, files, gallery)
        await model.start()
        log.info("butd gallery ready: database %s, data in %s, model: %s", db.safe_url, settings.data_dir,
                 model.description)
        try:
            yield
        finally:
            await model.stop()
            db.dispose()

    app = FastAPI(
        title="butd gallery",
        version="1",
        description="Accounts and a personal gallery of captioned images, with per-word attention over regions.",
        lifespan=lifespan,
        redirect_slashes=False,  # never turn a mistyped DELETE /api/images/ into another route
    )
    app.state.gallery = ctx
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    install_error_handlers(app, log=log, crash_detail=False)
    app.include_router(auth_router)
    app.include_router(images_router)

    @app.get("/healthz", response_model=GalleryHealth, tags=["service"])
    def healthz(request: Request) -> dict[str, Any]:
        """Whether the database answers, which model captions, and the limits the page shows."""
        parts = context(request)
        return {
            "status": "ok", "database": "ok" if parts.db.ping() else "unreachable",
            "database_backend": parts.db.dialect,
            "model": parts.model.description, "random_detector": parts.model.random_detector,
            "max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
            "max_images": settings.max_images, "max_beam_size": MAX_BEAM_SIZE, "quota_bytes": settings.quota_bytes,
            "password_min_length": settings.password_min_length,
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY",
                                     "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff"})

    @app.get("/static/viewer.js", include_in_schema=False)
    async def attention_view() -> FileResponse:  # the service page's attention view, one file for both pages
        return FileResponse(SERVICE_STATIC_DIR / "viewer.js", media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


