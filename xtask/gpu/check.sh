#!/usr/bin/env bash
# The GPU check, one command on the lent GPU machine (repository root, `.gpu/` carried along):
#
#   bash xtask/gpu/check.sh                      # parity-f32, parity-half, speed
#   bash xtask/gpu/check.sh --parts speed        # any check.py arguments pass through
#
# `.gpu/` comes from `cargo xtask build-cuda [--flash-attn]` (ltd-gen.xz, ltd-gen-flash.xz,
# wheels/). Writes $OUT/gpu-check.json (the device tool's $OUT; /tmp/ltd-gpu-check without
# one) and the PNGs; exit status 0 only if every part passed. On a machine without a GPU,
# `LTD_GEN=target/debug/ltd-gen PYTHON=<venv>/bin/python bash xtask/gpu/check.sh --device cpu
# --dry-run` checks the script itself (see check.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${OUT:-/tmp/ltd-gpu-check}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/ltd-gpu.XXXXXX)
mkdir -p "$OUTDIR"

# The CUDA libraries ltd-gen links (cuBLAS, cuRAND, NVRTC, cudart) from the Python packages
# torch brings; the driver's libcuda.so.1 is the system's.
LIBS=$("$PY" - <<'PYEOF'
import glob, os, site
dirs = []
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for pattern in ("nvidia/*/lib", "nvidia/*/*/lib"):
        for d in glob.glob(os.path.join(root, pattern)):
            if glob.glob(os.path.join(d, "lib*.so*")) and d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PYEOF
)
export LD_LIBRARY_PATH=${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# The binaries: LTD_GEN (a path) or every .gpu/ltd-gen*.xz, unpacked.
BINS=()
if [ -n "${LTD_GEN:-}" ]; then
  BINS+=(--bin "ltd-gen=$LTD_GEN")
else
  for xz in .gpu/ltd-gen*.xz; do
    [ -e "$xz" ] || { echo "check.sh: no .gpu/ltd-gen*.xz: run \`cargo xtask build-cuda\` and carry .gpu" >&2; exit 2; }
    name=$(basename "$xz" .xz)
    "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$xz" "$WORK/$name"
    chmod +x "$WORK/$name"
    if ldd "$WORK/$name" | grep -q 'not found'; then
      echo "check.sh: $name misses libraries:" >&2; ldd "$WORK/$name" | grep 'not found' >&2
    fi
    BINS+=(--bin "$name=$WORK/$name")
  done
fi

# diffusers and what it needs beyond the machine's torch environment: pure-Python wheels, unzipped.
if [ -d .gpu/wheels ]; then
  "$PY" -c 'import sys,zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$WORK/py" .gpu/wheels/*.whl
  export PYTHONPATH=$WORK/py${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || true

exec "$PY" xtask/gpu/check.py "${BINS[@]}" --out "$OUTDIR" "$@"
