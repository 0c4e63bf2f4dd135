#!/usr/bin/env bash
# Build flash-attn's CUDA extensions on a machine without a GPU, for a GPU machine that has no compiler and no
# registry, trimmed to what the decode benchmark calls (bf16, head_dim 128, forward only, H100/H200):
#   FlashAttention-2 (`flash_attn.flash_attn_with_kvcache`), from flash-attn's sdist on PyPI;
#   FlashAttention-3 (`flash_attn_interface.flash_attn_with_kvcache`, flash-attn's hopper/ folder), which is not
#   on PyPI: only when FA3_SOURCE names a checkout of github.com/Dao-AILab/flash-attention (hopper/ is read)
#   and CUTLASS_SOURCE one of github.com/NVIDIA/cutlass at the commit of its csrc/cutlass submodule.
#
#     bash tools/flash_attn_build.sh                     # → .flash_attn/ (git-ignored), FlashAttention-2 only
#     FA3_SOURCE=DIR CUTLASS_SOURCE=DIR bash tools/flash_attn_build.sh   # and FlashAttention-3 beside it
#     # on the GPU machine, carrying .flash_attn (7 MB):
#     PYTHONPATH=.flash_attn:src:benchmarks python benchmarks/gpu_decode.py --flash-attn 2 3 --contexts 32768 \
#         65536 131072 --bits 3 4 --reference-max 0 --out -
#
# The compiler comes from NVIDIA's CUDA wheels on PyPI; the torch wheel the GPU machine runs gives the headers and
# libraries to link against (the same build: TORCH=2.11.0, PYTHON=3.12 by default). Each extension is
# flash-attn's own code with its own FLASHATTENTION_DISABLE_* switches set for what a step over a whole bf16
# cache with head_dim 128 does not take: the backward, dropout, ALiBi, soft-cap, local windows and uneven head
# dims for FlashAttention-2; the backward, fp16, fp8, other head dims, paged KV, appending KV, soft-cap, local
# windows, clusters and sm_8x for FlashAttention-3 (which keeps per-sequence lengths and builds for sm_90a).
# FlashAttention-2 has no switch for dtypes and head dims, so its two dispatch macros are pinned to bf16 and 128,
# failing on anything else (the only edit to its source). About 13 minutes for both on 2 cores; the compiler and
# torch wheels are 0.6 GB to download. An interrupted build resumes; the build folder, .flash_attn_build, can go
# afterwards.
set -euo pipefail

FLASH_ATTN=${FLASH_ATTN:-2.8.3.post2}
TORCH=${TORCH:-2.11.0}
PYTHON=${PYTHON:-3.12}
CUDA=${CUDA:-13.5.37}
CCCL=${CCCL:-13.3.5.0.6}  # NVIDIA's CCCL headers wheel, versioned on its own
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$ROOT/.flash_attn_build}
OUT=${OUT:-$ROOT/.flash_attn}
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
OUT=$(cd "$OUT" && pwd)
if [ -n "${FA3_SOURCE:-}" ]; then
  FA3_SOURCE=$(cd "$FA3_SOURCE" && pwd)
  CUTLASS_SOURCE=$(cd "${CUTLASS_SOURCE:?a cutlass checkout at the commit of the csrc/cutlass submodule}" && pwd)
fi
cd "$WORK"

