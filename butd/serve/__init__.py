"""The captioning web service (FastAPI): ``create_app(captioner, ...)`` and its micro-batcher.

Run it with ``tools/serve.py --detector WEIGHTS --checkpoint CKPT``; see docs/service.md.
"""
from __future__ import annotations

from butd.serve.app import create_app
from butd.serve.batcher import MicroBatcher

__all__ = ["MicroBatcher", "create_app"]
