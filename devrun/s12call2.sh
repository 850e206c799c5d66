#!/usr/bin/env bash
# session 12, device call 2 (H100, warm after call 1): the program timeline of large launches with the persistent
# split kernel's variants beside the default (call 1's run stopped at a key clash in its first row).
set -u
source devrun/device_env.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
timeout 400 python3 -m kvmodel.measure.program_timeline --out $W/program_timeline_large.jsonl --raw $W/program_timeline_large_raw.jsonl --cases large 2>&1 | tee $W/program_timeline_large.log
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call2.sh"), indent=1, sort_keys=True))
PY
tar -C $OUT -czf $OUT/s12call2.tgz w && rm -rf $W; ls -la $OUT
