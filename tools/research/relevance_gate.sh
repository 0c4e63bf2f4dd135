#!/usr/bin/env bash
# Causal relevance-gated key bits on SmolLM2 keys (values exact; attention over the captured test blocks, real
# queries, causal mask; 3 seeds): the gate against its random control at the same share, and against uniform
# TurboQuant widths around the same bytes. Paired over (layer, KV head) units. Results: docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
common=(logger=csv progress=false kv=key_only rotation=fast_hadamard seed=0,1,2)
out=multirun/relevance_gate
run() { local name=$1; shift; $PY eval.py -m "${common[@]}" "$@" hydra.sweep.dir=$out/$name; }
run uniform codec=turboquant_mse bits=2,2.5,3
run gated codec=relevance_gated bits=2 codec.high_bits=4 codec.share=0.125,0.25 codec.gate=relevance,random
run gated_damped codec=relevance_gated bits=2 codec.high_bits=4 codec.share=0.25 codec.half_life=64
$PY report.py "runs=[$out/uniform,$out/gated,$out/gated_damped]" 'metrics=[output_cosine,attention_kl]' \
  unit=layer_head wandb.mode=disabled hydra.run.dir=outputs/research/relevance_gate
# end to end: keys gated inside TurboQuantCache (values exact), all-quantized, 12 documents, one seed
e2e=(task=perplexity logger=csv progress=false kv=key_only rotation=fast_hadamard seed=0)
$PY eval.py -m "${e2e[@]}" codec=turboquant_mse bits=2,3 hydra.sweep.dir=$out/e2e_uniform
$PY eval.py -m "${e2e[@]}" codec=relevance_gated bits=2 codec.share=0.25 codec.gate=relevance,random \
  hydra.sweep.dir=$out/e2e_gated
$PY report.py "runs=[$out/e2e_uniform,$out/e2e_gated]" 'metrics=[nll_increase,next_token_kl,final_hidden_cosine]' \
  wandb.mode=disabled hydra.run.dir=outputs/research/relevance_gate_e2e
