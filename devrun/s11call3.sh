#!/usr/bin/env bash
# session 11, device call 3: where large P5 launches spend their time (kernel_timeline --cases large)
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
timeout 400 python3 -m kvmodel.measure.kernel_timeline --out $W/kernel_timeline_large.jsonl --cases large 2>&1 | tee $W/kernel_timeline_large.log
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s11call3.sh"), indent=1, sort_keys=True))
PY
tar -C $OUT -czf $OUT/s11call3.tgz w && rm -rf $W; ls -la $OUT
