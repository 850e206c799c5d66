#!/usr/bin/env bash
# session 9, device call 2: the GPU kernel tests of v10's new paths, then B = 1 decode steps with kernel v10
set -u
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
timeout 200 python -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py -k "one_round or merge or pdl or large_launch or subset or options or split_rule or launcher_splits or fold" 2>&1 | tail -15 | tee $OUT/kernel_gpu_tests_v10.log
timeout 60 python -m kvmodel.measure.probes --out $OUT/probes.csv --quick --models Qwen2.5-7B 2>&1 | tail -5
timeout 200 python -m kvmodel.measure.e2e_decode --out $OUT/e2e_decode_v10_b1.csv --models Llama-3.1-8B,Qwen2.5-7B --batches 1 --contexts 1k,4k --formats P0:16/16,P5:4/4 --probes $OUT/probes.csv --linear triton-pdl --budget-s 150 2>&1 | tail -20 | tee $OUT/e2e_decode_v10_b1.log
ls $OUT
