"""GPU probe of the v4 candidate (4-bit V in the token_pair / token_octet layouts) against v3 (channel layout).

    python -m kvmodel.kernels.probe_v4 [--out validation/data/h200/decode_attention_probe_v4.jsonl] [--cases d64]

Times P5 4/4 (and 16/4) with the v3 halves V path and with the token_pair and token_octet V paths at the default
block shape of each size and the other one, plus P0 (SDPA FP16) as the baseline, by CUDA-graph replays over
rotated input copies (measure/bench_decode_attention.py's make_cache / time_graph). Opt-in layouts only: no
default changes. token_octet (per 8 tokens and channel one 32-bit word, byte m = token m | token m+4 << 4) is a
full quant.py layout (quantize / append / dequantize / P1); here its cache is the bench's random codes re-packed.
"""

from __future__ import annotations

import argparse
import json
import math

from .quant import to_token_octet  # the layout lives in quant.py (also re-exported for the probe's callers)


CASES = [  # (model, Hq, Hkv, d, B, T, k_bits)
    ("llama-3.1-8b", 32, 8, 128, 32, 32768, 4),
    ("llama-3.1-8b", 32, 8, 128, 16, 131072, 4),
    ("llama-3.1-8b", 32, 8, 128, 1, 4096, 4),
    ("gemma-3-12b", 16, 8, 256, 32, 32768, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 64, 16384, 4),
    ("llama-3.1-8b", 32, 8, 128, 32, 32768, 16),
]


# v8 question (session 4): with the swapped dots and the V fold, is token_octet V now faster at d = 64 too?
CASES_D64 = [
    ("qwen2.5-0.5b", 14, 2, 64, 64, 16384, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 16, 131072, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 128, 32768, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 8, 32768, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 1, 4096, 4),
    ("qwen2.5-0.5b", 14, 2, 64, 64, 16384, 16),
]
CASE_SETS = {"v4": CASES, "d64": CASES_D64}


def main(argv=None):
    import torch

    from measure.bench_decode_attention import L2_BYTES, bytes_moved, cache_bytes, make_cache, time_graph

    from .decode_attention import decode_attention, default_config
    from .pipelines import p0
    from .quant import to_layout, to_token_pair

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--target-s", type=float, default=0.3)
    ap.add_argument("--cases", choices=sorted(CASE_SETS), default="v4",
                    help="v4: the v4 layout question; d64: the same layouts at d = 64 with the current kernel")
    a = ap.parse_args(argv)
    out = open(a.out, "a") if a.out else None
    read_gbps = 4500.0  # the v3 grid's read ceiling (NOTES.md); % columns are relative to it
    for model, Hq, Hkv, d, B, T, kb in CASE_SETS[a.cases]:
        ws = cache_bytes(B, Hkv, T, d, kb, 4)
        n_sets = max(1, min(16, math.ceil(4 * L2_BYTES / ws)))
        base = [make_cache(B, Hkv, T, d, kb, 4, "cuda", gen_seed=i) for i in range(n_sets)]
        base = [type(c)(c.k, to_layout(c.v, "channel"), c.length) for c in base]  # the bench's default may differ
        lay = {"v3": base}
        lay["pair"] = [type(c)(c.k, to_token_pair(c.v), c.length) for c in base]
        lay["octet"] = [type(c)(c.k, to_token_octet(c.v), c.length) for c in base]
        qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        cfg = default_config(kb, 4, d, B, Hkv, T)
        shapes = [(cfg["block_n"], cfg["num_warps"]), (64, 4) if cfg["num_warps"] != 4 else (32, 1 if d <= 128 else 2)]
        fp16 = [make_cache(B, Hkv, T, d, 16, 16, "cuda", gen_seed=i) for i in range(min(n_sets, 4))]
        line = []
        try:
            med = time_graph(lambda i: p0(qs[i], fp16[i % len(fp16)]), n_sets, target_s=a.target_s)[0]
            line.append(f"P0 {med * 1e6:.1f}us")
        except Exception as e:  # noqa: BLE001
            line.append(f"P0 ERR {e}")
        del fp16
        for bn, w in shapes:
            for name, caches in lay.items():
                wss = [dict() for _ in range(n_sets)]
                fn = (lambda i, c=caches, bn=bn, w=w: decode_attention(qs[i], c[i], out=outs[i], workspace=wss[i],
                                                                      block_n=bn, num_warps=w))
                try:
                    med = time_graph(fn, n_sets, target_s=a.target_s)[0]
                except Exception as e:  # noqa: BLE001
                    line.append(f"{name}({bn},{w}) ERR {type(e).__name__}: {str(e)[:60]}")
                    continue
                by = bytes_moved("P5", B, T, Hq, Hkv, d, kb, 4)[0]
                pct = 100 * by / med / 1e9 / read_gbps
                line.append(f"{name}({bn},{w}) {med * 1e6:.1f}us {pct:.0f}%")
                if out:
                    out.write(json.dumps(dict(model=model, B=B, T=T, k_bits=kb, v_bits=4, v_layout=name, block_n=bn,
                                              num_warps=w, median_s=med, bytes=by, pct_read_ceiling=pct)) + "\n")
                    out.flush()
        print(f"PROBE-v4 {model} B={B} T={T} {kb}/4: " + " | ".join(line), flush=True)
        del base, lay, qs, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
