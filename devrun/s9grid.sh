#!/usr/bin/env bash
# session 9, the one device call its budget allows: the kernel v10 grid (short), with provenance and clocks
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=timestamp,name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > $OUT/smi.csv &
SMI=$!
timeout 180 python -m kvmodel.measure.bench_decode_attention --out $OUT/decode_attention.csv --contexts 4096 32768 1024 16384 --max-seconds 100 --target-s 0.02 --procs 16 2>&1 | tail -30 | tee $OUT/decode_attention_grid.log
ls $OUT
kill $SMI
