#!/usr/bin/env bash
# session 10, one device call: the kernel v11 grid (v10 with short splits capped by the launch's programs), the GPU
# kernel tests of the split / merge paths, then B = 1 decode steps with kernel v11 and --linear triton-pdl
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $OUT/smi.csv &
SMI=$!
timeout 280 python -m kvmodel.measure.bench_decode_attention --out $OUT/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 220 --target-s 0.02 --procs 16 2>&1 | tail -8 | tee $OUT/decode_attention_grid.log
timeout 110 python -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py -k "one_round or merge or pdl or large_launch or subset or options or split or launcher or fold" 2>&1 | tail -15 | tee $OUT/kernel_gpu_tests_v11.log
timeout 40 python -m kvmodel.measure.probes --out $OUT/probes.csv --quick --models Qwen2.5-7B 2>&1 | tail -3
timeout 120 python -m kvmodel.measure.e2e_decode --out $OUT/e2e_decode_v11_b1.csv --models Llama-3.1-8B,Qwen2.5-7B --batches 1 --contexts 1k,4k --formats P0:16/16,P5:4/4 --probes $OUT/probes.csv --linear triton-pdl --budget-s 90 2>&1 | tail -20 | tee $OUT/e2e_decode_v11_b1.log
python - <<'PY' > $OUT/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s10call.sh"), indent=1, sort_keys=True))
PY
ls $OUT
kill $SMI
