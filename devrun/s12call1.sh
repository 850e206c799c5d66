#!/usr/bin/env bash
# session 12, device call 1. On an H200: kernel v12's large-launch GPU tests, then the v12 grid in steady-state
# timing with the ceilings, then the probes (the inputs of the H200 calibration refit). On an H100: the five
# large-launch GPU tests that ran out of memory in session 11 (3 workers), the stamps and persistent-kernel tests,
# then the program timeline of large launches (measure/program_timeline.py: per-program %globaltimer start/end and
# SM), the persistent split kernel's variants beside the default.
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
if [[ "$GPU" == *H200* ]]; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py -k "large_launch or v12" > $W/kernel_gpu_tests_v12.log 2>&1; tail -3 $W/kernel_gpu_tests_v12.log
  timeout 390 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 350 --target-s 0.02 --procs 16 2>&1 | tail -3 | tee $W/decode_attention_grid.log
  timeout 30 python3 -m kvmodel.measure.probes --out $W/probes.csv --quick 2>&1 | tail -1
else
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py tests/test_program_timeline.py -k "large_launch_k_fold_gpu or large_launch_octet_gpu or d256_one_warp or stamps or persistent" > $W/kernel_gpu_tests_v12_rerun.log 2>&1; tail -3 $W/kernel_gpu_tests_v12_rerun.log
  timeout 370 python3 -m kvmodel.measure.program_timeline --out $W/program_timeline_large.jsonl --raw $W/program_timeline_large_raw.jsonl --cases large 2>&1 | tee $W/program_timeline_large.log
fi
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call1.sh"), indent=1, sort_keys=True))
PY
kill $SMI
tar -C $OUT -czf $OUT/s12call1.tgz w && rm -rf $W; ls -la $OUT
