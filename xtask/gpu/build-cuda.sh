#!/usr/bin/env bash
# Builds a CUDA-enabled `ltd-gen` on a machine with NO GPU and no CUDA install, for an H100
# (sm_90) whose driver is 580 (CUDA 13.0), and packs what `xtask/gpu/check.sh` needs there.
# Run through `cargo xtask build-cuda [--flash-attn]`, or directly from the repository root:
#
#   xtask/gpu/build-cuda.sh [--flash-attn] [--no-reference]
#
# Leaves in .gpu/ (ignored by git; carry it to the GPU machine):
#   ltd-gen.xz (or ltd-gen-flash.xz): the stripped binary, xz-compressed (~20 MB: the default model is embedded);
#   wheels/: diffusers 0.42.1 and the pure-Python packages it needs beyond what the GPU
#            machine's torch environment has (skipped with --no-reference).
#
# Why each step (read off candle 0.11 / cudarc 0.19 build scripts; checked on an H100):
#  * candle-kernels runs `nvcc` at build time (src/*.cu -> PTX embedded in the binary, compiled
#    by the driver at run time). It needs CUDA headers + cccl, nvvm, a host g++, and
#    CUDA_COMPUTE_CAP (there is no nvidia-smi here). candle-flash-attn compiles its kernels to
#    sm_90 code with nvcc the same way (much longer: 53 large kernel files).
#  * cudarc (features dynamic-linking + cuda-version-from-build-system) reads the CUDA version
#    from `nvcc --version` and LINKS libcuda, libnvrtc, libcurand, libcublas(Lt), libcudart at
#    build time. PyPI's CUDA wheels have no unversioned .so links and no libcuda stub: this
#    script makes a CUDA root with the links and a stub libcuda.so (SONAME libcuda.so.1)
#    exporting the driver symbols cudarc declares. At run time the real driver is used.
#  * nvcc must be 13.0.x: driver 580 rejects PTX written by a newer nvcc.
#  * candle-flash-attn's build script (through cudaforge) git-clones CUTLASS from GitHub at a
#    pinned commit into ~/.cudaforge/git/checkouts/: --flash-attn needs github.com reachable
#    once (or that checkout copied in from elsewhere).
set -euo pipefail

FEATURES=cuda
NAME=ltd-gen
REFERENCE=1
for arg in "$@"; do
  case "$arg" in
    --flash-attn) FEATURES=cuda,flash-attn; NAME=ltd-gen-flash ;;
    --no-reference) REFERENCE=0 ;;
    *) echo "build-cuda.sh: unknown argument \`$arg\` (expected --flash-attn, --no-reference)" >&2; exit 2 ;;
  esac
done
if [ "$FEATURES" = cuda,flash-attn ] && ! ls -d "$HOME"/.cudaforge/git/checkouts/cutlass-* >/dev/null 2>&1 \
  && ! timeout 30 git ls-remote --exit-code https://github.com/NVIDIA/cutlass.git HEAD >/dev/null 2>&1; then
  echo "build-cuda.sh: --flash-attn: candle-flash-attn clones CUTLASS from github.com, which is not reachable" \
       "(copy a checkout into ~/.cudaforge/git/checkouts/ or build where GitHub is reachable)" >&2
  exit 1
fi
test -f Cargo.toml && test -d crates/ltd-cli || { echo "build-cuda.sh: run it from the repository root" >&2; exit 2; }

VENV=${CUDA_VENV:-$HOME/.cache/ltd-cudaenv}
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q \
  'nvidia-cuda-nvcc==13.0.88' 'nvidia-cuda-crt==13.0.88' 'nvidia-nvvm==13.0.88' \
  'nvidia-cuda-cccl==13.0.85' 'nvidia-cuda-runtime==13.0.96' 'nvidia-cuda-nvrtc==13.0.88' \
  'nvidia-curand==10.4.0.35' 'nvidia-cublas==13.1.0.3'
CU13=$("$VENV/bin/python" -c 'import os,nvidia; print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
test -x "$CU13/bin/nvcc"

# A stub libcuda.so from the driver bindings of the cudarc version the project resolves.
cargo fetch -q
VER=$(cargo metadata --format-version 1 --all-features 2>/dev/null | python3 -c '
import json,sys
v=[p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"]
print(max(v) if v else "")')
[ -n "$VER" ] || { echo "cudarc is not in the dependency graph (is the cuda feature wired to candle?)" >&2; exit 1; }

# The CUDA root (the links and the stub) is made once per cudarc version and moved into place
# whole, so a build running beside this one never sees it half made, and its path stays the
# same (candle-kernels' build script reruns when CUDA_ROOT changes).
ROOT=$VENV/cudaroot
if [ "$(cat "$ROOT/.cudarc-version" 2>/dev/null)" != "$VER" ]; then
  NEW=$(mktemp -d "$VENV/cudaroot.XXXXXX")
  mkdir -p "$NEW/lib64/stubs"
  for d in bin include nvvm; do ln -s "$CU13/$d" "$NEW/$d"; done
  for f in "$CU13"/lib/*.so.*; do
    b=$(basename "$f"); ln -s "$f" "$NEW/lib64/$b"
    case "$b" in *builtins*|*.alt.*) ;; *) ln -sf "$f" "$NEW/lib64/${b%%.so.*}.so";; esac
  done
  ln -s "$CU13/lib/libcudart_static.a" "$NEW/lib64/libcudart_static.a"
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$VER" | head -1)
  grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$NEW/lib64/stubs/cuda_stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$NEW/lib64/stubs/libcuda.so" "$NEW/lib64/stubs/cuda_stub.c"
  echo "$VER" > "$NEW/.cudarc-version"
  rm -rf "$ROOT.old"; [ -e "$ROOT" ] && mv -T "$ROOT" "$ROOT.old"; mv -T "$NEW" "$ROOT"; rm -rf "$ROOT.old"
fi

export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_TOOLKIT_ROOT_DIR=$ROOT
export PATH=$ROOT/bin:$PATH NVCC=$ROOT/bin/nvcc CUDA_COMPUTE_CAP=90
export LIBRARY_PATH=$ROOT/lib64:$ROOT/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -1

# Its own target folder: the CUDA build shares nothing with the CPU one, and must not evict it.
TARGET=${CARGO_TARGET_DIR:-target}/cuda
mkdir -p "$TARGET"
BINS=$TARGET/built-binaries.txt
CARGO_TARGET_DIR=$TARGET cargo build --release --message-format=json-render-diagnostics \
  -p ltd-cli --bin ltd-gen --features "$FEATURES" \
  | python3 -c '
import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])' > "$BINS"
EXE=$(grep '/ltd-gen$' "$BINS" | tail -1)
[ -n "$EXE" ] || { echo "build-cuda.sh: cargo built no ltd-gen" >&2; exit 1; }
mkdir -p .gpu
cp "$EXE" ".gpu/$NAME"; strip ".gpu/$NAME"; xz -9 -T2 -f ".gpu/$NAME"
echo ".gpu/$NAME.xz"

if [ "$REFERENCE" = 1 ]; then
  # diffusers is pure Python; the GPU machine has torch, transformers, huggingface_hub,
  # safetensors, numpy and pillow but no network. These install there with --no-index --no-deps.
  mkdir -p .gpu/wheels
  python3 -m pip download -q --no-deps -d .gpu/wheels \
    'diffusers==0.42.1' importlib_metadata zipp
  ls .gpu/wheels
fi
