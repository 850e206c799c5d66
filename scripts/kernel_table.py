"""Print the README's kernel table from the committed H200 decode-attention measurements.

Reads validation/data/h200/decode_attention.csv (+ its provenance JSON) and prints, per attention shape, the
median time of each pipeline at a few (batch, context) points, its speedup over SDPA FP16 (P0) and its achieved
bandwidth (the bytes the model says the pipeline must move / time) as a share of the measured read ceiling.
Run: ``python scripts/kernel_table.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "validation" / "data" / "h200" / "decode_attention.csv"
POINTS = [(1, 4096), (8, 32768), (32, 32768), (16, 131072)]
COLUMNS = [("P0", 16, 16, "P0 FP16 (SDPA)"), ("P5", 16, 16, "P5 16/16"), ("P5", 8, 8, "P5 8/8"),
           ("P5", 8, 4, "P5 8/4"), ("P5", 4, 4, "P5 4/4"), ("P1", 4, 4, "P1 4/4"), ("P0-expand", 16, 16, "P0-expand")]


def main() -> int:
    d = pd.read_csv(DATA)
    d = d[(d["variant"].fillna("default") == "default")]
    prov = json.loads(DATA.with_suffix(".provenance.json").read_text())
    ceiling = d["read_ceiling_GBps"].median()
    print(f"H200 decode attention, one layer; median of CUDA-graph replays; read ceiling {ceiling:.0f} GB/s "
          f"(measured in the same run). {prov.get('gpu', prov.get('device_name', ''))}, torch {prov.get('torch')}, "
          f"triton {prov.get('triton')}, {str(prov.get('date', ''))[:10]}.")
    print("Each cell: time (speedup vs P0, % of read ceiling).\n")
    for model, g in d.groupby("model", sort=False):
        r0 = g.iloc[0]
        print(f"**{model}** (Hq {r0.Hq}, Hkv {r0.Hkv}, d {r0.d})\n")
        print("| B x T | " + " | ".join(c[3] for c in COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for B, T in POINTS:
            pt = g[(g.B == B) & (g["T"] == T)]
            if pt.empty:
                continue
            base = pt[(pt.pipeline == "P0")]
            t0 = float(base.median_s.iloc[0]) if not base.empty else None
            cells = []
            for pipe, kb, vb, _ in COLUMNS:
                r = pt[(pt.pipeline == pipe) & (pt.k_bits == kb) & (pt.v_bits == vb)]
                if pipe.startswith("P0"):
                    r = pt[pt.pipeline == pipe]
                if r.empty:
                    cells.append("-")
                    continue
                r = r.iloc[0]
                t = float(r.median_s)
                sp = f"{t0 / t:.2f}x" if t0 else "?"
                cells.append(f"{t * 1e6:,.0f} us ({sp}, {r.pct_read_ceiling:.0f} %)")
            print(f"| {B} x {T // 1024}K | " + " | ".join(cells) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
