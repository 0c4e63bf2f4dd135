#!/usr/bin/env bash
# Learned rotations started from a data-aware one (SmolLM2 keys at 2 bits, around the per-head mean; results:
# docs/results.md): SO(8) butterflies after eigenbasis × Hadamard, fitted on key MSE (hard codes) or on the
# attention KL (soft quantizer), and SO(8) blocks in the three triality views, identity at start; against
# eigenbasis × Hadamard and fast Hadamard alone. Three seeds; paired tests over (layer, KV head) units.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(logger=csv progress=false bits=2 kv=key_only codec.center=true)
out=multirun/learned_data_aware
$PY train.py -m "${common[@]}" seed=0,1,2 rotation=eigen_hadamard_butterfly fit.objective=mse,attention \
  hydra.sweep.dir=$out/train_butterfly
$PY train.py -m "${common[@]}" seed=0,1,2 rotation=eigen_hadamard_triality rotation.view=vector,spinor_plus,spinor_minus \
  hydra.sweep.dir=$out/train_triality
evals=("${common[@]}" eval.calibration_sequences=16)  # the means train.py fitted: every train sequence
$PY eval.py -m "${evals[@]}" seed=0,1,2 rotation=eigen_hadamard,fast_hadamard hydra.sweep.dir=$out/fixed
fitted=$(ls -d $out/train_butterfly/*/ $out/train_triality/*/ | sed "s:/$::" | paste -sd, -)
$PY eval.py -m "${evals[@]}" "rotations=$fitted" hydra.sweep.dir=$out/fitted
$PY report.py "runs=[$out/fixed,$out/fitted]" 'metrics=[output_cosine,attention_kl,key_rel_mse]' reference=fast_hadamard \
  unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/learned_data_aware
# end to end with the fitted keys in the cache (values exact), against fast Hadamard around the same mean
e2e=(task=perplexity logger=csv progress=false kv=key_only bits=2 codec.center=true eval.calibration_sequences=16)
butterflies=$(ls -d $out/train_butterfly/*/ | sed "s:/$::" | paste -sd, -)
$PY eval.py -m "${e2e[@]}" "rotations=$butterflies" hydra.sweep.dir=$out/e2e_fitted
$PY eval.py -m "${e2e[@]}" rotation=fast_hadamard,eigen_hadamard seed=0,1,2 hydra.sweep.dir=$out/e2e_fixed
$PY report.py "runs=[$out/e2e_fixed,$out/e2e_fitted]" 'metrics=[nll_increase,next_token_kl,final_hidden_cosine]' \
  reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/learned_data_aware_e2e
