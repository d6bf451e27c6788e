#!/usr/bin/env bash
# The project's GPU benchmark (see benchmarks/README.md and benchmarks/gpu/gpu_bench.py).
#
#   bash benchmarks/gpu/run.sh            # on a GPU box: under 8 minutes on one H200
#   bash benchmarks/gpu/run.sh --smoke    # on the CPU: every code path, tiny sizes
#   bash benchmarks/gpu/run.sh --sections loader ddp --json /tmp/gpu.json   # other gpu_bench.py options
#
# Python: $PYTHON, else the project venv's (.venv/bin/python), else python3. The project is not
# installed: src/ goes on PYTHONPATH. When visionflow's imports are missing (a bare GPU machine)
# and a folder .whl/ of wheels is in the repo root (benchmarks/gpu/requirements-device.txt), they
# are installed into /tmp/site (no index, no dependencies) and put on PYTHONPATH too.
# With $OUT set, the log goes to $OUT/gpu_bench.log and the figures to $OUT/gpu_bench.json.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
CHECK="import albumentations, pydantic, pycocotools, scipy, visionflow.training.engine, visionflow.tasks.detect, visionflow.tasks.segment"

if ! "$PY" -c "$CHECK" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${VF_WHEEL_SITE:-/tmp/site}
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        echo "pip failed; unpacking the wheels instead"
        "$PY" -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob('.whl/*.whl')]" "$SITE"
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if ! "$PY" -c "$CHECK"; then
    echo "run.sh: visionflow's imports fail with $PY (PYTHONPATH=$PYTHONPATH); see benchmarks/gpu/requirements-device.txt" >&2
    exit 2
fi

export PYTHONUNBUFFERED=1
ARGS=("$@")
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    ARGS+=(--json "$OUT/gpu_bench.json")
    "$PY" benchmarks/gpu/gpu_bench.py ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee "$OUT/gpu_bench.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$PY" benchmarks/gpu/gpu_bench.py ${ARGS[@]+"${ARGS[@]}"}
