"""Why is P1 (dequantize + SDPA) slower inside the end-to-end step with token_octet V than in the grid? (GPU)

    python -m kvmodel.measure.p1_layout_probe [--out FILE.jsonl]

Times, for Llama-3.1-8B shapes (32/8/128) at B=16 T=16K and B=4 T=32K, with 4-bit V in the channel and the
token_octet layout: the V dequantize kernel, the K dequantize kernel, SDPA on the dequantized buffers, the whole
P1 call — each on a grid-style cache (exactly T tokens) and on an e2e-style cache
(capacity rounded up to 64 tokens, T + 1 attended), by CUDA-graph replay (measure/bench_decode_attention.time_graph).
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from kvmodel.kernels.pipelines import p1
    from kvmodel.kernels.quant import dequantize_fp16, empty_cache
    from kvmodel.measure.bench_decode_attention import time_graph

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = open(a.out, "a") if a.out else None
    Hq, Hkv, d = 32, 8, 128
    for B, T in ((16, 16384), (4, 32768)):
        for layout in ("channel", "token_octet"):
            for style in ("grid", "e2e"):
                cap = T if style == "grid" else -(-(T + 1) // 64) * 64
                L = T if style == "grid" else T + 1
                n = 4
                caches = []
                for i in range(n):
                    c = empty_cache(B, Hkv, cap, d, 4, 4, device="cuda", v_layout=layout)
                    for qt in (c.k, c.v):
                        qt.data.copy_(torch.randint(0, 256, qt.data.shape, dtype=torch.uint8, device="cuda"))
                        qt.scales.uniform_(0.005, 0.02)
                    c.length = L
                    caches.append(c)
                qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n)]
                res = {}
                res["deq_v"] = time_graph(lambda i: dequantize_fp16(caches[i].v, L), n)[0]
                res["deq_k"] = time_graph(lambda i: dequantize_fp16(caches[i].k, L), n)[0]
                kb = [dequantize_fp16(c.k, L) for c in caches]
                vb = [dequantize_fp16(c.v, L) for c in caches]
                res["sdpa"] = time_graph(lambda i: F.scaled_dot_product_attention(
                    qs[i].unsqueeze(2), kb[i], vb[i], enable_gqa=True), n)[0]
                res["p1"] = time_graph(lambda i: p1(qs[i], caches[i]), n)[0]
                line = " ".join(f"{k} {v * 1e6:8.1f}us" for k, v in res.items())
                print(f"B={B} T={T} V {layout:11s} {style:4s} cap={cap}: {line}", flush=True)
                if out:
                    out.write(json.dumps(dict(B=B, T=T, layout=layout, style=style, cap=cap, attended=L,
                                              **{k + "_s": v for k, v in res.items()})) + "\n")
                del caches, kb, vb
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
