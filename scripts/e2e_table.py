"""Print the README's end-to-end table: measured H200 decode steps beside `kvmodel predict` with the shipped
calibration, for a few operating points of the committed data (validation/data/h200/e2e_decode.csv).

Run: ``python scripts/e2e_table.py``. (The calibration was fitted on all the committed rows; held-out errors are
in validation/report/REPORT.md.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from kvmodel.calibration import find_calibration
from kvmodel.predict import step_time_s
from kvmodel.specs import KVFormat, get_gpu, get_model
from kvmodel.timing import TimeModel

ROOT = Path(__file__).resolve().parents[1]
POINTS = [("Llama-3.1-8B", 1, 4096), ("Llama-3.1-8B", 16, 16384), ("Llama-3.1-8B", 16, 32768),
          ("Qwen2.5-7B", 64, 32768), ("Mistral-Small-3.1-24B", 16, 16384), ("Qwen2.5-0.5B", 128, 16384)]
PIPES = [("P0", 16, 16, "FP16 (P0)"), ("P5", 4, 4, "INT4 fused (P5)"), ("P1", 4, 4, "INT4 non-fused (P1)")]


def main() -> int:
    d = pd.read_csv(ROOT / "validation" / "data" / "h200" / "e2e_decode.csv")
    d = d[(d.runtime == "kvmodel-graph") & (d.status == "ok")]
    gpu = get_gpu("h200")
    tm = TimeModel(gpu, find_calibration(gpu.name))
    print("| model | B x T | " + " | ".join(f"{p[3]} measured / predicted" for p in PIPES) + " | INT4 fused speedup "
          "measured / predicted |")
    print("|---" * (len(PIPES) + 3) + "|")
    for name, B, T in POINTS:
        m = get_model(name)
        cells, times = [], {}
        for pipe, kb, vb, _ in PIPES:
            r = d[(d.model == name) & (d.B == B) & (d["T"] == T) & (d.pipeline == pipe) & (d.k_bits == kb)
                  & (d.v_bits == vb)]
            pred = float(step_time_s(tm, m, KVFormat(k_bits=kb, v_bits=vb), B, T, pipe))
            meas = float(r.median_s.iloc[0]) if len(r) else None
            times[pipe] = (meas, pred)
            cells.append(f"{meas * 1e3:.2f} / {pred * 1e3:.2f} ms" if meas else f"- / {pred * 1e3:.2f} ms")
        (m0, p0), (m5, p5) = times["P0"], times["P5"]
        sp = f"{m0 / m5:.2f}x / {p0 / p5:.2f}x" if m0 and m5 else f"- / {p0 / p5:.2f}x"
        print(f"| {name} | {B} x {T // 1024}K | " + " | ".join(cells) + f" | {sp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
