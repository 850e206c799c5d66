"""Peer tools (llm-analysis, GenZ) predicting the same end-to-end H200 decode steps as kvmodel.

The peers are installed on demand into an isolated venv (``validation/.peers-venv``, gitignored; PyPI packages
``llm-analysis`` and ``genz-llm``) and run in a subprocess (:mod:`kvmodel.validation.peers_runner`) that writes JSON.
Their predictions are committed as data (``validation/data/peers/h200_e2e_peers.json``) so that ``kvmodel validate``
runs without installing them; ``kvmodel validate --rerun-peers`` re-runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from kvmodel.specs import get_gpu, get_model

from .common import atomic_write_json, data_path, error_stats, package_dir

PEERS_FILE = ("peers", "h200_e2e_peers.json")
PEER_PACKAGES = ("llm-analysis==0.2.2", "genz-llm==0.0.16")
#: Configurations predicted when e2e_decode.csv has not landed: the measurement's default grid
#: (kvmodel.measure.e2e_decode DEFAULT_MODELS x DEFAULT_BATCHES x DEFAULT_CONTEXTS) at FP16 and the fused formats.
DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3.1-8B", "Mistral-Small-3.1-24B")
DEFAULT_BATCHES = (1, 4, 16, 64, 128)
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
DEFAULT_FORMATS = ((16, 16), (8, 8), (4, 4), (8, 4))


def venv_dir() -> Path:
    return package_dir() / ".peers-venv"


def ensure_venv(log=print) -> Path:
    """Create the isolated venv and install the peers (needs PyPI); returns its python."""
    v = venv_dir()
    py = v / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not py.exists():
        log(f"creating {v}")
        subprocess.run([sys.executable, "-m", "venv", str(v)], check=True)
    check = subprocess.run([str(py), "-c", "import llm_analysis, GenZ"], capture_output=True)
    if check.returncode != 0:
        log(f"installing {', '.join(PEER_PACKAGES)} into {v}")
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def _arch(name: str) -> dict:
    m = get_model(name)
    return {"name": m.name, "num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "vocab_size": m.vocab_size, "gated_mlp": m.mlp == "gated", "tie_embeddings": m.tie_embeddings}


def default_configs() -> list[dict]:
    return [{"model": m, "B": B, "T": T, "k_bits": kb, "v_bits": vb} for m in DEFAULT_MODELS
            for B in DEFAULT_BATCHES for T in DEFAULT_CONTEXTS for kb, vb in DEFAULT_FORMATS]


def configs_from_e2e(e2e: pd.DataFrame) -> list[dict]:
    cols = ["model", "B", "T", "k_bits", "v_bits"]
    u = e2e[e2e.get("runtime", "kvmodel-graph") == "kvmodel-graph"][cols].drop_duplicates()
    return [{k: (int(v) if k != "model" else str(v)) for k, v in r.items()} for r in u.to_dict(orient="records")]


def run_peers(configs: list[dict], out: Optional[Path] = None, log=print) -> dict:
    """Run both peers on ``configs`` in the isolated venv; write the committed JSON atomically; return it."""
    py = ensure_venv(log)
    gpu = get_gpu("h200")
    link = 450.0
    inp = {"gpu": {"name": gpu.name, "memory_GB": gpu.memory_capacity_GiB, "bw_GBps": gpu.memory_bandwidth_GBps,
                   "fp16_TFLOPS": gpu.fp16_dense_TFLOPS, "link_GBps": link},
           "models": {c["model"]: _arch(c["model"]) for c in configs}, "configs": configs}
    runner = Path(__file__).with_name("peers_runner.py")
    with tempfile.TemporaryDirectory() as td:
        fi, fo = Path(td) / "in.json", Path(td) / "out.json"
        fi.write_text(json.dumps(inp))
        log(f"running peers on {len(configs)} configurations")
        subprocess.run([str(py), str(runner), str(fi), str(fo)], check=True, cwd=td)
        res = json.loads(fo.read_text())
    res["note"] = ("Peers as shipped (their default efficiencies: both assume 100 % of the datasheet bandwidth) on "
                   "the H200 datasheet values; produced by `kvmodel validate --rerun-peers`.")
    out = Path(out) if out else data_path(*PEERS_FILE)
    atomic_write_json(out, res)
    return res


def load_peers(path: Optional[Path] = None) -> Optional[dict]:
    path = Path(path) if path else data_path(*PEERS_FILE)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def compare(e2e_frame: Optional[pd.DataFrame], peers: Optional[dict]) -> dict:
    """Errors of each peer beside kvmodel's on the measured e2e rows (FP16 rows vs P0, quantized rows vs P5)."""
    if peers is None:
        return {"available": False, "reason": "no committed peer predictions (run kvmodel validate --rerun-peers)"}
    p = pd.DataFrame(peers["predictions"])
    out = {"available": True, "versions": peers.get("versions", {}), "note": peers.get("note", ""),
           "n_predictions": int(len(p))}
    notes = {}
    for peer, g in p.groupby("peer"):
        n_missing = int(g["step_s"].isna().sum())
        frags: dict = {}
        for n in g["note"].fillna(""):
            for part in filter(None, (x.strip() for x in n.split(";"))):
                if part.startswith("peer error"):
                    part = part.split(". ")[0].split("System Memory")[0].strip()[:90]
                    part = "peer error: " + part.split(":", 2)[-1].strip() if part.count(":") >= 2 else part
                frags[part] = frags.get(part, 0) + 1
        notes[peer] = {"not_expressible": n_missing,
                       "notes": [f"{k} ({v} rows)" for k, v in sorted(frags.items(), key=lambda kv: -kv[1])][:8]}
    out["notes"] = notes
    if e2e_frame is None:
        out["errors"] = None
        out["reason"] = "e2e measurements not present: peers' predictions are committed, errors await the data"
        return out
    if "role" in e2e_frame.columns:  # compare on the rows kvmodel's calibration did not see
        e2e_frame = e2e_frame[e2e_frame["role"] != "train"]
        out["rows"] = "held-out rows of kvmodel's e2e split"
    m = e2e_frame[(e2e_frame["pipeline"] == "P0") & (e2e_frame["k_bits"] == 16)
                  | (e2e_frame["pipeline"] == "P5") & (e2e_frame["k_bits"] < 16)]
    rows = {}
    keys = ["model", "B", "T", "k_bits", "v_bits"]
    mm = m.copy()
    mm["model_key"] = mm["model"].map(lambda x: get_model(x).name)
    for peer, g in p.groupby("peer"):
        j = mm.merge(g[keys + ["step_s"]].rename(columns={"model": "model_key", "step_s": "peer_s"}),
                     on=["model_key", "B", "T", "k_bits", "v_bits"], how="left")
        ok = np.isfinite(j["peer_s"].astype(float))
        rows[peer] = {"compared": error_stats(j.loc[ok, "peer_s"], j.loc[ok, "meas_s"]),
                      "kvmodel_same_rows": error_stats(j.loc[ok, "pred_s"], j.loc[ok, "meas_s"]),
                      "not_expressible_rows": int((~ok).sum()),
                      "per_format": {f"{kb}/{vb}": error_stats(gg.loc[np.isfinite(gg.peer_s.astype(float)), "peer_s"],
                                                               gg.loc[np.isfinite(gg.peer_s.astype(float)), "meas_s"])
                                     for (kb, vb), gg in j.groupby(["k_bits", "v_bits"])}}
    out["errors"] = rows
    out["kvmodel"] = error_stats(m["pred_s"], m["meas_s"])
    return out
