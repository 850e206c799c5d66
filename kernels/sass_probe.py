"""Offline SASS probe of the fused decode kernel's main loop (no GPU needed).

Compiles ``_attn_split_kernel`` for sm_90 with Triton's bundled ptxas, with the divisibility specialization a real
launch gets (pointers and 16-multiple ints: ``tt.divisibility = 16``; NOTES.md explains why that matters), dumps the
SASS with Triton's cuobjdump and counts the instructions of the main loop (the longest backward-branch range).
Prints instructions per warp per tile, warp-instructions per token-head (× num_warps / BLOCK_N), registers and an
opcode histogram.

    python -m kvmodel.kernels.sass_probe --kb 4 --vb 4 --d 128 --G 4 --block-n 32 --warps 1 --vtp 2 [--swap 0|1]
    python -m kvmodel.kernels.sass_probe --table        # v3 halves vs token_pair V, both block shapes
    python -m kvmodel.kernels.sass_probe --occupancy    # resident programs per SM of the 1-warp builds
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def offline_signature(fn, ptrs: dict, ints, not_div=(), floats=()) -> tuple[dict, dict]:
    """Signature and attributes for an offline ``triton.compile`` of ``fn``: pointers (``ptrs``: name → type) and
    ints (``ints``, except ``not_div``) get the JIT's 16-divisibility specialization, as a real launch with aligned
    buffers does (without it the byte loads look un-pipelined), ``floats`` are fp32, everything else constexpr."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints:
            sig[name] = "i32"
            if name not in not_div:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig, attrs


