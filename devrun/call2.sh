#!/usr/bin/env bash
# session 7, device call 2: v10 candidate (one-round merge, more splits at small launches): probe, timeline, tests
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 > $OUT/smi2.csv &
SMI=$!
python - <<'PY' > $OUT/provenance_call2.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/call2.sh"), indent=1, sort_keys=True))
PY
timeout 240 python -m kvmodel.measure.bench_decode_attention --probe --probe-set v10 --probe-out $OUT/decode_attention_probe_v10.jsonl --target-s 0.03 --procs 16 2>&1 | tee $OUT/decode_attention_probe_v10.log
timeout 90 python -m kvmodel.measure.kernel_timeline --cases v10 --out $OUT/kernel_timeline_v10.jsonl 2>&1 | grep -v -i warn | tee $OUT/kernel_timeline_v10.log
timeout 200 python -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py -k "one_round or merge or pdl or large_launch or subset or options" 2>&1 | tail -15 | tee $OUT/kernel_gpu_tests_v10.log
kill $SMI
