#!/usr/bin/env bash
# Creates benchmarks/.venv-peers: DALLE-pytorch 1.6.6 + Hugging Face transformers + this project
# (editable, no deps) in ONE environment, so one script times them side by side in one process.
# Never touches the project venv. Idempotent: a stamp holds the hash of this script; a second run
# with nothing changed takes ~1 s.
#
# What it takes to get dalle-pytorch 1.6.6 importable today:
#   * youtokentome has no wheel for 3.11 and its sdist needs Cython at build time:
#     install Cython first, then youtokentome with --no-build-isolation;
#   * taming-transformers-rom1504 needs pytorch-lightning<1.8 (it imports
#     pytorch_lightning.utilities.distributed), which needs setuptools<70 (pkg_resources API)
#     and torchmetrics<0.11; torch 2.14.1 declares setuptools>=77 (metadata only), so setuptools<70
#     cannot sit in the constraints: it is put back last with --no-deps;
#   * pytorch-lightning 1.7.x metadata (`torch (>=1.9.*)`) is refused by pip>=24.1: pip<24.1;
#   * a dependency otherwise downgrades torch: everything installs under a constraints file
#     pinning torch==2.14.1 / torchvision==0.29.1 (the project's versions, for a fair race).
# torch (~5 GB with its CUDA libraries) is hard-linked from the project venv when it holds the
# same version (no copy, no download); otherwise pip installs it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${PEERS_VENV:-$ROOT/benchmarks/.venv-peers}
PROJECT_VENV=${PROJECT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
log() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

STAMP_HASH=$(cat "$0" | sha256sum | cut -c1-16)
if [ -f "$VENV/.stamp-peers" ] && [ "$(cat "$VENV/.stamp-peers")" = "$STAMP_HASH" ]; then
  log "peers env up to date: $VENV"; exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
C="$VENV/constraints.txt"
cat > "$C" <<'EOF'
torch==2.14.1
torchvision==0.29.1
pytorch-lightning<1.8
torchmetrics<0.11
dalle-pytorch==1.6.6
EOF
$PIP install -c "$C" --upgrade "pip<24.1" "setuptools<70" wheel Cython

# 1. torch: hard-link the project's identical install when there is one.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -x "$PROJECT_VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  SRC=$("$PROJECT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  log "hard-linking torch/torchvision/triton/nvidia from $SRC"
  "$VENV/bin/python" - "$SRC" "$SITE" <<'EOF'
import importlib.metadata as md, os, re, sys
src, dst = sys.argv[1], sys.argv[2]
want = re.compile(r"^(torch|torchvision|triton|nvidia[-_].*|cuda[-_].*)$", re.I)
for dist in md.distributions(path=[src]):
    name = dist.metadata["Name"]
    if not want.match(name) or (name == "torch" and dist.version != "2.14.1"):
        continue
    for f in dist.files or []:
        a = os.path.normpath(os.path.join(src, f))
        b = os.path.normpath(os.path.join(dst, f))
        if not a.startswith(src) or not os.path.isfile(a) or os.path.exists(b):
            continue  # skip console scripts outside site-packages
        os.makedirs(os.path.dirname(b), exist_ok=True)
        os.link(a, b)
EOF
fi
log "installing torch (no-op when linked) and its small dependencies"
$PIP install -c "$C" torch torchvision

# 2. youtokentome: sdist only, needs Cython at build time.
"$VENV/bin/python" -c 'import youtokentome' 2>/dev/null || {
  log "building youtokentome (--no-build-isolation)"; $PIP install -c "$C" --no-build-isolation youtokentome; }

# 3. dalle-pytorch and its pinned stack, transformers (GPT-2 baseline), py-spy for profiling.
log "installing dalle-pytorch 1.6.6, transformers"
$PIP install -c "$C" "dalle-pytorch==1.6.6" "pytorch-lightning<1.8" "torchmetrics<0.11" \
  transformers psutil py-spy

# 4. this project, editable, with only what its model code imports.
log "installing dalle (editable, --no-deps) + its light runtime deps"
$PIP install -c "$C" "pydantic>=2" pyyaml safetensors numpy pillow tqdm tokenizers
$PIP install -c "$C" --no-deps -e "$ROOT"
$PIP install --no-deps "setuptools<70"   # for pytorch-lightning<1.8 (see top); pip warns, by design

"$VENV/bin/python" - <<'EOF'
import torch, dalle_pytorch, transformers, dalle
assert torch.__version__.split("+")[0] == "2.14.1", f"torch was changed to {torch.__version__}"
from dalle_pytorch import DALLE, DiscreteVAE  # noqa: F401
print(f"peers env ok: torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$STAMP_HASH" > "$VENV/.stamp-peers"
log "peers env ready: $VENV"