wheel() {  # wheel(folder, requirements...): binary wheels for the GPU machine's platform, unpacked once
  local into=$1
  shift
  [ -d "$into" ] && return
  rm -rf "$into.partial" "$into.wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d "$into.wheels" "$@"
  for w in "$into.wheels"/*.whl; do python3 -m zipfile -e "$w" "$into.partial"; done
  mv "$into.partial" "$into"
  rm -rf "$into.wheels"
}
wheel "cuda-$CUDA" "nvidia-cuda-nvcc==$CUDA" "nvidia-cuda-runtime==$CUDA" "nvidia-cuda-crt==$CUDA" \
  "nvidia-nvvm==$CUDA" "nvidia-cuda-cccl==$CCCL"
wheel "torch-$TORCH-py$PYTHON" "torch==$TORCH"
CUDA_HOME=$WORK/cuda-$CUDA/nvidia/cu13
chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
NVCC=$CUDA_HOME/bin/nvcc
TORCH_DIR=$WORK/torch-$TORCH-py$PYTHON/torch
# headers of the GPU machine's Python minor version, from a python$PYTHON here or pyenv's
PY_INCLUDE=${PY_INCLUDE:-$(python"$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null ||
  echo "$(pyenv prefix "$(pyenv versions --bare | grep "^$PYTHON" | tail -1)" 2>/dev/null)/include/python$PYTHON")}
[ -f "$PY_INCLUDE/Python.h" ] || { echo "no Python.h for python$PYTHON in $PY_INCLUDE" >&2; exit 1; }
SYSTEM=(-isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include" -isystem "$PY_INCLUDE"
  -isystem "$CUDA_HOME/include" -isystem "$CUDA_HOME/include/cccl")
LIBS=(-L"$TORCH_DIR/lib" -L"$CUDA_HOME/lib" -lc10 -ltorch -ltorch_cpu -lc10_cuda -ltorch_cuda -l:libcudart.so.13)

compile() {  # compile(object, source, compiler and flags...): skipped when the object exists (a rerun resumes)
  local object=$1 source=$2
  shift 2
  [ -f "$object" ] && return
  echo "compiling $(basename "$source")"
  "$@" -c "$source" -o "$object.partial.o" > "$object.log" 2>&1 || { tail -30 "$object.log" >&2; exit 1; }
  mv "$object.partial.o" "$object"
}

# FlashAttention-2, from PyPI's sdist (which carries its CUTLASS headers), checked against PyPI's sha256
FA2=$WORK/flash_attn-$FLASH_ATTN
if [ ! -d "$FA2" ]; then
  link=$(curl -fsS https://pypi.org/simple/flash-attn/ | grep -o "https://[^\"]*/flash_attn-$FLASH_ATTN.tar.gz#sha256=[0-9a-f]*" |
    head -1)
  [ -n "$link" ] || { echo "flash-attn $FLASH_ATTN: no sdist on PyPI" >&2; exit 1; }
  rm -rf sdist.partial && mkdir sdist.partial
  curl -fsSL -o sdist.partial/sdist.tar.gz "${link%%#*}"
  echo "${link##*sha256=}  sdist.partial/sdist.tar.gz" | sha256sum -c --quiet
  tar -xzf sdist.partial/sdist.tar.gz -C sdist.partial
  python3 - "sdist.partial/flash_attn-$FLASH_ATTN/csrc/flash_attn/src/static_switch.h" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
# the only edit to flash-attn's source: bf16 and head_dim 128, and an error for anything else
text, n_dtype = re.subn(r"#define FP16_SWITCH\(COND, \.\.\.\).*?\}\(\)\n",
    "#define FP16_SWITCH(COND, ...) [&] { TORCH_CHECK(!(COND), \"this flash-attn build takes bf16 only\"); "
    "using elem_type = cutlass::bfloat16_t; return __VA_ARGS__(); }()\n", text, flags=re.S)
text, n_dim = re.subn(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)\n",
    "#define HEADDIM_SWITCH(HEADDIM, ...) [&] { TORCH_CHECK((HEADDIM) == 128, \"this flash-attn build takes "
    "head_dim 128 only\"); constexpr static int kHeadDim = 128; return __VA_ARGS__(); }()\n", text, flags=re.S)
assert n_dtype == n_dim == 1, (n_dtype, n_dim)
open(path, "w").write(text)
EOF
  mv "sdist.partial/flash_attn-$FLASH_ATTN" "$FA2"
  rm -rf sdist.partial
fi
FA2_FLAGS=(-DTORCH_EXTENSION_NAME=flash_attn_2_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
  -DFLASHATTENTION_DISABLE_BACKWARD -DFLASHATTENTION_DISABLE_DROPOUT -DFLASHATTENTION_DISABLE_ALIBI
  -DFLASHATTENTION_DISABLE_SOFTCAP -DFLASHATTENTION_DISABLE_UNEVEN_K -DFLASHATTENTION_DISABLE_LOCAL
  -I"$FA2/csrc/flash_attn" -I"$FA2/csrc/flash_attn/src" -I"$FA2/csrc/cutlass/include" "${SYSTEM[@]}")
FA2_NVCC=("$NVCC" -O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
  -U__CUDA_NO_HALF2_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr
  --expt-extended-lambda --use_fast_math -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC "${FA2_FLAGS[@]}")
objects_dir=$FA2/objects-cuda$CUDA-torch$TORCH-py$PYTHON
mkdir -p "$objects_dir"
compile "$objects_dir/flash_api.o" "$FA2/csrc/flash_attn/flash_api.cpp" g++ -O3 -std=c++17 -fPIC "${FA2_FLAGS[@]}"
objects=("$objects_dir/flash_api.o")
units=(flash_bwd_hdim128_bf16_sm80 flash_bwd_hdim128_bf16_causal_sm80)  # empty kernels: the backward is off
for split in "" split_; do
  for causal in "" _causal; do units+=("flash_fwd_${split}hdim128_bf16${causal}_sm80"); done
