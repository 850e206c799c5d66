"""Decode-attention grid on one GPU: bandwidth ceilings, then every pipeline × B × T × shape × K/V format.

    python -m kvmodel.measure.bench_decode_attention --out validation/data/h200/decode_attention.csv --resume

1. Ceilings: a streaming-read Triton kernel (a sum) and a torch device copy (read + write counted) over 4 GiB.
2. For each model shape (Llama-3.1-8B 32/8/128, Qwen2.5-7B 28/4/128, Gemma-3-12B 16/8/256, Qwen2.5-0.5B 14/2/64),
   B ∈ {1,4,8,16,32,64,128}, T ∈ {1K,4K,16K,32K,128K} (skipped where the caches don't fit), and K/V formats
   {16/16, 8/8, 4/4, 8/4, 16/4}: P0 (SDPA enable_gqa, FP16), P0-expand (the study's baseline; FP16, where its
   G× copy fits), P1 (Triton dequantize to FP16 buffers + SDPA; quantized formats), P5 (fused split-K; every
   format, 16/16 = FP16 split-K), and ablations on a subset: P5 with num_splits=1 (variant "nosplit") and P5
   without GQA sharing (variant "nogqa").

Timing: each call is captured ``R`` times in a CUDA graph, cycling over enough copies of the inputs that they
span ≥ 4× the L2 (240 MB), and the graph is replayed: first untimed until steady (``WARM_REPLAYS``: the first
replays of a fresh graph can run 10-20 % slow), then timed; a sample is one replay's time / R, the row reports the
median (and p10/p90) of the samples. Rows are appended as they are measured (``kvmodel.measure.results``);
``--resume`` skips rows already in the file. ``bytes_moved`` is ``kvmodel.traffic.attention_layer_bytes``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

MODELS = {  # name: (Hq, Hkv, d)
    "llama-3.1-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "gemma-3-12b": (16, 8, 256),
    "qwen2.5-0.5b": (14, 2, 64),
}
BATCHES = (1, 4, 8, 16, 32, 64, 128)
CONTEXTS = (1024, 4096, 16384, 32768, 131072)
FORMATS = ((16, 16), (8, 8), (4, 4), (8, 4), (16, 4))
GROUP = 32
L2_BYTES = 60 * 2**20
FIELDS = ["pipeline", "variant", "model", "B", "T", "Hq", "Hkv", "d", "k_bits", "v_bits", "group", "num_splits",
          "gqa_shared", "median_s", "p10_s", "p90_s", "n_samples", "calls_per_sample", "bytes_moved",
          "achieved_GBps", "read_ceiling_GBps", "copy_ceiling_GBps", "pct_read_ceiling", "working_sets",
          "bytes_source"]
KEY = ["pipeline", "variant", "model", "B", "T", "Hq", "Hkv", "d", "k_bits", "v_bits", "group"]


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ ceilings
def _sum_kernel_factory():
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(X, Out, n_per_prog, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        base = X + pid * n_per_prog
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_per_prog, BLOCK):
            acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(Out + pid, tl.sum(acc, 0))

    return _sum_kernel


def measure_ceilings(nbytes: int = 4 * 2**30) -> dict:
    import torch
    import triton

    kern = _sum_kernel_factory()
    x = torch.randn(nbytes // 2, dtype=torch.float16, device="cuda")
    res = {}
    best = None
    for progs, block, warps in ((132 * 8, 4096, 8), (132 * 16, 2048, 4), (132 * 4, 8192, 8)):
        n_per = x.numel() // progs // block * block
        out = torch.empty(progs, dtype=torch.float32, device="cuda")
        fn = lambda: kern[(progs,)](x, out, n_per, BLOCK=block, num_warps=warps)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        ref = x[: progs * n_per].view(progs, n_per).float().sum(1)
        assert torch.allclose(out, ref, rtol=1e-2, atol=1.0), "sum kernel wrong"
        t = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
        gbps = progs * n_per * 2 / t / 1e9
        log(f"  read probe progs={progs} block={block} warps={warps}: {gbps:.0f} GB/s")
        if best is None or gbps > best:
            best = gbps
    res["read_GBps"] = best
    y = torch.empty_like(x)
    t = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") * 1e-3
    res["copy_GBps"] = 2 * nbytes / t / 1e9
    del x, y
    torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------------ inputs
def make_cache(B, Hkv, T, d, kb, vb, device, gen_seed=0):
    """A cache with random content at realistic magnitudes (codes uniform, scales ~ N(0,1) absmax / qmax), V in its
    default layout (:func:`kvmodel.kernels.quant.default_v_layout`)."""
    import torch

    from kvmodel.kernels.quant import QuantizedKVCache, QuantizedTensor, data_rows, default_v_layout, packed_dim

    def one(bits, layout="channel"):
        if bits == 16:
            data = torch.randn(B, Hkv, T, d, dtype=torch.float16, device=device)
            return QuantizedTensor(data, None, None, 16, GROUP, False, d)
        rows = data_rows(T, layout, bits)
        data = torch.randint(0, 256, (B, Hkv, rows, packed_dim(d, bits, layout)), dtype=torch.uint8, device=device)
        qmax = 2 ** (bits - 1) - 1
        scales = torch.empty(B, Hkv, T, d // GROUP, dtype=torch.float16, device=device).uniform_(2.0 / qmax,
                                                                                                 3.0 / qmax)
        return QuantizedTensor(data, scales, None, bits, GROUP, False, d, layout)

    # V in the layout caches are allocated in by default (token_octet for 4-bit V, kernel v8; v4-v7: at d >= 128)
    return QuantizedKVCache(one(kb), one(vb, default_v_layout(vb, d)), T)


def cache_bytes(B, Hkv, T, d, kb, vb):
    def one(bits):
        return B * Hkv * T * (2 * d if bits == 16 else d * bits // 8 + (d // GROUP) * 2)

    return one(kb) + one(vb)


# ------------------------------------------------------------------------------------------------ bytes
def bytes_moved(pipe, B, T, Hq, Hkv, d, kb, vb):
    """``kvmodel.traffic.attention_layer_bytes`` (the model's count); where the analytic core cannot be imported
    (no pydantic on the GPU machine) a stand-in with the same definition, marked 'fallback' — rerun
    ``--fill-bytes`` where kvmodel imports to replace those values."""
    try:
        from kvmodel.traffic import attention_layer_bytes

        return float(attention_layer_bytes(pipe, B, T, Hq, Hkv, d, kb, vb, GROUP, asymmetric=False)), "traffic"
    except ImportError:
        pass
    qo = 2 * B * Hq * d * 2
    fp16 = B * T * Hkv * d * 2 * 2
    quant = cache_bytes(B, Hkv, T, d, kb, vb)
    if pipe == "P0":
        return float(qo + fp16), "fallback"
    if pipe == "P0-expand":
        G = Hq // Hkv
        return float(qo + fp16 + 2 * G * fp16), "fallback"
    if pipe == "P1":
        # the FP16 buffer holds only the halves stored below 16 bits (a 16-bit half is read from the cache),
        # as kvmodel.symbolic's attn_bytes_P1
        buf = B * T * Hkv * d * 2 * ((kb < 16) + (vb < 16))
        return float(qo + quant + 2 * buf), "fallback"
    return float(qo + quant), "fallback"


def fill_bytes(path):
    """Recompute bytes_moved / achieved_GBps / pct_read_ceiling of every row with kvmodel.traffic."""
    import csv

    from kvmodel.measure.results import atomic_write_text
    from kvmodel.traffic import attention_layer_bytes

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return 0
    fields = list(rows[0].keys())
    for r in rows:
        if not r["pipeline"].startswith("P"):
            continue
        b = float(attention_layer_bytes(r["pipeline"], int(r["B"]), int(r["T"]), int(r["Hq"]), int(r["Hkv"]),
                                        int(r["d"]), int(r["k_bits"]), int(r["v_bits"]), int(r["group"]),
                                        asymmetric=False))
        gbps = b / float(r["median_s"]) / 1e9
        r["bytes_moved"] = str(int(b))
        r["achieved_GBps"] = f"{gbps:.1f}"
        r["pct_read_ceiling"] = f"{100 * gbps / float(r['read_ceiling_GBps']):.1f}"
        if "bytes_source" in r:
            r["bytes_source"] = "traffic"
    buf = __import__("io").StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return len(rows)


# ------------------------------------------------------------------------------------------------ timing
def warm_up(fn, n_sets):
    """Run fn(i) on a side stream for the first working sets (compiles, allocates workspaces before a capture)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(n_sets, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()


def capture_graph(fn, n_sets, R):
    """A CUDA graph of R calls fn(r % n_sets), cycling over the working sets."""
    import torch

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(R):
            fn(r % n_sets)
    return g


#: Steady-state warm-up of :func:`time_graph`: replays run untimed before the samples, at least WARM_REPLAYS and
#: WARM_S seconds of them, at most MAX_WARM_S. Why: on the H100 the first 13-24 one-call replays of a fresh graph
#: ran 10-20 % slower than the rest (probe v11bi, `validation/data/h100/decode_attention_probe_v11bi.*`: Llama-3.1-8B
#: B=16 T=128K 4/4 950-970 us, then 815-825 us for good; B=32 T=128K 1890-1930, then 1605-1625; P0 FP16 Qwen2.5-7B
#: B=64 T=32K 1595, then 1340), while the same calls replayed 8 ms at a time were steady at the fast time. Grids
#: timed without it (kernel v11 and earlier) report the slow phase as their median where a row has fewer samples
#: than that phase.
WARM_REPLAYS = 30
WARM_S = 0.03
MAX_WARM_S = 0.3


def warm_replay_count(replay_s: float, warm_replays: int = WARM_REPLAYS, warm_s: float = WARM_S,
                      max_warm_s: float = MAX_WARM_S) -> int:
    """Untimed replays (of ``replay_s`` seconds each) before the samples: at least ``warm_replays`` and ``warm_s``
    seconds of them, but no more than ``max_warm_s`` seconds (at least one); 0 when both minimums are 0."""
    if not warm_replays and not warm_s:
        return 0
    replay_s = max(replay_s, 1e-9)
    return min(max(warm_replays, math.ceil(warm_s / replay_s)), max(1, math.ceil(max_warm_s / replay_s)))


def time_graph(fn, n_sets, target_s=0.05, min_graph_s=2e-4, max_samples=30, min_samples=3, samples_out=None,
               warm_replays=WARM_REPLAYS, warm_s=WARM_S, max_warm_s=MAX_WARM_S):
    """Median/p10/p90 seconds per call of fn(i) (i = working set), from CUDA-graph replays in steady state (after
    the untimed warm-up replays above). ``samples_out``: a list that receives every sample (seconds per call, in
    replay order)."""
    import torch

    warm_up(fn, n_sets)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn(0)
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) * 1e-3, 2e-6)
    reps = max(1, math.ceil(min_graph_s / (est * n_sets)))
    R = n_sets * reps
    g = capture_graph(fn, n_sets, R)
    g.replay()
    torch.cuda.synchronize()
    for _ in range(warm_replay_count(est * R, warm_replays, warm_s, max_warm_s)):
        g.replay()
    torch.cuda.synchronize()
    n = int(min(max_samples, max(min_samples, math.ceil(target_s / (est * R)))))
    samples = []
    for _ in range(n):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1e-3 / R)
    del g
    if samples_out is not None:
        samples_out.extend(samples)
    samples.sort()

    def q(p):
        return samples[min(len(samples) - 1, int(round(p * (len(samples) - 1))))]

    return q(0.5), q(0.1), q(0.9), len(samples), R


