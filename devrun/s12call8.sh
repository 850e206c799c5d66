#!/usr/bin/env bash
# session 12, device call 8 (whichever card comes). H200: kernel v12 at the issue-3 target rows — ceilings, P0 /
# P5 (and the grid's other pipelines) at 4/4 and 16/16, B 4-32 x T 32K / 128K for the four shapes, steady timing —
# then the tail-pool timeline if time is left. H100: the tail pool's GPU tests and timeline (devrun/s12call7.sh).
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  source devrun/device_env.sh
  timeout 260 python3 -m kvmodel.measure.bench_decode_attention --out $W/decode_attention_v12_targets.csv --models llama-3.1-8b qwen2.5-7b gemma-3-12b qwen2.5-0.5b --batches 4 8 16 32 --contexts 32768 131072 --formats 4/4 16/16 --max-seconds 220 --target-s 0.02 --procs 16 2>&1 | tail -4 | tee $W/decode_attention_v12_targets.log
  timeout 150 python3 -m kvmodel.measure.program_timeline --out $W/program_timeline_pool.jsonl --cases pool --no-ceilings 2>&1 | tee $W/program_timeline_pool.log
  python3 - <<'PY' > $W/provenance_call.json
import json; from kvmodel.measure.provenance import collect_provenance
print(json.dumps(collect_provenance(command="devrun/s12call8.sh"), indent=1, sort_keys=True))
PY
  tar -C $OUT -czf $OUT/s12call8.tgz w && rm -rf $W; ls -la $OUT
else
  bash devrun/s12call7.sh
fi
