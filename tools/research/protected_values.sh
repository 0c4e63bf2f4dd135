#!/usr/bin/env bash
# Protected value channels end to end on SmolLM2-135M (values compressed, keys exact; 12 held-out documents,
# all-quantized, one seed): channel-group tiers ranked by attention-weighted energy or by plain energy,
# against plain TurboQuant values at nearby bytes. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(task=perplexity logger=csv progress=false kv=value_only seed=0)
out=multirun/protected_values
run() { local name=$1; shift; $PY eval.py -m "${common[@]}" "$@" hydra.sweep.dir=$out/$name; }
run plain codec=turboquant_mse rotation=fast_hadamard bits=2,3,4
run high_only codec=protected_channels rotation=identity bits=2 codec.exact_groups=0 codec.high_groups=2 codec.ranking=attention,energy
run exact_only codec=protected_channels rotation=identity bits=2 codec.exact_groups=1 codec.high_groups=0 codec.ranking=attention,energy
run exact_high codec=protected_channels rotation=identity bits=2 codec.exact_groups=1 codec.high_groups=1 codec.ranking=attention,energy
run residual codec=protected_channels rotation=identity bits=2 codec.exact_groups=0 codec.high_groups=1 codec.rank=4
metrics='metrics=[nll_increase,next_token_kl,final_hidden_cosine,next_token_top1]'
all=$out/plain,$out/high_only,$out/exact_only,$out/exact_high,$out/residual
$PY report.py "runs=[$all]" "$metrics" wandb.mode=disabled hydra.run.dir=outputs/research/protected_values
