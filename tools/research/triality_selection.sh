#!/usr/bin/env bash
# Per-layer triality-view selection on SmolLM2 keys (2 bits, around the per-head mean; 3 seeds): the three views'
# fits come from learned_data_aware.sh (train split); the choice per layer is made on the validation split
# (triality_selection.py); everything is reported on the test split, paired over (layer, KV head) units.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
fits=multirun/learned_data_aware/train_triality
sel=outputs/research/triality_selection
$PY tools/research/triality_selection.py captures/smollm2-135m-ca5dc1531e01 $fits --out $sel | tee $sel.md
evals=(logger=csv progress=false bits=2 kv=key_only codec.center=true eval.calibration_sequences=16)
runs=$(ls -d $fits/*/ $sel/seed*/ | sed "s:/$::" | paste -sd, -)
$PY eval.py -m "${evals[@]}" "rotations=$runs" hydra.sweep.dir=multirun/triality_selection
$PY report.py "runs=[multirun/triality_selection]" 'metrics=[output_cosine,attention_kl]' unit=layer_head \
  wandb.mode=disabled hydra.run.dir=outputs/research/triality_selection_test
# control: the same per-layer selection between two fits of one view (vector, seeds s and s + 1)
ctl=outputs/research/triality_selection_control
$PY tools/research/triality_selection.py captures/smollm2-135m-ca5dc1531e01 $fits --control --out $ctl
$PY eval.py -m "${evals[@]}" "rotations=$(ls -d $ctl/seed*/ | sed "s:/$::" | paste -sd, -)" hydra.sweep.dir=multirun/triality_selection_control
$PY report.py "runs=[multirun/triality_selection,multirun/triality_selection_control]" 'metrics=[output_cosine,attention_kl]' \
  unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/triality_selection_test
