#!/usr/bin/env bash
# session 14, device call 2: only on an H200. `kvmodel calibrate`'s own run (measure.calibrate_run, full mode, the 4
# reference models) without its attention grid: the kernel v12 grid of devrun/s13call1.sh (call 1) is fitted in
# beside it afterwards with `kvmodel calibrate --fit-only`. On any other card it stops at once.
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
[[ "$GPU" == *H200* ]] || { echo "not an H200: nothing to run"; exit 0; }
source devrun/device_env.sh
mkdir -p $W/cal
[[ -d prev_cal ]] && cp prev_cal/* $W/cal/ && RES=--resume || RES=""
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/cal/smi.csv &
SMI=$!
timeout 560 python3 -m kvmodel.measure.calibrate_run --out $W/cal $RES --gpu h200 --no-attention --models Llama-3.1-8B,Qwen2.5-7B,Qwen2.5-0.5B,Mistral-Small-3.1-24B --budget-s ${BUDGET_S:-470} > $W/cal/calibrate.log 2>&1
echo "rc=$?"; grep -v "^#" $W/cal/calibrate.log | tail -15
kill $SMI
python3 - <<'PY' > $W/cal/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s14call2.sh"), indent=1, sort_keys=True))
PY
tar -C $OUT -czf $OUT/s14call2.tgz w && rm -rf $W; ls -la $OUT
