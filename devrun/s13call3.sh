#!/usr/bin/env bash
# session 13, device call 3 (whichever card comes). H200: as devrun/s13call1.sh (kernel v12 grid + decode steps).
# H100: `kvmodel calibrate`'s own run (measure.calibrate_run, full mode, 4 reference models) without its attention
# grid — the committed v12 H100 grid (validation/data/h100/decode_attention_v12.csv) is fitted in beside it
# afterwards with `kvmodel calibrate --fit-only` — under a budget; a later call can `--resume` it.
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  bash devrun/s13call1.sh
else
  source devrun/device_env.sh
  mkdir -p $W/cal
  [[ -d prev_cal ]] && cp prev_cal/* $W/cal/ && RES=--resume || RES=""
  nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/cal/smi.csv &
  SMI=$!
  timeout 560 python3 -m kvmodel.measure.calibrate_run --out $W/cal $RES --gpu h100-sxm --no-attention --models Llama-3.1-8B,Qwen2.5-7B,Qwen2.5-0.5B,Mistral-Small-3.1-24B --budget-s ${BUDGET_S:-470} > $W/cal/calibrate.log 2>&1
  echo "rc=$?"; grep -v "^#" $W/cal/calibrate.log | tail -15
  kill $SMI
  python3 - <<'PY' > $W/cal/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s13call3.sh"), indent=1, sort_keys=True))
PY
  tar -C $OUT -czf $OUT/s13call3.tgz w && rm -rf $W; ls -la $OUT
fi
