#!/usr/bin/env bash
# Creates or refreshes .venv: torch/torchvision first, then Horovod built from source (recipe of
# docs/operations.md, the stack), then the project and the rest of the stack. Each step keeps a stamp holding the
# hash of its inputs, so a second run with nothing changed rebuilds nothing and takes ~1 s.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
LOCK=requirements.lock
CONSTRAINTS=(-c constraints.txt)
[ -s "$LOCK" ] && CONSTRAINTS+=(-c "$LOCK")

stamp_ok() {  # stamp_ok NAME HASH -> 0 when the step already ran with these inputs
  [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]
}
stamp_set() { echo "$2" > "$VENV/.stamp-$1"; }
hash_of() { for f in "$@"; do if [ -f "$f" ]; then cat "$f"; fi; done | sha256sum | cut -c1-16; }
log() { echo "[bootstrap $(date +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  $PIP install --upgrade "pip>=24" setuptools wheel
fi

# 1. torch + torchvision (the CUDA build: torch-fidelity needs a torchvision that imports).
H1=$(hash_of constraints.txt)
if ! stamp_ok torch "$H1"; then
  log "installing torch/torchvision (first time: a few GB, several minutes)"
  $PIP install "${CONSTRAINTS[@]}" torch torchvision
  stamp_set torch "$H1"
fi

# 2. Horovod 0.28.1 from source against torch 2.14 (horovod issues #3996/#4014, PR #3998).
H2=$(hash_of constraints.txt scripts/cxx-std20.sh)
if ! stamp_ok horovod "$H2"; then
  log "building horovod from source (first time ~7 min on 2 cores; pip caches the wheel)"
  $PIP install "${CONSTRAINTS[@]}" setuptools wheel packaging psutil pyyaml cloudpickle cffi
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
         CMAKE_POLICY_VERSION_MINIMUM=3.5 \
         CMAKE_CXX_COMPILER_LAUNCHER="$ROOT/scripts/cxx-std20.sh"
  if command -v nvcc >/dev/null; then
    # A CUDA torch makes Horovod's CMake look for the toolkit: point it at nvcc's own root.
    # (`nvcc` may be a wrapper script, so ask nvcc itself where its toolkit lives.)
    CUDA_ROOT=$(readlink -f "$(nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")
    export CUDAToolkit_ROOT="$CUDA_ROOT" HOROVOD_CUDA_HOME="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
    if [ -n "${DALLE_GPU:-}" ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  fi
  export MAKEFLAGS="-j$(nproc)"
  $PIP install "${CONSTRAINTS[@]}" --no-build-isolation horovod
  "$VENV/bin/horovodrun" --check-build | tee "$VENV/horovod-check-build.txt"
  grep -q "\[X\] PyTorch" "$VENV/horovod-check-build.txt"
  grep -q "\[X\] Gloo" "$VENV/horovod-check-build.txt"
  stamp_set horovod "$H2"
fi

# 3. The project and the rest of the stack.
H3=$(hash_of constraints.txt "$LOCK" pyproject.toml)
if ! stamp_ok project "$H3"; then
  log "installing dalle and its dependencies"
  $PIP install "${CONSTRAINTS[@]}" -e ".[dev]"
  [ -s "$LOCK" ] || { $VENV/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > "$LOCK"; log "wrote $LOCK"; }
  stamp_set project "$(hash_of constraints.txt "$LOCK" pyproject.toml)"
fi
log "venv ready: $VENV"
