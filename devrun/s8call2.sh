#!/usr/bin/env bash
# session 8, device call 2: the kernel v10 grid
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $OUT/smi2.csv &
SMI=$!
timeout 560 python -m kvmodel.measure.bench_decode_attention --out $OUT/decode_attention.csv --contexts 32768 4096 131072 16384 1024 --max-seconds 290 --target-s 0.02 --procs 16 2>&1 | tail -40 | tee $OUT/decode_attention_grid.log
ls $OUT
kill $SMI
