"""Bandwidth probes on a CUDA GPU: streaming read, copy, and the GEMV/GEMM shapes of a decode step.

Every probe is timed the way a graph-captured decode step runs it: many calls back to back inside one
``torch.cuda.CUDAGraph``, each call on a different buffer from a rotating pool whose total is several times the L2
(so every call streams from HBM), replayed many times; the row reports the median time **per call**.

Rows (``probes.csv``): ``op`` is the operation class the calibration fits (``read``, ``copy``, ``weights`` for the
q/k/v/o/gate/up/down projections and their fused forms, ``lm_head``); ``bytes_moved`` counts every byte the call
must move (weights + activations in + out; read: the buffer; copy: read + write); ``median_s`` per call.

    python -m kvmodel.measure.probes --out validation/data/h200/probes.csv [--quick] [--resume]

torch/triton are imported lazily so that ``import kvmodel.measure.probes`` works on a machine without them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from kvmodel.measure.results import ResultsFile

PROBE_FIELDS = [
    "op", "impl", "model", "name", "B", "K", "N", "dtype", "n_buffers", "calls", "weight_bytes",
    "bytes_moved", "flops", "median_s", "p10_s", "p90_s", "achieved_GBps", "achieved_TFLOPS",
]
PROBE_KEYS = ["op", "impl", "model", "name", "B", "K", "N"]

MiB = 1024**2
GiB = 1024**3
#: bytes a rotating pool must span (>> the 50-60 MB L2 of an H100/H200)
ROTATE_BYTES = 512 * MiB
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_BATCHES = (1, 8, 64)


class GPUUnavailable(RuntimeError):
    """No usable CUDA GPU (or torch is missing); the message says which."""


def require_cuda():
    """Import torch and check for a CUDA device; raise :class:`GPUUnavailable` with the reason otherwise."""
    try:
        import torch  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        raise GPUUnavailable(f"PyTorch is not importable ({type(e).__name__}: {e}); install torch with CUDA") from None
    if not torch.cuda.is_available():
        raise GPUUnavailable(
            f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    return torch


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    graph: bool


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


#: untimed warm-up of :func:`time_graph`: this many seconds of replays (at most WARM_MAX_REPLAYS)
WARM_S = 0.03
WARM_MAX_REPLAYS = 200


def time_graph(calls: Sequence[Callable[[], object]], min_time_s: float = 0.05, max_replays: int = 50,
               min_replays: int = 5, use_graph: bool = True) -> Timing:
    """Median time per call of ``calls`` run back to back, captured in one CUDA graph and replayed.

    Each replay is timed with CUDA events; the number of replays is chosen so the total is ≈ ``min_time_s``.
    Falls back to eager launches (``graph=False`` in the result) if capture fails.
    """
    import torch  # noqa: PLC0415

    n = len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls[: min(n, 4)]:
            c()
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - fall back to eager
            graph = None
            torch.cuda.synchronize()

    def run_once():
        if graph is not None:
            graph.replay()
        else:
            for c in calls:
                c()

    run_once()
    run_once()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_once()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end) * 1e-3, 1e-7)
    # steady state before timing (the first replays of a fresh graph ran 10-20 % slow on the H100: the grid bench's
    # WARM_REPLAYS note): untimed replays for >= WARM_S seconds
    for _ in range(min(WARM_MAX_REPLAYS, math.ceil(WARM_S / est))):
        run_once()
    torch.cuda.synchronize()
    reps = int(min(max_replays, max(min_replays, math.ceil(min_time_s / est))))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        run_once()
        b.record()
    torch.cuda.synchronize()
    per = [a.elapsed_time(b) * 1e-3 / n for a, b in evs]
    del graph
    return Timing(statistics.median(per), _quantile(per, 0.1), _quantile(per, 0.9), reps, use_graph)


def n_rotating(nbytes: float, rotate_bytes: float = ROTATE_BYTES, lo: int = 2, hi: int = 4096) -> int:
    """How many buffers of ``nbytes`` a rotating pool needs to span ``rotate_bytes``."""
    return int(min(hi, max(lo, math.ceil(rotate_bytes / max(nbytes, 1)))))


def calls_per_graph(n_buffers: int, nbytes: float, target_bytes: float = 1 * GiB, hi: int = 2048) -> int:
    """Calls per captured graph: every buffer at least once, and enough bytes that one replay is ≫ launch."""
    want = max(n_buffers, math.ceil(target_bytes / max(nbytes, 1)))
    return int(min(max(want, n_buffers), max(hi, n_buffers)))


# ----------------------------------------------------------------------------------------------------------------
# Streaming read / copy
# ----------------------------------------------------------------------------------------------------------------

_read_kernel = None


def _get_read_kernel():
    global _read_kernel
    if _read_kernel is not None:
        return _read_kernel
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        base = pid * BLOCK * UNROLL
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for u in tl.static_range(UNROLL):
            offs = base + u * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(x_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
        tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))

    _read_kernel = read_kernel
    return read_kernel


def triton_read(x, out, block: int = 2048, unroll: int = 8):
    """Read every int32 word of ``x`` once (xor-reduce per program into ``out``)."""
    import triton  # noqa: PLC0415

    n = x.numel()
    grid = (triton.cdiv(n, block * unroll),)
    _get_read_kernel()[grid](x, out, n, BLOCK=block, UNROLL=unroll, num_warps=8)


def _row(op, impl, nbytes_moved, t: Timing, **kw) -> dict:
    row = {k: "" for k in PROBE_FIELDS}
    row.update(op=op, impl=impl, model="", name="", B=0, K=0, N=0, dtype="", weight_bytes=0, flops=0)
    row.update(kw)
    row.update(bytes_moved=int(nbytes_moved), median_s=t.median_s, p10_s=t.p10_s, p90_s=t.p90_s,
               achieved_GBps=nbytes_moved / t.median_s / 1e9,
               achieved_TFLOPS=(float(row["flops"]) / t.median_s / 1e12) if row["flops"] else 0.0)
    return row


def stream_sizes(quick: bool) -> list[int]:
    if quick:
        return [1 * MiB, 16 * MiB, 256 * MiB, 2 * GiB]
    return [2**k for k in range(17, 32)] + [4 * GiB]  # 128 KiB .. 2 GiB, 4 GiB


def probe_stream(rf: ResultsFile, quick: bool = False, resume: bool = True, log=print, on_row=None) -> None:
    """Read (Triton, torch sum) and copy (torch) bandwidth against buffer size, rotating buffers below L2."""
    torch = require_cuda()
    done = rf.done_keys() if resume else set()
    sizes = stream_sizes(quick)
    pool = None
    for nbytes in sizes:
        nb = n_rotating(nbytes)
        for op, impl in (("read", "triton"), ("read", "torch-sum"), ("copy", "torch")):
            key = {"op": op, "impl": impl, "model": "", "name": "", "B": 0, "K": nbytes, "N": 0}
            if rf.key_of(key) in done:
                continue
            need = nbytes * nb * (2 if op == "copy" else 1)
            if pool is None or pool.numel() * 4 < need:
                pool = None
                torch.cuda.empty_cache()
                pool = torch.randint(-2**31, 2**31 - 1, (max(need, 512 * MiB) // 4,), dtype=torch.int32,
                                     device="cuda")
            words = nbytes // 4
            views = [pool[i * words:(i + 1) * words] for i in range(nb)]
            if op == "read" and impl == "triton":
                outs = torch.empty(words // (2048 * 8) + 1, dtype=torch.int32, device="cuda")
                calls = [lambda v=v: triton_read(v, outs) for v in views]
            elif op == "read":
                fviews = [v.view(torch.float32) for v in views]
                calls = [lambda v=v: v.sum() for v in fviews]
            else:
                dsts = [pool[(nb + i) * words:(nb + i + 1) * words] for i in range(nb)]
                calls = [lambda s=s, d=d: d.copy_(s) for s, d in zip(views, dsts)]
            reps = calls_per_graph(nb, nbytes) // nb
            t = time_graph(calls * max(1, reps))
            moved = nbytes * (2 if op == "copy" else 1)
            row = _row(op, impl, moved, t, K=nbytes, n_buffers=nb, calls=len(calls) * max(1, reps))
            rf.append(row)
            if on_row:
                on_row(f"{op} {nbytes / MiB:.0f} MiB")
            log(f"  {op:5s} {impl:9s} {nbytes / MiB:9.2f} MiB  {t.median_s * 1e6:9.2f} us  "
                f"{row['achieved_GBps']:7.0f} GB/s")
    del pool
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# GEMV / GEMM shapes of a decode step
# ----------------------------------------------------------------------------------------------------------------


def projection_shapes(spec) -> list[tuple[str, str, int, int]]:
    """(op, name, K, N) of every distinct weight matrix a decode step multiplies, separate and fused forms.

    ``x[B, K] @ W[K, N]`` (stored as nn.Linear weights ``[N, K]``)."""
    h, d = spec.hidden_size, spec.head_dim
    qd, kvd = spec.num_heads * d, spec.num_kv_heads * d
    inter = spec.moe.expert_intermediate_size if (spec.moe and spec.moe.first_dense_layers == 0) \
        else spec.intermediate_size
    gated = spec.mlp == "gated"
    shapes = [
        ("weights", "q", h, qd),
        ("weights", "kv", h, kvd),
        ("weights", "qkv", h, qd + 2 * kvd),
        ("weights", "o", qd, h),
        ("weights", "up", h, inter),
        ("weights", "down", inter, h),
        ("lm_head", "lm_head", h, spec.vocab_size),
    ]
    if gated:
        shapes.insert(5, ("weights", "gate_up", h, 2 * inter))
    seen, out = set(), []
    for op, name, k, n in shapes:
        if (op, k, n) in seen:
            continue
        seen.add((op, k, n))
        out.append((op, name, k, n))
    return out


def probe_gemv(rf: ResultsFile, models: Iterable, batches: Sequence[int] = DEFAULT_BATCHES,
               resume: bool = True, dtype: str = "float16", log=print, on_row=None) -> None:
    """Time ``F.linear(x[B,K], W[N,K])`` for each model's projection shapes and batch sizes (cuBLAS)."""
    torch = require_cuda()
    tdt = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdt).element_size()
    done = rf.done_keys() if resume else set()
    for spec in models:
        for op, name, k, n in projection_shapes(spec):
            todo = [b for b in batches
                    if rf.key_of({"op": op, "impl": "cublas", "model": spec.name, "name": name, "B": b,
                                  "K": k, "N": n}) not in done]
            if not todo:
                continue
            wbytes = k * n * esize
            nb = n_rotating(wbytes)
            ws = [torch.randn(n, k, device="cuda", dtype=tdt) * (1.0 / math.sqrt(k)) for _ in range(nb)]
            for b in todo:
                x = torch.randn(b, k, device="cuda", dtype=tdt)
                outs = [torch.empty(b, n, device="cuda", dtype=tdt) for _ in range(min(nb, 8))]
                calls = [lambda w=w, o=outs[i % len(outs)]: torch.matmul(x, w.t(), out=o)
                         for i, w in enumerate(ws)]
                reps = max(1, calls_per_graph(nb, wbytes) // nb)
                t = time_graph(calls * reps)
                moved = wbytes + (b * k + b * n) * esize
                row = _row(op, "cublas", moved, t, model=spec.name, name=name, B=b, K=k, N=n, dtype=dtype,
                           n_buffers=nb, calls=len(calls) * reps, weight_bytes=wbytes, flops=2 * b * k * n)
                rf.append(row)
                if on_row:
                    on_row(f"{spec.name} {name} B={b}")
                log(f"  {spec.name:24s} {name:8s} B={b:<4d} {k}x{n}  {t.median_s * 1e6:9.2f} us  "
                    f"{row['achieved_GBps']:6.0f} GB/s  {row['achieved_TFLOPS']:6.1f} TF/s")
            del ws
            torch.cuda.empty_cache()


def read_ceiling_GBps(rows: Iterable[dict], min_bytes: int = 256 * MiB) -> Optional[float]:
    """Best streaming-read bandwidth among rows on buffers ≥ ``min_bytes`` (GB/s), or None."""
    best = None
    for r in rows:
        if r.get("op") != "read":
            continue
        try:
            nbytes, bw = float(r["bytes_moved"]), float(r["achieved_GBps"])
        except (KeyError, ValueError):
            continue
        if nbytes >= min_bytes and (best is None or bw > best):
            best = bw
    return best


def count_probe_rows(models: Sequence = (), quick: bool = False,
                     batches: Optional[Sequence[int]] = None) -> int:
    """Rows :func:`run_probes` writes (for progress/ETA)."""
    b = batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES)
    return 3 * len(stream_sizes(quick)) + sum(len(projection_shapes(m)) for m in models) * len(b)


