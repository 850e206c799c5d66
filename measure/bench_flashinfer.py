"""FlashInfer paged decode as a peer of the decode-attention grid: FP16 and FP8-e4m3 KV, same shapes, same run.

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi .fiwhl/*.whl
    PYTHONPATH=/tmp/fi python3 -m kvmodel.measure.bench_flashinfer --out validation/data/h200/decode_attention_peer.csv

The two wheels (``pip download --no-deps flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2`` for cp312
manylinux) are 62 MiB: with the repository they exceed a 64 MiB transfer to a lent GPU machine. The committed run
carried them unzipped and xz-packed instead (19 MB; neither wheel has ``.data`` folders, so unzipping equals
``pip install --target``): ``mkdir -p /tmp/fi && for w in .fiwhl/*.whl; do unzip -q -o $w -d /tmp/fi; done &&
tar cJf .fitar/fi.tar.xz -C /tmp fi``, then on the GPU machine ``tar xJf .fitar/fi.tar.xz -C /tmp`` and
``PYTHONPATH=/tmp/fi``.
    python -m kvmodel.measure.bench_flashinfer --fill-bytes --out validation/data/h200/decode_attention_peer.csv  # CPU

One run: the read and copy ceilings (``bench_decode_attention.measure_ceilings``), then, for the grid's shapes
(``bench_decode_attention.MODELS`` x ``BATCHES`` x ``CONTEXTS``; the README kernel table's (B, T) points first):

* ``P0`` (variant "default"): our baseline, SDPA ``enable_gqa`` on the FP16 cache, exactly as the grid times it,
  so the peer's rows have their baseline from the same run;
* ``FI-FP16`` (variant "tc"): FlashInfer ``BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD",
  use_tensor_cores=True, backend="fa2")``, page size 16, FP16 q/KV/out (on SM90 ``backend="auto"`` resolves to
  fa2 for both formats: FA3 takes FP8 KV only with FP8 q; ``--fi-backend`` changes it);
* ``FI-FP8`` (variant "tc"): the same with ``kv_data_type=torch.float8_e4m3fn``: e4m3 K/V with one per-tensor
  scale (1.0: ``k_scale`` folds into the softmax scale, ``v_scale`` == 1.0 adds no output-scaling kernel),
  FP16 q and output. No group scales, so ``group`` is 0 (FI-FP16 rows too).

Timing is the grid's (``bench_decode_attention.time_graph``): each call captured R times in a CUDA graph,
rotating over copies of the inputs that span >= 4x the L2. For FlashInfer every copy is its own pair of paged K/V
tensors ``[pages, 16, Hkv, d]`` (and q, out); ``plan()`` runs once per shape, outside the graph, and is shared by
the copies: they have the same page table (sequence b owns pages b*T/16 ... (b+1)*T/16-1, contiguous, every page
full), as the layers of a model share one. Each ``run()`` is issued inside ``tvm_ffi.use_torch_stream()`` so it
launches on the capturing stream. Before a shape is timed, each pipeline's output on its first copy is checked
against the float32 reference (``kvmodel.kernels.reference.attention_reference``, on the first two sequences, over
the values as stored: FP8 codes x scale): ``check_max_abs_err`` and ``check_rel_err`` (over max |reference|) are
recorded, and a row whose relative error exceeds ``--check-tol`` is refused (logged, not written).

Rows are the grid's CSV columns plus ``check_max_abs_err``, ``check_rel_err`` and ``backend`` (the resolved
FlashInfer backend, "sdpa" for P0), appended as measured (``kvmodel.measure.results``, provenance JSON with the
flashinfer and tvm-ffi versions); ``--resume`` skips rows already there; ``--max-seconds`` (counted from the start,
compilation included) stops starting new rows. ``bytes_moved``: P0 and FI-FP16 move the same bytes
(``attention_layer_bytes("P0")``: FP16 K+V once, q read, output written); FI-FP8 moves half the KV bytes and no
scales (the model's ``attn_bytes_P5`` with the FP8 format's zero metadata, ``KVFormat(float8=True)``). The page
table (4 bytes per 16 tokens, < 0.05 %) is not counted. This module imports no pydantic (the GPU machine may lack
it): there the bytes come from a stand-in with the same definition, ``bytes_source`` "fallback", and
``--fill-bytes`` recomputes them with ``kvmodel.traffic`` afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from functools import lru_cache

from kvmodel.measure.bench_decode_attention import BATCHES, CONTEXTS, FIELDS, GROUP, KEY, L2_BYTES, MODELS

PAGE_SIZE = 16
PIPES = ("P0", "FI-FP16", "FI-FP8")
# pipeline: (k_bits, v_bits, group, variant). P0 keeps the grid's group column (32) so its key matches the grid's.
PIPE_FORMAT = {"P0": (16, 16, GROUP, "default"), "FI-FP16": (16, 16, 0, "tc"), "FI-FP8": (8, 8, 0, "tc")}
PEER_FIELDS = FIELDS + ["check_max_abs_err", "check_rel_err", "backend"]
# the README kernel table's (B, T) points: measured first, so a run cut short still fills the table
PRIORITY = ((1, 4096), (8, 32768), (32, 32768), (16, 131072))
WORKSPACE_MIB = 512
CHECK_SEQS = 2
FP8_SCALE = 1.0
DEFAULT_OUT = "validation/data/h200/decode_attention_peer.csv"


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ sizes, cases
def kv_bytes(pipe, B, T, Hkv, d):
    """Bytes of one copy of the K/V cache of ``pipe`` (FP16, or FP8 for FI-FP8)."""
    per = 1 if pipe == "FI-FP8" else 2
    return 2 * B * T * Hkv * d * per


def n_sets_for(ws, max_sets):
    """Input copies rotated through so that they span >= 4x the L2 (as the grid)."""
    return max(1, min(max_sets, math.ceil(4 * L2_BYTES / ws)))


def case_peak_bytes(pipe, B, T, Hq, Hkv, d, max_sets, workspace_mib=WORKSPACE_MIB):
    """Device bytes one pipeline's timing holds: its input copies, FlashInfer's workspaces, the fp32 check."""
    ws = kv_bytes(pipe, B, T, Hkv, d)
    copies = n_sets_for(ws, max_sets) * (ws + 2 * B * Hq * d * 2)
    nb = min(B, CHECK_SEQS)
    check = 2 * nb * Hkv * T * d * 4 + nb * Hq * T * 4 * 2
    extra = (workspace_mib + 16) * 2**20 if pipe.startswith("FI") else 0
    return copies + check + extra


def enumerate_cases(models, batches, contexts, priority=PRIORITY):
    """(model, B, T) in measuring order: the ``priority`` points (those within the selection) for every model,
    then the rest with contexts outermost in the order given (as the grid)."""
    sel_b, sel_t = set(batches), set(contexts)
    out = []
    for B, T in priority:
        if B in sel_b and T in sel_t:
            out += [(m, B, T) for m in models]
    seen = set(out)
    for T in contexts:
        for m in models:
            for B in batches:
                if (m, B, T) not in seen:
                    out.append((m, B, T))
                    seen.add((m, B, T))
    return out


def row_base(pipe, model, B, T):
    Hq, Hkv, d = MODELS[model]
    kb, vb, group, variant = PIPE_FORMAT[pipe]
    return {"pipeline": pipe, "variant": variant, "model": model, "B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "d": d,
            "k_bits": kb, "v_bits": vb, "group": group}


# ------------------------------------------------------------------------------------------------ bytes
@lru_cache(maxsize=1)
def _traffic():
    """kvmodel.traffic and the FP8 format's KV symbols, or None where the analytic core does not import."""
    try:
        from kvmodel import traffic
        from kvmodel.specs import KVFormat
    except ImportError:
        return None
    return traffic, traffic.kv_symbols(KVFormat(k_bits=8, v_bits=8, float8=True))


