#!/usr/bin/env bash
# session 13, device call 2 (whichever card comes). H200: as devrun/s13call1.sh (kernel v12 grid + decode steps).
# H100: the tail pool in steady-state timing (probe set v13tp) beside the default, read ceiling in the same run.
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  bash devrun/s13call1.sh
else
  source devrun/device_env.sh
  timeout 400 python3 -m kvmodel.measure.bench_decode_attention --probe --probe-set v13tp --probe-out $W/probe_v13tp.jsonl --target-s 0.1 --procs 16 2>&1 | tee $W/probe_v13tp.log | grep -E "PROBE|ceiling|GB/s" | tail -60
  python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s13call2.sh"), indent=1, sort_keys=True))
PY
  tar -C $OUT -czf $OUT/s13call2.tgz w && rm -rf $W; ls -la $OUT
fi
