#!/usr/bin/env bash
# session 7, device call 1: small-launch kernel timeline, the v9rep probe (K fold on/off alternately, clocks logged)
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 250 > $OUT/smi.csv &
SMI=$!
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
python - <<'PY' > $OUT/provenance_call1.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/call1.sh"), indent=1, sort_keys=True))
PY
timeout 150 python -m kvmodel.measure.kernel_timeline --out $OUT/kernel_timeline_small.jsonl 2>&1 | tee $OUT/kernel_timeline_small.log | grep -v Warning
timeout 300 python -m kvmodel.measure.bench_decode_attention --probe --probe-set v9rep --probe-out $OUT/decode_attention_probe_v9rep.jsonl --target-s 0.1 --procs 8 2>&1 | tee $OUT/decode_attention_probe_v9rep.log
kill $SMI