# ------------------------------------------------------------------------------------------------ precompile
def _precompile_worker(spec):
    import torch

    from kvmodel.kernels import decode_attention
    from kvmodel.kernels.pipelines import p1

    Hq, Hkv, d, kb, vb, variant = spec
    try:
        c = make_cache(2, Hkv, 256, d, kb, vb, "cuda")
        q = torch.randn(2, Hq, d, dtype=torch.float16, device="cuda")
        if variant == "P1":
            p1(q, c)
        else:
            from kvmodel.kernels.decode_attention import LARGE_WORK, default_config

            heads = Hkv if variant != "nogqa" else Hq
            cfgs = {tuple(default_config(kb, vb, d, 1, heads, t)[k] for k in ("block_n", "num_warps", "num_stages"))
                    for t in (1, LARGE_WORK)}  # the small- and the large-launch block shapes
            for bn, nw, ns_ in cfgs:
                for ns in (1, 2):
                    decode_attention(q, c, num_splits=ns, gqa_shared=(variant != "nogqa"), block_n=bn,
                                     num_warps=nw, num_stages=ns_)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{spec}: {type(e).__name__}: {e}"


def precompile(models, formats, procs=12):
    import multiprocessing as mp

    specs = []
    for m in models:
        Hq, Hkv, d = MODELS[m]
        for kb, vb in formats:
            specs.append((Hq, Hkv, d, kb, vb, "P5"))
            if (kb, vb) != (16, 16):
                specs.append((Hq, Hkv, d, kb, vb, "P1"))
            if (kb, vb) in ((4, 4), (16, 16)):
                specs.append((Hq, Hkv, d, kb, vb, "nogqa"))
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(procs, len(specs))) as pool:
        errs = [e for e in pool.map(_precompile_worker, specs) if e]
    log(f"precompiled {len(specs)} kernel sets in {time.time() - t0:.1f}s; errors: {errs[:3]}")


# ------------------------------------------------------------------------------------------------ grid
def ablation(model, B, T):
    """The subset that gets the nosplit / nogqa rows."""
    return model in ("llama-3.1-8b", "qwen2.5-7b") and B in (1, 8, 64) and T in (4096, 32768)


