"""Who captions the gallery's uploads: the model in this process (through the service's micro-batcher), or a
separate model service reached over HTTP at its ``POST /v1/captions`` (``--model-url``), so that the model runs on
GPU machines while the gallery scales on its own. Both give ``ImageCaption.to_json()`` dictionaries.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import httpx

from feature_extraction.images import ImageError

from butd.gallery.images import PreparedImage
from butd.serve.admission import PixelBudget, admit
from butd.serve.app import RETRY_AFTER_S
from butd.serve.batcher import MicroBatcher
from butd.serve.limits import ApiError

log = logging.getLogger("butd.gallery")


class CaptionModel(Protocol):
    """What the gallery needs from a model."""

    description: str  # stored with every caption: which model produced it
    random_detector: bool  # the captions are meaningless (the page says so)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def check_image(self, image: PreparedImage) -> None:
        """Raise 422 ``ApiError`` if the model cannot take this image (before anything is queued)."""

    async def caption(self, images: list[PreparedImage], beam_size: int) -> list[dict[str, Any]]: ...


class LocalModel:
    """A ``butd.Captioner`` in this process, used by one inference thread behind a ``MicroBatcher``."""

    def __init__(self, captioner: Any, *, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_pending_pixels: int = 100_000_000) -> None:
        self.captioner = captioner
        info = captioner.info()
        checkpoint = Path(info["checkpoint"]).name if info.get("checkpoint") else "checkpoint"
        self.description = f"{info['model']} {checkpoint}, detector {info['detector']}, boxes {info['boxes']}"
        self.random_detector = info["detector"] == "random"

        def run_batch(arrays: list[Any], names: list[str], beam_size: int) -> list[dict[str, Any]]:
            return [r.to_json() for r in captioner.caption(arrays, beam_size=beam_size, names=names)]

        self._batcher = MicroBatcher(run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms)
        # The service's memory budget: decoded pixels waiting for the model, not a count of images.
        self._budget = PixelBudget(max_pixels=max_pending_pixels, max_decodes=1)

    async def start(self) -> None:
        await self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    def check_image(self, image: PreparedImage) -> None:
        try:
            self.captioner.check_image(image.width, image.height, image.name)
        except ImageError as err:
            raise ApiError(422, "unusable_image", str(err)) from err

    async def caption(self, images: list[PreparedImage], beam_size: int) -> list[dict[str, Any]]:
        with admit(self._budget, [i.name for i in images], [(i.width, i.height) for i in images],
                   retry_after_s=RETRY_AFTER_S):
            return await self._batcher.submit([i.pixels for i in images], [i.name for i in images], beam_size)


class RemoteModel:
    """The model service at ``url`` (``tools/serve.py``): the files are sent to its ``POST /v1/captions``.

    Its refusals come back with their status and code, prefixed "model service:"; when it cannot be reached or
    fails, the upload gets 502 ``model_unavailable`` (nothing is stored). ``transport`` is for tests.
    """

    def __init__(self, url: str, *, timeout_s: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.description = f"model service at {self.url}"
        self.random_detector = False
        self._timeout = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self._timeout, transport=self._transport)
        await self._describe()

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def check_image(self, image: PreparedImage) -> None:
        pass  # the model service checks what its detector can take, and its 422 is passed on

    async def caption(self, images: list[PreparedImage], beam_size: int) -> list[dict[str, Any]]:
        assert self._client is not None, "RemoteModel.caption before start()"
        if self.description.startswith("model service at"):
            await self._describe()  # it was down when the gallery started
        files = [("images", (image.name, image.data, image.content_type)) for image in images]
        try:
            response = await self._client.post("/v1/captions", files=files, data={"beam_size": str(beam_size)})
        except httpx.HTTPError as err:
            raise ApiError(502, "model_unavailable",
                           f"the model service at {self.url} cannot be reached ({type(err).__name__}: {err})") from err
        if response.status_code != 200:
            raise _refusal(response, self.url)
        captions = response.json().get("captions", [])
        if len(captions) != len(images):
            raise ApiError(502, "model_unavailable", f"the model service at {self.url} answered {len(captions)} "
                                                     f"captions for {len(images)} images")
        return captions

    async def _describe(self) -> None:
        assert self._client is not None
        try:
            health = (await self._client.get("/healthz", timeout=10.0)).raise_for_status().json()
        except (httpx.HTTPError, ValueError) as err:
            log.warning("the model service at %s does not answer /healthz yet (%s)", self.url, err)
            return
        checkpoint = Path(health["checkpoint"]).name if health.get("checkpoint") else "checkpoint"
        self.description = (f"{health['model']} {checkpoint}, detector {health['detector']}, boxes {health['boxes']} "
                            f"(at {self.url})")
        self.random_detector = bool(health.get("random_detector"))


def _refusal(response: httpx.Response, url: str) -> ApiError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "model_unavailable", f"HTTP {response.status_code}"
    if 400 <= response.status_code < 500 or response.status_code == 503:
        return ApiError(response.status_code, code, f"model service: {message}")
    return ApiError(502, "model_unavailable", f"the model service at {url} failed: {message}")
