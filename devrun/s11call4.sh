#!/usr/bin/env bash
# session 11, device call 4: the v12 split-rule candidate (probe v12sp: programs per SM the rule assumes, large
# launches) and the 1-warp shape at d = 256
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
timeout 400 python3 -m kvmodel.measure.bench_decode_attention --probe --probe-set v12sp --probe-out $W/probe_v12sp.jsonl --target-s 0.05 --procs 16 2>&1 | tee $W/probe_v12sp.log | grep -E "PROBE|ERR|rror"
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s11call4.sh"), indent=1, sort_keys=True))
PY
kill $SMI
tar -C $OUT -czf $OUT/s11call4.tgz w && rm -rf $W; ls -la $OUT