def run_grid(args, rf, ceil):
    import torch

    from kvmodel.kernels import decode_attention
    from kvmodel.kernels.pipelines import p0, p0_expand, p1
    done = rf.done_keys() if args.resume else set()
    free, total = torch.cuda.mem_get_info()
    budget = args.mem_fraction * total
    t_start = time.time()
    p5_opts = {}
    if args.p5_config:
        vals = [int(x) for x in args.p5_config.split(",")]
        p5_opts = dict(block_n=vals[0], num_warps=vals[1], num_stages=vals[2])
        if len(vals) > 3:
            p5_opts["v_full"] = bool(vals[3])
    n_rows = 0
    for T in args.contexts:  # contexts outermost: the order given on the command line is the priority
        for model in args.models:
            Hq, Hkv, d = MODELS[model]
            for B in args.batches:
                for kb, vb in args.formats:
                    if time.time() - t_start > args.max_seconds:
                        log(f"time budget ({args.max_seconds}s) reached: stopping; rerun with --resume")
                        return n_rows
                    pipes = [("P5", "default")]
                    if (kb, vb) == (16, 16):
                        pipes = [("P0", "default"), ("P0-expand", "default")] + pipes
                    else:
                        pipes = [("P1", "default")] + pipes
                    if ablation(model, B, T) and (kb, vb) in ((4, 4), (16, 16)):
                        pipes += [("P5", "nosplit"), ("P5", "nogqa")]
                    base = dict(model=model, B=B, T=T, Hq=Hq, Hkv=Hkv, d=d, k_bits=kb, v_bits=vb, group=GROUP)
                    todo = [(p, v) for p, v in pipes if rf.key_of(dict(base, pipeline=p, variant=v)) not in done]
                    if not todo:
                        continue
                    ws = cache_bytes(B, Hkv, T, d, kb, vb)
                    fp16_ws = cache_bytes(B, Hkv, T, d, 16, 16)
                    if ws + (fp16_ws if (kb, vb) != (16, 16) else 0) > budget:
                        log(f"skip {model} B={B} T={T} {kb}/{vb}: {ws / 1e9:.1f} GB does not fit")
                        continue
                    n_sets = max(1, min(args.max_sets, math.ceil(4 * L2_BYTES / ws)))
                    try:
                        caches = [make_cache(B, Hkv, T, d, kb, vb, "cuda") for _ in range(n_sets)]
                        qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
                    except torch.OutOfMemoryError:
                        log(f"skip {model} B={B} T={T} {kb}/{vb}: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
                    wss = [dict() for _ in range(n_sets)]
                    for pipe, variant in todo:
                        extra = {}
                        if pipe == "P0":
                            fn = lambda i: p0(qs[i], caches[i])  # noqa: E731
                        elif pipe == "P0-expand":
                            if ws * (Hq // Hkv + 1) > budget:
                                log(f"skip P0-expand {model} B={B} T={T}: expanded copy does not fit")
                                continue
                            fn = lambda i: p0_expand(qs[i], caches[i])  # noqa: E731
                        elif pipe == "P1":
                            fn = lambda i: p1(qs[i], caches[i])  # noqa: E731
                        else:
                            opts = dict(p5_opts)
                            if variant == "nosplit":
                                opts["num_splits"] = 1
                            if variant == "nogqa":
                                opts["gqa_shared"] = False
                            fn = lambda i, o=opts: decode_attention(qs[i], caches[i], out=outs[i],  # noqa: E731
                                                                    workspace=wss[i], **o)
                            from kvmodel.kernels.decode_attention import num_sms, plan_num_splits

                            heads = Hkv if opts.get("gqa_shared", True) else Hq
                            rule = {k: opts[k] for k in ("block_n", "num_warps", "min_tiles_per_split", "max_splits",
                                                         "short_split_programs_per_sm") if k in opts}
                            # the splits the launcher launches (kernel v10's grid recorded v9's rule here)
                            extra["num_splits"] = opts.get("num_splits") or plan_num_splits(
                                kb, vb, d, B, heads, T, num_sms(torch.device("cuda")), **rule)
                            extra["gqa_shared"] = opts.get("gqa_shared", True)
                        try:
                            med, p10, p90, n, R = time_graph(fn, n_sets, target_s=args.target_s)
                        except torch.OutOfMemoryError:
                            log(f"skip {pipe}/{variant} {model} B={B} T={T} {kb}/{vb}: out of memory")
                            torch.cuda.empty_cache()
                            continue
                        nbytes, source = bytes_moved(pipe, B, T, Hq, Hkv, d, kb, vb)
                        gbps = nbytes / med / 1e9
                        row = dict(base, pipeline=pipe, variant=variant, median_s=med, p10_s=p10, p90_s=p90,
                                   n_samples=n, calls_per_sample=R, bytes_moved=int(nbytes), bytes_source=source,
                                   achieved_GBps=round(gbps, 1), read_ceiling_GBps=round(ceil["read_GBps"], 1),
                                   copy_ceiling_GBps=round(ceil["copy_GBps"], 1),
                                   pct_read_ceiling=round(100 * gbps / ceil["read_GBps"], 1), working_sets=n_sets,
                                   num_splits=extra.get("num_splits", ""), gqa_shared=extra.get("gqa_shared", ""))
                        rf.append(row)
                        n_rows += 1
                        log(f"{model:13s} B={B:3d} T={T:6d} {kb:2d}/{vb:2d} {pipe:9s} {variant:7s} "
                            f"{med * 1e6:9.1f} us  {gbps:7.0f} GB/s ({row['pct_read_ceiling']:5.1f}%)"
                            f"  [{time.time() - t_start:5.0f}s]")
                    del caches, qs, outs, wss
                    torch.cuda.empty_cache()
    return n_rows


# P5 variants the probe compares: name -> decode_attention options ("v1" = the synchronous scale loads of v1/v2;
# "dflt" = the built-in defaults; "mk" = a separate merge launch as in v3; "r128" = maxnreg 128; "sN" = N splits)
PROBE_VARIANTS = {
    "v1": dict(block_n=64, num_warps=4, num_stages=3, async_scales=False, k_full=False, v_full=False,
               merge="kernel"),
    "dflt": dict(),
    "mk": dict(merge="kernel"),
    "a64x4": dict(block_n=64, num_warps=4, num_stages=3),
    "a64x4mk": dict(block_n=64, num_warps=4, num_stages=3, merge="kernel"),
    "a64x4s4": dict(block_n=64, num_warps=4, num_stages=4),
    "a128x4": dict(block_n=128, num_warps=4, num_stages=3),
    "a64x2": dict(block_n=64, num_warps=2, num_stages=3),
    "a32x2": dict(block_n=32, num_warps=2, num_stages=3),
    "a32x1": dict(block_n=32, num_warps=1, num_stages=3),
    "a32x1mk": dict(block_n=32, num_warps=1, num_stages=3, merge="kernel"),
    "a32x1st2": dict(block_n=32, num_warps=1, num_stages=2),
    "a32x1st4": dict(block_n=32, num_warps=1, num_stages=4),
    "a32x1r128": dict(block_n=32, num_warps=1, num_stages=3, maxnreg=128),
    "a32x1r128st2": dict(block_n=32, num_warps=1, num_stages=2, maxnreg=128),
    "a32x4": dict(block_n=32, num_warps=4, num_stages=3),
    "a64x4sp32": dict(block_n=64, num_warps=4, num_stages=3, num_splits=32),
    "a32x4sp32": dict(block_n=32, num_warps=4, num_stages=3, num_splits=32),
    "a32x4sp64": dict(block_n=32, num_warps=4, num_stages=3, num_splits=64),
    "a32x1sp64": dict(block_n=32, num_warps=1, num_stages=3, num_splits=64),
}
# explicit split counts (spN = N splits): v5's first question was what kernel v4's split rule launched where the
# resource-derived rule differed (6, 9, 12, 17, 24); its second, whether more programs than the rule launches help
# the issue-bound 1-warp programs (the rest)
for _n in (4, 6, 8, 9, 12, 16, 17, 24, 48, 64, 96):
    PROBE_VARIANTS[f"sp{_n}"] = dict(num_splits=_n)
# synchronous scale loads (runtime scale stride): how v4's 8-bit paths loaded their scales
PROBE_VARIANTS["sync"] = dict(async_scales=False)
# (model, B, T, (kb, vb), variants); P0 is timed beside every case (P1 too for quantized ones).
# v5, first probe (decode_attention_probe_v5.jsonl, run with an intermediate rule): the split rule's programs per SM
# (dflt vs the v4 rule's split count), the 8-bit paths' asynchronous scale loads (dflt vs "sync"), and the 1-warp
# 32-token shape for 8-bit parts. The v4 probe's cases are in git history (decode_attention_probe_v4.jsonl).
_PROBE_V5A = [
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "sp6"]),
    ("llama-3.1-8b", 128, 32768, (4, 4), ["dflt", "sp17"]),
    ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "sp24"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dflt", "sp12"]),
    ("llama-3.1-8b", 32, 32768, (16, 4), ["dflt", "sp9"]),
    ("llama-3.1-8b", 32, 32768, (8, 8), ["dflt", "sync", "a32x1", "a32x2"]),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "sync", "a32x1"]),
    ("gemma-3-12b", 32, 32768, (8, 8), ["dflt", "sync", "a32x2"]),
    ("qwen2.5-0.5b", 64, 16384, (8, 8), ["dflt", "sync", "a32x1"]),
    ("llama-3.1-8b", 1, 4096, (8, 8), ["dflt", "sync"]),
]
# v5, second probe (decode_attention_probe_v5b.jsonl, run with the rule-12 kernel as dflt): more splits than the
# rule picks
_PROBE_V5B = [
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "sp8", "sp12", "sp16"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "sp48", "sp64"]),
    ("qwen2.5-7b", 32, 32768, (4, 4), ["dflt", "sp16", "sp24"]),
    ("llama-3.1-8b", 4, 32768, (4, 4), ["dflt", "sp64", "sp96"]),
    ("gemma-3-12b", 32, 32768, (4, 4), ["dflt", "sp4", "sp8"]),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "sp4", "sp6", "sp8"]),
    ("llama-3.1-8b", 32, 32768, (8, 8), ["dflt", "sp4", "sp6"]),
    ("llama-3.1-8b", 16, 131072, (8, 4), ["dflt", "sp12", "sp24"]),
    ("qwen2.5-0.5b", 64, 16384, (8, 8), ["dflt", "sp8", "sp16"]),
]
# v6 (swapped mma operands: tokens on M, the query rows on N): "nosw" is the v5 kernel's dot orientation at the
# same block shape and split count; swNN = swapped with NN splits (the swapped 1-warp programs use ~128 registers,
# so 16 fit on an SM where v5's 4/4 fitted 11)
PROBE_VARIANTS["nosw"] = dict(swap=False)
for _n in (8, 16, 24, 32, 48, 64, 96, 128):
    PROBE_VARIANTS[f"sw{_n}"] = dict(swap=True, num_splits=_n)
