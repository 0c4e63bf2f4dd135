#!/usr/bin/env bash
# End to end on SmolLM2-135M, beyond perplexity: needle-in-a-haystack and greedy-generation agreement at
# 2–4 bits (each against the uncompressed cache), and make train's fitted rotations (2-bit keys) against
# the fast Hadamard they start from, in the model. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=multirun/e2e_sweep
tq=(logger=csv progress=false kv=full_kv rotation=fast_hadamard seed=0 bits=2,3,4)
$PY eval.py -m task=niah "${tq[@]}" 'niah.contexts=[128,256,512]' hydra.sweep.dir=$out/niah
$PY eval.py -m task=generate "${tq[@]}" hydra.sweep.dir=$out/generate
$PY train.py logger=csv progress=false fit.per_head=false hydra.run.dir=outputs/research/e2e_train  # per layer, as then
keys=(task=perplexity logger=csv progress=false kv=key_only bits=2 seed=0)
$PY eval.py "${keys[@]}" rotations=outputs/research/e2e_train/result hydra.run.dir=$out/keys_fitted
$PY eval.py "${keys[@]}" rotation=fast_hadamard hydra.run.dir=$out/keys_hadamard
