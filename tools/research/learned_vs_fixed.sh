#!/usr/bin/env bash
# Do learned rotations beat fixed ones at equal bytes? SmolLM2 keys at 2 bits, three seeds per configuration,
# paired tests over (layer, KV head) units and over documents. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(logger=csv progress=false bits=2)
out=multirun/research
fit=(fit.per_head=false)  # per layer, as in docs/results.md (the default became per head after the study)
$PY train.py -m "${common[@]}" "${fit[@]}" seed=0,1,2 \
  rotation=hadamard_block_so8_learned,triality,block_so8_learned hydra.sweep.dir=$out/train
$PY train.py -m "${common[@]}" "${fit[@]}" seed=0,1,2 rotation=hadamard_block_so8_learned rotation.init=identity \
  hydra.sweep.dir=$out/train_identity_init
$PY eval.py -m "${common[@]}" seed=0,1,2 rotation=random_haar,fast_hadamard,block_so8_static,identity \
  hydra.sweep.dir=$out/fixed
fitted=$(ls -d $out/train/*/ $out/train_identity_init/*/ | sed "s:/$::" | paste -sd, -)
$PY eval.py -m "${common[@]}" "rotations=$fitted" hydra.sweep.dir=$out/fitted
for unit in layer_head document; do
  $PY report.py "runs=[$out/fixed,$out/fitted]" reference=random_haar unit=$unit wandb.mode=disabled \
    hydra.run.dir=outputs/research/learned_vs_fixed_$unit
done
