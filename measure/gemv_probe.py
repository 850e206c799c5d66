"""GPU probe: the Triton weight-streaming GEMV (``kvmodel.kernels.gemv``) against cuBLAS on decode projections.

    python -m kvmodel.measure.gemv_probe --out gemv_probe.jsonl [--models qwen2.5-7b,llama-3.1-8b]
        [--batches 1,2,4,8] [--wide] [--budget-s 220] [--fused] [--pdl 0,16384]

``--fused`` (instead of the sweep): the prologue fusions of ``gemv`` against the unfused pairs they replace, at
the default configs — qkv: ``rmsnorm`` (e2e_decode's kernel) + ``gemv`` vs ``gemv(norm_weight=)``; down:
``silu_mul`` + ``gemv`` vs ``gemv(gate_up=True)`` (rows ``"kind": "gemv_fused"``, impl ``unfused`` / ``fused``;
this mode also imports :mod:`kvmodel.measure.e2e_decode` for the two small kernels).

``--pdl P1,P2,..`` (beside the sweep): the default config also as ``gemv(pdl=True, prefetch_bytes=P)`` for each
P — the timed calls are a back-to-back chain, so each call is a programmatic dependent of the one before it (rows
``config.pdl`` / ``config.prefetch_bytes``; a per-shape summary line compares them with the default).

One run: (1) the streaming-read ceiling (the Triton read kernel of :mod:`kvmodel.measure.probes` over a 4 GiB
buffer, timed the same way as every other row); (2) for each projection of Qwen2.5-7B and Llama-3.1-8B (fused qkv,
o, fused gate_up, down, lm_head) and B ∈ {1, 2, 4, 8}: ``F.linear`` (cuBLAS) and the Triton ``gemv`` over a small
sweep of launch configs (the default table's pick first, then a handful of alternatives: block_n, block_k,
split_k, num_warps, num_stages, dot), each checked against an fp32 reference.

Timing (as :func:`kvmodel.measure.probes.time_graph`): the calls are captured back to back in one CUDA graph,
cycling over copies of the weight that together span ≥ 4× the 60 MB L2 (one copy when the matrix alone is
≥ that), and the graph is replayed; a sample is one replay / calls, the row has the median. A config that fails
to compile or run is recorded with its error and the sweep goes on.

Output: JSON lines appended to ``--out``: one ``{"kind": "meta", ...}`` line (GPU, versions, command, ceiling),
then one ``{"kind": "gemv", ...}`` line per (shape, B, impl, config) with ``median_s``, ``bytes`` (weights + x +
y (+ bias)), ``GBps``, ``pct`` (of the read ceiling) and ``max_err`` (vs fp32, beside cuBLAS's own). One summary
line per shape is printed.

Needs only torch, triton and ``kvmodel.kernels`` / ``kvmodel.measure.probes`` (no pydantic).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import sys
import time
from collections.abc import Sequence

L2_BYTES = 60 * 2**20
ROTATE_BYTES = 4 * L2_BYTES
GiB = 2**30

#: (model, hidden, [(name, K, N, bias)]) — x[B, K] @ W[N, K]^T, the step's fused projections
SHAPES = {
    "qwen2.5-7b": ("Qwen2.5-7B", [("qkv", 3584, 4608, True), ("o", 3584, 3584, False),
                                  ("gate_up", 3584, 2 * 18944, False), ("down", 18944, 3584, False),
                                  ("lm_head", 3584, 152064, False)]),
    "llama-3.1-8b": ("Llama-3.1-8B", [("qkv", 4096, 6144, False), ("o", 4096, 4096, False),
                                      ("gate_up", 4096, 2 * 14336, False), ("down", 14336, 4096, False),
                                      ("lm_head", 4096, 128256, False)]),
}
BATCHES = (1, 2, 4, 8)


def _cfg(bn, bk, dot, warps=4, stages=3, split=1) -> dict:
    return {"block_n": bn, "block_k": bk, "split_k": split, "num_warps": warps, "num_stages": stages, "dot": dot}


#: alternatives timed beside the default table's pick, for B = 1 and for B ≥ 2: fp32-FMA tiles (dot False),
#: tl.dot with x as the M side (True) and with the w tile as the M side ("swap", a wgmma from block_n 64 at 4 warps)
_ALTS = {
    1: [_cfg(4, 1024, False), _cfg(16, 256, False), _cfg(8, 512, False, warps=8), _cfg(2, 512, False),
        _cfg(8, 512, False, split=2), _cfg(16, 512, True, warps=2)],
    2: [_cfg(16, 512, True, warps=2), _cfg(16, 512, True, warps=1), _cfg(32, 256, True, stages=4),
        _cfg(64, 128, "swap", stages=4), _cfg(128, 128, "swap"), _cfg(16, 512, True, warps=2, split=2),
        _cfg(4, 256, False)],
}
#: more with --wide (the exploration the table was chosen from)
_ALTS_WIDE = {
    1: [_cfg(4, 512, False), _cfg(8, 512, False), _cfg(8, 256, False), _cfg(16, 512, False),
        _cfg(8, 1024, False, warps=8), _cfg(8, 512, False, stages=1), _cfg(8, 512, False, warps=2)],
    2: [_cfg(32, 256, True), _cfg(64, 256, True), _cfg(64, 256, "swap"), _cfg(16, 256, True, warps=2),
        _cfg(32, 512, True, warps=2), _cfg(64, 512, True), _cfg(64, 256, "swap", warps=8),
        _cfg(32, 256, True, warps=2, split=2), _cfg(8, 256, False), _cfg(8, 256, False, warps=8)],
}


def sweep_configs(N: int, K: int, B: int, wide: bool = False, sms: int = 132) -> list[dict]:
    """Launch configs to time for one shape: ``{}`` (the default table's pick) first, then a handful of
    alternatives for B's class (B = 1, B ≥ 2), more with ``wide``; duplicates of the default dropped."""
    from kvmodel.kernels.gemv import default_config

    d = default_config(N, K, B, sms)
    full = _cfg(d["block_n"], d["block_k"], d["dot"], d["num_warps"], d["num_stages"], d["split_k"])
    cls = 1 if B == 1 else 2
    alts = list(_ALTS[cls]) + (list(_ALTS_WIDE[cls]) if wide else [])
    out, seen = [{}], {tuple(sorted(full.items(), key=str))}
    for a in alts:
        if a["dot"] is False and B > 2 and a["block_n"] * B > 32:  # per-row reductions: B × block_n small
            continue
        key = tuple(sorted(a.items(), key=str))
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def _resolved(cfg: dict, N: int, K: int, B: int, sms: int) -> dict:
    from kvmodel.kernels.gemv import default_config

    d = default_config(N, K, B, sms)
    r = {k: d[k] for k in ("block_n", "block_k", "split_k", "num_warps", "num_stages", "dot")}
    if cfg and ("block_n" in cfg or "block_k" in cfg) and "split_k" not in cfg:
        r["split_k"] = 1
    r.update(cfg)
    return r


def measure_read_ceiling(log=print) -> float:
    """Best streaming-read bandwidth (GB/s) of the probes module's Triton read kernel over 4 GiB (2 configs)."""
    import torch
    from kvmodel.measure.probes import time_graph, triton_read

    buf = torch.empty(GiB, dtype=torch.int32, device="cuda")  # 4 GiB
    buf.random_()
    best = 0.0
    for block, unroll in ((2048, 8), (4096, 4)):
        out = torch.empty(buf.numel() // (block * unroll) + 1, dtype=torch.int32, device="cuda")
        call = functools.partial(triton_read, buf, out, block, unroll)
        t = time_graph([call] * 3, min_time_s=0.05, max_replays=10, min_replays=3)
        gbps = buf.numel() * 4 / t.median_s / 1e9
        log(f"# read ceiling: block {block} x{unroll}: {gbps:.0f} GB/s")
        best = max(best, gbps)
    buf = out = call = None
    torch.cuda.empty_cache()
    return best


def _meta(args, ceiling) -> dict:
    import torch
    import triton
    from kvmodel.kernels.gemv import KERNEL_VERSION

    p = torch.cuda.get_device_properties(0)
    return {"kind": "meta", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "gemv_kernel": KERNEL_VERSION,
            "read_ceiling_GBps": ceiling, "rotate_bytes": ROTATE_BYTES, "command": " ".join(sys.argv),
            "args": vars(args)}


def _recorder(out_path: str, meta: dict):
    """(rows, emit): ``emit(row)`` keeps the row and appends it to ``out_path`` as one JSON line at once (nothing
    measured is lost on interruption); the run's ``meta`` row is written first."""
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")

    emit(meta)
    return rows, emit


def _addmm(torch, bias, x, y, w):
    return torch.addmm(bias, x, w.t(), out=y)


def _matmul(torch, x, y, w):
    return torch.matmul(x, w.t(), out=y)


def _gemv_call(gemv, x, bias, y, workspace, cfg, w):
    return gemv(x, w, bias, out=y, workspace=workspace, **cfg)


class _Case:
    """One (shape, B): its weight copies, output, fp32 reference and row template; times one impl/config."""

    def __init__(self, ws, reps, y, ref, base, ceiling, emit):
        self.ws, self.reps, self.y, self.ref, self.base = ws, reps, y, ref, base
        self.ceiling, self.emit = ceiling, emit

    def record(self, impl: str, cfg: dict, fn, max_err: float | None = None) -> dict:
        """Check ``fn(w)`` (writes y) against the reference, then time it over the rotated copies; emit the row."""
        import torch
        from kvmodel.measure.probes import time_graph

        row = dict(self.base, impl=impl, config=cfg)
        try:
            self.y.fill_(float("nan"))
            fn(self.ws[0])
            torch.cuda.synchronize()
            row["max_err"] = float((self.y.float() - self.ref).abs().max().nan_to_num(float("inf")))
            if max_err is not None and not row["max_err"] <= max_err:
                raise ArithmeticError(f"max error {row['max_err']:.3g} > {max_err:.3g} (2x cuBLAS + 1e-2)")
            calls = [functools.partial(fn, w) for w in self.ws] * self.reps
            t = time_graph(calls, min_time_s=0.03, max_replays=20, min_replays=5)
            gbps = row["bytes"] / t.median_s / 1e9
            row.update(status="ok" if t.graph else "ok-eager", median_s=t.median_s, p10_s=t.p10_s,
                       p90_s=t.p90_s, GBps=gbps, pct=100.0 * gbps / self.ceiling)
        except Exception as e:  # noqa: BLE001 - one failing config must not stop the sweep
            row.update(status="wrong" if isinstance(e, ArithmeticError) else "error",
                       error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.synchronize()
        self.emit(row)
        return row


def run(out_path: str, models: Sequence[str] = tuple(SHAPES), batches: Sequence[int] = BATCHES,
        dtype_name: str = "float16", wide: bool = False, budget_s: float | None = 220.0,
        shapes: Sequence[str] | None = None, args=None, log=print,
        pdl_prefetch: Sequence[int] = ()) -> list[dict]:
    import torch
    from kvmodel.kernels.gemv import gemv

    t0 = time.time()
    dt = getattr(torch, dtype_name)
    esize = torch.empty((), dtype=dt).element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceiling = measure_read_ceiling(log)
    meta = _meta(args or argparse.Namespace(), ceiling)
    if pdl_prefetch:
        from kvmodel.kernels.gemv import PDL_VERSION, use_pdl

        meta.update(pdl_active=use_pdl(True, torch.device("cuda")), gemv_pdl=PDL_VERSION)
        log(f"# pdl rows: prefetch_bytes {list(pdl_prefetch)}, PDL active: {meta['pdl_active']}")
    rows, emit = _recorder(out_path, meta)
    F = torch.nn.functional
    gen = torch.Generator(device="cuda").manual_seed(0)
    todo = [(SHAPES[m][0], name, K, N, has_b) for m in models for (name, K, N, has_b) in SHAPES[m][1]
            if not shapes or name in shapes]
    summary = []
    for i_shape, (model, name, K, N, has_b) in enumerate(todo):
        if budget_s and time.time() - t0 > budget_s:
            log(f"# budget of {budget_s:.0f} s reached: {len(todo) - i_shape} shapes left out")
            break
        wbytes = N * K * esize
        n_copies = max(1, math.ceil(ROTATE_BYTES / wbytes)) if wbytes < ROTATE_BYTES else 1
        ws = []
        for _ in range(n_copies):
            w = torch.empty(N, K, device="cuda", dtype=dt)
            w.normal_(0.0, 1.0 / math.sqrt(K), generator=gen)
            ws.append(w)
        bias = torch.randn(N, device="cuda", dtype=dt, generator=gen) * 0.1 if has_b else None
        reps = max(1, math.ceil(max(n_copies, math.ceil(0.5 * GiB / wbytes)) / n_copies))
        for B in batches:
            x = torch.randn(B, K, device="cuda", dtype=dt, generator=gen)
            y = torch.empty(B, N, device="cuda", dtype=dt)
            ref = F.linear(x.float(), ws[0].float(), bias.float() if bias is not None else None)
            moved = wbytes + (B * K + B * N + (N if has_b else 0)) * esize
            base = {"kind": "gemv", "model": model, "name": name, "B": B, "K": K, "N": N, "dtype": dtype_name,
                    "bytes": moved, "n_copies": n_copies, "calls": n_copies * reps, "read_ceiling_GBps": ceiling}

            case = _Case(ws=ws, reps=reps, y=y, ref=ref, base=base, ceiling=ceiling, emit=emit)
            if bias is not None:
                cb = case.record("cublas", {}, functools.partial(_addmm, torch, bias, x, y))
            else:
                cb = case.record("cublas", {}, functools.partial(_matmul, torch, x, y))
            cb_err = cb.get("max_err")
            best = default = None
            pdl_rows = []
            cfgs = sweep_configs(N, K, B, wide, sms) + [{"pdl": True, "prefetch_bytes": int(p)} for p in pdl_prefetch]
            for cfg in cfgs:
                ws_dict: dict = {}
                fn = functools.partial(_gemv_call, gemv, x, bias, y, ws_dict, cfg)
                r = case.record("triton", _resolved(cfg, N, K, B, sms) | {"default": not cfg}, fn,
                                max_err=None if cb_err is None else 2 * cb_err + 1e-2)
                if not r["status"].startswith("ok"):
                    log(f"  {r['status']} {model} {name} B={B} {r['config']}: {r.get('error', '')[:200]}")
                    continue
                if not cfg:
                    default = r
                if cfg.get("pdl"):
                    pdl_rows.append(r)
                    continue  # a chain effect, not a config: kept out of "best"
                if best is None or r["median_s"] < best["median_s"]:
                    best = r

            def fmt(r):
                if r is None or "GBps" not in r:
                    return "      -"
                return f"{r['median_s'] * 1e6:8.2f} us {r['GBps']:5.0f} GB/s {r['pct']:5.1f}%"

            line = (f"{model:13s} {name:7s} B={B} {K:>5d}x{N:<6d} cuBLAS {fmt(cb)} | triton default {fmt(default)}"
                    f" | best {fmt(best)}")
            if best is not None:
                c = best["config"]
                kind = {False: "fma", True: "dot"}.get(c["dot"], c["dot"])
                line += (f"  [bn {c['block_n']} bk {c['block_k']} sk {c['split_k']} w {c['num_warps']} "
                         f"s {c['num_stages']} {kind}]")
            log(line + f"  ({time.time() - t0:.0f} s)")
            if pdl_rows and default is not None:
                log("    pdl: " + "  ".join(
                    f"prefetch {r['config']['prefetch_bytes']}: {r['median_s'] * 1e6:.2f} us "
                    f"({100 * (r['median_s'] / default['median_s'] - 1):+.1f}%, {r['pct']:.1f}%)" for r in pdl_rows))
            summary.append((model, name, B, cb, default, best))
        del ws
        torch.cuda.empty_cache()
    # per-layer + lm_head totals (what one decode step spends in these projections)
    for model in sorted({s[0] for s in summary}):
        for B in batches:
            sel = [s for s in summary if s[0] == model and s[2] == B]
            if not sel or any(r is None or "median_s" not in r for s in sel for r in s[3:]):
                continue
            tot = [sum(s[k]["median_s"] for s in sel) for k in (3, 4, 5)]
            log(f"# {model} B={B}: sum over {len(sel)} projections: cuBLAS {tot[0] * 1e6:.1f} us, triton default "
                f"{tot[1] * 1e6:.1f} us ({100 * (tot[0] / tot[1] - 1):+.1f}%), best {tot[2] * 1e6:.1f} us")
    log(f"# done in {time.time() - t0:.0f} s -> {out_path}")
    return rows


def run_fused(out_path: str, models: Sequence[str] = tuple(SHAPES), batches: Sequence[int] = BATCHES,
              dtype_name: str = "float16", args=None, log=print) -> list[dict]:
    """qkv with the RMSNorm prologue and down with the SiLU·mul prologue vs the unfused pairs (default configs),
    timed as the sweep (rotated weights, graph replay); each output checked against the fp32 reference."""
    import torch
    from kvmodel.kernels.gemv import gemv, gemv_ref
    from kvmodel.measure.e2e_decode import rmsnorm, silu_mul

    t0 = time.time()
    dt = getattr(torch, dtype_name)
    esize = torch.empty((), dtype=dt).element_size()
    ceiling = measure_read_ceiling(log)
    rows, emit = _recorder(out_path, _meta(args or argparse.Namespace(), ceiling) | {"mode": "fused"})
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m in models:
        model, projs = SHAPES[m]
        for name, K, N, has_b in projs:
            if name not in ("qkv", "down"):
                continue
            wbytes = N * K * esize
            n_copies = max(1, math.ceil(ROTATE_BYTES / wbytes))
            ws = [torch.empty(N, K, device="cuda", dtype=dt).normal_(0.0, 1.0 / math.sqrt(K), generator=gen)
                  for _ in range(n_copies)]
            bias = torch.randn(N, device="cuda", dtype=dt, generator=gen) * 0.1 if has_b else None
            nw = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dt, generator=gen)
            reps = max(1, math.ceil(max(n_copies, math.ceil(0.5 * GiB / wbytes)) / n_copies))
            for B in batches:
                y = torch.empty(B, N, device="cuda", dtype=dt)
                wsd: dict = {}
                if name == "qkv":
                    x = torch.randn(B, K, device="cuda", dtype=dt, generator=gen)
                    mid = torch.empty(B, K, device="cuda", dtype=dt)
                    kw = {"norm_weight": nw}

                    def unfused(w, x=x, mid=mid, y=y, wsd=wsd, nw=nw, bias=bias):
                        rmsnorm(x, nw, mid)
                        gemv(mid, w, bias, out=y, workspace=wsd)
                else:
                    x = torch.randn(B, 2 * K, device="cuda", dtype=dt, generator=gen)
                    mid = torch.empty(B, K, device="cuda", dtype=dt)
                    kw = {"gate_up": True}

                    def unfused(w, x=x, mid=mid, y=y, wsd=wsd, bias=bias):
                        silu_mul(x, mid)
                        gemv(mid, w, bias, out=y, workspace=wsd)

                def fused(w, x=x, y=y, wsd=wsd, kw=kw, bias=bias):
                    gemv(x, w, bias, out=y, workspace=wsd, **kw)

                ref = gemv_ref(x, ws[0], bias, **kw)
                moved = wbytes + (B * x.shape[1] + B * N + (N if has_b else 0)) * esize
                base = {"kind": "gemv_fused", "model": model, "name": name, "B": B, "K": K, "N": N,
                        "dtype": dtype_name, "bytes": moved, "n_copies": n_copies, "calls": n_copies * reps,
                        "read_ceiling_GBps": ceiling, "prologue": "rmsnorm" if name == "qkv" else "silu_mul"}
                case = _Case(ws=ws, reps=reps, y=y, ref=ref, base=base, ceiling=ceiling, emit=emit)
                u = case.record("unfused", {}, unfused)
                f = case.record("fused", {}, fused,
                                max_err=None if u.get("max_err") is None else 2 * u["max_err"] + 1e-2)
                if "median_s" in u and "median_s" in f:
                    log(f"{model:13s} {name:5s} B={B} unfused {u['median_s'] * 1e6:7.2f} us  fused "
                        f"{f['median_s'] * 1e6:7.2f} us  ({100 * (f['median_s'] / u['median_s'] - 1):+.1f}%)  "
                        f"({time.time() - t0:.0f} s)")
                else:
                    log(f"{model:13s} {name:5s} B={B} unfused {u['status']} fused {f['status']}: "
                        f"{u.get('error', '')} {f.get('error', '')}")
            del ws
            torch.cuda.empty_cache()
    log(f"# done in {time.time() - t0:.0f} s -> {out_path}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Triton GEMV vs cuBLAS on decode projection shapes (GPU)")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--shapes", default="", help="comma list of projection names (default all)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--wide", action="store_true", help="a wider config sweep (slower)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop starting new shapes after this long")
    ap.add_argument("--fused", action="store_true",
                    help="instead of the sweep: qkv with the RMSNorm prologue and down with the SiLU*mul "
                         "prologue vs the unfused pairs (default configs)")
    ap.add_argument("--pdl", default="",
                    help="comma list of prefetch_bytes: also time the default config as gemv(pdl=True, "
                         "prefetch_bytes=P) chains (Hopper programmatic dependent launch)")
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    models = [m.strip().lower() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {list(SHAPES)}", file=sys.stderr)
        return 2
    if a.fused:
        run_fused(a.out, models, [int(b) for b in a.batches.split(",")], a.dtype, args=a,
                  log=lambda s: print(s, flush=True))
        return 0
    run(a.out, models, [int(b) for b in a.batches.split(",")], a.dtype, a.wide, a.budget_s,
        [s for s in a.shapes.split(",") if s], args=a, log=lambda s: print(s, flush=True),
        pdl_prefetch=[int(p) for p in a.pdl.split(",") if p.strip()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
