#!/usr/bin/env bash
# session 11, device call 2: the timing warm-up checked (probe v11warm: cold vs steady-state replays), then the
# kernel v11 grid timed in steady state (bench time_graph's WARM_REPLAYS), on whichever card the call gets.
set -u
source devrun/device_env.sh  # sets W, installs the carried wheels and the package
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $W/smi.csv &
SMI=$!
timeout 70 python3 -m kvmodel.measure.bench_decode_attention --probe --probe-set v11warm --probe-out $W/probe_v11warm.jsonl --target-s 0.1 --procs 16 2>&1 | tee $W/probe_v11warm.log | grep PROBE
timeout 480 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 400 --target-s 0.02 --procs 16 2>&1 | tail -6 | tee $W/decode_attention_grid.log
python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s11call2.sh"), indent=1, sort_keys=True))
PY
kill $SMI
ls -la $W; tar -C $OUT -czf $OUT/s11call2.tgz w && rm -rf $W; ls -la $OUT
