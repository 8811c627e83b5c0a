#!/usr/bin/env bash
# One-command GPU check (issue 10), at most 8 minutes, on a machine with an NVIDIA GPU and
# CuPy already installed (no network needed when the pure-Python dependencies are there):
#
#   bash bench/gpu_check.sh
#
# 1. device  : nvidia-smi and CuPy see a CUDA device; its name gives the file names' <device>.
# 2. install : pip install --no-deps -e . over the machine's CuPy; missing pure-Python
#              dependencies (scipy, pydicom, h5py, pytest, hypothesis; matplotlib for the
#              pictures) are installed with numpy and cupy pinned to what is there.
# 3. pytest  : python -m pytest -m gpu -q (the GPU twin tests).
# 4. dose    : IDS_BACKEND=cupy bench/bench_dose.py --phantom horseshoe
# 5. dmr     : IDS_BACKEND=cupy bench/bench_dmr.py
# 6. devcost : IDS_BACKEND=cupy bench/bench_device_cost.py (skipped when the script is absent)
#
# Each stage runs under `timeout`: it may use the time left, less the minimum reserved for
# the stages after it, up to its own maximum, so a hung stage cannot eat the budget.
# Results: bench/results/*-cupy-<device>.json from the benchmarks, and
# bench/results/gpu-check-cupy-<device>.json with every stage's status and time; logs in
# bench/out/gpu-check-<device>/. Exit status 0 when every stage passed.
# GPU_CHECK_BUDGET_S overrides the total (default 465 s), PYTHON the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}
KILL_AFTER_S=5
START_S=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=15 PIP_RETRIES=0 PYTHONUNBUFFERED=1
export PY

# stage: minimum reserved s, maximum s (in run order)
STAGES=(device install pytest dose dmr devcost)
declare -A MIN_S=([device]=10 [install]=20 [pytest]=60 [dose]=60 [dmr]=60 [devcost]=30)
declare -A MAX_S=([device]=30 [install]=90 [pytest]=200 [dose]=180 [dmr]=150 [devcost]=60)
declare -A STATUS ELAPSED

MARKER=$(mktemp)
trap 'rm -f "$MARKER"' EXIT

