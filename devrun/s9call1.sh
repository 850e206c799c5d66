#!/usr/bin/env bash
# session 9, device call 1: the kernel v10 grid, then the v10 defaults beside v9's rule and merge (probe v10b)
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $OUT/smi1.csv &
SMI=$!
python - <<'PY' > $OUT/provenance_call1.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s9call1.sh"), indent=1, sort_keys=True))
PY
timeout 300 python -m kvmodel.measure.bench_decode_attention --out $OUT/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 230 --target-s 0.02 --procs 16 2>&1 | tail -40 | tee $OUT/decode_attention_grid.log
timeout 200 python -m kvmodel.measure.bench_decode_attention --probe --probe-set v10b --probe-out $OUT/decode_attention_probe_v10b.jsonl --target-s 0.03 --procs 16 2>&1 | tee $OUT/decode_attention_probe_v10b.log
ls $OUT
kill $SMI
