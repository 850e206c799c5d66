"""Measure how many decode configurations per second the vectorized grid predicts on one CPU core.

Grid: every catalog GPU x every catalog model x 5 KV formats x 64 batch sizes x 512 contexts. Prints the size,
the wall time, and as its last line ``configs_per_second: N``. Run: ``python benchmarks/sweep_speed.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

from kvmodel.predict import predict_grid  # noqa: E402
from kvmodel.specs import catalog, parse_kv_format  # noqa: E402


def main(repeats: int = 3) -> float:
    cat = catalog()
    gpus, models = list(cat.gpus.values()), list(cat.models.values())
    formats = [parse_kv_format(f) for f in ("fp16", "int8", "int4", "k8v4", "k16v4")]
    batches = np.arange(1, 65)
    contexts = np.unique(np.geomspace(512, 1 << 20, 512).astype(int))
    n = len(gpus) * len(models) * len(formats) * len(batches) * len(contexts)
    predict_grid(gpus[:1], models[:1], formats[:1], batches[:2], contexts[:2])  # warm the lambdify caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = predict_grid(gpus, models, formats, batches, contexts)
        best = min(best, time.perf_counter() - t0)
    assert np.isfinite(out["step_time_s"]).all()
    rate = n / best
    print(f"grid: {len(gpus)} GPUs x {len(models)} models x {len(formats)} formats x {len(batches)} batches x "
          f"{len(contexts)} contexts = {n:,} configurations")
    print(f"best of {repeats}: {best:.3f} s")
    print(f"configs_per_second: {rate:,.0f}".replace(",", ""))
    return rate


if __name__ == "__main__":
    main()