# ------------------------------------------------------------------ device
if ! DEVICE=$(timeout -k "$KILL_AFTER_S" "${MAX_S[device]}" "$PY" -c '
import cupy
props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
print(name)
' 2>&1); then
    echo "gpu_check: no usable CUDA device through CuPy (CuPy must be installed on this machine):" >&2
    echo "$DEVICE" >&2
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
    exit 2
fi
DEVICE=$(printf '%s\n' "$DEVICE" | tail -n 1)
# The same slug as bench/_common.py's device_slug.
SLUG=$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
LOGS=bench/out/gpu-check-$SLUG
mkdir -p "$LOGS" bench/results
STATUS[device]=ok
ELAPSED[device]=$(( $(date +%s) - START_S ))
{ command -v nvidia-smi >/dev/null && nvidia-smi; "$PY" -c 'import cupy; cupy.show_config()'; } >"$LOGS/device.log" 2>&1
echo "== gpu_check on $DEVICE ($SLUG), budget ${BUDGET_S} s; logs in $LOGS"

# ------------------------------------------------------------------ stage commands
stage_install() {
    if "$PY" -c 'import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
        # No build isolation: works offline with the machine's setuptools.
        "$PY" -m pip install --no-deps --no-build-isolation -e . || return 1
    else
        "$PY" -m pip install --no-deps -e . || return 1
    fi
    local missing
    missing=$("$PY" - <<'EOF'
import importlib.util
need = {"scipy": "scipy>=1.11", "pydicom": "pydicom>=2.4", "h5py": "h5py>=3.9", "pytest": "pytest>=7.4",
        "hypothesis": "hypothesis>=6.80", "matplotlib": "matplotlib>=3.7"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
    # Pin numpy and CuPy to what the machine has: nothing may replace them.
    "$PY" -m pip freeze | grep -iE '^(numpy|cupy[a-z0-9_.-]*|fastrlock)==' >"$LOGS/constraints.txt"
    if [ -n "$missing" ]; then
        echo "installing missing pure-Python dependencies: $missing"
        "$PY" -m pip install -c "$LOGS/constraints.txt" $missing || echo "warning: could not install $missing"
    fi
    # numba compiles the DMR host loops (row selection, read-outs): without it they fall back to
    # NumPy and the GPU timings include slower host work. Best effort (needs a wheel or network).
    if ! "$PY" -c 'import numba' 2>/dev/null; then
        "$PY" -m pip install --retries 0 --timeout 5 -c "$LOGS/constraints.txt" numba 2>/dev/null \
            || echo "warning: numba not installed: the DMR host loops run in NumPy (slower host work per step)"
    fi
    "$PY" -c 'import cupy, scipy, pytest, hypothesis, ids_engine.kernels.pencil; print("ids_engine", ids_engine.__version__, "over CuPy", cupy.__version__)'
    "$PY" -c 'from ids_engine.kernels import _cpu; print("numba host loops:", _cpu.HAVE_NUMBA)'
}
# One broken test module must not hide the results of all the others.
stage_pytest() { "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors; }
stage_dose() { IDS_BACKEND=cupy "$PY" bench/bench_dose.py --phantom horseshoe --repeats 5; }
stage_dmr() { IDS_BACKEND=cupy "$PY" bench/bench_dmr.py --repeats 5; }
stage_devcost() {
    local quick=()
    "$PY" bench/bench_device_cost.py --help 2>/dev/null | grep -q -- '--quick' && quick=(--quick)
    IDS_BACKEND=cupy "$PY" bench/bench_device_cost.py "${quick[@]}"
}
export -f stage_install stage_pytest stage_dose stage_dmr stage_devcost
export LOGS

# ------------------------------------------------------------------ run
for ((k = 1; k < ${#STAGES[@]}; k++)); do
    name=${STAGES[$k]}
    if [ "$name" = devcost ] && [ ! -f bench/bench_device_cost.py ]; then
        STATUS[$name]="skipped (no bench/bench_device_cost.py)"; ELAPSED[$name]=0
        continue
    fi
    reserve=0
    for ((j = k + 1; j < ${#STAGES[@]}; j++)); do reserve=$((reserve + MIN_S[${STAGES[$j]}] + KILL_AFTER_S)); done
    left=$((BUDGET_S - ($(date +%s) - START_S) - reserve - KILL_AFTER_S))
    limit=$((left < MAX_S[$name] ? left : MAX_S[$name]))
    if [ "$limit" -lt "${MIN_S[$name]}" ]; then
        limit=${MIN_S[$name]}
    fi
    echo "== $name (limit ${limit} s)"
    t0=$(date +%s)
    timeout -k "$KILL_AFTER_S" "$limit" bash -c "stage_$name" >"$LOGS/$name.log" 2>&1
    rc=$?
    ELAPSED[$name]=$(( $(date +%s) - t0 ))
    case $rc in
        0) STATUS[$name]=ok ;;
        124 | 137) STATUS[$name]="timed out after ${limit} s" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   /'
done

# ------------------------------------------------------------------ summary
mapfile -t WRITTEN < <(find bench/results -maxdepth 1 -name "*-cupy-$SLUG.*" -newer "$MARKER" | sort)
PYTEST_LINE=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/pytest.log" 2>/dev/null | tail -n 1)
echo
echo "== gpu_check summary: $DEVICE, $(( $(date +%s) - START_S )) s of ${BUDGET_S} s"
printf '%-9s %-40s %6s\n' stage status seconds
failed=0
rows=()
for name in "${STAGES[@]}"; do
    printf '%-9s %-40s %6s\n' "$name" "${STATUS[$name]:-not run}" "${ELAPSED[$name]:-}"
    rows+=("$name" "${STATUS[$name]:-not run}" "${ELAPSED[$name]:-0}")
    case ${STATUS[$name]:-not run} in ok | skipped*) ;; *) failed=1 ;; esac
done
echo "pytest -m gpu: ${PYTEST_LINE:-no summary line (see $LOGS/pytest.log)}"
echo "results written:"
printf '  %s\n' "${WRITTEN[@]:-none}"

SUMMARY=bench/results/gpu-check-cupy-$SLUG.json
"$PY" - "$SUMMARY" "$DEVICE" "$PYTEST_LINE" "${#WRITTEN[@]}" "${WRITTEN[@]}" "${rows[@]}" <<'EOF'
import datetime, json, subprocess, sys
out, device, pytest_line, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
written, rest = sys.argv[5:5 + n], sys.argv[5 + n:]
stages = {rest[i]: {"status": rest[i + 1], "seconds": int(rest[i + 2])} for i in range(0, len(rest), 3)}
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "unknown"
doc = {"benchmark": "gpu-check", "backend": "cupy", "device": device, "git_commit": commit or "unknown",
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "stages": stages, "pytest_gpu": pytest_line, "results": written}
with open(out, "w") as f:
    f.write(json.dumps(doc, indent=2) + "\n")
print(f"  {out}")
EOF
exit $failed
