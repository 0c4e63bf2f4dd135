#!/usr/bin/env bash
# Per-head key statistics on SmolLM2 keys: plain fast-Hadamard TurboQuant against mean removal
# (codec.center) and mean removal + the query metric (codec.key_metric=query), at equal stored bits.
# Attention over held-out blocks (2 bits, one seed, units (layer, head)), then end to end (perplexity).
# Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=multirun/key_statistics
attention=(logger=csv progress=false kv=key_only rotation=fast_hadamard bits=2 seed=0)
$PY eval.py -m "${attention[@]}" codec.center=false,true hydra.sweep.dir=$out/attention_center
$PY eval.py -m "${attention[@]}" codec.center=true codec.key_metric=query hydra.sweep.dir=$out/attention_query
$PY report.py "runs=[$out/attention_center,$out/attention_query]" 'metrics=[output_cosine,attention_kl,logit_cosine,key_rel_mse]' \
  reference=fast_hadamard unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/key_statistics_attention
e2e=(task=perplexity logger=csv progress=false kv=full_kv rotation=fast_hadamard seed=0 bits=2,3)
$PY eval.py -m "${e2e[@]}" codec.center=true hydra.sweep.dir=$out/e2e_center
$PY eval.py -m "${e2e[@]}" codec.center=true codec.key_metric=query hydra.sweep.dir=$out/e2e_query
