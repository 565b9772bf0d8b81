#!/usr/bin/env bash
# Run once here, on the CPU machine, in the checkout, before benchmarks/gpu_session.sh goes to a GPU machine.
#
# The GPU machine's image has PyTorch but not all of butd's packages, and it cannot download anything. This fills
# the ignored folder .gpu/ (name it in the device tool's `carry`) with what is missing there:
#   .gpu/whl/   the lmdb wheel for its Python 3.12 (butd.data.store imports lmdb);
#   .gpu/site/  pycocoevalcap's Python modules only (butd.metrics imports it; its 100 MB of Java jars serve METEOR and
#               SPICE in tools/eval.py, which no GPU check runs);
#   .gpu/peer/  the peer's timing bundle (../shared/peer-bench: self-critical.pytorch's own step, timed beside ours).
# About 6 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEER_BENCH=${PEER_BENCH:-../shared/peer-bench}
rm -rf .gpu
mkdir -p .gpu/whl .gpu/site
lmdb_version=$("$PY" -c "import lmdb; print(lmdb.__version__)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "lmdb==$lmdb_version"
"$PY" - <<'PYCODE'
import shutil
from pathlib import Path

import pycocoevalcap

source = Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __init__.py
for path in source.rglob("*.py"):
    target = Path(".gpu/site/pycocoevalcap") / path.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
PYCODE
if [ -d "$PEER_BENCH" ]; then
    cp -r "$PEER_BENCH" .gpu/peer
else
    echo "note: no peer bench at $PEER_BENCH; gpu_session.sh will time butd only" >&2
fi
du -sh .gpu >&2
