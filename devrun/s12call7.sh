#!/usr/bin/env bash
# session 12, device call 7: the tail pool (decode_attention(tail_pool=)) — its GPU tests, then the program timeline
# of the pool variants beside the default (ceilings in the same run).
set -u
source devrun/device_env.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
timeout 100 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py -k "tail_pool" > $W/kernel_gpu_tests_pool.log 2>&1; tail -1 $W/kernel_gpu_tests_pool.log
timeout 300 python3 -m kvmodel.measure.program_timeline --out $W/program_timeline_pool.jsonl --raw $W/program_timeline_pool_raw.jsonl --cases pool 2>&1 | tee $W/program_timeline_pool.log
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call7.sh"), indent=1, sort_keys=True))
PY
tar -C $OUT -czf $OUT/s12call7.tgz w && rm -rf $W; ls -la $OUT
