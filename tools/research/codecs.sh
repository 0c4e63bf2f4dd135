#!/usr/bin/env bash
# Codecs at equal real bytes: SmolLM2 keys and values. Configurations with random rotations run with two
# seeds; the deterministic baselines (no rotation) with one. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(logger=csv progress=false kv=full_kv)
out=multirun/codecs
$PY eval.py -m "${common[@]}" seed=0,1 codec=turboquant_mse rotation=fast_hadamard bits=2,3,4 hydra.sweep.dir=$out/tq_mse
$PY eval.py -m "${common[@]}" seed=0,1 codec=turboquant_prod rotation=fast_hadamard bits=3,4 hydra.sweep.dir=$out/tq_prod
$PY eval.py -m "${common[@]}" seed=0,1 codec=int4_block rotation=fast_hadamard bits=4 hydra.sweep.dir=$out/q4_0_hadamard
$PY eval.py -m "${common[@]}" seed=0 codec=int4_block rotation=identity bits=4 hydra.sweep.dir=$out/q4_0
$PY eval.py -m "${common[@]}" seed=0 codec=int8_block rotation=identity bits=8 hydra.sweep.dir=$out/q8_0
$PY eval.py -m "${common[@]}" seed=0 codec=kivi rotation=identity bits=2,4 hydra.sweep.dir=$out/kivi
for unit in layer_head document; do
  $PY report.py "runs=[$out/tq_mse,$out/tq_prod,$out/q4_0_hadamard,$out/q4_0,$out/q8_0,$out/kivi]" \
    reference=fast_hadamard unit=$unit wandb.mode=disabled hydra.run.dir=outputs/research/codecs_$unit
done
