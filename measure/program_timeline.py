"""When each program of the fused split kernel runs: per-program start / end times and SMs, from %globaltimer.

    python -m kvmodel.measure.program_timeline --out program_timeline.jsonl [--cases large] [--raw raw.jsonl]

For each case (model shape, B, T, K/V format, P5 variant) ``R`` calls over rotated working sets (≫ L2) are
captured in one CUDA graph, each call writing its programs' stamps (``decode_attention(stamps=)``: start and end
%globaltimer in ns and the SM id) to its own buffer; the graph is replayed until steady, and the last replay's
stamps are summarised per call (medians over the R calls): the split kernel's span (first program start to last
program end), how far program starts spread (is the launch one wave?), the most programs resident on one SM at
once, program durations, when programs end (p50 / p90 / last) and the SMs' idle time at the end (span − the SM's
last end, averaged over SMs), plus the gap from one call's last program to the next call's first (the merge
kernel and the launch between). The same calls without stamps are timed beside them (the stamps' overhead).

Why: at 250-600 MB per call the 4-bit split kernel fits ~25 µs + bytes / 3.05 TB/s on the H100 (NOTES.md,
session 11); whether that fixed part is start-up (every program slow to reach speed), a tail (programs of equal
work ending at different times: unequal bandwidth between SMs) or more than one wave decides the fix (a
persistent kernel that claims tiles, or different split sizes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

from kvmodel.measure.bench_decode_attention import (L2_BYTES, MODELS, PROBE_VARIANTS, cache_bytes, capture_graph, log,
                                                    make_cache, measure_ceilings, time_graph, warm_up)

#: (model, B, T, (k_bits, v_bits), [P5 variants of bench_decode_attention.PROBE_VARIANTS])
CASES = {
    "large": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "pps16", "pe8", "pe8pps16", "pe8pps32", "pe4pps16"]),
        ("llama-3.1-8b", 16, 32768, (4, 4), ["dflt", "pe8pps16"]),
        ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "pe8pps16", "pe16pps32"]),
        ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt"]),
        ("llama-3.1-8b", 64, 4096, (4, 4), ["dflt"]),
        ("llama-3.1-8b", 8, 32768, (16, 16), ["dflt"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt", "pe8pps16"]),
        ("gemma-3-12b", 16, 32768, (4, 4), ["dflt", "pe8pps16"]),
        ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "pe8pps16"]),
    ],
    # the merge of large launches (session 12): a programmatic dependent launch or the fused last-program merge
    # against the second launch, where call 2 put ~4-5 us between the split kernel's last program and the next call
    "merge": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "pdl", "fused"]),
        ("llama-3.1-8b", 64, 4096, (4, 4), ["dflt", "pdl", "fused"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt", "pdl", "fused"]),
        ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "pdl"]),
        ("qwen2.5-0.5b", 64, 32768, (4, 4), ["dflt", "pdl"]),
        ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "pdl"]),
    ],
    # rotated tile order (session 12): the split programs of a head start at addresses congruent modulo the split's
    # byte size (a power of two) and advance at one pace; the streaming-read kernel, at 99 % of the ceiling, does
    # not. Does walking each split from a program-dependent tile (rotate_tiles) narrow the spread of program times?
    # kfst2: the 4/4 1-warp shape with 2 pipeline stages instead of 3 (half the bytes in flight per program: fewer
    # requests queued at the memory, a fairer share?)
    "rot": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "rot", "kfst2"]),
        ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "rot", "kfst2"]),
        ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "rot"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt", "rot", "kfst2"]),
        ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "rot", "kfst2"]),
        ("gemma-3-12b", 16, 32768, (4, 4), ["dflt", "rot", "kfst2"]),
        ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "rot"]),
        ("llama-3.1-8b", 64, 4096, (4, 4), ["dflt", "rot"]),
        ("llama-3.1-8b", 8, 32768, (16, 16), ["dflt", "rot"]),
    ],
    # pipeline depth of the 4/4 large shape (session 12): 2 stages lost 8-10 % against 3 (the rot set's kfst2);
    # does a 4th help? At d = 256 four stages need ~36 KB of shared memory per program: 6 per SM fit, not 8
    "stages": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "kfst4"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt", "kfst4"]),
        ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "kfst4"]),
        ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "kfst4pps6", "kfst4"]),
        ("gemma-3-12b", 16, 32768, (4, 4), ["dflt", "kfst4pps6"]),
        ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "kfst4"]),
    ],
    # tail pool (session 12): the slowest programs end ~9 us after the median one at 302 MB (memory unfairness
    # between SMs and programs: more bytes in flight, wider spread); a pool of end-of-head chunks claimed by the
    # head's programs once their own tiles are done evens the ends without more partials (tpFFcC: FF % in C-tile
    # chunks)
    "pool": [
        ("llama-3.1-8b", 8, 32768, (4, 4), ["dflt", "tp05c2", "tp10c2", "tp10c4", "tp15c4", "tp20c4", "tp10c8"]),
        ("qwen2.5-7b", 32, 16384, (4, 4), ["dflt", "tp10c2", "tp10c4", "tp20c4"]),
        ("gemma-3-12b", 8, 32768, (4, 4), ["dflt", "tp10c2", "tp10c4", "tp20c4"]),
        ("llama-3.1-8b", 64, 4096, (4, 4), ["dflt", "tp10c2", "tp10c4"]),
        ("llama-3.1-8b", 32, 32768, (4, 4), ["dflt", "tp10c4", "tp20c4"]),
        ("gemma-3-12b", 16, 32768, (4, 4), ["dflt", "tp10c4", "tp20c4"]),
        ("llama-3.1-8b", 32, 32768, (8, 4), ["dflt", "tp10c4"]),
        ("llama-3.1-8b", 32, 32768, (8, 8), ["dflt", "tp10c4"]),
        ("llama-3.1-8b", 16, 131072, (4, 4), ["dflt", "tp10c4"]),
    ],
    "tiny": [("qwen2.5-0.5b", 2, 4096, (4, 4), ["dflt"])],
}
STAMP_FIELDS = 4  # start ns, end ns, SM id, unused (int64 each)


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def max_resident(starts, ends) -> int:
    """Most intervals [start, end) open at one instant (programs resident on one SM at once)."""
    ev = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends], key=lambda x: (x[0], x[1]))
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


def call_summary(stamps) -> dict:
    """Summary (µs, relative to the call's first program start) of one call's stamps: rows (start_ns, end_ns, sm)."""
    rows = [(int(r[0]), int(r[1]), int(r[2])) for r in stamps]
    if not rows:
        raise ValueError("no stamps")
    if any(e < s for s, e, _ in rows):
        raise ValueError("a program ends before it starts")
    t0 = min(s for s, _, _ in rows)
    t1 = max(e for _, e, _ in rows)
    span = (t1 - t0) / 1e3
    starts = [(s - t0) / 1e3 for s, _, _ in rows]
    ends = [(e - t0) / 1e3 for _, e, _ in rows]
    durs = [(e - s) / 1e3 for s, e, _ in rows]
    by_sm: dict[int, list] = {}
    for s, e, sm in rows:
        by_sm.setdefault(sm, []).append((s, e))
    sm_last = [(max(e for _, e in v) - t0) / 1e3 for v in by_sm.values()]
    resident = [max_resident([s for s, _ in v], [e for _, e in v]) for v in by_sm.values()]
    counts = [len(v) for v in by_sm.values()]
    return dict(
        programs=len(rows), sms=len(by_sm), span_us=span,
        programs_per_sm_min=min(counts), programs_per_sm_max=max(counts),
        resident_max=max(resident), resident_min=min(resident),
        start_p50_us=_pct(starts, 0.5), start_p90_us=_pct(starts, 0.9), start_max_us=max(starts),
        dur_p10_us=_pct(durs, 0.1), dur_p50_us=_pct(durs, 0.5), dur_p90_us=_pct(durs, 0.9), dur_max_us=max(durs),
        end_p10_us=_pct(ends, 0.1), end_p50_us=_pct(ends, 0.5), end_p90_us=_pct(ends, 0.9),
        sm_idle_end_mean_us=span - sum(sm_last) / len(sm_last),
    )


def summarise_calls(per_call: list[list], bytes_per_call: float) -> dict:
    """Medians over calls of :func:`call_summary`, the gap between consecutive calls (µs; one call's last program
    end to the next call's first program start, when they ran in that order) and the split kernel's GB/s."""
    sums = [call_summary(c) for c in per_call]
    med = {k: _pct([s[k] for s in sums], 0.5) for k in sums[0]}
    gaps = []
    for a, b in itertools.pairwise(per_call):
        end_a = max(int(r[1]) for r in a)
        start_b = min(int(r[0]) for r in b)
        if start_b >= end_a:
            gaps.append((start_b - end_a) / 1e3)
    med["gap_to_next_us"] = _pct(gaps, 0.5) if gaps else None
    med["split_GBps"] = bytes_per_call / (med["span_us"] * 1e-6) / 1e9 if med["span_us"] > 0 else None
    med["calls"] = len(sums)
    return med


def _stamped_run(B, T, Hq, Hkv, d, kb, vb, opts, n_sets, replays):
    """(per-call stamps of the last replay [R × (programs × 3)], programs, R, stamped / plain median s per call)."""
    import torch

    from kvmodel.kernels import decode_attention

    caches = [make_cache(B, Hkv, T, d, kb, vb, "cuda", gen_seed=i) for i in range(n_sets)]
    qs = [torch.randn(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
    outs = [torch.empty(B, Hq, d, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
    wss = [dict() for _ in range(n_sets)]
    plain = lambda i: decode_attention(qs[i], caches[i], out=outs[i], workspace=wss[i], **opts)  # noqa: E731
    t_plain = time_graph(plain, n_sets, target_s=0.05)[0]
    # programs of one launch: grow the buffer until the launcher accepts it
    cap = 4 * B * Hkv * 64
    while True:
        st = torch.full((cap,), -1, dtype=torch.int64, device="cuda")
        try:
            decode_attention(qs[0], caches[0], out=outs[0], workspace=wss[0], stamps=st, **opts)
            break
        except ValueError as e:
            if "stamps must be" not in str(e) or cap > 1 << 26:
                raise
            cap *= 4
    torch.cuda.synchronize()
    programs = int((st[0::STAMP_FIELDS] >= 0).sum().item())
    R = n_sets * max(1, math.ceil(8 / n_sets))
    bufs = [torch.full((STAMP_FIELDS * programs,), -1, dtype=torch.int64, device="cuda") for _ in range(R)]
    fn_r = lambda r: decode_attention(qs[r % n_sets], caches[r % n_sets], out=outs[r % n_sets],  # noqa: E731
                                      workspace=wss[r % n_sets], stamps=bufs[r], **opts)
    warm_up(fn_r, min(R, 3))
    g = capture_graph(fn_r, R, R)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3 / R)
    per_call = [b.view(programs, STAMP_FIELDS)[:, :3].cpu().tolist() for b in bufs]
    return per_call, programs, R, _pct(times[len(times) // 2:], 0.5), t_plain


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines file (appended): one summary per case")
    ap.add_argument("--raw", default=None, help="JSON lines file (appended): one call's stamps per case")
    ap.add_argument("--cases", choices=sorted(CASES), default="large")
    ap.add_argument("--replays", type=int, default=40, help="graph replays (the last one's stamps are kept)")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the read / copy ceiling probe (same run)")
    args = ap.parse_args(argv)
    from kvmodel.measure.probes import GPUUnavailable, require_cuda

    try:
        torch = require_cuda()
    except GPUUnavailable as e:
        print(f"program_timeline: {e}", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceil = {} if args.no_ceilings else measure_ceilings()
    if ceil:
        log(f"PT ceilings: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s")
    with open(args.out, "a") as out:
        for model, B, T, (kb, vb), names in CASES[args.cases]:
            Hq, Hkv, d = MODELS[model]
            nbytes = cache_bytes(B, Hkv, T, d, kb, vb)
            n_sets = max(1, min(16, math.ceil(4 * L2_BYTES / nbytes)))
            for name in names:
                try:
                    per_call, programs, R, t_st, t_plain = _stamped_run(B, T, Hq, Hkv, d, kb, vb,
                                                                        PROBE_VARIANTS[name], n_sets, args.replays)
                    summ = summarise_calls(per_call, nbytes)
                    torch.cuda.empty_cache()  # the case's caches went with _stamped_run's frame
                except Exception as e:  # noqa: BLE001
                    log(f"PT {model} B={B} T={T} {kb}/{vb} {name}: ERR {type(e).__name__}: {str(e)[:160]}")
                    torch.cuda.empty_cache()
                    continue
                row = dict(model=model, B=B, T=T, k_bits=kb, v_bits=vb, variant=name, device_sms=sms, bytes=nbytes,
                           R=R, call_stamped_us=t_st * 1e6, call_plain_us=t_plain * 1e6,
                           read_ceiling_GBps=ceil.get("read_GBps"), copy_ceiling_GBps=ceil.get("copy_GBps"),
                           pct_read_ceiling=(100 * nbytes / t_plain / 1e9 / ceil["read_GBps"]) if ceil else None, **summ)
                out.write(json.dumps(row) + "\n")
                out.flush()
                if args.raw:
                    with open(args.raw, "a") as raw:
                        raw.write(json.dumps(dict(model=model, B=B, T=T, k_bits=kb, v_bits=vb, variant=name,
                                                  stamps=per_call[len(per_call) // 2])) + "\n")
                pct = f" = {row['pct_read_ceiling']:.1f} % of read" if ceil else ""
                log(f"PT {model} B={B} T={T} {kb}/{vb} {name}: {nbytes / 1e6:.0f} MB, call {t_plain * 1e6:.1f} us{pct} "
                    f"(stamped {t_st * 1e6:.1f}); split span {summ['span_us']:.1f} us ({summ['split_GBps']:.0f} "
                    f"GB/s), {programs} programs on {summ['sms']} SMs, resident <= {summ['resident_max']}; starts "
                    f"p90 {summ['start_p90_us']:.1f} max {summ['start_max_us']:.1f}; dur p10/50/90/max "
                    f"{summ['dur_p10_us']:.1f}/{summ['dur_p50_us']:.1f}/{summ['dur_p90_us']:.1f}/"
                    f"{summ['dur_max_us']:.1f}; ends p50/90 {summ['end_p50_us']:.1f}/{summ['end_p90_us']:.1f}; SM "
                    f"idle at end {summ['sm_idle_end_mean_us']:.1f}; gap {summ['gap_to_next_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
