#!/usr/bin/env bash
# Same evaluation on 1 GPU and on 2 GPUs (DDP): prints both summaries and their largest difference.
# Usage on a machine with >= 2 GPUs: tools/ddp_check.sh [extra eval.py overrides]
set -euo pipefail
common=(data=synthetic "data.sequences={train:4,validation:2,test:9}" data.seq_len=256 logger=none progress=false bits=3 "$@")
python3 eval.py "${common[@]}" trainer=gpu results_root=/tmp/ddp_check/one hydra.run.dir=/tmp/ddp_check/out_one
python3 eval.py "${common[@]}" trainer=ddp trainer.devices=2 results_root=/tmp/ddp_check/two hydra.run.dir=/tmp/ddp_check/out_two
python3 - <<'PY'
import glob, json
one, two = (json.load(open(glob.glob(f"/tmp/ddp_check/{n}/eval/*/summary.json")[0])) for n in ("one", "two"))
print("blocks:", one["blocks"], two["blocks"])
for k in one["overall"]:
    print(f"{k:28s} 1 GPU {one['overall'][k]:.10g}   2 GPUs {two['overall'][k]:.10g}   diff {abs(one['overall'][k] - two['overall'][k]):.2e}")
PY
