#!/usr/bin/env bash
# Install PyTorch into the given Python's environment unless it is already there. Without an NVIDIA GPU,
# take the CPU build: a plain `pip install torch` on Linux pulls a CUDA build of several GB.
set -euo pipefail
py=${1:?usage: install_torch.sh PYTHON}
spec=${TORCH_SPEC:-torch==2.13.0}
if "$py" -c "import torch" 2>/dev/null; then exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  exec "$py" -m pip install "$spec"
fi
# Which file would pip take? A local or "+cpu" wheel is fine; otherwise ask PyTorch's CPU index.
report=$("$py" -m pip install --dry-run --no-deps --quiet --report - "$spec" 2>/dev/null || true)
url=$(printf '%s' "$report" | "$py" -c 'import json,sys
try: print(json.load(sys.stdin)["install"][0]["download_info"]["url"])
except Exception: print("")')
case "$url" in
  file:*|*%2Bcpu*|*+cpu*) exec "$py" -m pip install "$spec" ;;
  *) exec "$py" -m pip install "$spec" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" ;;
esac