done
for unit in "${units[@]}"; do
  compile "$objects_dir/$unit.o" "$FA2/csrc/flash_attn/src/$unit.cu" "${FA2_NVCC[@]}"
  objects+=("$objects_dir/$unit.o")
done
rm -rf "$OUT/flash_attn" "$OUT/flash_attn_3" "$OUT/flash_attn_interface.py" "$OUT/flash_attn_config.py"
cp -r "$FA2/flash_attn" "$OUT/flash_attn"
so=$OUT/flash_attn_2_cuda.cpython-${PYTHON/./}-x86_64-linux-gnu.so
g++ -shared -o "$so" "${objects[@]}" "${LIBS[@]}" -ltorch_python
echo "built $so ($(du -h "$so" | cut -f1)): FlashAttention-2 $FLASH_ATTN for torch $TORCH, python $PYTHON, sm_90"

[ -n "${FA3_SOURCE:-}" ] || exit 0
# FlashAttention-3: flash-attn's hopper/, with torch's stable ABI (flash_api_stable.cpp, torch ≥ 2.9)
HOPPER=$FA3_SOURCE/hopper
FA3_SWITCHES=(BACKWARD FP16 FP8 HDIM64 HDIM96 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 PAGEDKV SOFTCAP LOCAL APPENDKV
  CLUSTER SM8x)
FA3_FLAGS=(-D_GLIBCXX_USE_CXX11_ABI=1 "${FA3_SWITCHES[@]/#/-DFLASHATTENTION_DISABLE_}" -I"$HOPPER"
  -I"$CUTLASS_SOURCE/include" "${SYSTEM[@]}")
FA3_NVCC=("$NVCC" -O3 -std=c++17 --use_fast_math -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
  -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -D__CUDA_NO_HALF_OPERATORS__
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Xcompiler -fPIC "${FA3_FLAGS[@]}")
# its objects keyed by the two source folders and the toolchain, so that other sources are never mixed in
objects_dir=$WORK/fa3-$(echo "$FA3_SOURCE $CUTLASS_SOURCE $CUDA $TORCH" | sha256sum | cut -c1-12)
mkdir -p "$objects_dir"
compile "$objects_dir/flash_api_stable.o" "$HOPPER/flash_api_stable.cpp" g++ -O3 -std=c++17 -fPIC \
  -DPy_LIMITED_API=0x03090000 -DTORCH_TARGET_VERSION=0x0209000000000000 "${FA3_FLAGS[@]}"
objects=("$objects_dir/flash_api_stable.o")
for unit in instantiations/flash_fwd_hdim128_bf16_sm90 instantiations/flash_fwd_hdim128_bf16_split_sm90 \
  instantiations/flash_fwd_hdim128_bf16_packgqa_sm90 flash_fwd_combine flash_prepare_scheduler; do
  compile "$objects_dir/$(basename "$unit").o" "$HOPPER/$unit.cu" "${FA3_NVCC[@]}"
  objects+=("$objects_dir/$(basename "$unit").o")
done
mkdir -p "$OUT/flash_attn_3"
cp "$HOPPER"/flash_attn_3/*.py "$OUT/flash_attn_3/"
cp "$HOPPER/flash_attn_interface.py" "$OUT/"
python3 - "$OUT/flash_attn_config.py" "${FA3_SWITCHES[@]}" <<'EOF'
import sys
# what hopper/setup.py writes beside the interface, which reads these flags (to round head dims)
path, disabled = sys.argv[1], set(sys.argv[2:])
names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
         "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"]
flags = {f"FLASHATTENTION_DISABLE_{name}": name in disabled for name in names}
flags["FLASHATTENTION_ENABLE_VCOLMAJOR"] = False
flags.update({f"FLASH_ATTENTION_DISABLE_HDIMDIFF{d}": f"HDIMDIFF{d}" in disabled for d in (64, 192)})
open(path, "w").write(f"CONFIG = {{'build_flags': {flags!r}}}\n")
EOF
so=$OUT/flash_attn_3/_C.abi3.so
g++ -shared -o "$so" "${objects[@]}" "${LIBS[@]}"
echo "built $so ($(du -h "$so" | cut -f1)): FlashAttention-3 from $FA3_SOURCE for torch $TORCH, sm_90a"
