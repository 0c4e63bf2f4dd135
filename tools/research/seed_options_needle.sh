#!/usr/bin/env bash
# Needle-in-a-haystack with the seed's options in the cache (SmolLM2-135M, all-quantized, one seed; 9 prompts:
# 128/256/512 tokens × depth 0, ½, 1): int8 keys + 3-bit TurboQuant values, protected 2-bit values (keys exact),
# relevance-gated 2/4-bit keys (values exact) and its random control. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=multirun/seed_options_needle
common=(task=niah logger=csv progress=false seed=0 'niah.contexts=[128,256,512]' rotation=fast_hadamard)
$PY eval.py -m "${common[@]}" kv=full_kv k_codec=int8_block k_bits=8 bits=3 hydra.sweep.dir=$out/int8_keys
$PY eval.py -m "${common[@]}" kv=value_only codec=protected_channels rotation=identity bits=2 codec.high_groups=2 \
  codec.exact_groups=0 hydra.sweep.dir=$out/protected
$PY eval.py -m "${common[@]}" kv=key_only codec=relevance_gated bits=2 codec.gate=relevance,random hydra.sweep.dir=$out/gated
$PY eval.py -m "${common[@]}" kv=key_only codec=turboquant_mse bits=2,3 hydra.sweep.dir=$out/uniform_keys
for d in $out/*/*/; do
  python3 - "$d" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
s = json.loads((d / "result" / "summary.json").read_text()) if (d / "result").exists() else None
if s: print(s["columns"]["codec"], s["columns"].get("k_bits"), s["columns"].get("v_bits"), s["columns"]["options"], json.dumps(s["overall"]))
PY
done
