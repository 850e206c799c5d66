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
    print("| held-out accuracy (absolute % error) | median | p90 | worst | target (median / worst) |")
    print("|---|---|---|---|---|")
    ta = f"{t['attention_median']:g} % / {t['attention_max']:g} %"
    te = f"{t['e2e_median']:g} % / -"
    for label, pre in (("kvmodel predict (shipped model, calibrated on the training split)", "predict_"),
                       ("validation model (per kernel block shape)", "")):
        print(f"| H200 decode attention, per pipeline and format: {label} | "
              f"{_fmt(s[pre + 'attention_median_abs_pct_error'])} | {_fmt(s[pre + 'attention_p90_abs_pct_error'])} | "
              f"{_fmt(s[pre + 'attention_max_abs_pct_error'])} | {ta} |")
        p90 = s.get(pre + "e2e_p90_abs_pct_error", (s.get("h200_e2e") or {}).get("overall", {}).get("p90_abs_pct"))
        print(f"| H200 end-to-end decode steps: {label} | {_fmt(s[pre + 'e2e_median_abs_pct_error'])} | "
              f"{_fmt(p90)} | {_fmt(s[pre + 'e2e_max_abs_pct_error'])} | {te} |")
    h = s["h100_study"].get("heldout_all_pipelines")
    if h:
        print(f"| external H100 sweep (the study's data; P0/P1/P5 single layer; validation model) | "
              f"{_fmt(h['median_abs_pct'])} | {_fmt(h.get('p90_abs_pct'))} | {_fmt(h['max_abs_pct'])} | - |")
    peers = s.get("peers") or {}
    for name, e in (peers.get("errors") or {}).items():
        c, k = e.get("compared"), e.get("kvmodel_same_rows")
        if c and k:
            print(f"| peer {name} on the same {c['n']} H200 end-to-end rows (validation model on them: "
                  f"{_fmt(k['median_abs_pct'])}) | {_fmt(c['median_abs_pct'])} | {_fmt(c.get('p90_abs_pct'))} | "
                  f"{_fmt(c['max_abs_pct'])} | - |")
    hill = s.get("hill", {}).get("h100_measured")
    card = s.get("hill", {}).get("card")
    if hill and card:
        print(f"\nHill fit of the study's H100 speedups (P0/P5 decode, B >= 4): Smax {hill['Smax']:.2f}, "
              f"B_half {hill['B_half']:.2f}, gamma {hill['gamma']:.2f}, R2 {hill['R2']:.2f}, n = {hill['n']} "
              f"(the study's card, {s['hill']['card_file']}: {card['Smax']}, {card['B_half']}, {card['gamma']}, "
              f"R2 {card['R2']:.2f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
