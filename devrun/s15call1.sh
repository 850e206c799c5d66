#!/usr/bin/env bash
# session 15, device call 1: only on an H200 (on any other card it stops at once). The kernel v12 grid in
# steady-state timing, quick probes, and decode steps of the 4 catalog models with P0 and P5 4/4 (--linear
# triton-pdl), KV-bound (B = 16/8, T = 16K/32K) and at batch 1 (T = 1K/4K) in one CSV, with budgets trimmed so the
# whole call stays inside one 600 s command.
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
[[ "$GPU" == *H200* ]] || { echo "not an H200: nothing to run"; exit 0; }
source devrun/device_env.sh
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
timeout 255 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 230 --target-s 0.02 --procs 16 2>&1 | tail -3 | tee $W/decode_attention_grid.log
timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick 2>&1 | tail -1
M=Llama-3.1-8B,Qwen2.5-7B,Mistral-Small-3.1-24B,Qwen2.5-0.5B
timeout 95 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12.csv --models $M --batches 1 --contexts 1k,4k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 80 2>&1 | tee $W/e2e_decode_v12_b1.log | grep -v "^#" | tail -16
timeout 175 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12.csv --models $M --batches 16,8 --contexts 16k,32k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 160 2>&1 | tee $W/e2e_decode_v12.log | grep -v "^#" | tail -30
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s15call1.sh"), indent=1, sort_keys=True))
PY
kill $SMI
tar -C $OUT -czf $OUT/s15call1.tgz w && rm -rf $W; ls -la $OUT
