#!/usr/bin/env bash
# session 12, device call 5: the rotated-tile-order probe in the program timeline (ceilings in the same run), the
# rotated-order GPU test.
set -u
source devrun/device_env.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
timeout 60 python3 -m pytest -q -p no:cacheprovider -n 3 tests/test_kernels.py -k "rotated" > $W/kernel_gpu_tests_rot.log 2>&1; tail -1 $W/kernel_gpu_tests_rot.log
timeout 300 python3 -m kvmodel.measure.program_timeline --out $W/program_timeline_rot.jsonl --raw $W/program_timeline_rot_raw.jsonl --cases rot 2>&1 | tee $W/program_timeline_rot.log
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call5.sh"), indent=1, sort_keys=True))
PY
tar -C $OUT -czf $OUT/s12call5.tgz w && rm -rf $W; ls -la $OUT