PROBE_VARIANTS["sw32x1"] = dict(swap=True, block_n=32, num_warps=1, num_stages=3)
PROBE_VARIANTS["sw32x1st4"] = dict(swap=True, block_n=32, num_warps=1, num_stages=4)
PROBE_VARIANTS["sw64x1"] = dict(swap=True, block_n=64, num_warps=1, num_stages=3)
PROBE_VARIANTS["sw64x2"] = dict(swap=True, block_n=64, num_warps=2, num_stages=3)
_PROBE_V6 = [
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "nosw", "sw32", "sw48", "sw64x1", "sw32x1st4"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "nosw", "sw64", "sw96"]),
    ("qwen2.5-7b", 32, 32768, (4, 4), ["dflt", "nosw", "sw32", "sw48"]),
    ("gemma-3-12b", 32, 32768, (4, 4), ["dflt", "nosw", "sw8", "sw16", "sw64x2"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dflt", "nosw", "sw16", "sw24"]),
    ("llama-3.1-8b", 4, 32768, (4, 4), ["dflt", "nosw", "sw96", "sw128"]),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "nosw", "sw16"]),
    ("llama-3.1-8b", 32, 32768, (8, 8), ["dflt", "nosw", "sw16"]),
    ("llama-3.1-8b", 32, 32768, (16, 4), ["dflt", "nosw", "sw16"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "nosw", "sw16", "sw32x1", "sw32"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "nosw", "sw16", "sw32x1", "sw32"]),
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "nosw", "sw16", "sw32x1", "sw32"]),
    ("gemma-3-12b", 1, 4096, (4, 4), ["dflt", "nosw", "sw16", "sw32"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "nosw", "sw32x1"]),
]
# v7 candidate (V fold: with the swapped dots and a symmetric 4-bit token_octet V, V's group scales multiply the
# P tile per group, one batched dot over the groups): "novf" = v6 (the V tile dequantized), same shape and splits
PROBE_VARIANTS["novf"] = dict(v_fold=False)
PROBE_VARIANTS["a64x2sp8"] = dict(block_n=64, num_warps=2, num_stages=3, num_splits=8)
PROBE_VARIANTS["a64x2sp16"] = dict(block_n=64, num_warps=2, num_stages=3, num_splits=16)
_PROBE_V7 = [
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "novf", "sp24", "sp48"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "novf"]),
    ("qwen2.5-7b", 32, 32768, (4, 4), ["dflt", "novf"]),
    ("qwen2.5-7b", 16, 131072, (4, 4), ["dflt", "novf"]),
    ("gemma-3-12b", 32, 32768, (4, 4), ["dflt", "novf", "a64x2", "a64x2sp8", "a64x2sp16"]),
    ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "novf", "a64x2"]),
    ("llama-3.1-8b", 4, 32768, (4, 4), ["dflt", "novf"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "novf"]),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "novf"]),
    ("llama-3.1-8b", 32, 32768, (16, 4), ["dflt", "novf"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "novf"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "novf"]),
    ("gemma-3-12b", 1, 4096, (4, 4), ["dflt", "novf"]),
]
# programmatic dependent launch of the split merge (merge="pdl"): the launch gap between the split kernel and
# its merge, which dominates small calls (B = 1, T = 4K: ~10 us of latency for ~1 us of bytes)
PROBE_VARIANTS["pdl"] = dict(merge="pdl")
PROBE_VARIANTS["pdlsw32x1"] = dict(merge="pdl", block_n=32, num_warps=1, num_stages=3)
_PROBE_PDL = [
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "pdl", "pdlsw32x1"]),
    ("gemma-3-12b", 1, 4096, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 1, 4096, (16, 16), ["dflt", "pdl"]),
    ("llama-3.1-8b", 1, 32768, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 4, 16384, (8, 8), ["dflt", "pdl"]),
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "pdl"]),
]
# v8 candidates (4-bit V in the token_octet layout at d = 64 too, so "dflt" at d = 64 is octet + swapped dots + V
# fold): the programs per SM the split rule should assume at d = 64 (80 registers: up to 24), a register cap
# that lets more 1-warp programs reside at d = 128 (rNNNspS = maxnreg NNN with S splits, the count the split rule
# picks for 18 / 20 programs per SM), the 1-warp shape and the PDL merge for small launches, and which batch sizes
# the PDL merge wins at
PROBE_VARIANTS["vf"] = dict(v_fold=True)
for _r, _s in ((112, 9), (96, 10), (112, 37), (96, 41)):
    PROBE_VARIANTS[f"r{_r}sp{_s}"] = dict(maxnreg=_r, num_splits=_s)
