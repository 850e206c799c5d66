#!/usr/bin/env bash
# session 11, device call 5: kernel v12 — GPU tests of the large launches (the new d = 256 1-warp shape included),
# the v12 grid in steady-state timing, then KV-bound decode steps with P5 4/4 (v12) and --linear triton-pdl
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
timeout 130 python3 -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py -k "large_launch or v12" > $W/kernel_gpu_tests_v12.log 2>&1; tail -4 $W/kernel_gpu_tests_v12.log
timeout 300 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 255 --target-s 0.02 --procs 16 2>&1 | tail -3 | tee $W/decode_attention_grid.log
timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick --models Qwen2.5-7B 2>&1 | tail -1
timeout 100 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12.csv --models Llama-3.1-8B,Qwen2.5-7B --batches 8,16 --contexts 16k,32k --formats P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 85 2>&1 | tee $W/e2e_decode_v12.log | grep -v "^#"
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s11call5.sh"), indent=1, sort_keys=True))
PY
kill $SMI
tar -C $OUT -czf $OUT/s11call5.tgz w && rm -rf $W; ls -la $OUT
