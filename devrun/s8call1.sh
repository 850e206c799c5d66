#!/usr/bin/env bash
# session 8, device call 1: kernel v10 defaults vs v9's rule and merge (probe v10b), then the GPU kernel tests
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 > $OUT/smi1.csv &
SMI=$!
python - <<'PY' > $OUT/provenance_call1.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s8call1.sh"), indent=1, sort_keys=True))
PY
timeout 270 python -m kvmodel.measure.bench_decode_attention --probe --probe-set v10b --probe-out $OUT/decode_attention_probe_v10b.jsonl --target-s 0.03 --procs 16 2>&1 | tee $OUT/decode_attention_probe_v10b.log
timeout 240 python -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py -k "one_round or merge or pdl or large_launch or subset or options or split_rule or launcher_splits or fold" 2>&1 | tail -15 | tee $OUT/kernel_gpu_tests_v10b.log
kill $SMI