for _n in (10, 20, 37, 41, 82, 98):
    PROBE_VARIANTS[f"sp{_n}"] = dict(num_splits=_n)
_PROBE_V8 = [
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "sp9", "r112sp9", "sp10", "r96sp10"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "r112sp37", "r96sp41"]),
    ("qwen2.5-7b", 16, 131072, (4, 4), ["dflt", "r112sp37", "r96sp41"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dflt", "sp20", "sp24"]),
    ("qwen2.5-0.5b", 16, 131072, (4, 4), ["dflt", "sp82", "sp98"]),
    ("qwen2.5-0.5b", 64, 16384, (16, 4), ["dflt"]),
    ("qwen2.5-0.5b", 64, 16384, (8, 4), ["dflt", "vf"]),
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "a32x1", "pdl", "pdlsw32x1"]),
    ("qwen2.5-0.5b", 4, 4096, (4, 4), ["dflt", "a32x1", "pdl", "pdlsw32x1"]),
    ("qwen2.5-0.5b", 1, 16384, (4, 4), ["dflt", "a32x1", "pdl", "pdlsw32x1"]),
    ("qwen2.5-0.5b", 16, 4096, (4, 4), ["dflt", "a32x1", "pdl", "pdlsw32x1"]),
    ("qwen2.5-0.5b", 4, 32768, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-0.5b", 1, 1024, (8, 8), ["dflt", "a32x1", "pdl"]),
    ("llama-3.1-8b", 1, 1024, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 2, 4096, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 4, 4096, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 4, 16384, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 1, 1024, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 2, 4096, (4, 4), ["dflt", "pdl"]),
    ("qwen2.5-7b", 1, 4096, (8, 8), ["dflt", "pdl"]),
    ("qwen2.5-7b", 1, 131072, (8, 8), ["dflt", "pdl"]),
    ("gemma-3-12b", 2, 4096, (4, 4), ["dflt", "pdl"]),
    ("llama-3.1-8b", 1, 1024, (16, 16), ["dflt", "pdl"]),
]
# v8, second probe: the B = 1 latency chain at T = 4K / 16K (more splits with the PDL merge, the fused merge with the
# 1-warp shape, fewer pipeline stages)
PROBE_VARIANTS["fsw32x1"] = dict(merge="fused", block_n=32, num_warps=1, num_stages=3)
PROBE_VARIANTS["pdlsw32x1st2"] = dict(merge="pdl", block_n=32, num_warps=1, num_stages=2)
PROBE_VARIANTS["fused"] = dict(merge="fused")
for _n in (32, 64, 128):
    PROBE_VARIANTS[f"pdlsp{_n}"] = dict(merge="pdl", num_splits=_n)
    PROBE_VARIANTS[f"pdlsw32x1sp{_n}"] = dict(merge="pdl", block_n=32, num_warps=1, num_stages=3, num_splits=_n)
_PROBE_V8B = [
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["a32x1", "pdlsw32x1", "pdlsw32x1sp64", "pdlsw32x1sp128", "fsw32x1",
                                       "pdlsw32x1st2"]),
    ("qwen2.5-0.5b", 1, 16384, (4, 4), ["a32x1", "pdlsw32x1", "pdlsw32x1sp64", "pdlsw32x1sp128", "fsw32x1"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["pdl", "pdlsp32", "pdlsp64", "fused"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["pdl", "pdlsp32", "fused"]),
    ("qwen2.5-7b", 1, 16384, (4, 4), ["pdl", "pdlsp32", "pdlsp64"]),
]
# v9 (K fold: symmetric 4-bit K's group scales on the score tile, one batched dot over the groups on the raw codes):
# the throughput cases (where the 1-/2-warp 32-token shapes run) and small launches with the fold on the 1-warp
# shape (the 4-warp shape's loop gets longer with the fold: 474 -> 596 instructions offline)
PROBE_VARIANTS["kf"] = dict(k_fold=True)
PROBE_VARIANTS["kfa32x1"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=3)
PROBE_VARIANTS["kfpdla32x1"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=3, merge="pdl")
for _n in (12, 24, 48):
    PROBE_VARIANTS[f"kfsp{_n}"] = dict(k_fold=True, num_splits=_n)
_PROBE_V9KF = [
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "kf", "kfsp12", "kfsp24"]),
    ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "kf"]),
    ("qwen2.5-7b", 16, 131072, (4, 4), ["dflt", "kf", "kfsp24", "kfsp48"]),
    ("qwen2.5-7b", 32, 32768, (4, 4), ["dflt", "kf"]),
    ("gemma-3-12b", 32, 32768, (4, 4), ["dflt", "kf"]),
    ("gemma-3-12b", 4, 131072, (4, 4), ["dflt", "kf"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dflt", "kf"]),
    ("qwen2.5-0.5b", 16, 131072, (4, 4), ["dflt", "kf"]),
    ("llama-3.1-8b", 32, 32768, (4, 16), ["dflt", "kf"]),
    ("llama-3.1-8b", 32, 32768, (4, 8), ["dflt", "kf"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "kf"]),
    ("llama-3.1-8b", 4, 16384, (4, 4), ["dflt", "kf"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "a32x1", "kfa32x1", "kfpdla32x1"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "kfa32x1", "kfpdla32x1"]),
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "kf", "kfpdla32x1"]),
    ("qwen2.5-0.5b", 4, 4096, (4, 4), ["dflt", "kf"]),
    ("qwen2.5-0.5b", 1, 1024, (4, 4), ["dflt", "kf"]),
]
# v9, repeat: the K fold on and off alternately at the d = 128 long-context cases, each case three times on fresh
# allocations (the v9 grid's medians there sat at the v8 time with p10 at the probe's K-fold time)
PROBE_VARIANTS["nokf"] = dict(k_fold=False)
_PROBE_V9REP = 3 * [
    ("llama-3.1-8b", 16, 131072, (4, 4), ["nokf", "dflt"]),
    ("qwen2.5-7b", 16, 131072, (4, 4), ["nokf", "dflt"]),
    ("llama-3.1-8b", 8, 131072, (4, 4), ["nokf", "dflt"]),
    ("gemma-3-12b", 4, 131072, (4, 4), ["nokf", "dflt"]),
]
# v10 candidate (small launches): the merge reads every split in one round (merge_block_s=64: merge_shape caps it at
# MERGE_MAX_ELEMS / d), which should make more splits pay at B = 1 (v8b measured 64 / 128 splits slower with kernel
# v9's rounds of 16). "mb64" = the default block shape and split count with the one-round merge, "mb16" = v9's
# merge; spN / a32x1spN / a64x4spN / a32x2spN: N splits (the default / 1-warp 32-token / 4-warp 64-token / 2-warp
# 32-token shape) with the one-round merge; ...mb16: v9's merge; ...mk: separate (not PDL) merge
PROBE_VARIANTS["mb16"] = dict(merge_block_s=16)
PROBE_VARIANTS["mb64"] = dict(merge_block_s=64)
for _n in (16, 32, 64, 128):
    _one = dict(num_splits=_n, merge_block_s=64)
    PROBE_VARIANTS[f"sp{_n}"] = dict(_one)
    PROBE_VARIANTS[f"a32x1sp{_n}"] = dict(block_n=32, num_warps=1, num_stages=3, **_one)
    PROBE_VARIANTS[f"a32x1sp{_n}mk"] = dict(block_n=32, num_warps=1, num_stages=3, merge="kernel", **_one)
    PROBE_VARIANTS[f"a32x1sp{_n}mb16"] = dict(block_n=32, num_warps=1, num_stages=3, num_splits=_n,
                                              merge_block_s=16)
    PROBE_VARIANTS[f"a64x4sp{_n}"] = dict(block_n=64, num_warps=4, num_stages=3, **_one)
    PROBE_VARIANTS[f"a32x2sp{_n}"] = dict(block_n=32, num_warps=2, num_stages=3, **_one)