def run_probes(out_csv, models: Sequence = (), quick: bool = False, resume: bool = True, log=print,
               batches: Optional[Sequence[int]] = None, on_row=None) -> ResultsFile:
    """Streaming probes then GEMV probes for ``models`` into ``out_csv`` (appending; resumable)."""
    require_cuda()
    rf = ResultsFile(out_csv, PROBE_KEYS, fieldnames=PROBE_FIELDS)
    rf.write_provenance(extra={"probe": "stream+gemv", "quick": quick})
    log("# streaming read / copy")
    probe_stream(rf, quick=quick, resume=resume, log=log, on_row=on_row)
    if models:
        log("# GEMV/GEMM projection shapes")
        probe_gemv(rf, models, batches=batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES),
                   resume=resume, log=log, on_row=on_row)
    return rf


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="CSV to append to")
    ap.add_argument("--models", default="Qwen2.5-0.5B,Qwen2.5-7B,Llama-3.1-8B,Mistral-Small-3.1-24B")
    ap.add_argument("--batches", default=None, help="comma list (default 1..128 in powers of 2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-resume", action="store_true")
    a = ap.parse_args(argv)
    from kvmodel.measure.e2e_decode import resolve_model  # noqa: PLC0415

    models = [resolve_model(m) for m in a.models.split(",") if m.strip()]
    batches = [int(b) for b in a.batches.split(",")] if a.batches else None
    t0 = time.time()
    try:
        run_probes(a.out, models, quick=a.quick, resume=not a.no_resume, batches=batches,
                   log=lambda s: print(s, flush=True))
    except GPUUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# probes done in {time.time() - t0:.1f} s -> {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
