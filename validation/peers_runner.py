"""Run the peer tools (llm-analysis, GenZ) on decode configurations; executed INSIDE the isolated peers venv.

    python peers_runner.py IN.json OUT.json

IN.json: {"gpu": {...}, "models": {name: architecture}, "configs": [{model, B, T, k_bits, v_bits}, ...]}.
OUT.json: {"versions": {...}, "predictions": [{config..., peer, step_s | null, note}]}.

Imports only the standard library and the peers (kvmodel is not installed in that venv). Each peer is used as
shipped (its default efficiencies); where it cannot express a configuration the prediction is null with a note.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def _llm_analysis(gpu: dict, arch: dict, c: dict):
    from llm_analysis.analysis import LLMAnalysis
    from llm_analysis.config import DtypeConfig, GPUConfig, ModelConfig

    notes = []
    ffn = arch["intermediate_size"]
    if arch.get("gated_mlp", True):
        # llm-analysis counts two MLP matrices; a gated MLP has three of the same size
        ffn = int(round(1.5 * ffn))
        notes.append("gated MLP given as ffn_embed_dim = 1.5 x intermediate (llm-analysis counts 2 MLP matrices)")
    mc = ModelConfig(name=arch["name"], num_layers=arch["num_layers"], n_head=arch["num_heads"],
                     hidden_dim=arch["hidden_size"], vocab_size=arch["vocab_size"],
                     num_key_value_heads=arch["num_kv_heads"], ffn_embed_dim=ffn,
                     expansion_ratio=ffn / arch["hidden_size"], model_type="llama", max_seq_len=None)
    if arch["hidden_size"] // arch["num_heads"] != arch["head_dim"]:
        notes.append(f"llm-analysis derives head_dim = hidden/heads = {arch['hidden_size'] // arch['num_heads']}, "
                     f"not {arch['head_dim']}: its KV bytes are off by that ratio")
    gc = GPUConfig(name=gpu["name"], mem_per_GPU_in_GB=gpu["memory_GB"], hbm_bandwidth_in_GB_per_sec=gpu["bw_GBps"],
                   intra_node_bandwidth_in_GB_per_sec=gpu["link_GBps"], intra_node_min_message_latency=8e-06,
                   peak_fp16_TFLOPS=gpu["fp16_TFLOPS"])
    kb, vb = c["k_bits"], c["v_bits"]
    # bytes per cached element, with one fp16 scale per 32 channels for integer formats (llm-analysis has no notion
    # of metadata; the API documents an int, a fraction works)
    per = [(b / 8 + (2 / 32 if b < 16 else 0)) for b in (kb, vb)]
    kv_bytes = sum(per) / 2
    if kb < 16 or vb < 16:
        notes.append(f"quantized KV given as kv_cache_dtype_bytes = {kv_bytes:g} (fractional, metadata folded in)")
    a = LLMAnalysis(mc, gc, DtypeConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = a.inference(batch_size_per_gpu=c["B"], seq_len=c["T"], num_tokens_to_generate=1,
                        kv_cache_dtype_bytes=kv_bytes)
    return float(s["decode_latency"]), "; ".join(notes)


def _genz(gpu: dict, arch: dict, c: dict):
    from GenZ.LLM_inference.llm_decode import decode_moddeling
    from GenZ.Models.default_models import ModelConfig
    from GenZ.system import System
    from GenZ.unit import Unit

    kb, vb = c["k_bits"], c["v_bits"]
    if kb != vb:
        return None, f"GenZ has one KV precision (gear b bits): K{kb}/V{vb} cannot be expressed"
    if kb not in (16, 8, 4):
        return None, f"GenZ has no {kb}-bit KV"
    notes = []
    gear = None
    if kb < 16:
        gear = {"b": {8: "int8", 4: "int4"}[kb], "s": 0, "r": 0}
        notes.append(f"KV as GEAR b={gear['b']}, s=0, r=0 (no scale metadata)")
    mc = ModelConfig(model=arch["name"].replace("/", "_"), vocab_size=arch["vocab_size"],
                     hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
                     num_ffi=2 if arch.get("gated_mlp", True) else 1, num_decoder_layers=arch["num_layers"],
                     num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                     head_dim=arch["head_dim"], hidden_act="silu", max_model_len=max(c["T"] + 16, 4096))
    # as GenZ.LLM_inference.utils.get_inference_system builds a System from real values, plus the KV precision
    system = System(Unit(), frequency=1000, flops=gpu["fp16_TFLOPS"], off_chip_mem_size=gpu["memory_GB"] * 1024,
                    offchip_mem_bw=gpu["bw_GBps"], bits="bf16", external_mem_bw=128,
                    interchip_link_bw=gpu["link_GBps"], interchip_link_latency=1, gear_params=gear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = decode_moddeling(model=mc, batch_size=c["B"], input_tokens=c["T"], output_tokens=1, Bb=1,
                               system_name=system, bits="bf16", model_profilling=False)
    # ModdelingOutput is a dict whose class attributes default to 0: read the key, not the attribute
    return float(out["Latency"]) * 1e-3, "; ".join(notes)


PEERS = {"llm-analysis": _llm_analysis, "GenZ": _genz}


def main(argv):
    import os
    import shutil
    import tempfile

    logging.disable(logging.CRITICAL)
    # GenZ writes per-model scratch CSVs under /tmp/genz/data; start clean so stale files cannot be read back
    shutil.rmtree(os.path.join(tempfile.gettempdir(), "genz"), ignore_errors=True)
    inp = json.load(open(argv[1]))
    versions = {}
    for dist in ("llm-analysis", "genz-llm"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = None
    preds = []
    for c in inp["configs"]:
        arch = inp["models"][c["model"]]
        for peer, fn in PEERS.items():
            row = {**c, "peer": peer}
            try:
                step, note = fn(inp["gpu"], arch, c)
                row.update(step_s=step, note=note)
            except Exception as e:  # noqa: BLE001 - a peer failing on one config is data, not a crash
                row.update(step_s=None, note=f"peer error: {type(e).__name__}: {str(e)[:200]}")
            preds.append(row)
    json.dump({"versions": versions, "gpu": inp["gpu"], "predictions": preds}, open(argv[2], "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv)
