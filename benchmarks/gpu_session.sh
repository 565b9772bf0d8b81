#!/usr/bin/env bash
# Issue 18's GPU checks and figures in one go, for one H200/H100 (about 5-8 minutes of device time):
#   1. pytest -q tests/test_gpu_fast_paths.py (the fast paths equal the plain ones on CUDA, the captured step equals
#      the uncaptured one, no host sync inside the sync-free step): figures mean nothing if this fails;
#   2. benchmarks/train_xe.py at batch 10 and 100 with every runner (eager first: a runner that fails leaves an
#      error in the line, not a missing line), then the peer's own step beside it
#      (self-critical.pytorch, XE and SCST from a random model, samples of at most 16 words);
#   3. train_xe.py at batch 250 and 500, the XE step profiled (kernel and graph launches per iteration) with the
#      eager and the cuda_graph runner, benchmarks/train_scst.py at batch 10 and 100 with every runner, and the
#      captured SCST step profiled.
# Every step prints one JSON line on stdout (a failed or skipped one too), also appended to
# ${OUT:-gpu_session}/results.jsonl as it goes ($OUT: the device tool's folder that comes back); progress and the
# tools' own messages go to stderr.
#
#   here:   bash benchmarks/gpu_session_prepare.sh     # fills .gpu/ (lmdb wheel, pycocoevalcap, the peer bench)
#   there:  bash benchmarks/gpu_session.sh             # with .gpu carried, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-gpu_session}/results.jsonl
mkdir -p "$(dirname "$RESULTS")"
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/butd-site \
        .gpu/whl/*.whl >&2
fi
export PYTHONPATH="$PWD:/tmp/butd-site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"

json() {  # json KEY VALUE ...: one JSON object of strings, also into the results file
    "$PY" -c 'import json, sys; a = sys.argv[1:]; print(json.dumps(dict(zip(a[::2], a[1::2]))))' "$@" | tee -a "$RESULTS"
}

started=$(date +%s)
BUDGET_S=${BUDGET_S:-480}  # past this many seconds the remaining steps are skipped (a JSON line each), so the lines
                           # written so far come back before the device tool's own limit stops the command

bench() {  # bench SECONDS SCRIPT ARGS...: the script's last stdout line (its JSON) or a JSON line saying it failed
    local limit=$1; shift
    if [ $(( $(date +%s) - started )) -gt "$BUDGET_S" ]; then
        json benchmark skipped command "$*" reason "past BUDGET_S=$BUDGET_S seconds"
        return
    fi
    echo "[gpu_session] $*" >&2
    local line rc
    line=$(timeout "$limit" "$PY" "$@" | tail -n 1); rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ] && [ -n "$line" ]; then
        echo "$line" | tee -a "$RESULTS"
    else
        json benchmark failed command "$*" rc "$rc"
    fi
}

json benchmark gpu_session date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    gpu "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)" \
    torch "$("$PY" -c 'import torch; print(torch.__version__)')"

echo "[gpu_session] pytest -q tests/test_gpu_fast_paths.py" >&2
summary=$(timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_fast_paths.py 2>&1 | tee /dev/stderr | tail -n 1)
json benchmark pytest file tests/test_gpu_fast_paths.py summary "$summary"

for batch in 10 100; do
    bench 150 benchmarks/train_xe.py --device cuda --batch-size "$batch" --runner eager --compare-runners
done
if [ -d .gpu/peer ]; then
    echo "[gpu_session] peer: self-critical.pytorch, xe:10,xe:100,scst_randinit:10,scst_randinit:100" >&2
    peer=$(cd .gpu/peer && DEVICE=cuda CONFIGS=xe:10,xe:100,scst_randinit:10,scst_randinit:100 SAMPLE_MAX_LEN=16 \
        timeout 300 bash run_bench.sh); rc=$?
    [ -z "$peer" ] || echo "$peer" | tee -a "$RESULTS"
    [ "$rc" = 0 ] || json benchmark failed command "peer: cd .gpu/peer && bash run_bench.sh" rc "$rc"
else
    json benchmark peer status "not run: no .gpu/peer (run benchmarks/gpu_session_prepare.sh first)"
fi
for batch in 250 500; do
    bench 150 benchmarks/train_xe.py --device cuda --batch-size "$batch" --runner eager --compare-runners
done
bench 120 benchmarks/profile_step.py --stage xe --device cuda --batch-size 250 --runner cuda_graph
bench 120 benchmarks/profile_step.py --stage xe --device cuda --batch-size 250
for batch in 10 100; do
    bench 150 benchmarks/train_scst.py --device cuda --batch-size "$batch" --num-samples 5 --baseline mean \
        --runner eager --compare-runners
done
bench 120 benchmarks/profile_step.py --stage scst --device cuda --batch-size 100 --runner cuda_graph
json benchmark gpu_session_end seconds "$(( $(date +%s) - started ))"
