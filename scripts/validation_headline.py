"""Print the README's validation headline from validation/report/summary.json (written by `kvmodel validate`).

Run: ``python scripts/validation_headline.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f} %"


def main() -> int:
    s = json.loads((ROOT / "validation" / "report" / "summary.json").read_text())
    t = s["targets"]
    print("| held-out accuracy (absolute % error) | median | worst | target (median / worst) |")
    print("|---|---|---|---|")
    print(f"| H200 decode attention, per pipeline and format | {_fmt(s['attention_median_abs_pct_error'])} | "
          f"{_fmt(s['attention_max_abs_pct_error'])} | {t['attention_median']:g} % / {t['attention_max']:g} % |")
    print(f"| H200 end-to-end decode steps | {_fmt(s['e2e_median_abs_pct_error'])} | "
          f"{_fmt(s['e2e_max_abs_pct_error'])} | {t['e2e_median']:g} % / - |")
    h = s["h100_study"].get("heldout_all_pipelines")
    if h:
        print(f"| external H100 sweep (the study's data; P0/P1/P5 single layer) | {_fmt(h['median_abs_pct'])} | "
              f"{_fmt(h['max_abs_pct'])} | - |")
    peers = s.get("peers") or {}
    for name, e in (peers.get("errors") or {}).items():
        c, k = e.get("compared"), e.get("kvmodel_same_rows")
        if c and k:
            print(f"| peer {name} on the same {c['n']} H200 end-to-end rows (kvmodel on them: "
                  f"{_fmt(k['median_abs_pct'])}) | {_fmt(c['median_abs_pct'])} | {_fmt(c['max_abs_pct'])} | - |")
    hill = s.get("hill", {}).get("h100_measured")
    if hill:
        print(f"\nHill fit of the study's H100 speedups (P0/P5 decode, B >= 4): Smax {hill['Smax']:.2f}, "
              f"B_half {hill['B_half']:.2f}, gamma {hill['gamma']:.2f}, R2 {hill['R2']:.2f}, n = {hill['n']} "
              f"(the study's card: 3.75, 5.1, 1.32, R2 0.80).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
