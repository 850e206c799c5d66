"""Where a small decode-attention call's time goes: per-kernel GPU durations and the gaps between kernels.

    python -m kvmodel.measure.kernel_timeline --out timeline.jsonl [--cases small]

For each case (model shape, B, T, K/V format, pipeline or P5 variant) the call is captured ``R`` times in a CUDA
graph over rotated inputs (as ``bench_decode_attention.time_graph`` does), the graph is replayed under
``torch.profiler`` (CUPTI records the kernels inside a graph), and the trace's kernel events give, per call:
the kernels launched and each one's mean duration (µs), their sum, and the span per call (first kernel start to
last kernel end over the replay / R) — span − sum is the time the GPU spent between kernels (launch gaps, drains).
The same replay's wall time per call (CUDA events) is reported beside it. One JSON line per case, appended as it is
measured; a table on stdout. A merge launched as a programmatic dependent (``merge="pdl"``) starts while the split
kernel runs and waits on-device, so its duration includes that wait and busy can exceed the span.

Why: at B = 1 the fused kernel moves < 1 MB and its time is latency — launch gaps, the split kernel's own latency
chain and the merge — and which of those dominates decides what to change (NOTES.md, v9: B = 1 T = 4K).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections import defaultdict

from kvmodel.measure.bench_decode_attention import (L2_BYTES, MODELS, PROBE_VARIANTS, cache_bytes, capture_graph, log,
                                                    make_cache, warm_up)

#: (model, B, T, (k_bits, v_bits), [pipelines / P5 variants]); "P0" and "P1" are the torch pipelines.
CASES = {
    "small": [
        ("qwen2.5-0.5b", 1, 4096, (4, 4), ["P0", "dflt", "mk", "a32x1sp64", "a64x4", "sp16", "sp8"]),
        ("qwen2.5-0.5b", 1, 1024, (4, 4), ["P0", "dflt", "mk"]),
        ("qwen2.5-0.5b", 1, 4096, (8, 4), ["dflt"]),
        ("qwen2.5-7b", 1, 4096, (4, 4), ["P0", "dflt", "mk", "a32x1"]),
        ("llama-3.1-8b", 1, 4096, (4, 4), ["P0", "dflt", "mk"]),
        ("llama-3.1-8b", 1, 1024, (4, 4), ["P0", "dflt"]),
        ("gemma-3-12b", 1, 4096, (4, 4), ["P0", "dflt"]),
        ("llama-3.1-8b", 1, 4096, (16, 16), ["dflt"]),
    ],
    "v10": [
        ("qwen2.5-0.5b", 1, 4096, (4, 4), ["P0", "dflt", "mb64", "a32x1sp64", "a32x1sp128"]),
        ("qwen2.5-7b", 1, 4096, (4, 4), ["P0", "dflt", "mb64", "a32x1sp64", "a32x1sp64mk", "sp32"]),
        ("llama-3.1-8b", 1, 4096, (4, 4), ["P0", "dflt", "a32x1sp64"]),
        ("gemma-3-12b", 1, 4096, (4, 4), ["P0", "dflt", "sp64"]),
    ],
    # large launches (session 11): the steady-state v11 grid fits P5 4/4 at d = 128 as ~30 us + bytes / 3.05 TB/s
    # per call on the H100 (302 MB: 74 % of the read ceiling, 4.8 GB: 94 %) with 2,048 programs throughout: is the
    # fixed part the split kernel's or the merge's? Plus block shapes for Gemma (d = 256, 64 % at every size)
    "large": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "fused", "a32x1sp16", "a32x1sp64"]),
        ("llama-3.1-8b", 64, 4096, (4, 4), ["dflt", "fused"]),
        ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt"]),
        ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt"]),
        ("gemma-3-12b", 16, 32768, (4, 4), ["dflt", "a32x4", "a64x4", "a32x1", "nokf"]),
        ("gemma-3-12b", 32, 4096, (4, 4), ["dflt"]),
    ],
}


def _callable(name, qs, caches, fp16, outs, wss):
    from kvmodel.kernels import decode_attention
    from kvmodel.kernels.pipelines import p0, p1

    if name == "P0":
        return lambda i: p0(qs[i], fp16[i % len(fp16)])
    if name == "P1":
        return lambda i: p1(qs[i], caches[i])
    opts = PROBE_VARIANTS[name]
    return lambda i: decode_attention(qs[i], caches[i], out=outs[i], workspace=wss[i], **opts)


def _kernel_events(trace_path: str) -> list[dict]:
    with open(trace_path) as f:
        trace = json.load(f)
    return sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e),
                  key=lambda e: e["ts"])


def timeline(fn, n_sets: int, replays: int = 5, min_graph_s: float = 2e-4) -> dict:
    """Per-call kernel durations (µs), their sum, the per-call span and the replay's wall time per call (µs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    warm_up(fn, n_sets)
    R = n_sets * max(1, math.ceil(min_graph_s / (1e-5 * n_sets)))
    g = capture_graph(fn, n_sets, R)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    walls = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        walls.append(e0.elapsed_time(e1) * 1e3 / R)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        ev = _kernel_events(path)
    finally:
        os.unlink(path)
    del g
    return dict(R=R, wall_us=sorted(walls)[len(walls) // 2], **timeline_stats(ev, replays, R))


def timeline_stats(ev: list[dict], replays: int, R: int) -> dict:
    """Per-call figures from the kernel events (``ts``/``dur`` in µs, sorted by start) of ``replays`` graph
    replays of ``R`` calls each: span (first start to last end of a replay, median over replays, / R), busy (sum of
    kernel durations / calls), kernels per call and per kernel name {per_call, mean_us}."""
    calls = replays * R
    if not ev:
        return dict(kernels={}, note="no kernel events in the trace")
    by_name = defaultdict(list)
    for e in ev:
        by_name[e["name"]].append(e["dur"])
    per_replay = len(ev) // replays  # each replay's kernels are consecutive events
    spans = sorted(ev[(k + 1) * per_replay - 1]["ts"] + ev[(k + 1) * per_replay - 1]["dur"] - ev[k * per_replay]["ts"]
                   for k in range(replays))
    kernels = {n[:90]: dict(per_call=len(d) / calls, mean_us=sum(d) / len(d)) for n, d in by_name.items()}
    busy = sum(sum(d) for d in by_name.values()) / calls
    return dict(span_us=spans[len(spans) // 2] / R, busy_us=busy, kernels_per_call=len(ev) / calls, kernels=kernels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--cases", choices=sorted(CASES), default="small")
    ap.add_argument("--replays", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("kernel_timeline needs torch with CUDA (pip install 'kvmodel[gpu]')", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("kernel_timeline needs a CUDA GPU", file=sys.stderr)
        return 2
    with open(args.out, "a") as out:
        for model, B, T, (kb, vb), names in CASES[args.cases]:
            Hq, Hkv, d = MODELS[model]
            n_sets = max(1, min(64, math.ceil(4 * L2_BYTES / cache_bytes(B, Hkv, T, d, kb, vb))))
            caches = [make_cache(B, Hkv, T, d, kb, vb, "cuda", gen_seed=i) for i in range(n_sets)]
            fp16 = caches if (kb, vb) == (16, 16) else [make_cache(B, Hkv, T, d, 16, 16, "cuda", gen_seed=i)
                                                         for i in range(n_sets)]
            qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
            outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
            wss = [dict() for _ in range(n_sets)]
            for name in names:
                try:
                    r = timeline(_callable(name, qs, caches, fp16, outs, wss), n_sets, replays=args.replays)
                except Exception as e:  # noqa: BLE001
                    log(f"TL {model} B={B} T={T} {kb}/{vb} {name}: ERR {type(e).__name__}: {str(e)[:120]}")
                    continue
                row = dict(model=model, B=B, T=T, k_bits=kb, v_bits=vb, variant=name, **r)
                out.write(json.dumps(row) + "\n")
                out.flush()
                ks = "; ".join(f"{n[:40]} {v['mean_us']:.2f}us x{v['per_call']:.0f}" for n, v in r["kernels"].items())
                log(f"TL {model} B={B} T={T} {kb}/{vb} {name}: wall {r['wall_us']:.2f} span "
                    f"{r.get('span_us', float('nan')):.2f} busy {r.get('busy_us', float('nan')):.2f} us | {ks}")
            del caches, fp16, qs, outs, wss
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
