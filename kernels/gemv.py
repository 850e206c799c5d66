"""Weight-streaming GEMV for small batch (decode projections) in Triton.

``gemv(x, w, bias)``: ``x [B, K]`` (B = 1..8 rows), ``w [N, K]`` row-major (an ``nn.Linear`` weight), fp16 or
bf16; returns ``y [B, N] = x @ w.T (+ bias) (+ residual)`` in the input dtype, accumulated in fp32. At B ≤ 8
the op is a pure stream of ``w`` (N·K·2 bytes) from HBM: the kernel is built to keep enough bytes in flight per
SM to run at the read ceiling, not to use the tensor cores well.

Kernel (``_gemv_kernel``), grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: each program owns BLOCK_N output rows (all B
rows of x) and one contiguous range of K (the whole of K without split-K), and loops over it in BLOCK_K chunks:
one ``[BLOCK_N, BLOCK_K]`` tile of w per step (16-byte vector loads along K, ``evict_first``: it is read once)
and the matching ``[B_PAD, BLOCK_K]`` slice of x (L2/L1 resident). Three inner products:

- ``DOT=False`` (FMA): at B = 1 ``acc[BLOCK_N, BLOCK_K] += w · x`` in fp32 registers, reduced over K once after
  the loop (no cross-thread reduction inside it); at B ≥ 2 one row of x at a time against the w tile, reduced
  per chunk (an option; tensor cores measured faster there).
- ``DOT=True``: ``acc[16, BLOCK_N] += tl.dot(x_pad16, w^T)`` (x padded to the 16 rows an MMA needs; the wasted
  rows cost tensor-core time, of which a weight stream leaves plenty). ``DOT="swap"``: ``tl.dot(w, x_pad16^T)``,
  the w tile as the M side (a Hopper wgmma from BLOCK_N = 64 at 4 warps). Both pipeline the w tiles through
  shared memory (cp.async, ``num_stages``).

Rows past N are clamped to N-1 for the loads (no row masks in the loop; the stores are masked), and K is masked
only when BLOCK_K does not divide it (``EVEN_K``).

Split-K (``SPLIT_K > 1``, for shapes whose N/BLOCK_N programs cannot fill the SMs): every program writes its fp32
partial ``[B, BLOCK_N]`` to a workspace ``[SPLIT_K, B, N]``; then either the last program of each row block to
finish (an acq_rel gpu-scope counter, reset by that program for the next launch, the pattern of
``decode_attention``'s fused merge) sums the partials and writes y (``merge="fused"``, one launch), or a second
small kernel does (``merge="kernel"``). Both are deterministic (fixed summation order) and atomic-add free.

Block shapes come from :func:`default_config`, a small table keyed by (N, K, B) — see its docstring for the
reasoning and the measurement it rests on — never from run-time autotuning (a CUDA graph capture must not
autotune). Every field can be overridden per call (``block_n``, ``block_k``, ``split_k``, ``num_warps``,
``num_stages``, ``dot``), which is how ``kvmodel.measure.gemv_probe`` sweeps them.

Prologue fusions (opt-in; measured on the H200 and not adopted: no gain at B = 1, 3-10x slower at B >= 2 on
the tensor-core path, kernels/NOTES.md "GEMV prologue fusion: measured"; off by default, when the
kernel is specialized exactly as before): the launcher kwargs select constexprs that transform each chunk of x as
it is loaded, in fp32, before the inner product — the w stream (tiles, order, eviction) is unchanged.

- ``norm_weight=g`` (+ ``eps``, ``NORM``): ``y = rmsnorm(x) @ w.T``, ``rmsnorm(x) = x / sqrt(mean(x²) + eps) * g``
  per row. Written as ``y[b] = r_b · ((x[b] * g) @ w.T)``: the loop multiplies x by g on load and also sums
  x² from the very chunks it loads anyway, and ``r_b = 1/sqrt(ss_b / K + eps)`` scales the fp32 sums once, before
  bias and residual. Chosen over a first pass over x in each program (every program would wait one L2 round
  trip of B·K before its first weight load — all programs start together at decode sizes, so that latency adds
  to the whole launch) and over a precomputed per-row 1/rms (one more launch, the thing being removed). With
  split-K a program sees only its K range, so there (never picked by the table) it sums the whole rows first.
- ``gate_up=True`` (``GATE_UP``): x is the ``[B, 2K]`` gate|up activation of a gated MLP and the dot takes
  ``silu(gate) * up`` (the ``e2e_decode.silu_mul`` formula), for the down projection.

Rounding vs the unfused step (rmsnorm / silu_mul in fp32, one rounding to x's dtype, then the GEMV): the fp32 FMA
paths (B = 1, and the per-row path) never round the transformed x (slightly more accurate than the composition);
the tensor-core paths round ``x * g`` resp. ``silu(gate) * up`` once to x's dtype, as the composition rounds its
``hn`` / activation. Caveat (fp16, tl.dot paths only): ``x * g`` before the 1/rms is what is rounded, so it
overflows where ``|x · g| > 65504`` (the composition's ``hn`` would not); real residual streams stay far below.
``residual=`` and ``bias`` work with both prologues (the two are exclusive). ``tests/test_gemv.py`` checks both
against the torch composition under the interpreter; the GPU timing is ``kvmodel.measure.gemv_probe --fused``
and the step's ``kvmodel.measure.e2e_decode --linear triton-fused`` (commands in ``kernels/NOTES.md``).

Programmatic dependent launch (opt-in ``pdl=True``, ``prefetch_bytes``; off by default, when the kernel is
specialized exactly as before — offline sm_90 SASS of the table's four paths byte-identical to the kernel without
the option). At B = 1 the small projections run well below the read ceiling (Qwen2.5-7B qkv, 33 MB: 11.7 µs ≈
2.8 TB/s): at each kernel boundary HBM idles while the previous grid drains and the next one's programs start and
wait for their first bytes. With ``pdl=True`` the GEMV is launched with ``launch_pdl=True`` (Hopper PDL: its
programs may be scheduled once every program of the kernel before it in the stream has executed
``griddepcontrol.launch_dependents``, i.e. while that kernel's tail still runs) and each program, in this order:
``gdc_launch_dependents()`` (so the next PDL kernel can be scheduled in turn); one
``cp.async.bulk.prefetch.L2`` per weight row it owns (thread t → row t, ``prefetch_bytes / min(BLOCK_N,
threads)`` bytes from the start of its K range, 16-byte multiples; the step never writes weights, so this may run
before the predecessor finishes); ``gdc_wait()`` (the predecessor grid complete and its writes visible); then
everything else — x, residual, the prologues' loads, every store. With split-K and ``merge="kernel"``
the merge kernel is a PDL launch as well (it waits before reading the partials). The prefetch is off by default
(``DEFAULT_PREFETCH_BYTES = 0``: measured slower than PDL alone on the H200); ``MAX_PREFETCH_BYTES`` keeps the
total (~800 resident programs) below the 60 MB L2. Active only on CUDA devices
of capability ≥ 9 with Triton's grid dependency control and not under the interpreter (:func:`use_pdl`);
elsewhere ``pdl=True`` silently takes the normal path, same results. The step's ``--linear triton-pdl``
(``kvmodel.measure.e2e_decode``) chains it with PDL variants of its RMSNorm / RoPE / SiLU·mul kernels;
``kvmodel.measure.gemv_probe --pdl 0,16384`` times back-to-back chains of one projection.

``gemv_ref(x, w, bias)`` is the float32 torch reference with the same signature (and the same prologue kwargs).
"""

