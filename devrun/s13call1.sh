#!/usr/bin/env bash
# session 13, device call 1 (whichever card comes). H200: kernel v12 grid in steady-state timing (never measured on
# an H200), then decode steps of the catalog models with P5 4/4 + P0 (kernel v12, --linear triton-pdl, read ceiling
# from the same call's probes). H100: the tail pool's GPU tests and timeline (devrun/s12call7.sh).
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  source devrun/device_env.sh
  nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
  SMI=$!
  timeout 300 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 270 --target-s 0.02 --procs 16 2>&1 | tail -3 | tee $W/decode_attention_grid.log
  timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick 2>&1 | tail -1
  timeout 230 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12.csv --models Llama-3.1-8B,Qwen2.5-7B,Mistral-Small-3.1-24B,Qwen2.5-0.5B --batches 16,8 --contexts 16k,32k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 215 2>&1 | tee $W/e2e_decode_v12.log | grep -v "^#" | tail -30
  python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s13call1.sh"), indent=1, sort_keys=True))
PY
  kill $SMI
  tar -C $OUT -czf $OUT/s13call1.tgz w && rm -rf $W; ls -la $OUT
else
  bash devrun/s12call7.sh
fi
