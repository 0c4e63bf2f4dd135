#!/usr/bin/env bash
# Decoding ablations at equal bytes (SmolLM2, fast-Hadamard TurboQuant; results: docs/results.md): the plain
# MSE decode, the norm-corrected decode (codec.norm_correction), the inner-product-unbiased rescaling
# (codec.unbiased: divide by 1 − D, no extra bits) and Prod (QJL) decoding, for keys and for values, at 2 and
# 3 bits, two seeds, paired over (layer, KV head) units; then end to end at 3 bits.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=multirun/decoding_ablations
att=(logger=csv progress=false rotation=fast_hadamard bits=2,3 seed=0,1)
for side in key value; do
  $PY eval.py -m "${att[@]}" kv=${side}_only codec=turboquant_mse codec.norm_correction=false,true hydra.sweep.dir=$out/${side}_mse
  $PY eval.py -m "${att[@]}" kv=${side}_only codec=turboquant_mse codec.unbiased=true hydra.sweep.dir=$out/${side}_unbiased
  $PY eval.py -m "${att[@]}" kv=${side}_only codec=turboquant_prod hydra.sweep.dir=$out/${side}_prod
  $PY report.py "runs=[$out/${side}_mse,$out/${side}_unbiased,$out/${side}_prod]" 'metrics=[output_cosine,attention_kl,logit_cosine]' \
    reference=fast_hadamard unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/decoding_ablations_$side
done
e2e=(task=perplexity logger=csv progress=false kv=full_kv seed=0 rotation=fast_hadamard bits=3 codec=turboquant_mse)
$PY eval.py -m "${e2e[@]}" codec.norm_correction=false,true hydra.sweep.dir=$out/e2e_mse
$PY eval.py -m "${e2e[@]}" codec.unbiased=true hydra.sweep.dir=$out/e2e_unbiased
$PY report.py "runs=[$out/e2e_mse,$out/e2e_unbiased]" 'metrics=[nll_increase,next_token_kl,final_hidden_cosine]' \
  reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/decoding_ablations_e2e