def traffic_bytes(pipe, B, T, Hq, Hkv, d):
    """The model's count (needs kvmodel.traffic, i.e. pydantic and sympy): (bytes, bytes_source)."""
    got = _traffic()
    if got is None:
        raise ImportError("kvmodel.traffic does not import here")
    traffic, fp8 = got
    if pipe in ("P0", "FI-FP16"):
        b = traffic.attention_layer_bytes("P0", B, T, Hq, Hkv, d)
        return float(b), "traffic" if pipe == "P0" else "traffic:P0"
    if pipe == "FI-FP8":
        vals = {"B": B, "T": T, "H_q": Hq, "H_kv": Hkv, "d": d, "d_v": d, "d_q": d, "b_a": 2, **fp8}
        return float(traffic.evaluate("attn_bytes_P5", vals)), "traffic:P5-fp8"
    raise ValueError(f"unknown peer pipeline {pipe!r}; one of {PIPES}")


def fallback_bytes(pipe, B, T, Hq, Hkv, d):
    """The same definition without the analytic core: q read + output written (FP16) + K and V once."""
    if pipe not in PIPES:
        raise ValueError(f"unknown peer pipeline {pipe!r}; one of {PIPES}")
    return float(2 * B * Hq * d * 2 + kv_bytes(pipe, B, T, Hkv, d))


