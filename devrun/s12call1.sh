#!/usr/bin/env bash
# session 12, device call 1. On an H200: kernel v12's large-launch GPU tests, then the v12 grid in steady-state
# timing with the ceilings, then the probes (the inputs of the H200 calibration refit). On an H100: the five
# large-launch GPU tests that ran out of memory in session 11 (3 workers), then decode steps of the two models
# session 11 did not step (Mistral-Small-3.1-24B, Qwen2.5-0.5B) at B = 1 and KV-bound, P0 and P5 4/4 (kernel v12).
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
if [[ "$GPU" == *H200* ]]; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py -k "large_launch or v12" > $W/kernel_gpu_tests_v12.log 2>&1; tail -3 $W/kernel_gpu_tests_v12.log
  timeout 420 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 380 --target-s 0.02 --procs 16 2>&1 | tail -3 | tee $W/decode_attention_grid.log
  timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick 2>&1 | tail -1
else
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py -k "large_launch_k_fold_gpu or large_launch_octet_gpu or d256_one_warp" > $W/kernel_gpu_tests_v12_rerun.log 2>&1; tail -3 $W/kernel_gpu_tests_v12_rerun.log
  timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick --models Qwen2.5-7B 2>&1 | tail -1
  timeout 110 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12_models.csv --models Mistral-Small-3.1-24B,Qwen2.5-0.5B --batches 1 --contexts 1k,4k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 95 2>&1 | tee $W/e2e_decode_v12_models.log | grep -v "^#"
  timeout 110 python3 -m kvmodel.measure.e2e_decode --out $W/e2e_decode_v12_models.csv --models Mistral-Small-3.1-24B,Qwen2.5-0.5B --batches 8,16 --contexts 16k,32k --formats P0:16/16,P5:4/4 --probes $W/probes.csv --linear triton-pdl --budget-s 95 2>&1 | tee -a $W/e2e_decode_v12_models.log | grep -v "^#"
fi
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call1.sh"), indent=1, sort_keys=True))
PY
kill $SMI
tar -C $OUT -czf $OUT/s12call1.tgz w && rm -rf $W; ls -la $OUT
