#!/usr/bin/env bash
# session 13, device call 4: only on an H200 (devrun/s13call1.sh: kernel v12 grid + decode steps); on any other
# card it stops at once (the H100 work of this session is done).
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then bash devrun/s13call1.sh; else echo "not an H200: nothing to run"; fi