def compile_kernel(kb=4, vb=4, d=128, G=4, block_n=32, num_warps=1, num_stages=3, group=32, asym=False,
                   vtp=False, v_full=False, k_full=False, sc=True, split=True, swap=None, vf=None, kf=False,
                   persist=False, stamp=False, pool=False):
    """The compiled kernel (``triton.compile`` result) for sm_90. ``swap`` / ``vf`` None: the launcher's defaults
    (swapped dots for a quantized part; the V fold for a symmetric 4-bit token_octet V with K not 8-bit).
    ``persist`` / ``stamp`` / ``pool``: the persistent split kernel / the per-program timestamps / the tail pool
    (probe options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .decode_attention import SWAP_MIN_ROWS, _attn_split_kernel, default_swap, default_v_fold

    fn = _attn_split_kernel
    dt = {4: "u8", 8: "u8", 16: "fp16"}
    ptrs = dict(Q="*fp16", KD=f"*{dt[kb]}", KS="*fp16", KZ="*fp16", VD=f"*{dt[vb]}", VS="*fp16", VZ="*fp16",
                Out="*fp16", PartO="*fp32", PartL="*fp32")
    if persist or pool:
        ptrs["Counter"] = "*i32"
    if stamp:
        ptrs["Stamps"] = "*i64"
    ints = ["T", "tokens_per_split", "num_splits", "n_heads", "n_items", "pool_start", "pool_chunk", "n_pool",
            "stride_qb", "stride_qh", "skd_b", "skd_h", "skd_t", "sks_b", "sks_h", "sks_t", "svd_b", "svd_h", "svd_t", "svs_b", "svs_h", "svs_t", "stride_ob",
            "stride_oh", "stride_pb", "stride_ph", "stride_ps"]
    # the scale token strides are d/group (4 for d=128, g=32) and the work-item counts are not 16-divisible; every
    # other int of a real launch (T = 32K, strides of 16-aligned allocations) is
    not_div = {"sks_t", "svs_t", "num_splits", "n_heads", "n_items", "pool_start", "pool_chunk", "n_pool"}
    if swap is None:
        swap = default_swap(kb, vb)
    if vf is None:
        vf = default_v_fold(swap, vtp, asym, kb, vb, v_full, d)
    m_pad = max(SWAP_MIN_ROWS, triton.next_power_of_2(G)) if swap else max(16, triton.next_power_of_2(G))
    consts = dict(G=G, HPP=G, M_PAD=m_pad, SW=swap, VF=vf, D=d, K_BITS=kb, V_BITS=vb, GROUP=group,
                  ASYM=asym, BLOCK_N=block_n, MAGIC=True, ASM=True, SPLIT=split, V_FULL=v_full, SC=sc,
                  K_FULL=k_full, VTP=vtp, KF=kf, PERSIST=persist, STAMP=stamp, POOL=pool)
    sig, attrs = offline_signature(fn, ptrs, ints, not_div, floats=("qk_scale",))
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sass_of(kernel) -> tuple[str, int]:
    """(SASS text, registers per thread) of a compiled kernel, by Triton's cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)", res)
        return sass, int(m.group(1)) if m else -1
    finally:
        os.unlink(path)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def main_loop(sass: str):
    """(instructions of the longest backward-branch loop, list of their opcodes)."""
    ins = []
    for m in _INSTR.finditer(sass):
        ins.append((int(m.group(1), 16), m.group(2)))
    addr_idx = {a: i for i, (a, _) in enumerate(ins)}
    best = (0, 0, 0)
    for i, (a, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt < a and tgt in addr_idx:
            n = i - addr_idx[tgt] + 1
            if n > best[0]:
                best = (n, addr_idx[tgt], i)
    n, lo, hi = best
    ops = []
    for _, text in ins[lo:hi + 1]:
        t = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
        ops.append(t.split()[0] if t else "?")
    return n, ops


def probe(**cfg) -> dict:
    k = compile_kernel(**cfg)
    sass, regs = sass_of(k)
    n, ops = main_loop(sass)
    hist = collections.Counter(op.split(".")[0] for op in ops)
    per_th = n * cfg.get("num_warps", 1) / cfg.get("block_n", 32)
    return dict(loop_instr=n, per_token_head=per_th, regs=regs, smem=k.metadata.shared,
                hist=hist)


#: Hopper SM resources (sm_90): registers, shared memory usable by resident blocks (bytes), reserved per block,
#: register allocation granularity per thread, resident blocks.
SM90_REGS, SM90_SMEM, SM90_SMEM_PER_BLOCK, SM90_REG_UNIT, SM90_MAX_BLOCKS = 65536, 228 * 1024, 1024, 8, 32


def programs_per_sm(regs: int, smem_bytes: int, num_warps: int) -> int:
    """Resident programs of one build on an sm_90 SM: the tighter of registers (rounded up to 8 per thread,
    32 threads a warp) and shared memory (+1 KB reserved per block)."""
    per_warp = -(-regs // SM90_REG_UNIT) * SM90_REG_UNIT * 32
    by_regs = (SM90_REGS // per_warp) // num_warps
    by_smem = SM90_SMEM // (smem_bytes + SM90_SMEM_PER_BLOCK)
    return int(min(by_regs, by_smem, SM90_MAX_BLOCKS))


def occupancy_table(groups=(1, 2, 4, 7, 8)) -> dict:
    """(K/V bits, d, V layout) → the fewest resident programs per SM over ``groups`` (G = Hq/Hkv) of the 1-warp
    32-token shape (a resource count; ``decode_attention.SHAPE_PROGRAMS_PER_SM`` is tuned on the GPU beside it)."""
    out = {}
    builds = [(4, 4, 64, 0), (4, 4, 128, 0), (4, 4, 128, 1), (4, 4, 128, 2), (16, 4, 64, 0), (16, 4, 128, 2),
              (4, 16, 64, 0), (4, 16, 128, 0), (8, 8, 64, 0), (8, 8, 128, 0), (8, 4, 128, 2), (4, 8, 128, 0)]
    for kb, vb, d, vtp in builds:
        best = None
        for G in groups:
            k = compile_kernel(kb=kb, vb=vb, d=d, G=G, block_n=32, num_warps=1, vtp=vtp)
            _, regs = sass_of(k)
            n = programs_per_sm(regs, k.metadata.shared, 1)
            print(f"  {kb}/{vb} d={d} vtp={vtp} G={G}: {regs} registers, {k.metadata.shared} B shared -> {n}",
                  flush=True)
            best = n if best is None else min(best, n)
        out[(f"{kb}/{vb}", d, ("channel", "token_pair", "token_octet")[vtp])] = best
    return out


def _fmt(name, r):
    top = ", ".join(f"{k} {v}" for k, v in r["hist"].most_common(14))
    return (f"{name:34s} loop {r['loop_instr']:4d} instr/warp/tile = {r['per_token_head']:5.1f} warp-instr per "
            f"token-head; regs {r['regs']}, smem {r['smem']} B\n    {top}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kb", type=int, default=4)
    ap.add_argument("--vb", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--warps", type=int, default=1)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--vtp", type=int, default=0, choices=(0, 1, 2),
                    help="4-bit V layout: 0 channel, 1 token_pair, 2 token_octet (the default 4-bit V cache)")
    ap.add_argument("--swap", type=int, default=None, choices=(0, 1),
                    help="swapped operands (tokens on the mma M side); default: the launcher's")
    ap.add_argument("--vf", type=int, default=None, choices=(0, 1),
                    help="V fold (swapped, token_octet 4-bit V): V scales on the P tile; default: the launcher's")
    ap.add_argument("--kf", type=int, default=0, choices=(0, 1),
                    help="K fold (swapped, symmetric 4-bit K): K scales on the score tile")
    ap.add_argument("--v-full", action="store_true")
    ap.add_argument("--asym", action="store_true", help="asymmetric quantization (scale and zero per group)")
    ap.add_argument("--table", action="store_true", help="v3 vs v4 candidate at both default block shapes")
    ap.add_argument("--occupancy", action="store_true",
                    help="resident programs per SM of the 1-warp shape's builds (registers, shared memory)")
    a = ap.parse_args(argv)
    if a.occupancy:
        from .decode_attention import shape_programs_per_sm

        for (fmt, d, layout), n in occupancy_table().items():
            kb, vb = map(int, fmt.split("/"))
            print(f"{fmt} d={d} V {layout}: {n} fit (the split rule assumes "
                  f"{shape_programs_per_sm(kb, vb, d, 32, 1)})")
        return
    if a.table:
        for bn, w in ((32, 1), (64, 4)):
            for vtp in (False, True):
                cfg = dict(kb=a.kb, vb=a.vb, d=a.d, G=a.G, group=a.group, block_n=bn, num_warps=w,
                           num_stages=a.stages, vtp=vtp)
                print(_fmt(f"{a.kb}/{a.vb} d={a.d} G={a.G} ({bn},{w}) {'v4 token_pair' if vtp else 'v3'}",
                           probe(**cfg)), flush=True)
        return
    cfg = dict(kb=a.kb, vb=a.vb, d=a.d, G=a.G, group=a.group, block_n=a.block_n, num_warps=a.warps,
               num_stages=a.stages, vtp=a.vtp, v_full=a.v_full, asym=a.asym,
               swap=None if a.swap is None else bool(a.swap), vf=None if a.vf is None else bool(a.vf),
               kf=bool(a.kf))
    print(_fmt(str(cfg), probe(**cfg)))


if __name__ == "__main__":
    main()