def peer_bytes(pipe, B, T, Hq, Hkv, d):
    """(bytes_moved, bytes_source): kvmodel.traffic where it imports, else the stand-in marked 'fallback'."""
    try:
        return traffic_bytes(pipe, B, T, Hq, Hkv, d)
    except ImportError:
        return fallback_bytes(pipe, B, T, Hq, Hkv, d), "fallback"


def fill_bytes(path):
    """Recompute bytes_moved / achieved_GBps / pct_read_ceiling / bytes_source of every peer row with
    kvmodel.traffic (CPU; raises ImportError where it does not import). Returns the number of rows updated."""
    import csv
    import io

    from kvmodel.measure.results import atomic_write_text

    if _traffic() is None:
        raise ImportError("--fill-bytes needs kvmodel.traffic (pydantic, sympy)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return 0
    fields = list(rows[0].keys())
    n = 0
    for r in rows:
        if r["pipeline"] not in PIPES:
            continue
        b, src = traffic_bytes(r["pipeline"], int(r["B"]), int(r["T"]), int(r["Hq"]), int(r["Hkv"]), int(r["d"]))
        gbps = b / float(r["median_s"]) / 1e9
        r["bytes_moved"] = str(int(b))
        r["achieved_GBps"] = f"{gbps:.1f}"
        r["pct_read_ceiling"] = f"{100 * gbps / float(r['read_ceiling_GBps']):.1f}"
        if "bytes_source" in r:
            r["bytes_source"] = src
        n += 1
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return n


# ------------------------------------------------------------------------------------------------ GPU inputs
def page_table(B, T, device):
    """indptr [B+1], indices [B*P], last_page_len [B] (int32): sequence b owns pages b*P .. (b+1)*P-1."""
    import torch

    P = -(-T // PAGE_SIZE)
    indptr = torch.arange(0, B + 1, dtype=torch.int32, device=device) * P
    indices = torch.arange(B * P, dtype=torch.int32, device=device)
    last = torch.full((B,), T - (P - 1) * PAGE_SIZE, dtype=torch.int32, device=device)
    return indptr, indices, last


def rand_pages(B, T, Hkv, d, dtype, device, chunk_elems=2**28):
    """A paged NHD tensor [B*P, 16, Hkv, d] of N(0,1) values (cast to ``dtype``), filled in chunks so an FP8
    cache needs no full-size FP16 temporary."""
    import torch

    P = -(-T // PAGE_SIZE)
    x = torch.empty(B * P, PAGE_SIZE, Hkv, d, dtype=dtype, device=device)
    flat = x.view(-1)
    for s in range(0, flat.numel(), chunk_elems):
        part = flat[s:s + chunk_elems]
        if dtype == torch.float16:
            part.normal_()
        else:
            part.copy_(torch.randn(part.numel(), dtype=torch.float16, device=device))
    return x


def pages_to_bhtd(pages, nb, T):
    """The first ``nb`` sequences of a paged NHD tensor as float32 [nb, Hkv, T, d] (for the reference)."""
    P = -(-T // PAGE_SIZE)
    _, _, Hkv, d = pages.shape
    x = pages[: nb * P].float().reshape(nb, P * PAGE_SIZE, Hkv, d)[:, :T]
    return x.permute(0, 2, 1, 3)


def check_output(out, q, k, v):
    """(max |out - ref|, that / max |ref|) of ``out[:nb]`` against the float32 reference over k, v [nb,Hkv,T,d]."""
    from kvmodel.kernels.reference import attention_reference

    nb = k.shape[0]
    ref = attention_reference(q[:nb], k, v)
    err = float((out[:nb].float() - ref).abs().max())
    return err, err / max(float(ref.abs().max()), 1e-6)


# ------------------------------------------------------------------------------------------------ FlashInfer
def fi_versions():
    """Versions of flashinfer and tvm_ffi (empty where absent)."""
    out = {}
    for name in ("flashinfer", "tvm_ffi"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", ""))
        except Exception as e:  # noqa: BLE001
            out[name] = ""
            out[name + "_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def _ffi_stream():
    """``tvm_ffi.use_torch_stream`` (FlashInfer's kernels launch on tvm-ffi's stream: make it torch's current
    one, the capturing stream inside a graph capture); a no-op where tvm_ffi lacks it."""
    try:
        import tvm_ffi

        return tvm_ffi.use_torch_stream
    except (ImportError, AttributeError):
        return contextlib.nullcontext


def fi_wrapper(B, T, Hq, Hkv, d, kv_dtype, device, backend="fa2", workspace_mib=WORKSPACE_MIB):
    """A planned tensor-core ``BatchDecodeWithPagedKVCacheWrapper`` (NHD, page 16) for B sequences of T tokens."""
    import flashinfer
    import torch

    ws = torch.zeros(workspace_mib * 2**20, dtype=torch.uint8, device=device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend=backend)
    indptr, indices, last = page_table(B, T, device)
    w.plan(indptr, indices, last, Hq, Hkv, d, PAGE_SIZE, pos_encoding_mode="NONE", q_data_type=torch.float16,
           kv_data_type=kv_dtype, o_data_type=torch.float16)
    return w


def fi_run_fn(w, qs, ks, vs, outs, fp8):
    """fn(i) for time_graph: one FlashInfer decode on input copy i."""
    stream = _ffi_stream()
    scales = {"k_scale": FP8_SCALE, "v_scale": FP8_SCALE} if fp8 else {}

    def fn(i):
        with stream():
            return w.run(qs[i], (ks[i], vs[i]), out=outs[i], **scales)

    return fn


def _precompile_worker(spec):
    """JIT-compile (into FlashInfer's on-disk cache) the module of one (head_dim, kv dtype), in a worker process."""
    d, kv_name, backend = spec
    t0 = time.time()
    try:
        import torch

        kv_dtype = getattr(torch, kv_name)
        Hq, Hkv = 4, 2
        w = fi_wrapper(2, 64, Hq, Hkv, d, kv_dtype, "cuda", backend=backend, workspace_mib=16)
        k = rand_pages(2, 64, Hkv, d, kv_dtype, "cuda")
        v = rand_pages(2, 64, Hkv, d, kv_dtype, "cuda")
        q = torch.randn(2, Hq, d, dtype=torch.float16, device="cuda")
        out = torch.empty_like(q)
        fi_run_fn(w, [q], [k], [v], [out], kv_dtype != torch.float16)(0)
        torch.cuda.synchronize()
        return None, time.time() - t0
    except Exception as e:  # noqa: BLE001
        return f"{spec}: {type(e).__name__}: {e}"[:500], time.time() - t0


def precompile(models, pipes, backend, procs):
    import multiprocessing as mp

    kvs = [n for p, n in (("FI-FP16", "float16"), ("FI-FP8", "float8_e4m3fn")) if p in pipes]
    specs = sorted({(MODELS[m][2], n, backend) for m in models for n in kvs})
    if not specs:
        return []
    t0 = time.time()
    with mp.get_context("spawn").Pool(max(1, min(procs, len(specs)))) as pool:
        res = pool.map(_precompile_worker, specs)
    errs = [e for e, _ in res if e]
    log(f"precompiled {len(specs)} FlashInfer modules in {time.time() - t0:.0f}s "
        f"(each {', '.join(f'{s[0]}/{s[1]} {t:.0f}s' for s, (_, t) in zip(specs, res))}); errors: {errs}")
    return errs


# ------------------------------------------------------------------------------------------------ one row
def measure_pipe(pipe, model, B, T, args, ceil):
    """Time one pipeline at one shape; returns the row (dict) or None when its check refused it."""
    import torch
    from kvmodel.measure.bench_decode_attention import make_cache, time_graph

    Hq, Hkv, d = MODELS[model]
    dev = "cuda"
    ws = kv_bytes(pipe, B, T, Hkv, d)
    n_sets = n_sets_for(ws, args.max_sets)
    nb = min(B, CHECK_SEQS)
    qs = [torch.randn(B, Hq, d, dtype=torch.float16, device=dev) for _ in range(n_sets)]
    if pipe == "P0":
        from kvmodel.kernels.pipelines import p0

        caches = [make_cache(B, Hkv, T, d, 16, 16, dev) for _ in range(n_sets)]
        out0 = p0(qs[0], caches[0])
        k0, v0 = caches[0].k.data[:nb, :, :T].float(), caches[0].v.data[:nb, :, :T].float()
        err, rel = check_output(out0, qs[0], k0, v0)
        del k0, v0

        def fn(i):
            return p0(qs[i], caches[i])

        backend = "sdpa"
    else:
        fp8 = pipe == "FI-FP8"
        kv_dtype = torch.float8_e4m3fn if fp8 else torch.float16
        w = fi_wrapper(B, T, Hq, Hkv, d, kv_dtype, dev, backend=args.fi_backend, workspace_mib=args.workspace_mib)
        ks = [rand_pages(B, T, Hkv, d, kv_dtype, dev) for _ in range(n_sets)]
        vs = [rand_pages(B, T, Hkv, d, kv_dtype, dev) for _ in range(n_sets)]
        outs = [torch.empty(B, Hq, d, dtype=torch.float16, device=dev) for _ in range(n_sets)]
        fn = fi_run_fn(w, qs, ks, vs, outs, fp8)
        fn(0)
        torch.cuda.synchronize()
        scale = FP8_SCALE if fp8 else 1.0
        err, rel = check_output(outs[0], qs[0], pages_to_bhtd(ks[0], nb, T) * scale,
                                pages_to_bhtd(vs[0], nb, T) * scale)
        backend = str(getattr(w, "resolved_backend", "") or getattr(w, "_backend", ""))
    torch.cuda.synchronize()
    if not (rel <= args.check_tol):
        log(f"REFUSED {pipe} {model} B={B} T={T}: max abs err {err:.3g}, relative {rel:.3g} > {args.check_tol}")
        return None
    med, p10, p90, n, R = time_graph(fn, n_sets, target_s=args.target_s)
    nbytes, source = peer_bytes(pipe, B, T, Hq, Hkv, d)
    gbps = nbytes / med / 1e9
    return dict(row_base(pipe, model, B, T), median_s=med, p10_s=p10, p90_s=p90, n_samples=n, calls_per_sample=R,
                bytes_moved=int(nbytes), bytes_source=source, achieved_GBps=round(gbps, 1),
                read_ceiling_GBps=round(ceil["read_GBps"], 1), copy_ceiling_GBps=round(ceil["copy_GBps"], 1),
                pct_read_ceiling=round(100 * gbps / ceil["read_GBps"], 1), working_sets=n_sets, num_splits="",
                gqa_shared="", check_max_abs_err=f"{err:.3e}", check_rel_err=f"{rel:.3e}", backend=backend)


# ------------------------------------------------------------------------------------------------ grid
def plan_rows(args, done, key_of, budget):
    """[(model, B, T, [pipes to measure])] and the skipped cases [(model, B, T, why)], in measuring order."""
    todo, skipped = [], []
    for model, B, T in enumerate_cases(args.models, args.batches, args.contexts):
        Hq, Hkv, d = MODELS[model]
        pipes = [p for p in args.pipelines if key_of(row_base(p, model, B, T)) not in done]
        if not pipes:
            continue
        fit = [p for p in pipes if case_peak_bytes(p, B, T, Hq, Hkv, d, args.max_sets, args.workspace_mib) <= budget]
        if len(fit) < len(pipes):
            gb = max(case_peak_bytes(p, B, T, Hq, Hkv, d, args.max_sets, args.workspace_mib) for p in pipes) / 1e9
            why = f"{gb:.1f} GB > budget {budget / 1e9:.1f} GB for {', '.join(p for p in pipes if p not in fit)}"
            skipped.append((model, B, T, why))
        if fit:
            todo.append((model, B, T, fit))
    return todo, skipped


def run_grid(args, rf, ceil, t_start):
    import torch

    done = rf.done_keys() if args.resume else set()
    _, total = torch.cuda.mem_get_info()
    budget = args.mem_fraction * total
    todo, skipped = plan_rows(args, done, rf.key_of, budget)
    for model, B, T, why in skipped:
        log(f"skip {model} B={B} T={T}: {why}")
    n_total = sum(len(p) for *_, p in todo)
    log(f"{n_total} rows to measure in {len(todo)} shapes (stop starting rows after {args.max_seconds:.0f}s)")
    t_grid = time.time()
    n_rows = n_tried = 0
    for model, B, T, pipes in todo:
        for pipe in pipes:
            if time.time() - t_start > args.max_seconds:
                log(f"time budget ({args.max_seconds:.0f}s) reached after {n_rows} rows, {n_total - n_tried} left: "
                    f"rerun with --resume")
                return n_rows
            n_tried += 1
            try:
                row = measure_pipe(pipe, model, B, T, args, ceil)
            except torch.OutOfMemoryError:
                log(f"skip {pipe} {model} B={B} T={T}: out of memory")
                row = None
            except Exception as e:  # noqa: BLE001 - one case failing must not end the run
                log(f"FAILED {pipe} {model} B={B} T={T}: {type(e).__name__}: {e}")
                log("".join(traceback.format_exception(e)[-6:]).rstrip())
                row = None
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: nothing after it can be trusted
                log(f"CUDA context unusable after {pipe} {model} B={B} T={T} ({type(e).__name__}: {e}): stopping; "
                    f"rerun with --resume")
                return n_rows
            if row is None:
                continue
            rf.append(row)
            n_rows += 1
            el = time.time() - t_grid
            eta = el / n_tried * (n_total - n_tried)
            log(f"{model:13s} B={B:3d} T={T:6d} {pipe:8s} {row['median_s'] * 1e6:9.1f} us "
                f"{row['achieved_GBps']:7.0f} GB/s ({row['pct_read_ceiling']:5.1f}%) err {row['check_rel_err']} "
                f"[{n_tried}/{n_total}, {time.time() - t_start:4.0f}s, ETA {eta:4.0f}s]")
    return n_rows


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true", help="skip rows already in --out")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    ap.add_argument("--pipelines", nargs="+", default=list(PIPES), choices=list(PIPES))
    ap.add_argument("--max-seconds", type=float, default=450.0,
                    help="stop starting rows this long after the start (ceilings and compilation included)")
    ap.add_argument("--target-s", type=float, default=0.04, help="timed seconds per row (approximately)")
    ap.add_argument("--max-sets", type=int, default=1024, help="most input copies rotated through (as the grid)")
    ap.add_argument("--mem-fraction", type=float, default=0.8, help="share of the GPU memory one row may hold")
    ap.add_argument("--check-tol", type=float, default=2e-2,
                    help="largest accepted max|out - ref| / max|ref| (a row above it is refused)")
    ap.add_argument("--fi-backend", default="fa2",
                    help="BatchDecodeWithPagedKVCacheWrapper backend (fa2: what 'auto' resolves to on SM90 for FP16 "
                         "q with FP16 or FP8 KV, named so that no cuDNN/FA3 probing runs)")
    ap.add_argument("--workspace-mib", type=int, default=WORKSPACE_MIB, help="FlashInfer float workspace (MiB)")
    ap.add_argument("--no-precompile", action="store_true", help="compile each FlashInfer module on first use")
    ap.add_argument("--procs", type=int, default=6, help="parallel FlashInfer compilations")
    ap.add_argument("--fill-bytes", action="store_true",
                    help="only recompute bytes_moved etc. of --out with kvmodel.traffic (CPU, no GPU needed)")
    args = ap.parse_args(argv)
    for b in args.batches:
        if b < 1:
            ap.error(f"batch sizes must be >= 1, got {b}")
    for t in args.contexts:
        if t < 1:
            ap.error(f"contexts must be >= 1, got {t}")
    return args


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    if args.fill_bytes:
        log(f"updated {fill_bytes(args.out)} rows of {args.out}")
        return 0

    import torch
    from kvmodel.measure.bench_decode_attention import measure_ceilings
    from kvmodel.measure.results import ResultsFile

    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    vers = fi_versions()
    if any(p.startswith("FI") for p in args.pipelines) and not vers.get("flashinfer"):
        log(f"flashinfer does not import: {vers.get('flashinfer_error')} (install the wheels, see the docstring)")
        return 2
    props = torch.cuda.get_device_properties(0)
    log(f"GPU {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"flashinfer {vers.get('flashinfer')}, tvm_ffi {vers.get('tvm_ffi')}")
    ceil = measure_ceilings()
    log(f"ceilings: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s "
        f"({time.time() - t_start:.0f}s)")
    rf = ResultsFile(args.out, key_fields=KEY, fieldnames=PEER_FIELDS)
    rf.write_provenance(
        extra={"ceilings": ceil, "sms": props.multi_processor_count, "gpu": props.name,
               "benchmark": "decode_attention_peer", "flashinfer": vers.get("flashinfer", ""),
               "tvm_ffi": vers.get("tvm_ffi", ""),
               "peer": {"api": "flashinfer.BatchDecodeWithPagedKVCacheWrapper", "use_tensor_cores": True,
                        "kv_layout": "NHD", "page_size": PAGE_SIZE, "backend": args.fi_backend,
                        "use_cuda_graph": False, "plan": "once per shape, outside the graph, shared by the copies",
                        "fp8": "float8_e4m3fn K/V, per-tensor k_scale = v_scale = 1.0, fp16 q and output",
                        "workspace_mib": args.workspace_mib},
               "check_tol": args.check_tol},
        command=[sys.executable, "-m", "kvmodel.measure.bench_flashinfer"] + (sys.argv[1:] if argv is None
                                                                              else list(argv)))
    if not args.no_precompile:
        precompile(args.models, args.pipelines, args.fi_backend, args.procs)
    n = run_grid(args, rf, ceil, t_start)
    log(f"wrote {n} rows to {args.out} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
