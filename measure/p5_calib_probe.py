"""Calibration rows for the fused kernel's (P5) split-K merge and its few-programs-per-SM rate, at the held-out
validation's TRAINING contexts of its training models only, written in the decode-attention grid's CSV format.

    python -m kvmodel.measure.p5_calib_probe --out validation/data/h200/decode_attention_calib.csv

What the grid cannot separate (kvmodel validate, section 4 "Still missing"): each occupancy curve's merge cost per
split is identified by one 128-split training row (Llama-3.1-8B B = 1, T = 128K), and the training rows at head dim
128 never launch fewer than ~1,000 one-warp programs (~8 per SM), so the held-out 64-128-split calls of short
programs are over-predicted (up to +25 %) and the 512-program ones under-predicted (-10..-13 %). The cases are
pairs of launches with the SAME split-kernel work — programs, tiles per program and memory order (grid
(splits, Hkv, B), split fastest: program i reads the i-th contiguous chunk of the cache in both) — that differ only
in the split count, i.e. in the merge launch: (T = 128K, B = 1, S splits) and (T = 16K, B = 8, S/8 splits) for
S = 32, 64, 128 (P = 256, 512, 1024 programs at Hkv = 8: the rate at 2-8 programs per SM too), and for short
programs (T = 16K, B = 2, S = 64 / 128) against (T = 1K, B = 32, S = 4 / 8). Every case keeps the block shape the
kernel picks for its size (``default_config``, ported as ``kvmodel.timing.kernel_config``): an explicit split
count changes nothing else. Plus the FP16 Llama-3.1-8B B = 32, T = 128K row at its 2 splits, whose rate the grid's
same-work pair (Qwen2.5-7B B = 64, 2 splits: 13 % faster) contradicts, and B = 16 at 4 splits beside it (half the
work per program, same program count) as the session's reference.

Rows: the grid's fields, variant ``sp<S>`` (so that keys stay unique beside the grid's own split counts), the
launched split count in ``num_splits``. ``kvmodel.validation.heldout.calibration_rows`` adds them to the training
split (and to ``kvmodel predict``'s held-out calibration) when the file sits beside ``decode_attention.csv`` and its
provenance names the grid's kernel version. Appends as it goes (``--resume`` skips rows already written).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from kvmodel.measure import bench_decode_attention as bench

#: The validation split's training contexts and models (kvmodel.validation.heldout.split_roles on the committed
#: grid: alternate contexts 1K, 16K, 128K; Qwen2.5-7B held out entirely).
TRAIN_CONTEXTS = (1024, 16384, 131072)
TRAIN_MODELS = ("llama-3.1-8b", "gemma-3-12b", "qwen2.5-0.5b")


def _pairs(model, fmt, long=(32, 64, 128)):
    """(T = 128K, B = 1, S) and (T = 16K, B = 8, S / 8): the same programs and tiles per program."""
    out = []
    for s in long:
        out += [(model, 1, 131072, fmt, s), (model, 8, 16384, fmt, s // 8)]
    return out


def _short(model, fmt):
    """Short programs (4-8 tiles of 32 tokens): (T = 16K, B = 2, S) and (T = 1K, B = 32, S / 16)."""
    return [(model, 2, 16384, fmt, 64), (model, 32, 1024, fmt, 4), (model, 2, 16384, fmt, 128),
            (model, 32, 1024, fmt, 8)]


#: (model, B, T, (k_bits, v_bits), num_splits)
CALIB6 = (
    [c for f in ((8, 8), (4, 4), (8, 4), (16, 16)) for c in _pairs("llama-3.1-8b", f)]
    + [c for f in ((8, 8), (4, 4)) for c in _short("llama-3.1-8b", f)]
    + [c for f in ((8, 8), (4, 4)) for c in _pairs("qwen2.5-0.5b", f)]
    + [c for f in ((8, 8), (4, 4)) for c in _pairs("gemma-3-12b", f, long=(32, 64))]
    + [("llama-3.1-8b", 32, 131072, (16, 16), 2), ("llama-3.1-8b", 16, 131072, (16, 16), 4)]
)
PROBE_SETS = {"calib6": CALIB6}


def launched_splits(T: int, block_n: int, num_splits: int) -> int:
    """Splits the kernel launches for an explicit ``num_splits`` (``decode_attention``: no empty splits)."""
    tiles = -(-T // block_n)
    per = -(-tiles // min(num_splits, tiles))
    return -(-T // (per * block_n))


def case_rows(cases=CALIB6) -> list[dict]:
    """The rows' identity (grid fields without the timings): variant ``sp<S>``, the launched split count, and the
    block shape / programs / tiles per program the kernel runs (for checks; not written)."""
    from kvmodel.timing import kernel_config, kernel_config_key

    out = []
    for model, B, T, (kb, vb), s in cases:
        Hq, Hkv, d = bench.MODELS[model]
        cfg = kernel_config(kb, vb, d, B, Hkv, T)
        ns = launched_splits(T, cfg["block_n"], s)
        out.append(dict(pipeline="P5", variant=f"sp{s}", model=model, B=B, T=T, Hq=Hq, Hkv=Hkv, d=d, k_bits=kb,
                        v_bits=vb, group=bench.GROUP, num_splits=ns, shape=kernel_config_key(cfg),
                        programs=B * Hkv * ns, tiles_per_program=T / ns / cfg["block_n"]))
    return out


def _compile(spec):
    """Compile one (model, format, block shape, split / no split) variant in a worker (Triton's disk cache)."""
    import torch

    from kvmodel.kernels.decode_attention import decode_attention

    model, kb, vb, B, T, s = spec
    Hq, Hkv, d = bench.MODELS[model]
    try:
        # the block shape is picked by the launch size: compile at the case's size class with a short cache
        c = bench.make_cache(1, Hkv, 512, d, kb, vb, "cuda")
        q = torch.randn(1, Hq, d, dtype=torch.float16, device="cuda")
        from kvmodel.kernels.decode_attention import default_config

        cfg = default_config(kb, vb, d, B, Hkv, T)
        decode_attention(q, c, num_splits=min(s, 2), block_n=cfg["block_n"], num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"])
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{spec}: {type(e).__name__}: {e}"


def run(args) -> int:
    import multiprocessing as mp

    import torch

    from kvmodel.kernels.decode_attention import decode_attention
    from kvmodel.measure.results import ResultsFile

    if not torch.cuda.is_available():
        bench.log("needs a CUDA GPU")
        return 2
    cases = PROBE_SETS[args.probe_set]
    props = torch.cuda.get_device_properties(0)
    t_start = time.time()
    ceil = bench.measure_ceilings()
    bench.log(f"ceilings: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s")
    rf = ResultsFile(args.out, key_fields=bench.KEY, fieldnames=bench.FIELDS)
    rf.write_provenance(extra={"ceilings": ceil, "sms": props.multi_processor_count, "gpu": props.name,
                               "benchmark": "decode_attention", "probe_set": args.probe_set,
                               "note": "explicit split counts at the validation's training contexts and models "
                                       "(kvmodel.measure.p5_calib_probe)"},
                        command=[sys.executable, "-m", "kvmodel.measure.p5_calib_probe"] + sys.argv[1:])
    done = rf.done_keys() if args.resume else set()
    specs = sorted({(m, kb, vb, B, T, min(s, 2)) for m, B, T, (kb, vb), s in cases})
    with mp.get_context("spawn").Pool(min(args.procs, len(specs))) as pool:
        errs = [e for e in pool.map(_compile, specs) if e]
    bench.log(f"compiled {len(specs)} variants in {time.time() - t_start:.0f}s; errors: {errs[:3]}")
    n = 0
    for ident in case_rows(cases):
        if time.time() - t_start > args.max_seconds:
            bench.log(f"time budget ({args.max_seconds}s) reached: stopping; rerun with --resume")
            break
        row = {k: ident[k] for k in bench.KEY + ["num_splits"]}
        if rf.key_of(row) in done:
            continue
        model, B, T, d, Hq, Hkv = ident["model"], ident["B"], ident["T"], ident["d"], ident["Hq"], ident["Hkv"]
        kb, vb, s = ident["k_bits"], ident["v_bits"], int(ident["variant"][2:])
        ws = bench.cache_bytes(B, Hkv, T, d, kb, vb)
        n_sets = max(1, min(args.max_sets, math.ceil(4 * bench.L2_BYTES / ws)))
        caches = [bench.make_cache(B, Hkv, T, d, kb, vb, "cuda") for _ in range(n_sets)]
        qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
        wss = [dict() for _ in range(n_sets)]
        fn = lambda i: decode_attention(qs[i], caches[i], out=outs[i], workspace=wss[i], num_splits=s)  # noqa: E731
        med, p10, p90, ns_, R = bench.time_graph(fn, n_sets, target_s=args.target_s)
        nbytes, source = bench.bytes_moved("P5", B, T, Hq, Hkv, d, kb, vb)
        gbps = nbytes / med / 1e9
        row.update(gqa_shared=True, median_s=med, p10_s=p10, p90_s=p90, n_samples=ns_, calls_per_sample=R,
                   bytes_moved=int(nbytes), bytes_source=source, achieved_GBps=round(gbps, 1),
                   read_ceiling_GBps=round(ceil["read_GBps"], 1), copy_ceiling_GBps=round(ceil["copy_GBps"], 1),
                   pct_read_ceiling=round(100 * gbps / ceil["read_GBps"], 1), working_sets=n_sets)
        rf.append(row)
        n += 1
        bench.log(f"{model:13s} B={B:3d} T={T:6d} {kb:2d}/{vb:2d} S={s:3d} ({ident['shape']}, "
                  f"{ident['programs']} programs x {ident['tiles_per_program']:g} tiles) {med * 1e6:9.1f} us  "
                  f"[{time.time() - t_start:5.0f}s]")
        del caches, qs, outs, wss
        torch.cuda.empty_cache()
    bench.log(f"wrote {n} rows to {args.out} in {time.time() - t_start:.0f}s")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="validation/data/h200/decode_attention_calib.csv")
    ap.add_argument("--probe-set", choices=sorted(PROBE_SETS), default="calib6")
    ap.add_argument("--resume", action="store_true", help="skip rows already in --out")
    ap.add_argument("--target-s", type=float, default=0.02, help="timed seconds per row (approximately)")
    ap.add_argument("--max-sets", type=int, default=1024, help="most input copies rotated through (as the grid)")
    ap.add_argument("--max-seconds", type=float, default=110.0, help="stop starting rows after this")
    ap.add_argument("--procs", type=int, default=16)
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
