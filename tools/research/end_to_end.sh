#!/usr/bin/env bash
# End to end on SmolLM2-135M: perplexity with the compressed cache in the loop on 12 held-out documents
# (one 256-token window each), every configuration against the uncompressed cache. All-quantized protocol
# unless the folder says otherwise; one seed (the unit is the document). Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(task=perplexity logger=csv progress=false kv=full_kv seed=0)
out=multirun/e2e_sweep
run() { local name=$1; shift; $PY eval.py -m "${common[@]}" "$@" hydra.sweep.dir=$out/$name; }
run tq_mse codec=turboquant_mse rotation=fast_hadamard bits=2,2.5,3,3.5,4
run tq_mse_rotations codec=turboquant_mse rotation=identity,random_haar bits=3
run tq_prod codec=turboquant_prod rotation=fast_hadamard bits=2,2.5,3,3.5,4
run kv_splits codec=turboquant_mse rotation=fast_hadamard bits=3 k_bits=4,3 v_bits=2
run q4_0 codec=int4_block rotation=identity,fast_hadamard bits=4
run q8_0 codec=int8_block rotation=identity bits=8
run kivi codec=kivi rotation=identity bits=2,4
run sinks_window codec=turboquant_mse rotation=fast_hadamard bits=2,3 cache.sink_tokens=4 cache.recent_window=32
# prefill-exact decodes token by token after the exact prompt (the reference path: slow on CPU), so 4 documents
run prefill_exact codec=turboquant_mse rotation=fast_hadamard bits=3,4 cache.protocol=prefill_exact perplexity.max_windows=4
metrics='metrics=[nll_increase,next_token_kl,final_hidden_cosine,next_token_top1]'
all=$out/tq_mse,$out/tq_mse_rotations,$out/tq_prod,$out/kv_splits,$out/q4_0,$out/q8_0,$out/kivi,$out/sinks_window
$PY report.py "runs=[$all]" "$metrics" reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/e2e_all_quantized
$PY report.py "runs=[$out/prefill_exact]" "$metrics" reference=fast_hadamard wandb.mode=disabled hydra.run.dir=outputs/research/e2e_prefill_exact
