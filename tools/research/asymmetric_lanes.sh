#!/usr/bin/env bash
# Asymmetric lanes end to end on SmolLM2-135M (12 held-out documents, all-quantized, one seed): int8 keys with
# TurboQuant values, TurboQuant keys with int8 values, and K/V bit splits, against the uncompressed cache.
# The K4V2 / K3V2 / K3V3 rows are end_to_end.sh's (kv_splits, tq_mse). Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(task=perplexity logger=csv progress=false kv=full_kv seed=0 codec=turboquant_mse rotation=fast_hadamard)
out=multirun/asymmetric_lanes
run() { local name=$1; shift; $PY eval.py -m "${common[@]}" "$@" hydra.sweep.dir=$out/$name; }
run int8_keys k_codec=int8_block k_bits=8 v_bits=2,3,4
run int8_values v_codec=int8_block v_bits=8 k_bits=2,3,4
run splits bits=3 k_bits=2 v_bits=4
# end_to_end.sh's symmetric rows at these widths (content-addressed: reused when they exist)
run kv_splits bits=3 k_bits=4,3 v_bits=2
run symmetric bits=2,3,4
run q8_0 codec=int8_block rotation=identity bits=8
metrics='metrics=[nll_increase,next_token_kl,final_hidden_cosine,next_token_top1]'
all=$out/int8_keys,$out/int8_values,$out/splits,$out/kv_splits,$out/symmetric,$out/q8_0
$PY report.py "runs=[$all]" "$metrics" reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/asymmetric_lanes
