#!/usr/bin/env bash
# session 11, one device call: (H200 only) the kernel v11 grid for issue #3; (any card) the bimodal-times probe
# (v11bi); then decode steps with kernel v11 and --linear triton-pdl: B = 1 (issue #4's target) and the KV-bound
# regime (B = 8/16, T = 16K/32K). The package's pure-Python dependencies the image lacks (pydantic and its own)
# travel as wheels in .whl (carry it); the image has no network.
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
python3 -c "import kvmodel.specs, kvmodel.measure.e2e_decode; print('kvmodel imports ok')" || exit 3
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  timeout 270 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 210 --target-s 0.02 --procs 16 2>&1 | tail -6 | tee $W/decode_attention_grid.log
else
  timeout 120 python3 -m kvmodel.measure.bench_decode_attention --probe --probe-set v11bi --probe-out $W/probe_v11bi.jsonl --target-s 0.1 --procs 16 2>&1 | tee $W/probe_v11bi.log | grep -v "^  read"
fi
timeout 40 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick --models Qwen2.5-7B 2>&1 | tail -2
timeout 110 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v11.csv --models Llama-3.1-8B,Qwen2.5-7B --batches 1 --contexts 1k,4k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 95 2>&1 | tee $W/e2e_decode_v11.log | grep -v "^#"
timeout 150 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v11.csv --models Llama-3.1-8B,Qwen2.5-7B --batches 8,16 --contexts 16k,32k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 135 2>&1 | tee -a $W/e2e_decode_v11.log | grep -v "^#"
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s11call.sh"), indent=1, sort_keys=True))
PY
kill $SMI
ls -la $W; tar -C $OUT -czf $OUT/s11call.tgz w && rm -rf $W; ls -la $OUT