from __future__ import annotations

import os

import torch

from . import _interpreter_compat

# one SM-count helper for every launcher; grid dependency control (programmatic dependent launch: the kernels'
# gdc_* globals) from the import decode_attention's merge="pdl" uses
from .decode_attention import DEFAULT_SMS, gdc_launch_dependents, gdc_wait, num_sms, pdl_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_B = 8
DTYPES = (torch.float16, torch.bfloat16)
#: SM count the default table is evaluated for on CPU tensors (the interpreter runs programs one after another,
#: so a grid sized to fill 132 SMs only costs time there; the results do not depend on it)
INTERPRETER_SMS = 4

#: Version of the GEMV kernel and its config table; bump it with any change that alters what is measured.
#: (The opt-in ``pdl=True`` path is recorded separately: ``PDL_VERSION``; the default kernel is still v1.)
KERNEL_VERSION = "v1"
#: Version of the ``pdl=True`` path (grid dependency control + the L2 weight prefetch before the wait).
PDL_VERSION = "pdl1"
#: Default L2 prefetch per program of the ``pdl=True`` path, bytes (split evenly over the program's rows). 0: the
#: H200 step measured the prefetch slower than PDL alone (Llama-3.1-8B B=1 T=1K 4.404 ms with 16 KiB vs 4.230 ms
#: without; gemv_probe chains +4-18 %; kernels/NOTES.md "PDL through the step"), so it stays an option.
DEFAULT_PREFETCH_BYTES = 0
#: Largest ``prefetch_bytes`` accepted: ~800 resident programs × 64 KiB ≈ 52 MB would already fill the 60 MB L2.
MAX_PREFETCH_BYTES = 65536


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, Bias, R, Y, Part, Counter, G,
                     B, N, K, k_per_split, split_k, eps,
                     stride_xb, stride_wn, stride_rb, stride_yb,
                     B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                     EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     SPLIT: tl.constexpr, FUSE_MERGE: tl.constexpr, MERGE_SB: tl.constexpr,
                     EMU_BF16: tl.constexpr, NORM: tl.constexpr = False, GATE_UP: tl.constexpr = False,
                     PDL: tl.constexpr = False, PF_ROW: tl.constexpr = 0):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        rn = tl.arange(0, BLOCK_N)
        rows = n0 + rn
        # clamp instead of masking: the tail block re-reads row N-1, its results are not stored
        rows_ld = tl.minimum(rows, N - 1) - n0
        w_base = W + n0.to(tl.int64) * stride_wn
        rb = tl.arange(0, B_PAD)
        b_ok = rb < B
        rk = tl.arange(0, BLOCK_K)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if PDL:
            # programmatic dependent launch (launched with launch_pdl=True, see gemv(pdl=True)): let the next
            # kernel of the stream be scheduled now (its programs take the slots this grid's programs free as they
            # finish), start this program's first weight bytes towards L2 (the step never writes weights), and
            # only then wait for the predecessor grid: everything below (x, residual, the norm / up loads, every
            # store) comes after the wait
            gdc_launch_dependents()
            if PF_ROW > 0:
                _l2_prefetch_rows((w_base + k_lo).to(tl.int64), tl.minimum(N - n0, BLOCK_N), stride_wn * 2,
                                  tl.minimum(PF_ROW, (k_hi - k_lo) * 2) // 16 * 16)
            gdc_wait()
        w_ptrs = w_base + rows_ld[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
        x_ptrs = X + rb[:, None] * stride_xb + rk[None, :]  # [B_PAD, BLOCK_K]
        ROW1: tl.constexpr = (not DOT) and B_PAD == 1  # one row of x: a plain 2-D [BLOCK_N, BLOCK_K] accumulator
        PRO: tl.constexpr = NORM or GATE_UP  # a prologue transforms x on load (fp32), see _prologue
        # the batched FMA path loads x rows in w's layout; with NORM it also loads the [B_PAD, BLOCK_K] slice once
        # per chunk for the sums of squares
        LOAD_XV: tl.constexpr = ROW1 or DOT or (NORM and not SPLIT)
        if NORM:
            if SPLIT:  # this program sees only its K range: the whole rows' sums of squares first (x from L2)
                ss = _row_sumsq(X, B, K, stride_xb, B_PAD, BLOCK_K)
            elif ROW1:
                ssv = tl.zeros([BLOCK_K], dtype=tl.float32)
            else:
                ss = tl.zeros([B_PAD], dtype=tl.float32)
        if DOT == 1:
            acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
        elif DOT == 2:
            acc_s = tl.zeros([BLOCK_N, B_PAD], dtype=tl.float32)
        elif ROW1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc_t = tl.zeros([BLOCK_N, B_PAD], dtype=tl.float32)  # transposed: column b = row b of y
            rb_t = tl.arange(0, B_PAD)
        for k in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs + k, eviction_policy="evict_first")
                if ROW1:
                    xv = tl.load(X + k + rk, eviction_policy="evict_last")
                elif LOAD_XV:
                    xv = tl.load(x_ptrs + k, mask=b_ok[:, None], other=0.0, eviction_policy="evict_last")
            else:
                k_ok = (k + rk) < K
                w = tl.load(w_ptrs + k, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                if ROW1:
                    xv = tl.load(X + k + rk, mask=k_ok, other=0.0, eviction_policy="evict_last")
                elif LOAD_XV:
                    xv = tl.load(x_ptrs + k, mask=b_ok[:, None] & k_ok[None, :], other=0.0,
                                 eviction_policy="evict_last")
            if PRO:
                kk = k + rk
                k_in = kk < K
                if NORM and not SPLIT:
                    xsq = xv.to(tl.float32)
                    if ROW1:
                        ssv += xsq * xsq
                    else:
                        ss += tl.sum(xsq * xsq, axis=1)
                gv = 1.0
                gv2 = 1.0
                if NORM:  # the norm weight chunk, once per chunk
                    gv = tl.load(G + kk, mask=k_in, other=0.0, eviction_policy="evict_last").to(tl.float32)
                    gv2 = gv[None, :]
                if ROW1:
                    xf = _prologue(xv, X + K + kk, k_in, gv, GATE_UP)  # fp32, never rounded
                elif DOT:
                    xf = _prologue(xv, x_ptrs + K + k, b_ok[:, None] & k_in[None, :], gv2, GATE_UP)
                    # one rounding to the input dtype, as the unfused step stores hn / act (tensor cores take it)
                    if EMU_BF16:
                        xv = _round_bf16(xf)
                    else:
                        xv = xf.to(X.dtype.element_ty)
            if DOT == 1:
                if EMU_BF16:  # interpreter only: its tl.dot multiplies bf16 as raw uint16 bits
                    acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv, tl.trans(w), acc, out_dtype=tl.float32)
            elif DOT == 2:  # w as the M side (a wgmma-sized tile from block_n = 64 at 4 warps)
                if EMU_BF16:
                    acc_s = tl.dot(w.to(tl.float32), tl.trans(xv.to(tl.float32)), acc_s, input_precision="ieee")
                else:
                    acc_s = tl.dot(w, tl.trans(xv), acc_s, out_dtype=tl.float32)
            elif ROW1:
                if PRO:
                    acc2 += w.to(tl.float32) * xf[None, :]
                else:
                    acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            else:
                # one row of x at a time against the w tile (kept in registers), reduced over the chunk at once:
                # every tensor stays in w's 2-D layout (a 3-D [B, N, K] product costs layout conversions)
                wf = w.to(tl.float32)
                if NORM:  # the norm weight chunk in w's layout (as x's rows below)
                    gm = ((k + rk) < K)[None, :] & (rn[:, None] >= 0)
                    gw = tl.load(G + k + (rk[None, :] + 0 * rn[:, None]), mask=gm, other=0.0,
                                 eviction_policy="evict_last").to(tl.float32)
                else:
                    gw = 1.0
                for b in tl.static_range(B_PAD):
                    # x row b broadcast over the tile's rows: loaded straight into w's layout (L1 hits)
                    xp = X + b * stride_xb + k + (rk[None, :] + 0 * rn[:, None])
                    if EVEN_K:
                        xm = (rk[None, :] < BLOCK_K) & ((rk[None, :] * 0 + b) < B)
                    else:
                        xm = ((k + rk) < K)[None, :] & ((rk[None, :] * 0 + b) < B)
                    xb = tl.load(xp, mask=xm, other=0.0, eviction_policy="evict_last")
                    if PRO:
                        xbf = _prologue(xb, xp + K, xm, gw, GATE_UP)
                    else:
                        xbf = xb.to(tl.float32)
                    part = tl.sum(wf * xbf, axis=1)  # [BLOCK_N]
                    acc_t += tl.where(rb_t[None, :] == b, part[:, None], 0.0)
        if DOT == 2:
            acc = tl.trans(acc_s)
        elif ROW1:
            acc = tl.reshape(tl.sum(acc2, axis=1), (1, BLOCK_N))  # [B_PAD = 1, BLOCK_N]
        elif not DOT:
            acc = tl.trans(acc_t)  # [B_PAD, BLOCK_N]
        if NORM:  # rmsnorm(x) @ w.T = r_b * ((x * g) @ w.T): the per-row 1/rms applied once, to the fp32 sums
            if ROW1 and not SPLIT:
                acc = acc * (1.0 / tl.sqrt(tl.sum(ssv, axis=0) / K + eps))
            else:
                acc = acc * (1.0 / tl.sqrt(ss / K + eps))[:, None]

        n_ok = rows < N
        out_mask = b_ok[:, None] & n_ok[None, :]
        if SPLIT:
            p_ptrs = Part + (pid_k * B + rb[:, None]).to(tl.int64) * N + rows[None, :]
            tl.store(p_ptrs, acc, mask=out_mask)
            if FUSE_MERGE:
                # the last program of this row block to finish sums all splits (no second launch). Barrier, then
                # one gpu-scope acq_rel atomic publishes this CTA's partials; the sum reads them with .cg (L2).
                tl.debug_barrier()
                cnt_ptr = Counter + pid_n
                prev = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
                if prev == split_k - 1:
                    _merge_block(Part, Bias, R, Y, rows, rb, out_mask, B, N, split_k, stride_rb, stride_yb,
                                 B_PAD, BLOCK_N, HAS_BIAS, HAS_RES, MERGE_SB, EMU_BF16)
                    tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        else:
            _epilogue(acc, Bias, R, Y, rows, rb, out_mask, N, stride_rb, stride_yb, HAS_BIAS, HAS_RES, EMU_BF16)

    @triton.jit
    def _l2_prefetch_rows(addr, nrows, row_bytes, nbytes):
        """L2 prefetch of the first ``nbytes`` of ``nrows`` weight rows: thread ``t < nrows`` of the program
        issues one ``cp.async.bulk.prefetch.L2.global [addr + t * row_bytes], nbytes`` (sm_90; the address
        16-byte aligned and ``nbytes`` a multiple of 16, which the launcher guarantees; nothing when ``nbytes`` is
        0). Rows past the program's thread count are not prefetched. The asm has a dummy output and is not pure,
        so the compiler keeps it (and keeps it before the ``griddepcontrol.wait`` that follows it)."""
        tl.inline_asm_elementwise(
            """{
            .reg .u32 %pft;
            .reg .u64 %pfo, %pfa;
            .reg .pred %pfp, %pfq;
            mov.u32 %pft, %tid.x;
            setp.lt.u32 %pfp, %pft, $2;
            setp.ne.u32 %pfq, $4, 0;
            and.pred %pfp, %pfp, %pfq;
            mul.wide.u32 %pfo, %pft, $3;
            add.u64 %pfa, $1, %pfo;
            @%pfp cp.async.bulk.prefetch.L2.global [%pfa], $4;
            mov.u32 $0, 0;
            }""",
            "=r,l,r,r,r", [addr, nrows, row_bytes, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prologue(xv, up_ptrs, mask, g, GATE_UP: tl.constexpr):
        """x as the dot consumes it, in fp32: ``x * g`` (NORM: ``g`` the loaded norm weight chunk, 1.0 without;
        1/rms is applied after the dot) or ``silu(gate) * up`` (GATE_UP: ``xv`` is the gate chunk, the up chunk
        is ``K`` elements further on)."""
        xf = xv.to(tl.float32) * g
        if GATE_UP:
            u = tl.load(up_ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            xf = xf / (1.0 + tl.exp(-xf)) * u  # the formula of e2e_decode's silu_mul kernel
        return xf

    @triton.jit
    def _row_sumsq(X, B, K, stride_xb, B_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
        """Sum of squares of each of the B rows of ``x[:, :K]`` (fp32; rows past B give 0)."""
        rb = tl.arange(0, B_PAD)
        rk = tl.arange(0, BLOCK_K)
        ss = tl.zeros([B_PAD], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            m = (rb < B)[:, None] & ((k + rk) < K)[None, :]
            v = tl.load(X + rb[:, None] * stride_xb + k + rk[None, :], mask=m, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            ss += tl.sum(v * v, axis=1)
        return ss

    @triton.jit
    def _round_bf16(v):
        """fp32 -> bf16 rounding to nearest even (the interpreter's cast truncates; the GPU's rounds)."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _epilogue(acc, Bias, R, Y, rows, rb, out_mask, N, stride_rb, stride_yb,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EMU_BF16: tl.constexpr):
        """y[b, n] = acc[b, n] (+ bias[n]) (+ residual[b, n]), fp32 sums, one rounding to y's dtype."""
        if HAS_BIAS:
            acc += tl.load(Bias + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(R + rb[:, None] * stride_rb + rows[None, :], mask=out_mask, other=0.0).to(tl.float32)
        if EMU_BF16:
            # interpreter only: its fp32 -> bf16 cast truncates; round to nearest even as the GPU does
            bits = acc.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = acc.to(Y.dtype.element_ty)
        tl.store(Y + rb[:, None] * stride_yb + rows[None, :], y, mask=out_mask)

    @triton.jit
    def _merge_block(Part, Bias, R, Y, rows, rb, out_mask, B, N, split_k, stride_rb, stride_yb,
                     B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     SB: tl.constexpr, EMU_BF16: tl.constexpr):
        """Sum the ``split_k`` fp32 partials of one row block (SB splits per step, fixed order) → y."""
        s_off = tl.arange(0, SB)
        base = rb[:, None].to(tl.int64) * N + rows[None, :]  # [B_PAD, BLOCK_N]
        acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
        for s0 in range(0, split_k, SB):
            sp = s0 + s_off
            m = (sp < split_k)[:, None, None] & out_mask[None, :, :]
            p = tl.load(Part + sp[:, None, None].to(tl.int64) * B * N + base[None, :, :], mask=m, other=0.0,
                        cache_modifier=".cg")
            acc += tl.sum(p, axis=0)
        _epilogue(acc, Bias, R, Y, rows, rb, out_mask, N, stride_rb, stride_yb, HAS_BIAS, HAS_RES, EMU_BF16)

    @triton.jit
    def _merge_kernel(Part, Bias, R, Y, B, N, split_k, stride_rb, stride_yb,
                      B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                      SB: tl.constexpr, EMU_BF16: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # launched as a programmatic dependent of the split kernel: its partials are read after the wait
            gdc_launch_dependents()
            gdc_wait()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rb = tl.arange(0, B_PAD)
        out_mask = (rb < B)[:, None] & (rows < N)[None, :]
        _merge_block(Part, Bias, R, Y, rows, rb, out_mask, B, N, split_k, stride_rb, stride_yb,
                     B_PAD, BLOCK_N, HAS_BIAS, HAS_RES, SB, EMU_BF16)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def default_config(N: int, K: int, B: int, sms: int = DEFAULT_SMS) -> dict:
    """Launch configuration for ``y[B, N] = x[B, K] @ w[N, K]^T``: a small fixed table, no autotuning (a CUDA
    graph capture must not autotune, and the table is what was measured).

    The rules, from ``kvmodel.measure.gemv_probe --wide`` on an H200 (2026-11-29; every projection of Qwen2.5-7B
    and Llama-3.1-8B at B = 1, 2, 4, 8, fp16, weights rotated over ≥ 4× L2, graph replay; % of the 4.61 TB/s
    read ceiling at B = 1, table pick vs cuBLAS: Qwen qkv 71 vs 64, o 66 vs 49, gate_up 92 vs 84, down 83 vs
    74, lm_head 97 vs 80; Llama qkv 78 vs 73, o 68 vs 55, gate_up 89 vs 89, down 84 vs 80, lm_head 94 vs 91):

    - B = 1: fp32 FMAs on a ``[block_n, 512]`` tile (1 KiB of fp16 per row chunk: 64 lanes × 16-byte loads),
      ``block_n`` the largest of 8, 4, 2, 1 that still gives ≥ 4 programs per SM (N = 3584 → 4, N ≥ 4224 → 8),
      4 warps. Tiles of 4096 elements (8×512, 4×1024, 16×256) measured within ~3 % of each other; 16 rows and
      more lose (fewer programs, more registers). These loads are not software-pipelined (num_stages has no
      effect); the bytes in flight come from ~6 resident programs per SM.
    - B ≥ 2: tensor cores, x padded to 16 rows. N < 16384 (qkv, o, down): ``tl.dot(x, w^T)``, block_n 16,
      block_k 512, 2 warps (4 warps split a 16-wide tile and lose 20-30 %). N ≥ 16384 (gate_up, lm_head):
      ``tl.dot(w, x^T)`` ("swap": the w tile is the M side, a wgmma), block_n 64, block_k 128, 4 stages — 1-5 %
      ahead of the 16-row tile there. The per-row FMA path at B = 2 measured 10-50 % slower than either.
    - ``split_k = 1``: splitting K (fused merge) measured slower on every shape, even N = 3584 (o_proj), where
      the 4-row tiles already give 896 programs; it stays available as an override.

    ``sms`` only enters through the programs-per-SM rule.
    """
    def npow2(v):
        return 1 << max(0, (int(v) - 1).bit_length())

    kmax = max(16, npow2(K))
    if B == 1:
        block_n = 8
        while block_n > 1 and -(-N // block_n) < 4 * sms:
            block_n //= 2
        return {"block_n": block_n, "block_k": min(512, kmax), "split_k": 1, "num_warps": 4, "num_stages": 3,
                "dot": False, "merge": "fused"}
    if N >= 16384:
        return {"block_n": 64, "block_k": min(128, kmax), "split_k": 1, "num_warps": 4, "num_stages": 4,
                "dot": "swap", "merge": "fused"}
    return {"block_n": 16, "block_k": min(512, kmax), "split_k": 1, "num_warps": 2, "num_stages": 3,
            "dot": True, "merge": "fused"}


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def use_pdl(requested: bool, device) -> bool:
    """Whether a ``pdl=True`` launch on ``device`` really uses programmatic dependent launch: only on a CUDA
    device of compute capability ≥ 9 (Hopper), with Triton's grid dependency control (``HAVE_PDL``) and not under
    the interpreter. Everywhere else the launcher silently takes the normal path (same kernel, same results)."""
    return bool(requested) and pdl_available(device)


def pdl_launch_kwargs(active: bool, prefetch_bytes: int, block_n: int, num_warps: int, w_ptr: int,
                      row_bytes: int, k_split_bytes: int) -> dict:
    """Extra kwargs of the ``_gemv_kernel`` launch for the PDL path: ``{}`` when not ``active`` (the kernel is
    then specialized exactly as without the option), else the ``PDL`` constexpr, ``launch_pdl=True`` and
    ``PF_ROW``, the L2 prefetch per weight row: ``prefetch_bytes`` shared by the rows one program prefetches
    (``min(block_n, 32 · num_warps)``: one thread a row), rounded down to 16 bytes — 0 (no prefetch) when the
    weight's address, its row pitch ``row_bytes`` or the split-K range ``k_split_bytes`` is not a multiple of 16
    (``cp.async.bulk.prefetch`` needs 16-byte aligned addresses)."""
    if not active:
        return {}
    rows = max(1, min(block_n, 32 * num_warps))
    pf_row = (int(prefetch_bytes) // rows) // 16 * 16
    if w_ptr % 16 or row_bytes % 16 or k_split_bytes % 16:
        pf_row = 0
    return {"PDL": True, "PF_ROW": pf_row, "launch_pdl": True}


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


def _check_inputs(x, w, bias, out, residual, norm_weight=None, gate_up=False):
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise ValueError("x and w must be torch.Tensors")  # noqa: TRY004 - the launcher's one error type
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, K], got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    B, K = x.shape
    N = w.shape[0]
    if not 1 <= B <= MAX_B:
        raise ValueError(f"gemv takes 1..{MAX_B} rows of x, got B={B} (use F.linear for larger batches)")
    if norm_weight is not None and gate_up:
        raise ValueError("norm_weight and gate_up are exclusive (one prologue per call)")
    if gate_up:
        if K % 2 or K // 2 != w.shape[1]:
            raise ValueError(f"gate_up: x must be [B, 2*K] = gate|up with w [N, K], got x {tuple(x.shape)}, "
                             f"w {tuple(w.shape)}")
        K //= 2
    if w.shape[1] != K:
        raise ValueError(f"x is [B, {K}] but w is {tuple(w.shape)}: w must be [N, K]")
    if K < 1 or N < 1:
        raise ValueError(f"K and N must be positive, got K={K}, N={N}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if w.dtype != x.dtype:
        raise ValueError(f"w dtype {w.dtype} != x dtype {x.dtype}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous (row-major [N, K])")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError("gemv needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    for name, t, shape in (("w", w, None), ("bias", bias, (N,)), ("out", out, (B, N)),
                           ("residual", residual, (B, N)), ("norm_weight", norm_weight, (K,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor")  # noqa: TRY004
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != x dtype {x.dtype}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    return B, K, N


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
         split_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
         dot: bool | str | None = None, merge: str | None = None, workspace: dict | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, gate_up: bool = False, pdl: bool = False,
         prefetch_bytes: int | None = None) -> torch.Tensor:
    """``y = x @ w.T (+ bias) (+ residual)`` for ``x [B ≤ 8, K]``, ``w [N, K]`` (fp16/bf16) → ``y [B, N]``.

    ``out``: where to write y (``[B, N]``, contiguous in N); ``residual``: ``[B, N]`` added in fp32 before the one
    rounding — it may be ``out`` itself (``out += x @ w.T`` in place, what a decoder's residual stream does).
    ``block_n``/``block_k`` (powers of two), ``split_k`` (≥ 1), ``num_warps``, ``num_stages``, ``dot`` (True:
    ``tl.dot(x_pad16, w^T)``; "swap": ``tl.dot(w, x_pad16^T)``, the w tile as the MMA's M side; False: fp32
    FMAs), ``merge`` (``"fused"`` or ``"kernel"``) override
    :func:`default_config`. ``workspace``: optional dict reused across calls for split-K partials and counters
    (no allocation or memset per call; one per stream). Raises ValueError on bad inputs.

    Prologues (opt-in, one per call; see the module docstring): ``norm_weight`` (``[K]``, x's dtype; ``eps``):
    ``y = rmsnorm(x) @ w.T (+ bias) (+ residual)``, rmsnorm over each row of x; ``gate_up=True``: x is the
    ``[B, 2K]`` gate|up activation and ``y = (silu(x[:, :K]) * x[:, K:]) @ w.T (+ bias) (+ residual)``.

    ``pdl=True`` (opt-in, see the module docstring): launched as a programmatic dependent of the previous kernel
    in the stream (``launch_pdl``; the split-K merge kernel too), each program prefetching its first
    ``prefetch_bytes`` of weights (default :data:`DEFAULT_PREFETCH_BYTES`; 0: none) into L2 before it waits for
    that kernel. Only where :func:`use_pdl` says so (CUDA, capability ≥ 9, not interpreting); elsewhere the
    normal launch, silently. Results are identical either way.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _interpreter_compat.apply()
    B, K, N = _check_inputs(x, w, bias, out, residual, norm_weight, bool(gate_up))
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if prefetch_bytes is None:
        prefetch_bytes = DEFAULT_PREFETCH_BYTES
    if isinstance(prefetch_bytes, bool) or not isinstance(prefetch_bytes, int) or \
            not 0 <= prefetch_bytes <= MAX_PREFETCH_BYTES:
        raise ValueError(f"prefetch_bytes must be an int in [0, {MAX_PREFETCH_BYTES}], got {prefetch_bytes!r}")
    pdl = use_pdl(bool(pdl), x.device)
    cfg = default_config(N, K, B, num_sms(x.device) if x.device.type == "cuda" else INTERPRETER_SMS)
    block_n = cfg["block_n"] if block_n is None else block_n
    block_k = cfg["block_k"] if block_k is None else block_k
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    dot = cfg["dot"] if dot is None else dot
    modes = {False: 0, True: 1, "swap": 2}
    if not any(dot is m or (isinstance(dot, str) and dot == m) for m in modes):
        raise ValueError(f"dot must be False, True or 'swap', got {dot!r}")
    dot = modes[dot]
    merge = cfg["merge"] if merge is None else merge
    if split_k is None:
        split_k = cfg["split_k"] if (block_n == cfg["block_n"] and block_k == cfg["block_k"]) else 1
    if not _is_pow2(block_n) or not _is_pow2(block_k) or not _is_pow2(num_warps):
        raise ValueError(f"block_n, block_k and num_warps must be powers of two, got {block_n}, {block_k}, "
                         f"{num_warps}")
    if dot and block_n < 16:
        raise ValueError(f"the dot path needs block_n >= 16, got {block_n}")
    block_k = max(block_k, 16) if dot else block_k
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be an int >= 1, got {split_k!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if merge not in ("fused", "kernel"):
        raise ValueError(f"merge must be 'fused' or 'kernel', got {merge!r}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    # K split into whole BLOCK_K chunks, no empty split
    chunks = -(-K // block_k)
    per = -(-chunks // min(split_k, chunks))
    split_k = -(-chunks // per)
    k_per_split = per * block_k
    b_pad = max(16, triton.next_power_of_2(B)) if dot else triton.next_power_of_2(B)
    grid_n = -(-N // block_n)
    split = split_k > 1
    fuse = split and merge == "fused"
    part = counter = out  # placeholders when unused
    if split:
        key = ("gemv_part", split_k, B, N, x.device)
        part = None if workspace is None else workspace.get(key)
        if part is None:
            part = torch.empty(split_k, B, N, dtype=torch.float32, device=x.device)
            if workspace is not None:
                workspace[key] = part
    if fuse:
        key = ("gemv_counter", grid_n, x.device)
        counter = None if workspace is None else workspace.get(key)
        if counter is None:
            counter = torch.zeros(grid_n, dtype=torch.int32, device=x.device)  # reset by the kernel
            if workspace is not None:
                workspace[key] = counter
    bias_t = bias if bias is not None else out
    res_t = residual if residual is not None else out
    merge_sb = min(8, triton.next_power_of_2(split_k))
    emu = x.dtype == torch.bfloat16 and _interpreting()
    prologue = {}  # default off: the kernel is specialized exactly as before
    if norm_weight is not None:
        prologue["NORM"] = True
    if gate_up:
        prologue["GATE_UP"] = True
    esz = w.element_size()
    pdl_kw = pdl_launch_kwargs(pdl, prefetch_bytes, block_n, num_warps, w.data_ptr(), w.stride(0) * esz,
                               k_per_split * esz)  # {} unless pdl: the default specialization is unchanged
    _gemv_kernel[(grid_n, split_k)](
        x, w, bias_t, res_t, out, part, counter, norm_weight if norm_weight is not None else out,
        B, N, K, k_per_split, split_k, float(eps),
        x.stride(0), w.stride(0), res_t.stride(0), out.stride(0),
        B_PAD=b_pad, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, EVEN_K=(K % block_k == 0),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SPLIT=split, FUSE_MERGE=fuse,
        MERGE_SB=merge_sb, EMU_BF16=emu, num_warps=num_warps, num_stages=num_stages, **prologue, **pdl_kw,
    )
    if split and not fuse:
        mb = 128
        _merge_kernel[(-(-N // mb),)](
            part, bias_t, res_t, out, B, N, split_k, res_t.stride(0), out.stride(0),
            B_PAD=triton.next_power_of_2(B), BLOCK_N=mb, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            SB=merge_sb, EMU_BF16=emu, num_warps=4, **({"PDL": True, "launch_pdl": True} if pdl else {}),
        )
    return out


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
             residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
             gate_up: bool = False) -> torch.Tensor:
    """float32 reference of :func:`gemv`: ``x @ w.T (+ bias) (+ residual)`` computed in fp32 (not rounded), with
    the same prologues: ``x = x / sqrt(mean(x^2) + eps) * norm_weight`` or ``x = silu(gate) * up``, in fp32."""
    xf = x.float()
    if gate_up:
        g, u = xf.chunk(2, dim=-1)
        xf = torch.nn.functional.silu(g) * u
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = xf @ w.float().T
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y
