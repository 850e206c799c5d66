#!/usr/bin/env bash
# session 13, device call 1 (whichever card comes). H200: devrun/s15call1.sh (kernel v12 grid, probes, decode steps;
# this branch never ran in session 13, and session 15 moved it there with batch-1 steps added). H100: the tail pool's
# GPU tests and timeline (devrun/s12call7.sh), the branch that did run.
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
if [[ "$GPU" == *H200* ]]; then
  bash devrun/s15call1.sh
else
  bash devrun/s12call7.sh
fi
