#!/usr/bin/env bash
# train.py and eval.py on one GPU (synthetic KV): every codec family, fitted rotations, fractional bits.
set -euo pipefail
rm -rf /tmp/gpu_smoke  # a run's results are reused by the next with the same settings: start empty
common=(data=synthetic logger=none progress=false results_root=/tmp/gpu_smoke/runs)
python3 train.py "${common[@]}" debug=fast trainer=gpu fit.max_epochs=2 rotation=triality kv=full_kv hydra.run.dir=/tmp/gpu_smoke/train
for args in "codec=turboquant_mse bits=3" "codec=turboquant_prod bits=3" "codec=turboquant_mse bits=2.5" \
            "codec=int4_block bits=4 rotation=fast_hadamard" "codec=kivi bits=2 rotation=identity kv=full_kv" \
            "codec=int8_block bits=8 rotation=identity" "codec=transform_coding bits=2 rotation=identity kv=full_kv" \
            "codec=protected_channels bits=2 rotation=identity kv=full_kv" "codec=relevance_gated bits=2 kv=key_only" \
            "rotations=/tmp/gpu_smoke/train kv=full_kv bits=2"; do
  # shellcheck disable=SC2086
  python3 eval.py "${common[@]}" trainer=gpu $args hydra.run.dir=/tmp/gpu_smoke/eval
done
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("/tmp/gpu_smoke/runs/eval/*/summary.json")):
    s = json.load(open(f)); c, o = s["columns"], s["overall"]
    rotation = c.get("rotations_from") or c.get("k_rotation") or c.get("v_rotation")
    print(f"{c['codec']:18s} {c['kv']:9s} {rotation:40s} K{c.get('k_bits')} V{c.get('v_bits')}  "
          f"output_cosine {o['output_cosine']:.4f}  kv_bits {o['kv_bits_per_coordinate']:.3f}")
PY
