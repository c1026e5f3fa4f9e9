#!/usr/bin/env bash
# The GPU check, one command on the lent GPU machine (benchmarks/gpu/README.md): from the repository root,
#     OUT=... bash benchmarks/gpu/check.sh
# Needs .whl/ from `make gpu-wheels` (carried along) and a Python with a CUDA torch and triton. Steps: a venv over
# that Python's packages, the wheels and the package (the C++/CUDA extension), versions and nvidia-smi, the cuda
# tests, the benchmark; then $OUT/check.json sums it up. A step that fails or times out is recorded and the next one
# runs; every step has a timeout and all of them together stay under T_TOTAL (default 470 s).
#
# Environment: OUT (default benchmarks/results/gpu), PYTHON (the device's python; default the first of python3,
# python with torch), GPU_VENV (default /tmp/moc-gpu-venv), WHEELS (default .whl), T_INSTALL T_BUILD T_PYTEST
# T_BENCH T_TOTAL (seconds), MOC_CHECK_SKIP_CUDA=1: a dry run without a GPU (no CUDA build, the benchmark's
# --device cpu --quick; the tests skip themselves).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VENV=${GPU_VENV:-/tmp/moc-gpu-venv}
WHEELS=${WHEELS:-.whl}
SKIP_CUDA=${MOC_CHECK_SKIP_CUDA:-0}
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$ROOT/$WHEELS")
T_INSTALL=${T_INSTALL:-50} T_BUILD=${T_BUILD:-180} T_VERSIONS=${T_VERSIONS:-25} T_PYTEST=${T_PYTEST:-120}
T_BENCH=${T_BENCH:-100} T_TOTAL=${T_TOTAL:-470}
START=$(date +%s)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
export MOC_GPU_REPORT="$OUT/test_measurements.json"
rm -f "$OUT"/*.status "$MOC_GPU_REPORT"

log() { echo "[check $(( $(date +%s) - START ))s] $*"; }

# step NAME LIMIT CMD...: run CMD under a timeout (cut to what T_TOTAL leaves), output in $OUT/NAME.log,
# "rc seconds" in $OUT/NAME.status; never fails the script.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( START + T_TOTAL - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "125 0" >"$OUT/$name.status"
    log "$name: skipped, no time left"
    return 0
  fi
  log "$name (timeout ${limit}s)"
  export STEP_LIMIT=$limit
  local t0 rc=0
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local dt
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  echo "$rc $dt" >"$OUT/$name.status"
  log "$name: rc $rc in ${dt}s$( ((rc == 124)) && echo ' (timed out)')"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

# The device's python: the first candidate that imports torch.
pick_python() {
  local p
  for p in ${PYTHON:-} python3 python python3.12; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then
      command -v "$p"
      return 0
    fi
  done
  command -v python3 || echo python3
}
HOST_PY=$(pick_python)
export HOST_PY VENV WHEELS ROOT OUT
log "python: $HOST_PY"

setup_venv() {
  set -e
  if [[ ! -f $WHEELS/requirements.txt ]]; then
    echo "no $WHEELS/requirements.txt: run \`make gpu-wheels\` on the CPU machine and carry .whl" >&2
  fi
  rm -rf "$VENV"
  "$HOST_PY" -m venv --system-site-packages "$VENV" || "$HOST_PY" -m venv --system-site-packages --without-pip "$VENV"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # a venv made from inside another venv sees the base interpreter's packages, not torch: add that python's
  "$HOST_PY" - >"$site/_device_site.pth" <<'PY'
import os, site, sys
import torch
paths = [os.path.dirname(os.path.dirname(torch.__file__))] + site.getsitepackages()
print("\n".join(dict.fromkeys(p for p in paths if os.path.isdir(p))))
PY
  local pip=("$VENV/bin/python" -m pip)
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || pip=("$HOST_PY" -m pip --python "$VENV/bin/python")
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'from', torch.__file__)"
  "${pip[@]}" install --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
  "${pip[@]}" list 2>/dev/null | grep -iE "^(torch|triton|deepspeed|megatron|numpy|pytest) " || true
}

build_ext() {
  set -e
  cd "$ROOT"
  export PATH="$VENV/bin:$PATH"
  if [[ $SKIP_CUDA == 1 ]]; then export MOC_BUILD_CUDA=0; fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  command -v nvcc && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
  # --use-pep517: an older pip would take setuptools' deprecated `setup.py develop`, which needs an index
  "$VENV/bin/python" -m pip install -v --no-index --no-build-isolation --no-deps --use-pep517 -e .
  "$VENV/bin/python" -c "import torch, moc_megatron._C as C; print('moc_megatron._C with_cuda =', bool(C.with_cuda))"
}

versions() {
  cd "$ROOT"
  { nvidia-smi || echo "nvidia-smi failed"; } >"$OUT/nvidia-smi.txt" 2>&1
  "$VENV/bin/python" - <<'PY'
import json, os, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                nccl=".".join(map(str, torch.cuda.nccl.version())), gpus=torch.cuda.device_count())
for mod in ("triton", "deepspeed", "megatron.core", "numpy", "pytest"):
    try:
        m = __import__(mod, fromlist=["_"])
        info[mod] = getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info[mod] = f"not importable: {type(e).__name__}: {e}"
import moc_megatron.ops as o
from moc_megatron.ops import _backend
info["ops_backend"] = o.backend()
info["extension"] = None if _backend.EXTENSION is None else {"file": _backend.EXTENSION.__file__,
                                                             "with_cuda": bool(_backend.EXTENSION.with_cuda)}
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
kernels = _backend.attention_kernels(dev)
info["attention_kernels"] = getattr(kernels, "__name__", "torch reference")
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
PY
}

run_tests() {
  cd "$ROOT"
  # no -x: a failure in one family must not hide the others' results
  "$VENV/bin/python" -m pytest -m cuda -q -p no:cacheprovider --timeout 60 --junitxml "$OUT/pytest.xml" \
    tests/test_cuda.py
}

run_bench() {
  cd "$ROOT"
  local args=(--out "$OUT/bench_gpu.json" --budget $(( STEP_LIMIT - 10 )))
  [[ $SKIP_CUDA == 1 ]] && args+=(--device cpu --quick)
  "$VENV/bin/python" benchmarks/gpu/bench_gpu.py "${args[@]}"
}
export -f setup_venv build_ext versions run_tests run_bench log
export SKIP_CUDA START T_TOTAL

step install "$T_INSTALL" bash -c setup_venv
step build "$T_BUILD" bash -c build_ext
step versions "$T_VERSIONS" bash -c versions
step pytest "$T_PYTEST" bash -c run_tests
step bench "$T_BENCH" bash -c run_bench

# check.json: everything above in one file, whatever failed (plain python: the venv may be what failed)
"$HOST_PY" - <<'PY' || log "summary failed"
import glob, json, os, re
out = os.environ["OUT"]

def read(name, default=None):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f) if name.endswith(".json") else f.read()
    except (OSError, ValueError):
        return default

steps = {}
for path in sorted(glob.glob(os.path.join(out, "*.status"))):
    rc, seconds = open(path).read().split()
    name = os.path.basename(path)[:-7]
    steps[name] = {"rc": int(rc), "seconds": float(seconds), "ok": rc == "0",
                   "timed_out": rc in ("124", "137"), "skipped": rc == "125"}
build_log = read("build.log", "")
pytest_log = read("pytest.log", "")
summary_line = next((ln.strip("= ") for ln in reversed(pytest_log.splitlines())
                     if re.search(r"\d+ (passed|failed|skipped|error)", ln)), None)
failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in pytest_log.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
env = read("env.json", {})
check = {
    "steps": steps,
    "total_seconds": round(sum(s["seconds"] for s in steps.values()), 1),
    "build": {"ok": steps.get("build", {}).get("ok", False), "seconds": steps.get("build", {}).get("seconds"),
              "cuda_build_failed": "CUDA build of moc_megatron._C FAILED" in build_log,
              "with_cuda": (env.get("extension") or {}).get("with_cuda"),
              "fallback": env.get("ops_backend") != "cuda"},
    "env": env,
    "pytest": {"result": summary_line, "failed": failed},
    "test_measurements": read("test_measurements.json", {}),
    "bench": read("bench_gpu.json"),
}
with open(os.path.join(out, "check.json"), "w") as f:
    json.dump(check, f, indent=1)
print(json.dumps({k: check[k] for k in ("steps", "build", "pytest")}, indent=1))
PY
log "done; results in $OUT"
