"""Offline sm_90 check of the GEMV's PDL path (no GPU needed): the order of grid dependency control and the L2
weight prefetch in the SASS, and the default build's instruction count beside it.

Compiles ``kvmodel.kernels.gemv._gemv_kernel`` with Triton's bundled ptxas for the default table's four paths
(B = 1 FMA at block_n 8 and 4; B ≥ 2 ``tl.dot`` 16-row; ``swap`` 64-row), without and with ``PDL`` (prefetch as
``gemv(pdl=True)`` sets it, and 0), and prints for each: SASS instructions and registers, and the positions of
``PREEXIT`` (griddepcontrol.launch_dependents), ``UBLKPF.L2`` (cp.async.bulk.prefetch.L2), ``ACQBULK``
(griddepcontrol.wait) and the first global load (``LDG`` / ``LDGSTS``). ``ok`` = PREEXIT < UBLKPF < ACQBULK <
first load.

    python -m kvmodel.kernels.gemv_pdl_sass [--prefetch-bytes 16384] [--ptx] [--quick]

Exit status 0 when every path is ``ok`` (the build needs ``TRITON_INTERPRET`` unset or 0).
"""

from __future__ import annotations

import argparse
import re

#: the table's paths: (name, B_PAD, BLOCK_N, BLOCK_K, DOT, num_warps, num_stages)
PATHS = (("B=1 fma bn8", 1, 8, 512, 0, 4, 3), ("B=1 fma bn4", 1, 4, 512, 0, 4, 3),
         ("B>=2 dot bn16", 16, 16, 512, 1, 2, 3), ("B>=2 swap bn64", 16, 64, 128, 2, 4, 4))


def compile_gemv(B_PAD=1, BLOCK_N=8, BLOCK_K=512, DOT=0, num_warps=4, num_stages=3, pdl=False, pf_row=0,
                 fn=None):
    """The compiled ``_gemv_kernel`` for sm_90 (fp16, no bias / residual / split, EVEN_K), pointers and strides
    16-divisible as a real launch specializes them; ``pdl``: the PDL build with ``PF_ROW = pf_row``."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .sass_probe import offline_signature

    fn = fn or importlib.import_module("kvmodel.kernels.gemv")._gemv_kernel
    ptrs = {"X": "*fp16", "W": "*fp16", "Bias": "*fp16", "R": "*fp16", "Y": "*fp16", "Part": "*fp32",
            "Counter": "*i32", "G": "*fp16"}
    ints = ("B", "N", "K", "k_per_split", "split_k", "stride_xb", "stride_wn", "stride_rb", "stride_yb")
    consts = {"B_PAD": B_PAD, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "DOT": DOT, "EVEN_K": True,
              "HAS_BIAS": False, "HAS_RES": False, "SPLIT": False, "FUSE_MERGE": False, "MERGE_SB": 1,
              "EMU_BF16": False}
    if pdl:
        consts.update(PDL=True, PF_ROW=pf_row)
    sig, attrs = offline_signature(fn, ptrs, ints, not_div=("B",), floats=("eps",))
    src = ASTSource(fn, sig, constexprs={k: v for k, v in consts.items() if k in fn.arg_names}, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if pdl:
        opts["launch_pdl"] = True
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass_instructions(sass: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", sass)]


def order(ins: list[str]) -> dict:
    """Positions (instruction index) of the PDL markers and the first global load."""
    def first(pat):
        return next((i for i, t in enumerate(ins) if re.search(pat, t)), None)

    r = {"PREEXIT": first(r"\bPREEXIT\b"), "UBLKPF": first(r"\bUBLKPF\.L2\b"), "ACQBULK": first(r"\bACQBULK\b"),
         "first_load": first(r"\bLDG(STS)?\b"), "n_ublkpf": sum(1 for t in ins if "UBLKPF" in t)}
    seq = [r[k] for k in ("PREEXIT", "UBLKPF", "ACQBULK", "first_load")]
    r["ok"] = all(v is not None for v in seq) and seq == sorted(seq)
    return r


def main(argv=None) -> int:
    from .sass_probe import sass_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefetch-bytes", type=int, default=16384,
                    help="per program (gemv's default is 0: measured slower; this check builds the prefetch path)")
    ap.add_argument("--ptx", action="store_true", help="also print the PTX lines of the PDL markers")
    ap.add_argument("--quick", action="store_true", help="the first path only (B = 1, block_n 8)")
    a = ap.parse_args(argv)
    from .gemv import pdl_launch_kwargs

    pfb = a.prefetch_bytes
    all_ok = True
    for name, b_pad, bn, bk, dot, nw, ns in PATHS[:1] if a.quick else PATHS:
        shape = {"B_PAD": b_pad, "BLOCK_N": bn, "BLOCK_K": bk, "DOT": dot, "num_warps": nw, "num_stages": ns}
        base, regs0 = sass_of(compile_gemv(**shape))
        pf_row = pdl_launch_kwargs(True, pfb, bn, nw, 0, 16, 16)["PF_ROW"]
        kp = compile_gemv(pdl=True, pf_row=pf_row, **shape)
        pdl, regs1 = sass_of(kp)
        pdl0, regs2 = sass_of(compile_gemv(pdl=True, pf_row=0, **shape))
        i0, i1, i2 = sass_instructions(base), sass_instructions(pdl), sass_instructions(pdl0)
        o1, o2 = order(i1), order(i2)
        ok = o1["ok"] and o2["PREEXIT"] is not None and o2["n_ublkpf"] == 0 and o2["ACQBULK"] < o2["first_load"]
        all_ok &= ok
        print(f"{name:15s} default {len(i0):4d} instr {regs0:3d} regs | pdl prefetch {pf_row} B/row: {len(i1):4d} "
              f"instr {regs1:3d} regs, PREEXIT@{o1['PREEXIT']} UBLKPF.L2@{o1['UBLKPF']} (x{o1['n_ublkpf']}) "
              f"ACQBULK@{o1['ACQBULK']} first load@{o1['first_load']} | pdl no prefetch: {len(i2):4d} instr "
              f"{regs2:3d} regs, ACQBULK@{o2['ACQBULK']} first load@{o2['first_load']} | {'ok' if ok else 'BAD'}")
        if a.ptx:
            for line in kp.asm["ptx"].splitlines():
                if "griddepcontrol" in line or "prefetch" in line:
                    print("    ptx:", line.strip())
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