_PROBE_V10 = [
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "mb64", "a32x1sp64", "a32x1sp64mb16", "a32x1sp128", "a32x1sp64mk"]),
    ("qwen2.5-0.5b", 1, 1024, (4, 4), ["dflt", "a32x1sp32", "a32x1sp16"]),
    ("qwen2.5-0.5b", 1, 16384, (4, 4), ["dflt", "a32x1sp64", "a32x1sp128"]),
    ("qwen2.5-0.5b", 4, 4096, (4, 4), ["dflt", "a32x1sp32", "a32x1sp64"]),
    ("qwen2.5-0.5b", 1, 4096, (8, 8), ["dflt", "a32x1sp64", "a32x1sp128"]),
    ("qwen2.5-0.5b", 1, 4096, (16, 16), ["dflt", "sp32", "sp64"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "mb64", "sp32", "sp64", "a32x1sp32", "a32x1sp64", "a32x1sp128",
                                     "a32x1sp64mk"]),
    ("qwen2.5-7b", 1, 1024, (4, 4), ["dflt", "a32x1sp32", "sp16"]),
    ("qwen2.5-7b", 1, 16384, (4, 4), ["dflt", "sp32", "sp64", "a32x1sp64", "a32x1sp128"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "sp32", "a32x1sp32", "a32x1sp64", "a32x1sp64mk"]),
    ("llama-3.1-8b", 1, 1024, (4, 4), ["dflt", "a32x1sp16", "a32x1sp32"]),
    ("llama-3.1-8b", 1, 32768, (4, 4), ["dflt", "sp64", "sp128", "a32x1sp128"]),
    ("llama-3.1-8b", 4, 4096, (4, 4), ["dflt", "sp32", "a32x1sp32"]),
    ("llama-3.1-8b", 1, 4096, (8, 8), ["dflt", "sp32", "a32x1sp64"]),
    ("llama-3.1-8b", 1, 4096, (16, 16), ["dflt", "sp32", "sp64"]),
    ("gemma-3-12b", 1, 4096, (4, 4), ["dflt", "sp32", "sp64", "a32x2sp32", "a32x2sp64"]),
    ("gemma-3-12b", 1, 1024, (4, 4), ["dflt", "sp16", "a32x2sp32"]),
]
# v10 check: the kernel-v10 defaults ("dflt": one-round merge; small launches with a quantized part split into 2-tile
# splits, at most MERGE_MAX_ELEMS / d) against kernel v9's rule and merge ("v9r": 4 tiles / 128 splits, rounds of
# 16), at the v10 probe's small cases, plus large launches (where only the merge changed) and alternatives at T = 1K
PROBE_VARIANTS["v9r"] = dict(min_tiles_per_split=4, max_splits=128, merge_block_s=16)
PROBE_VARIANTS["a32x1sp32d"] = dict(block_n=32, num_warps=1, num_stages=3, num_splits=32)
_PROBE_V10B = [
    ("qwen2.5-0.5b", 1, 4096, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 1, 1024, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 1, 16384, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 4, 4096, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 1, 4096, (8, 8), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 1, 4096, (16, 16), ["dflt", "v9r"]),
    ("qwen2.5-7b", 1, 4096, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-7b", 1, 1024, (4, 4), ["dflt", "v9r", "sp16"]),
    ("qwen2.5-7b", 1, 16384, (4, 4), ["dflt", "v9r"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dflt", "v9r"]),
    ("llama-3.1-8b", 1, 1024, (4, 4), ["dflt", "v9r", "sp16", "a32x1sp32d"]),
    ("llama-3.1-8b", 1, 32768, (4, 4), ["dflt", "v9r", "sp64"]),
    ("llama-3.1-8b", 4, 4096, (4, 4), ["dflt", "v9r"]),
    ("llama-3.1-8b", 1, 4096, (8, 8), ["dflt", "v9r"]),
    ("llama-3.1-8b", 1, 4096, (16, 16), ["dflt", "v9r"]),
    ("gemma-3-12b", 1, 4096, (4, 4), ["dflt", "v9r", "sp16"]),
    ("gemma-3-12b", 1, 1024, (4, 4), ["dflt", "v9r", "sp16"]),
    ("llama-3.1-8b", 8, 4096, (4, 4), ["dflt", "v9r"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "v9r"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dflt", "v9r"]),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "v9r"]),
]
# v11, bimodal times: the grids' P5 medians at 1.2-2.4 GB working sets sit ~15 % above their p10 in every kernel
# version (Llama B=16 T=128K 4/4 996 us, p10 862), also at 16/16, while 0.6 GB and 4.8 GB sets are tight. Beside the
# default kernel: "READ" = the streaming-read (sum) kernel over as many bytes as the P5 call moves, timed the same
# way (is the memory system itself bimodal at that size?); "...g8" = the same with >= 8 ms of calls per graph
# replay (do the idle gaps between 1-call replays cause the slow mode?). Every sample is recorded; the list runs
# twice, on fresh allocations.
# Recorded before time_graph had its warm-up: the committed file's "dflt" / "READ" rows (and P0 / P1) are the cold
# timing that "dfltcold" / "READcold" reproduce now. Finding: the slow phase is the first replays (see WARM_REPLAYS).
PROBE_VARIANTS["dfltg8"] = dict()
PROBE_VARIANTS["dfltcold"] = dict()
_COLD = dict(warm_replays=0, warm_s=0.0)
PROBE_TIMING = {"dfltg8": dict(min_graph_s=8e-3), "READg8": dict(min_graph_s=8e-3), "dfltcold": _COLD,
                "READcold": _COLD}
_PROBE_V11BI = 2 * [
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dfltcold", "dfltg8", "READcold", "READg8"]),
    ("llama-3.1-8b", 16, 32768, (16, 16), ["dfltcold", "dfltg8", "READcold", "READg8"]),
    ("llama-3.1-8b", 128, 4096, (4, 4), ["dfltcold", "dfltg8", "READcold", "READg8"]),
    ("llama-3.1-8b", 32, 131072, (4, 4), ["dfltcold", "dfltg8", "READcold", "READg8"]),
    ("qwen2.5-7b", 64, 32768, (4, 4), ["dfltcold", "dfltg8", "READcold"]),
    ("gemma-3-12b", 16, 32768, (16, 16), ["dfltcold", "dfltg8", "READcold"]),
]
# the warm-up checked: cold and steady-state timing of the default kernel side by side
_PROBE_V11WARM = [
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dfltcold", "dflt", "dfltg8"]),
    ("qwen2.5-7b", 64, 32768, (4, 4), ["dfltcold", "dflt", "dfltg8"]),
    ("llama-3.1-8b", 1, 4096, (4, 4), ["dfltcold", "dflt"]),
    ("qwen2.5-0.5b", 64, 16384, (4, 4), ["dfltcold", "dflt"]),
]
# v12 candidate (split rule of large launches): the steady-state v11 grid has P5 4/4 at d = 128 at 74 % of the read
# ceiling for 302 MB calls and 94 % at 4.8 GB, 2,048 programs each (16 per SM assumed); the kernel timeline puts the
# loss in the split kernel (merge 2-5 us) and 16 splits instead of 32 at Llama B=8 T=32K took 108 instead of 119 us.
# ppsN = the split rule assuming N programs per SM (default: 16 for 4/4, 8 for an 8-bit part); a32x1 at d = 256 =
# the 1-warp shape for Gemma (549 vs 575 us at B=16 T=32K in the timeline, without the K fold: kfa32x1 with it)
for _n in (4, 6, 8, 12, 16, 24):
    PROBE_VARIANTS[f"pps{_n}"] = dict(programs_per_sm=_n)
_PPS = ["dflt", "pps4", "pps6", "pps8", "pps12", "pps24"]
_PROBE_V12SP = [
    ("llama-3.1-8b", 8, 32768, (4, 4), _PPS),
    ("llama-3.1-8b", 64, 4096, (4, 4), _PPS),
    ("llama-3.1-8b", 128, 4096, (4, 4), _PPS),
    ("llama-3.1-8b", 32, 32768, (4, 4), _PPS),
    ("llama-3.1-8b", 4, 131072, (4, 4), _PPS),
    ("llama-3.1-8b", 16, 131072, (4, 4), _PPS),
    ("qwen2.5-7b", 32, 16384, (4, 4), _PPS),
    ("qwen2.5-7b", 4, 131072, (4, 4), _PPS),
    ("qwen2.5-7b", 64, 32768, (4, 4), _PPS),
    ("qwen2.5-0.5b", 64, 32768, (4, 4), _PPS),
    ("qwen2.5-0.5b", 16, 131072, (4, 4), _PPS),
    ("llama-3.1-8b", 8, 32768, (8, 4), ["dflt", "pps4", "pps6", "pps12", "pps16"]),
    ("llama-3.1-8b", 32, 32768, (8, 8), ["dflt", "pps4", "pps6", "pps12", "pps16"]),
    ("gemma-3-12b", 16, 32768, (4, 4), _PPS + ["a32x1", "kfa32x1", "kfa32x1pps8"]),
    ("gemma-3-12b", 32, 4096, (4, 4), ["dflt", "pps8", "a32x1", "kfa32x1", "kfa32x1pps8"]),
    ("gemma-3-12b", 4, 131072, (4, 4), ["dflt", "pps8", "a32x1", "kfa32x1", "kfa32x1pps8"]),
]
PROBE_VARIANTS["kfa32x1pps8"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=3, programs_per_sm=8)
# v13 candidate (session 12): a persistent split kernel whose programs claim work items from an atomic counter
# (kernels.decode_attention(persistent_programs_per_sm=)); peN = N programs per SM; ppsM = the split rule sized for
# M programs per SM (M > N: more, shorter items than programs). Timed beside the default in
# measure/program_timeline.py, which also records when each program runs.
for _n, _m in ((8, 0), (8, 16), (8, 32), (4, 16), (16, 32)):
    PROBE_VARIANTS[f"pe{_n}" + (f"pps{_m}" if _m else "")] = dict(persistent_programs_per_sm=_n,
                                                                   **({"programs_per_sm": _m} if _m else {}))
PROBE_VARIANTS["rot"] = dict(rotate_tiles=True)  # session 12: each split walked from a program-dependent tile
PROBE_VARIANTS["kfst2"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=2)  # the 4/4 large shape, 2 stages
PROBE_VARIANTS["kfst4"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=4)  # ... and 4
for _f, _c in ((5, 2), (10, 2), (10, 4), (15, 4), (20, 4), (10, 8)):  # tail pool: _f % of the tiles, _c-tile chunks
    PROBE_VARIANTS[f"tp{_f:02d}c{_c}"] = dict(tail_pool=_f / 100, pool_chunk_tiles=_c)
PROBE_VARIANTS["kfst4pps6"] = dict(k_fold=True, block_n=32, num_warps=1, num_stages=4, programs_per_sm=6)
# v13 candidate (session 13): the tail pool in steady-state timing. The program timeline (one pass per variant,
# validation/data/h100/program_timeline_pool.*) had the pool cut the SMs' idle time at the end 3-4x but lengthen the
# median program, calls moving -3..+3 %: too close for a single pass. Same shapes, bench timing, listed twice.
_TP = ["dflt", "tp05c2", "tp10c4", "tp10c8", "tp20c4"]
_PROBE_V13TP = 2 * [
    ("llama-3.1-8b", 8, 32768, (4, 4), _TP),
    ("qwen2.5-7b", 32, 16384, (4, 4), _TP),
    ("llama-3.1-8b", 64, 4096, (4, 4), _TP),
    ("gemma-3-12b", 8, 32768, (4, 4), _TP),
    ("llama-3.1-8b", 32, 32768, (4, 4), _TP),
    ("gemma-3-12b", 16, 32768, (4, 4), _TP),
    ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "tp10c4", "tp10c8"]),
    ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "tp10c4", "tp10c8"]),
]
#: ``--probe-set`` choices (re-running one measures the current kernel as "dflt", not the one its file recorded)
PROBE_SETS = {"v5a": _PROBE_V5A, "v5b": _PROBE_V5B, "v6": _PROBE_V6, "v7": _PROBE_V7, "pdl": _PROBE_PDL,
              "v8": _PROBE_V8, "v8b": _PROBE_V8B, "v9kf": _PROBE_V9KF, "v9rep": _PROBE_V9REP,
              "v10": _PROBE_V10, "v10b": _PROBE_V10B, "v11bi": _PROBE_V11BI,
              "v11warm": _PROBE_V11WARM, "v12sp": _PROBE_V12SP, "v13tp": _PROBE_V13TP}


def _probe_compile(spec):
    """Compile (into Triton's on-disk cache) one P5 variant for one shape class, in a worker process."""
    import torch

    from kvmodel.kernels import decode_attention

    model, kb, vb, name = spec
    Hq, Hkv, d = MODELS[model]
    try:
        c = make_cache(2, Hkv, 512, d, kb, vb, "cuda")
        q = torch.randn(2, Hq, d, dtype=torch.float16, device="cuda")
        decode_attention(q, c, **{"num_splits": 2, **PROBE_VARIANTS[name]})
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{spec}: {type(e).__name__}: {e}"


def probe(args, ceil):
    """P5 variants vs P0 (and P1) at a few shapes, one table (stdout) + rows in ``--probe-out`` (JSON lines)."""
    import json
    import multiprocessing as mp

    import torch

    from kvmodel.kernels import decode_attention
    from kvmodel.kernels.pipelines import p0, p1

    cases = PROBE_SETS[args.probe_set]
    specs = sorted({(m, kb, vb, v) for m, B, T, (kb, vb), vs in cases for v in vs if not v.startswith("READ")})
    read_kernel = _sum_kernel_factory()
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(args.procs, len(specs))) as pool:
        errs = [e for e in pool.map(_probe_compile, specs) if e]
    log(f"probe: compiled {len(specs)} variants in {time.time() - t0:.1f}s; errors: {errs}")
    out = open(args.probe_out, "a") if args.probe_out else None
    for model, B, T, (kb, vb), names in cases:
        Hq, Hkv, d = MODELS[model]
        ws = cache_bytes(B, Hkv, T, d, kb, vb)
        n_sets = max(1, min(64, math.ceil(4 * L2_BYTES / ws)))
        caches = [make_cache(B, Hkv, T, d, kb, vb, "cuda", gen_seed=i) for i in range(n_sets)]
        qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        wss = [dict() for _ in range(n_sets)]
        fp16 = caches if (kb, vb) == (16, 16) else [make_cache(B, Hkv, T, d, 16, 16, "cuda", gen_seed=i)
                                                     for i in range(min(n_sets, max(1, 4 * n_sets // 14)))]
        base = [("P0", lambda i: p0(qs[i], fp16[i % len(fp16)]))]
        if (kb, vb) != (16, 16):
            base.append(("P1", lambda i: p1(qs[i], caches[i])))
        runs = base + [(n, (lambda i, o=PROBE_VARIANTS[n]: decode_attention(qs[i], caches[i], out=outs[i],
                                                                             workspace=wss[i], **o)))
                       for n in names if not n.startswith("READ")]
        if any(n.startswith("READ") for n in names):
            # the read probe's kernel (measure_ceilings' first shape) over the P5 call's byte count, one fp16
            # buffer per working set
            progs, block = 132 * 8, 4096
            n_el = int(bytes_moved("P5", B, T, Hq, Hkv, d, kb, vb)[0]) // 2 // (progs * block) * (progs * block)
            rbufs = [torch.randn(n_el, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
            rout = torch.empty(progs, dtype=torch.float32, device="cuda")
            read_fn = lambda i: read_kernel[(progs,)](rbufs[i], rout, n_el // progs, BLOCK=block,  # noqa: E731
                                                      num_warps=8)
            runs += [(n, read_fn) for n in names if n.startswith("READ")]
        line = []
        for name, fn in runs:
            pipe = name if name in ("P0", "P1") else "P5"
            samples = []
            try:
                med, p10, p90 = time_graph(fn, n_sets, target_s=args.target_s, samples_out=samples,
                                           **PROBE_TIMING.get(name, {}))[:3]
            except Exception as e:  # noqa: BLE001
                line.append(f"{name} ERR {type(e).__name__}: {str(e)[:80]}")
                continue
            by = (2 * n_el) if name.startswith("READ") else bytes_moved(pipe, B, T, Hq, Hkv, d, kb, vb)[0]
            pct = 100 * by / med / 1e9 / ceil["read_GBps"]
            line.append(f"{name} {med * 1e6:.1f}us ({p10 * 1e6:.0f}-{p90 * 1e6:.0f}) {pct:.0f}%")
            if out:
                out.write(json.dumps(dict(model=model, B=B, T=T, k_bits=kb, v_bits=vb, variant=name,
                                          opts=PROBE_VARIANTS.get(name), median_s=med, p10_s=p10, p90_s=p90, bytes=by,
                                          pct_read_ceiling=pct, read_GBps=ceil["read_GBps"],
                                          samples_s=samples)) + "\n")
                out.flush()
        log(f"PROBE {model} B={B} T={T} {kb}/{vb}: " + " | ".join(line))
        del caches, qs, outs, wss, fp16
        rbufs = None
        torch.cuda.empty_cache()
    if out:
        out.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="validation/data/h200/decode_attention.csv")
    ap.add_argument("--resume", action="store_true", help="skip rows already in --out")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    ap.add_argument("--formats", nargs="+", default=[f"{k}/{v}" for k, v in FORMATS])
    ap.add_argument("--max-seconds", type=float, default=480.0, help="stop starting rows after this")
    ap.add_argument("--target-s", type=float, default=0.04, help="timed seconds per row (approximately)")
    ap.add_argument("--max-sets", type=int, default=1024,
                    help="most input copies rotated through (enough that even the smallest calls span 4x the L2; "
                         "the committed v3 grid used 32, so its smallest d=64 calls were L2-served)")
    ap.add_argument("--mem-fraction", type=float, default=0.8)
    ap.add_argument("--p5-config", default=None, help="block_n,num_warps,num_stages[,v_full] for P5 (default: built-in)")
    ap.add_argument("--probe", action="store_true", help="print a P5 tuning table instead of the grid")
    ap.add_argument("--probe-out", default=None, help="with --probe: append the probe rows (JSON lines) here")
    ap.add_argument("--probe-set", choices=sorted(PROBE_SETS), default="v5b",
                    help="with --probe: which case list (v5a: split rule and 8-bit loads; v5b: more splits; "
                         "v6: swapped mma operands; v7: V scales folded into P; pdl: dependent merge launch; v8: octet V at d = 64, register caps, small launches; v9kf: the K fold; v11bi: bimodal times vs the read kernel at the same bytes; v11warm: the timing warm-up; v12sp: programs per SM of the split rule; v13tp: the tail pool)")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--procs", type=int, default=12)
    ap.add_argument("--fill-bytes", action="store_true",
                    help="only recompute bytes_moved etc. of --out with kvmodel.traffic (no GPU needed)")
    args = ap.parse_args(argv)
    if args.fill_bytes:
        log(f"updated {fill_bytes(args.out)} rows of {args.out}")
        return 0
    args.formats = [tuple(int(x) for x in f.split("/")) for f in args.formats]

    import torch

    from kvmodel.measure.results import ResultsFile

    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    props = torch.cuda.get_device_properties(0)
    log(f"GPU {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    t0 = time.time()
    ceil = measure_ceilings()
    log(f"ceilings: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s "
        f"({time.time() - t0:.1f}s)")
    if args.probe:
        probe(args, ceil)
        return 0
    rf = ResultsFile(args.out, key_fields=KEY, fieldnames=FIELDS)
    rf.write_provenance(extra={"ceilings": ceil, "sms": props.multi_processor_count, "gpu": props.name,
                               "benchmark": "decode_attention", "p5_config": args.p5_config or "default"},
                        command=[sys.executable, "-m", "kvmodel.measure.bench_decode_attention"] + sys.argv[1:])
    if not args.no_precompile:
        precompile(args.models, args.formats, args.procs)
    n = run_grid(args, rf, ceil)
    log(f"wrote {n} rows to {args.out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
