#!/usr/bin/env bash
# Rotations that pay (SmolLM2-135M keys; results: docs/results.md). Every codec is fitted or calibrated on
# the same 16 train sequences; measured on the held-out test split, per (layer, KV head) unit.
#   attention: random Haar / fast Hadamard / eigenbasis × Hadamard at 2, 3, 4 bits (3 seeds each), the
#   fractional 2.5 split, Hadamard around the mean in the query metric, and transform coding (eigenbasis,
#   reverse water-filling, Lloyd-Max per component; deterministic, so one seed) plain / centred / centred in
#   the query metric, at the same stored bits; the first token kept exact; values with the same machinery.
#   end to end: perplexity with transform-coded keys and values in the cache (12 documents).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=multirun/rotations_that_pay
mkdir -p outputs/research
att=(logger=csv progress=false kv=key_only eval.calibration_sequences=16)
run() { local name=$1; shift; $PY eval.py -m "${att[@]}" "$@" hydra.sweep.dir=$out/$name; }
run rotations codec=turboquant_mse rotation=random_haar,fast_hadamard,eigen_hadamard bits=2,3,4 seed=0,1,2
run fractional codec=turboquant_mse rotation=fast_hadamard bits=2.5 seed=0,1,2
run hadamard_query codec=turboquant_mse rotation=fast_hadamard codec.center=true codec.key_metric=query bits=2,3,4 seed=0,1,2
run transform codec=transform_coding rotation=identity bits=2,2.75,3,4 seed=0
run transform_center codec=transform_coding rotation=identity codec.center=true bits=2,2.75,3,4 seed=0
run transform_query codec=transform_coding rotation=identity codec.center=true codec.key_metric=query bits=2,2.75,3,4 seed=0
run sinks_hadamard codec=turboquant_mse rotation=fast_hadamard bits=2 cache.sink_tokens=1 seed=0,1,2
run sinks_hadamard_query codec=turboquant_mse rotation=fast_hadamard codec.center=true codec.key_metric=query bits=2 cache.sink_tokens=1 seed=0,1,2
run sinks_transform codec=transform_coding rotation=identity codec.center=true codec.key_metric=query bits=2 cache.sink_tokens=1 seed=0
run values_hadamard kv=value_only codec=turboquant_mse rotation=fast_hadamard bits=2,3 seed=0,1,2
run values_transform kv=value_only codec=transform_coding rotation=identity codec.center=true bits=2,3 seed=0
metrics='metrics=[output_cosine,attention_kl,logit_cosine,key_rel_mse,value_rel_mse]'
keys=$out/rotations,$out/fractional,$out/hadamard_query,$out/transform,$out/transform_center,$out/transform_query
$PY report.py "runs=[$keys]" "$metrics" reference=fast_hadamard unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/rotations_that_pay_keys
$PY report.py "runs=[$out/sinks_hadamard,$out/sinks_transform,$out/sinks_hadamard_query]" "$metrics" reference=fast_hadamard unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/rotations_that_pay_sinks
$PY report.py "runs=[$out/values_hadamard,$out/values_transform]" "$metrics" reference=fast_hadamard unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/rotations_that_pay_values
# the Gaussian transform-coding bound per unit, from the same train statistics, against the measured key MSE
$PY tools/research/key_mse_bound.py captures/smollm2-135m-ca5dc1531e01 --sequences 16 > outputs/research/rotations_that_pay_bound.md
e2e=(task=perplexity logger=csv progress=false kv=full_kv seed=0 eval.calibration_sequences=16)
tq=(codec=turboquant_mse rotation=fast_hadamard codec.center=true codec.key_metric=query)
tc=(codec=transform_coding rotation=identity codec.center=true codec.key_metric=query)
$PY eval.py -m "${e2e[@]}" "${tc[@]}" bits=2,3,4 hydra.sweep.dir=$out/e2e_transform
$PY eval.py -m "${e2e[@]}" "${tc[@]}" bits=2,3 cache.sink_tokens=1 hydra.sweep.dir=$out/e2e_transform_sink
$PY eval.py -m "${e2e[@]}" "${tq[@]}" bits=2,3 hydra.sweep.dir=$out/e2e_hadamard_query
$PY eval.py -m "${e2e[@]}" "${tq[@]}" bits=2,3 cache.sink_tokens=1 hydra.sweep.dir=$out/e2e_hadamard_query_sink
$PY eval.py -m task=perplexity logger=csv progress=false kv=full_kv seed=0 codec=turboquant_mse rotation=fast_hadamard bits=2,3,4 hydra.sweep.dir=$out/e2e_hadamard
e2e_runs=$out/e2e_hadamard,$out/e2e_transform,$out/e2e_transform_sink,$out/e2e_hadamard_query,$out/e2e_hadamard_query_sink
$PY report.py "runs=[$e2e_runs]" 'metrics=[nll_increase,next_token_kl,final_hidden_cosine,next_token_top1]' \
  reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/rotations_that_pay_e2e
