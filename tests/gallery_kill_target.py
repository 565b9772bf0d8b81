"""Run by tests/test_gallery_storage.py: the gallery on a loopback port, which SIGKILLs itself at a chosen point of
an upload or a deletion (a crash at the worst moment, reproducibly).

    python tests/gallery_kill_target.py DATABASE_URL DATA_DIR PORT POINT

POINT is ``write_partial:N`` (at the N-th partial file write), ``promote`` (rows committed, no file renamed yet),
``replace:N`` (at the N-th rename from partial to final name) or ``discard`` (a deletion: rows removed,
files not yet).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery_fixtures import EchoModel, cheap_settings  # noqa: E402

from butd.gallery import create_gallery_app, storage  # noqa: E402


def arm(point: str) -> None:
    name, _, count = point.partition(":")
    remaining = [int(count or 1)]

    def wrap(original):
        def killing(*args, **kwargs):
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return killing

    if name == "replace":  # the renames of butd.gallery.storage only (promote), not those of other modules
        storage.rename_durably = wrap(storage.rename_durably)
    else:
        setattr(storage.ImageFiles, name, wrap(getattr(storage.ImageFiles, name)))


def main() -> None:
    database_url, data_dir, port, point = sys.argv[1:5]
    arm(point)
    app = create_gallery_app(cheap_settings(database_url, Path(data_dir)), EchoModel())
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
