#!/usr/bin/env bash
# FlashInfer for a GPU machine without a registry: its wheel and its one compiled dependency, unpacked and
# trimmed of the CUDA sources of kernels other than attention (MoE, GDN/KDA, Blackwell-only, the "cake_*"
# families) so that the bundle fits the 64 MiB that travels with the tree. FlashInfer compiles the kernels it
# uses with the machine's nvcc on first use. Writes .fi/site.tgz (git-ignored) for Python 3.12:
#
#   bash tools/flashinfer_bundle.sh
#   # on the GPU machine, carrying .fi:
#   mkdir -p /tmp/fis && tar xzf .fi/site.tgz -C /tmp/fis
#   PYTHONPATH=/tmp/fis:src:benchmarks python benchmarks/gpu_decode.py --flashinfer --contexts 32768 65536 131072 \
#       --bits 3 4 --reference-max 0 --out -
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: .fi/ goes there
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --dest "$work/wheels" --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 flashinfer-python==0.7.4 apache-tvm-ffi==0.1.15.post2 click einops \
    nvidia-ml-py tabulate
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
(
    cd "$work/site/flashinfer"
    rm -rf data/csrc/{cake_*,fused_moe,kda,gdn,nv_internal,alphamoe*,*moe*,blackwell_*,fmha_v2}
    for folder in experimental cake_*_backend fused_moe moe_ep; do  # their Python stays: __init__ imports it
        if [ -d "$folder" ]; then find "$folder" -type f ! -name "*.py" -delete; fi
    done
)
mkdir -p .fi
tar czf .fi/site.tgz -C "$work/site" .
ls -l .fi/site.tgz
cat <<'USAGE'
On the GPU machine (Python 3.12, the wheels' target), carrying .fi:
  mkdir -p /tmp/fis && tar xzf .fi/site.tgz -C /tmp/fis
  PYTHONPATH=/tmp/fis:src:benchmarks python benchmarks/gpu_decode.py --flashinfer --contexts 32768 65536 131072 \
      --bits 3 4 --reference-max 0 --out -
USAGE
