"""Fused quantized-KV decode attention (split-K / flash-decoding) in Triton.

``decode_attention(q, cache)``: ``q [B, Hq, d]`` fp16 (one new token per sequence), ``cache`` a
:class:`~kvmodel.kernels.quant.QuantizedKVCache` with ``cache.length = T`` valid tokens; returns ``[B, Hq, d]``
fp16, ``softmax(q K^T / sqrt(d)) V`` over the T cached tokens of each sequence.

Kernel 1 (``_attn_split_kernel``), grid ``(num_splits, Hkv, B)`` (or ``(num_splits, Hq, B)`` without GQA
sharing): each program streams one contiguous token range of one (sequence, KV head) once, in BLOCK_N tiles, and
serves all G = Hq/Hkv query heads of that KV head: their G rows of q, padded to 16, are the M side of ``tl.dot``.
Each tile is dequantized in registers (4- and 8-bit codes become fp16 by OR-ing them into the mantissa of 1024.0,
no int-to-float conversion; then one subtract and one multiply by the group scale), scores go through an online
softmax in fp32 (exp2, the 1/sqrt(d)·log2(e) factor folded into one multiply), and ``P·V`` accumulates in fp32.

The head dimension is handled as two halves A/B, so that 4-bit data is used straight from its packed bytes: for
4-bit K the halves are the even channels (low nibbles) and odd channels (high nibbles), and ``q·k`` is
``q_even·k_lo + q_odd·k_hi``; for 8- and 16-bit data they are channels [0, d/2) and [d/2, d). Same for V and the
output accumulators.

Swapped operands (``swap``, the default for formats with a quantized part since v6): the tile's tokens are the
mma M side and the query rows its N side, padded to 8 instead of 16 (``S^T = K·q^T``, ``O^T = V^T·P^T``): half the
mma and softmax work and accumulator registers at G ≤ 8. V fold (``v_fold``, v7, a symmetric 4-bit token_octet V
with K at 4 or 16 bits): per channel group, ``O^T_g = (codes_g − 8)^T · (P ⊙ s_g)`` in one batched dot — the group
scale multiplies the [BLOCK_N, 8] P tile instead of the [BLOCK_N, d] V tile.

Kernel 2 (``_merge_kernel``) merges the splits' normalized partial outputs by their log-sum-exp. With one split
kernel 1 writes the output directly (the study's no-split design).
"""

from __future__ import annotations

import functools
import math

import torch

from . import _interpreter_compat
from .quant import QuantizedKVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None
try:  # grid dependency control (programmatic dependent launch; merge="pdl"), triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_PDL = True
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None
    HAVE_PDL = False
try:  # per-program timestamps (the program-timeline probe, stamps=)
    from triton.language.extra.cuda import globaltimer, smid
except ImportError:  # pragma: no cover
    globaltimer = smid = None

LOG2E = 1.4426950408889634
V_FULL_DEFAULT = False  # True: V dequantized to a full-width fp16 tile before the P·V dot (_load_v_full); measured no faster for 4/4 (NOTES.md), so the grid default is the halves path
DEFAULT_SMS = 132  # H200; the launcher reads the real count from the device when there is one
K_FOLD_DEFAULT = True  # v9: large launches with a symmetric 4-bit K fold K's group scales into the score tile
SWAP_MIN_ROWS = 8  # query rows of the swapped (tokens-as-M) dots: mma.m16n8k16's N is 8
SWAP_DEFAULT = True  # formats with a quantized part use the swapped dots (v6; offline SASS −15…−25 % instructions)
V_FOLD_DEFAULT = True  # swapped dots + symmetric 4-bit token_octet V (K not 8-bit): V scales on the P tile (v7)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _to_f16(c, MAGIC: tl.constexpr):
        """Integer codes c (uint8 tensor, values < 256) → fp16 ``1024 + c`` (MAGIC) or fp16 ``c``."""
        if MAGIC:
            return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        else:
            return c.to(tl.float16)

    @triton.jit
    def _nibbles_f16(b, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """Packed bytes b (uint8) → (1024 + low nibble, 1024 + high nibble) as fp16 (MAGIC), or the plain
        nibble values. ASM: 7 PTX instructions per 4 bytes (2 LOP3, 1 SHF, 4 PRMT) instead of ~2.5 per element."""
        if ASM:
            lo, hi = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 a, b;
                and.b32 a, $4, 0x0F0F0F0F;
                shr.b32 b, $4, 4;
                and.b32 b, b, 0x0F0F0F0F;
                prmt.b32 $0, a, 0x64646464, 0x4140;
                prmt.b32 $1, a, 0x64646464, 0x4342;
                prmt.b32 $2, b, 0x64646464, 0x4140;
                prmt.b32 $3, b, 0x64646464, 0x4342;
                }""",
                constraints="=r,=r,=r,=r,r",
                args=[b],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=4,
            )
            return lo, hi
        else:
            return _to_f16(b & 0xF, MAGIC), _to_f16(b >> 4, MAGIC)

    @triton.jit
    def _bytes_f16(b, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """Bytes b (uint8) → fp16 1024 + b (MAGIC) or b."""
        if ASM:
            return tl.inline_asm_elementwise(
                asm="""{
                prmt.b32 $0, $2, 0x64646464, 0x4140;
                prmt.b32 $1, $2, 0x64646464, 0x4342;
                }""",
                constraints="=r,=r,r",
                args=[b],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
        else:
            return _to_f16(b, MAGIC)

    @triton.jit
    def _dequant(x, s, z, BITS: tl.constexpr, ASYM: tl.constexpr, MAGIC: tl.constexpr):
        """x: fp16 codes (+1024 when MAGIC) → fp16 values, with group scale s (and zero z). The asymmetric
        c·s + z is one fused multiply-add (one rounding, as the fp32 reference dequantizes: HFMA2 on the GPU; the
        interpreter's fma is made to round once too, kernels._interpreter_compat)."""
        bias: tl.constexpr = 1024.0 if MAGIC else 0.0
        if ASYM:
            return tl.fma(x - bias, s, z)
        else:
            return (x - (bias + 2.0 ** (BITS - 1))) * s

    @triton.jit
    def _split_scales(s_base, offs_n, mask_n, stride_st, D: tl.constexpr, GROUP: tl.constexpr, NGH: tl.constexpr):
        """Group scales of the channel halves [0, D/2) and [D/2, D) of BLOCK_N tokens, from one load of each
        token's NG = D/GROUP scales: two [BLOCK_N, NGH, 1] tensors (NGH groups per half; one shared group when
        GROUP > D/2)."""
        NG: tl.constexpr = D // GROUP
        if NG == 1:
            s = tl.load(s_base + offs_n[:, None, None] * stride_st + tl.zeros([1, 1, 1], tl.int32),
                        mask=mask_n[:, None, None], other=0.0)
            return s, s
        else:
            f = tl.arange(0, NG)[None, :]
            row = tl.load(s_base + offs_n[:, None] * stride_st + f, mask=mask_n[:, None], other=0.0)  # [BLOCK_N, NG]
            sa, sb = tl.split(tl.permute(tl.reshape(row, (row.shape[0], 2, NGH)), (0, 2, 1)))
            return sa[:, :, None], sb[:, :, None]

    @triton.jit
    def _load_tile(base, s_base, z_base, offs_n, mask_n, stride_t, stride_st,
                   D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                   BLOCK_N: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """Load and dequantize one tile of BLOCK_N tokens: returns the two halves (A, B), fp16 [BLOCK_N, D/2]."""
        HALF_D: tl.constexpr = D // 2
        if BITS == 16:
            j = tl.arange(0, HALF_D)[None, :]
            p = base + offs_n[:, None] * stride_t + j
            m = mask_n[:, None]
            xa = tl.load(p, mask=m, other=0.0)
            xb = tl.load(p + HALF_D, mask=m, other=0.0)
            return xa, xb
        elif BITS == 4:
            # packed byte i of a token holds channels 2i (low nibble) and 2i+1 (high nibble); group = i // (G/2)
            W: tl.constexpr = GROUP // 2
            NG: tl.constexpr = D // GROUP
            n3 = offs_n[:, None, None]
            m3 = mask_n[:, None, None]
            gh = tl.arange(0, NG)[None, :, None]
            w = tl.arange(0, W)[None, None, :]
            b = tl.load(base + n3 * stride_t + gh * W + w, mask=m3, other=0)
            s = tl.load(s_base + n3 * stride_st + gh, mask=m3, other=0.0)
            if ASYM:
                z = tl.load(z_base + n3 * stride_st + gh, mask=m3, other=0.0)
            else:
                z = s
            ca, cb = _nibbles_f16(b, MAGIC, ASM)
            xa = _dequant(ca, s, z, BITS, ASYM, MAGIC)
            xb = _dequant(cb, s, z, BITS, ASYM, MAGIC)
            return tl.reshape(xa, (BLOCK_N, HALF_D)), tl.reshape(xb, (BLOCK_N, HALF_D))
        else:
            # 8 bits: halves are channels [0, D/2) and [D/2, D); W channels per (sub)group in a half
            W: tl.constexpr = GROUP if GROUP < HALF_D else HALF_D
            NGH: tl.constexpr = HALF_D // W
            n3 = offs_n[:, None, None]
            m3 = mask_n[:, None, None]
            gh = tl.arange(0, NGH)[None, :, None]
            w = tl.arange(0, W)[None, None, :]
            pa = base + n3 * stride_t + gh * W + w
            ba = tl.load(pa, mask=m3, other=0)
            bb = tl.load(pa + HALF_D, mask=m3, other=0)
            # the token's whole scale row (NG contiguous fp16, one load the pipeliner can copy asynchronously when
            # the stride is constant), split into the halves' groups: [BLOCK_N, NGH, 1] each
            sa, sb = _split_scales(s_base, offs_n, mask_n, stride_st, D, GROUP, NGH)
            if ASYM:
                za, zb = _split_scales(z_base, offs_n, mask_n, stride_st, D, GROUP, NGH)
            else:
                za = sa
                zb = sb
            xa = _dequant(_bytes_f16(ba, MAGIC, ASM), sa, za, BITS, ASYM, MAGIC)
            xb = _dequant(_bytes_f16(bb, MAGIC, ASM), sb, zb, BITS, ASYM, MAGIC)
            return tl.reshape(xa, (BLOCK_N, HALF_D)), tl.reshape(xb, (BLOCK_N, HALF_D))

    @triton.jit
    def _load_v_full(base, s_base, z_base, offs_n, mask_n, stride_t, stride_st,
                     D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                     BLOCK_N: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """One V tile dequantized to fp16 [BLOCK_N, D] in natural channel order (the two nibble halves are
        interleaved in registers), so that the layout change for the P·V dot happens on fp16 data (ldmatrix.trans)
        instead of as transposed byte reads from shared memory."""
        if BITS == 16:
            c = tl.arange(0, D)[None, :]
            return tl.load(base + offs_n[:, None] * stride_t + c, mask=mask_n[:, None], other=0.0)
        else:
            NG: tl.constexpr = D // GROUP
            n3 = offs_n[:, None, None]
            m3 = mask_n[:, None, None]
            gh = tl.arange(0, NG)[None, :, None]
            s = tl.load(s_base + n3 * stride_st + gh, mask=m3, other=0.0)
            if ASYM:
                z = tl.load(z_base + n3 * stride_st + gh, mask=m3, other=0.0)
            else:
                z = s
            if BITS == 4:
                W: tl.constexpr = GROUP // 2
                w = tl.arange(0, W)[None, None, :]
                b = tl.load(base + n3 * stride_t + gh * W + w, mask=m3, other=0)
                ca, cb = _nibbles_f16(b, MAGIC, ASM)
                xa = _dequant(ca, s, z, BITS, ASYM, MAGIC)
                xb = _dequant(cb, s, z, BITS, ASYM, MAGIC)
                return tl.reshape(tl.join(xa, xb), (BLOCK_N, D))
            else:
                w = tl.arange(0, GROUP)[None, None, :]
                b = tl.load(base + n3 * stride_t + gh * GROUP + w, mask=m3, other=0)
                x = _dequant(_bytes_f16(b, MAGIC, ASM), s, z, BITS, ASYM, MAGIC)
                return tl.reshape(x, (BLOCK_N, D))

    @triton.jit
    def _load_v_pairs(base, s_base, z_base, n0, end, stride_t, stride_st,
                      D: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, BLOCK_N: tl.constexpr,
                      MAGIC: tl.constexpr, ASM: tl.constexpr):
        """One 4-bit V tile in the token_pair layout (byte (i, c) = tokens n0+2i (low nibble) and n0+2i+1 (high
        nibble) of channel c; n0 even) → fp16 [BLOCK_N, D] in natural token and channel order. The two nibbles of a
        byte are the two consecutive tokens (k, k+1) of the P·V contraction, which the mma B fragment holds as one
        fp16x2 register, so no transposed byte reads are needed."""
        HB: tl.constexpr = BLOCK_N // 2
        NG: tl.constexpr = D // GROUP
        i = tl.arange(0, HB)
        r3 = (n0 // 2 + i)[:, None, None]
        mrow = ((n0 + 2 * i) < end)[:, None, None]
        gh = tl.arange(0, NG)[None, :, None]
        w = tl.arange(0, GROUP)[None, None, :]
        b = tl.load(base + r3 * stride_t + gh * GROUP + w, mask=mrow, other=0)  # [HB, NG, GROUP]
        # scales of tokens (2i, 2i+1): [HB, 2, NG], contiguous per pair (constant stride NG under SC); a token past
        # `end` gets scale (and zero) 0, so its nibble (valid code, maybe another token's) dequantizes to 0
        tok = n0 + 2 * i[:, None, None] + tl.arange(0, 2)[None, :, None]
        g2 = tl.arange(0, NG)[None, None, :]
        sm = tok < end
        se, so = tl.split(tl.permute(tl.load(s_base + tok * stride_st + g2, mask=sm, other=0.0), (0, 2, 1)))
        if ASYM:
            ze, zo = tl.split(tl.permute(tl.load(z_base + tok * stride_st + g2, mask=sm, other=0.0), (0, 2, 1)))
        else:
            ze = se
            zo = so
        lo, hi = _nibbles_f16(b, MAGIC, ASM)
        ve = _dequant(lo, se[:, :, None], ze[:, :, None], 4, ASYM, MAGIC)
        vo = _dequant(hi, so[:, :, None], zo[:, :, None], 4, ASYM, MAGIC)
        v = tl.permute(tl.join(ve, vo), (0, 3, 1, 2))  # [HB, 2, NG, GROUP]
        return tl.reshape(v, (BLOCK_N, D))

    @triton.jit
    def _load_v_octets(base, s_base, z_base, n0, end, stride_t, stride_st,
                       D: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, BLOCK_N: tl.constexpr,
                       MAGIC: tl.constexpr, ASM: tl.constexpr, SC: tl.constexpr, RAW: tl.constexpr = False):
        """One 4-bit V tile in the token_octet layout: per 8 tokens (n0 + 8r + k) and channel c one 32-bit word,
        byte m = token m (low nibble) | token m + 4 (high nibble). The word's low nibbles unpack (LOP3 + 2 PRMT)
        to the fp16x2 pairs (t0, t1), (t2, t3) and its high nibbles to (t4, t5), (t6, t7): the 8 consecutive k of
        one n that an mma B fragment (kWidth 8) holds, read with one 32-bit shared-memory load. → fp16 [BLOCK_N, D]."""
        R: tl.constexpr = BLOCK_N // 8
        NG: tl.constexpr = D // GROUP
        r = tl.arange(0, R)
        mrow = ((n0 + 8 * r) < end)[:, None]
        f = tl.arange(0, 4 * D)[None, :]  # one contiguous row of 4·D bytes per 8 tokens
        b = tl.load(base + (n0 // 8 + r)[:, None] * stride_t + f, mask=mrow, other=0)
        b = tl.reshape(b, (R, NG, GROUP, 4))
        if RAW:  # the centered codes c - 8 (exact in fp16); the caller applies the scales (V fold)
            lo, hi = _nibbles_f16(b, MAGIC, ASM)
            off: tl.constexpr = (1024.0 if MAGIC else 0.0) + 8.0
            v = tl.permute(tl.join(lo - off, hi - off), (0, 4, 3, 1, 2))  # [R, 2, 4, NG, GROUP]
            return tl.reshape(v, (BLOCK_N, D))
        # scales of the 8 tokens (token n0 + 8r + 4e + m, group g): [R, 8·NG] → [R, NG, 1, 4] for e = 0 and e = 1
        f8 = tl.arange(0, 8 * NG)[None, :]
        tok = n0 + 8 * r[:, None] + f8 // NG
        sm = tok < end
        if SC:  # contiguous: 8·NG scales per octet, one run the pipeliner can copy asynchronously
            so = (n0 + 8 * r[:, None]) * NG + f8
        else:
            so = tok * stride_st + f8 % NG
        s8 = tl.permute(tl.reshape(tl.load(s_base + so, mask=sm, other=0.0), (R, 2, 4, NG)), (0, 3, 2, 1))
        s_lo, s_hi = tl.split(s8)
        s_lo = s_lo[:, :, None, :]
        s_hi = s_hi[:, :, None, :]
        if ASYM:
            z8 = tl.permute(tl.reshape(tl.load(z_base + so, mask=sm, other=0.0), (R, 2, 4, NG)), (0, 3, 2, 1))
            z_lo, z_hi = tl.split(z8)
            z_lo = z_lo[:, :, None, :]
            z_hi = z_hi[:, :, None, :]
        else:
            z_lo = s_lo
            z_hi = s_hi
        lo, hi = _nibbles_f16(b, MAGIC, ASM)
        v_lo = _dequant(lo, s_lo, z_lo, 4, ASYM, MAGIC)
        v_hi = _dequant(hi, s_hi, z_hi, 4, ASYM, MAGIC)
        v = tl.permute(tl.join(v_lo, v_hi), (0, 4, 3, 1, 2))  # [R, 2, 4, NG, GROUP]
        return tl.reshape(v, (BLOCK_N, D))

    @triton.jit
    def _attn_range(
        lo, hi, m_i, l_i, acc, acc_a, acc_b, acc3,
        qf, qa, qb, q3a, q3b, kbias3, gk, wk, rot_t, span_t,
        kd, ks, kz, vd, vs, vz, skd_t, sks_t, svd_t, svs_t, qk_scale,
        D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_N: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, SC: tl.constexpr, K_FULL: tl.constexpr,
        V_FULL: tl.constexpr, VTP: tl.constexpr, SW: tl.constexpr, VF: tl.constexpr, KF: tl.constexpr,
        ROT: tl.constexpr,
    ):
        """Tokens [lo, hi) of one (sequence, program head) folded into the online-softmax state (m_i, l_i and the
        accumulator of the build: acc, acc_a / acc_b or acc3; the others are placeholders passed through), one
        BLOCK_N tile per step. The q-side operands are the ones the build uses (placeholders otherwise)."""
        WK: tl.constexpr = GROUP // 2
        NGK: tl.constexpr = D // GROUP
        NGV: tl.constexpr = D // GROUP
        for n0 in range(lo, hi, BLOCK_N):
            if ROT:
                n_t = lo + (n0 - lo + rot_t) % span_t
            else:
                n_t = n0
            offs_n = n_t + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            if K_FULL:
                kf = _load_v_full(kd, ks, kz, offs_n, mask_n, skd_t, sks_t, D, K_BITS, GROUP, ASYM, BLOCK_N, MAGIC,
                                  ASM)
            elif KF:
                n3 = offs_n[:, None, None]
                bk = tl.load(kd + n3 * skd_t + gk[None, :, None] * WK + wk[None, None, :], mask=mask_n[:, None, None],
                             other=0)  # [BLOCK_N, NG, W] packed bytes
                sk = tl.load(ks + offs_n[:, None] * sks_t + gk[None, :], mask=mask_n[:, None], other=0.0)
                klo, khi = _nibbles_f16(bk, MAGIC, ASM)  # raw codes
                s3 = tl.dot(tl.permute(klo, (1, 0, 2)), q3a, kbias3)
                s3 = tl.dot(tl.permute(khi, (1, 0, 2)), q3b, s3)  # [NG, BLOCK_N, M_PAD]
                s = tl.sum(s3 * tl.permute(tl.reshape(sk.to(tl.float32), (BLOCK_N, NGK, 1)), (1, 0, 2)), 0)
            else:
                ka, kb = _load_tile(kd, ks, kz, offs_n, mask_n, skd_t, sks_t, D, K_BITS, GROUP, ASYM, BLOCK_N, MAGIC,
                                    ASM)
            # scores and softmax over the tile's tokens: [M_PAD, BLOCK_N], or [BLOCK_N, M_PAD] with swapped dots
            if SW:
                if K_FULL:
                    s = tl.dot(kf, qf)
                elif not KF:  # (with the K fold the scores were built with the tile's load)
                    s = tl.dot(ka, qa)
                    s = tl.dot(kb, qb, s)
                s = s * qk_scale
                s = tl.where(mask_n[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, 0)
            else:
                if K_FULL:
                    s = tl.dot(qf, tl.trans(kf))
                else:
                    s = tl.dot(qa, tl.trans(ka))
                    s = tl.dot(qb, tl.trans(kb), s)
                s = s * qk_scale
                s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            p16 = p.to(tl.float16)
            # P·V: the V tile (full width, or the two halves), then acc += P·V (swapped: acc^T += V^T·P^T)
            if VF:
                v = _load_v_octets(vd, vs, vz, n_t, hi, svd_t, svs_t, D, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SC, True)
                sv = tl.load(vs + offs_n[None, :] * svs_t + tl.arange(0, NGV)[:, None], mask=mask_n[None, :],
                             other=0.0)  # [NG, BLOCK_N]
                b3 = p16[None, :, :] * sv[:, :, None]  # [NG, BLOCK_N, M_PAD] fp16
                a3 = tl.permute(tl.reshape(v, (BLOCK_N, NGV, GROUP)), (1, 2, 0))  # [NG, GROUP, BLOCK_N]
                acc3 = tl.dot(a3, b3, acc3 * alpha[None, None, :])
            else:
                if VTP == 2:
                    v = _load_v_octets(vd, vs, vz, n_t, hi, svd_t, svs_t, D, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SC)
                elif VTP:
                    v = _load_v_pairs(vd, vs, vz, n_t, hi, svd_t, svs_t, D, GROUP, ASYM, BLOCK_N, MAGIC, ASM)
                elif V_FULL:
                    v = _load_v_full(vd, vs, vz, offs_n, mask_n, svd_t, svs_t, D, V_BITS, GROUP, ASYM, BLOCK_N,
                                     MAGIC, ASM)
                else:
                    va, vb = _load_tile(vd, vs, vz, offs_n, mask_n, svd_t, svs_t, D, V_BITS, GROUP, ASYM, BLOCK_N,
                                        MAGIC, ASM)
                if V_FULL or VTP:
                    if SW:
                        acc = tl.dot(tl.trans(v), p16, acc * alpha[None, :])
                    else:
                        acc = tl.dot(p16, v, acc * alpha[:, None])
                elif SW:
                    acc_a = tl.dot(tl.trans(va), p16, acc_a * alpha[None, :])
                    acc_b = tl.dot(tl.trans(vb), p16, acc_b * alpha[None, :])
                else:
                    acc_a = tl.dot(p16, va, acc_a * alpha[:, None])
                    acc_b = tl.dot(p16, vb, acc_b * alpha[:, None])

        return m_i, l_i, acc, acc_a, acc_b, acc3

    @triton.jit
    def _attn_program(
        pid_s, pid_h, pid_b, n_heads, pool_start, pool_chunk, n_pool,
        Q, KD, KS, KZ, VD, VS, VZ, Out, PartO, PartL, Counter,
        T, tokens_per_split, qk_scale, num_splits,
        stride_qb, stride_qh,
        skd_b, skd_h, skd_t, sks_b, sks_h, sks_t,
        svd_b, svd_h, svd_t, svs_b, svs_h, svs_t,
        stride_ob, stride_oh,
        stride_pb, stride_ph, stride_ps,
        G: tl.constexpr, HPP: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
        K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_N: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
        V_FULL: tl.constexpr, SC: tl.constexpr, K_FULL: tl.constexpr,
        VTP: tl.constexpr, FUSE_MERGE: tl.constexpr, MERGE_RB: tl.constexpr,
        MERGE_SB: tl.constexpr, SW: tl.constexpr, VF: tl.constexpr, KF: tl.constexpr, ROT: tl.constexpr,
        POOL: tl.constexpr,
    ):
        """One work item of the split kernel: split ``pid_s`` of (sequence ``pid_b``, program head ``pid_h``) —
        its tokens' online softmax and P·V, then its partial output and log-sum-exp (or, unsplit, the output)."""
        # placeholders for the operands and accumulators this build does not use (the branches below bind the rest)
        ph = tl.zeros([1], tl.float32)
        qf = ph
        qa = ph
        qb = ph
        q3a = ph
        q3b = ph
        kbias3 = ph
        gk = ph
        wk = ph
        acc = ph
        acc_a = ph
        acc_b = ph
        acc3 = ph
        rot_t = ph
        span_t = ph
        HALF_D: tl.constexpr = D // 2
        kvh = (pid_h // (G // HPP)).to(tl.int64)

        rows = tl.arange(0, M_PAD)
        row_ok = rows < HPP
        head = pid_h * HPP + rows  # query head of each row
        j = tl.arange(0, HALF_D)
        # channel of element j of half A / B, for K (q side) and for V (output side)
        if K_BITS == 4:
            qa_ch = 2 * j
            qb_ch = 2 * j + 1
        else:
            qa_ch = j
            qb_ch = j + HALF_D
        if V_FULL or VTP:
            oa_ch = j  # unused halves: acc is full width
            ob_ch = j + HALF_D
        elif V_BITS == 4:
            oa_ch = 2 * j
            ob_ch = 2 * j + 1
        else:
            oa_ch = j
            ob_ch = j + HALF_D

        q_ptr = Q + pid_b * stride_qb + head[:, None].to(tl.int64) * stride_qh
        if K_FULL:
            qf = tl.load(q_ptr + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
        else:
            qa = tl.load(q_ptr + qa_ch[None, :], mask=row_ok[:, None], other=0.0)
            qb = tl.load(q_ptr + qb_ch[None, :], mask=row_ok[:, None], other=0.0)

        kd = KD + pid_b * skd_b + kvh * skd_h
        ks = KS + pid_b * sks_b + kvh * sks_h
        kz = KZ + pid_b * sks_b + kvh * sks_h
        vd = VD + pid_b * svd_b + kvh * svd_h
        vs = VS + pid_b * svs_b + kvh * svs_h
        vz = VZ + pid_b * svs_b + kvh * svs_h

        if SC:  # scales contiguous along tokens: a constant stride lets the pipeliner copy them asynchronously
            sks_t = D // GROUP
            svs_t = D // GROUP
        start = pid_s * tokens_per_split
        end = start + tokens_per_split
        if end > T:
            end = T

        m_i = tl.full([M_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([M_PAD], tl.float32)
        if SW:
            # swapped operands: the tile's tokens are the mma M side and the query rows its N side (8 instead of
            # 16 padded rows: half the mma work and half the softmax registers at G <= 8); scores and P are
            # [BLOCK_N, M_PAD], the accumulators [channels, M_PAD]
            if K_FULL:
                qf = tl.trans(qf)
            elif KF:
                # K fold: per channel group g, S_g = codes_g · q_g on the raw fp16 codes (1024 + c with MAGIC)
                # minus (1024 + 8)·Σ q_g, then S = Σ_g S_g ⊙ s_g: the group scale multiplies the [BLOCK_N, M_PAD]
                # score tile instead of dequantizing the [BLOCK_N, D] K tile. One batched dot over the groups:
                # q's even / odd channels of each group (the packed bytes' low / high nibbles) as [NG, W, M_PAD],
                # and the bias as the dot's initial accumulator
                WK: tl.constexpr = GROUP // 2
                NGK: tl.constexpr = D // GROUP
                kbias_off: tl.constexpr = (1024.0 if MAGIC else 0.0) + 8.0
                wk = tl.arange(0, WK)
                gk = tl.arange(0, NGK)
                q3 = (Q + pid_b * stride_qb + head[None, :, None].to(tl.int64) * stride_qh
                      + 2 * (gk[None, None, :] * WK + wk[:, None, None]))  # [W, M_PAD, NG]
                q3a = tl.load(q3, mask=row_ok[None, :, None], other=0.0)
                q3b = tl.load(q3 + 1, mask=row_ok[None, :, None], other=0.0)
                kbias = -kbias_off * (tl.sum(q3a.to(tl.float32), 0) + tl.sum(q3b.to(tl.float32), 0))  # [M_PAD, NG]
                q3a = tl.permute(q3a, (2, 0, 1))  # [NG, W, M_PAD]
                q3b = tl.permute(q3b, (2, 0, 1))
                kbias3 = tl.zeros([NGK, BLOCK_N, M_PAD], tl.float32) + tl.permute(kbias, (1, 0))[:, None, :]
            else:
                qa = tl.trans(qa)
                qb = tl.trans(qb)
            if VF:
                # V fold: per channel group g, O^T_g = codes_g^T · (P ⊙ s_g): the group scale multiplies the
                # [BLOCK_N, M_PAD] P tile instead of the [BLOCK_N, D] V tile (one batched dot over the groups)
                NGV: tl.constexpr = D // GROUP
                acc3 = tl.zeros([NGV, GROUP, M_PAD], tl.float32)
            elif V_FULL or VTP:
                acc = tl.zeros([D, M_PAD], tl.float32)
            else:
                acc_a = tl.zeros([HALF_D, M_PAD], tl.float32)
                acc_b = tl.zeros([HALF_D, M_PAD], tl.float32)
        elif V_FULL or VTP:
            acc = tl.zeros([M_PAD, D], tl.float32)
        else:
            acc_a = tl.zeros([M_PAD, HALF_D], tl.float32)
            acc_b = tl.zeros([M_PAD, HALF_D], tl.float32)

        if ROT:
            # probe: each program walks its split's tiles from a program-dependent tile on (wrapping around), so
            # programs running side by side do not sit at addresses congruent modulo the split size
            span_t = tl.cdiv(end - start, BLOCK_N) * BLOCK_N
            rot_t = ((pid_s * 7 + pid_h * 13 + pid_b.to(tl.int32) * 5) % tl.cdiv(end - start, BLOCK_N)) * BLOCK_N
        m_i, l_i, acc, acc_a, acc_b, acc3 = _attn_range(
            start, end, m_i, l_i, acc, acc_a, acc_b, acc3, qf, qa, qb, q3a, q3b, kbias3, gk, wk, rot_t, span_t,
            kd, ks, kz, vd, vs, vz, skd_t, sks_t, svd_t, svs_t, qk_scale,
            D, K_BITS, V_BITS, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SC, K_FULL, V_FULL, VTP, SW, VF, KF, ROT,
        )
        if POOL:
            # tail pool (probe): the last tokens of this (sequence, head) are chunks that its split programs claim
            # from a counter once their own tokens are done, folding them into the same softmax state — a program
            # on a slow SM takes fewer. Every program's last claim fails; the last failing one resets the counter
            cnt = Counter + pid_b * n_heads + pid_h
            c = tl.atomic_add(cnt, 1, sem="relaxed", scope="gpu")
            while c < n_pool:
                lo = pool_start + c * pool_chunk
                hi = lo + pool_chunk
                if hi > T:
                    hi = T
                m_i, l_i, acc, acc_a, acc_b, acc3 = _attn_range(
                    lo, hi, m_i, l_i, acc, acc_a, acc_b, acc3, qf, qa, qb, q3a, q3b, kbias3, gk, wk, rot_t, span_t,
                    kd, ks, kz, vd, vs, vz, skd_t, sks_t, svd_t, svs_t, qk_scale,
                    D, K_BITS, V_BITS, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SC, K_FULL, V_FULL, VTP, SW, VF, KF, False,
                )
                c = tl.atomic_add(cnt, 1, sem="relaxed", scope="gpu")
            if c == n_pool + num_splits - 1:
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        if SW:
            if VF:
                acc = tl.trans(tl.reshape(acc3, (D, M_PAD)))
            elif V_FULL or VTP:
                acc = tl.trans(acc)
            else:
                acc_a = tl.trans(acc_a)
                acc_b = tl.trans(acc_b)
        if V_FULL or VTP:
            # split the full-width accumulator into the two stored halves (channels [0, D/2) and [D/2, D))
            acc = acc / l_safe[:, None]
            acc_a, acc_b = tl.split(tl.permute(tl.reshape(acc, (M_PAD, 2, HALF_D)), (0, 2, 1)))
        else:
            acc_a = acc_a / l_safe[:, None]
            acc_b = acc_b / l_safe[:, None]
        if SPLIT:
            po = PartO + pid_b * stride_pb + head[:, None].to(tl.int64) * stride_ph + pid_s * stride_ps
            tl.store(po + oa_ch[None, :], acc_a, mask=row_ok[:, None])
            tl.store(po + ob_ch[None, :], acc_b, mask=row_ok[:, None])
            lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
            pl = PartL + (pid_b * stride_pb + head.to(tl.int64) * stride_ph + pid_s * stride_ps) // D
            tl.store(pl, lse, mask=row_ok)
            if FUSE_MERGE:
                # the last program of this (sequence, head group) to finish merges all splits: no second launch.
                # Barrier, then one gpu-scope acq_rel atomic (CUTLASS's semaphore pattern) publishes this CTA's
                # partials; the merge reads them with .cg (L2, never a stale L1 line).
                tl.debug_barrier()
                cnt_ptr = Counter + pid_b * n_heads + pid_h
                prev = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
                if prev == num_splits - 1:
                    _merge_rows(PartO, PartL, Out, pid_b, pid_h * HPP, HPP, num_splits, stride_pb, stride_ph,
                                stride_ps, stride_ob, stride_oh, D, MERGE_RB, MERGE_SB)
                    tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        else:
            o = Out + pid_b * stride_ob + head[:, None].to(tl.int64) * stride_oh
            tl.store(o + oa_ch[None, :], acc_a.to(tl.float16), mask=row_ok[:, None])
            tl.store(o + ob_ch[None, :], acc_b.to(tl.float16), mask=row_ok[:, None])

    @triton.jit
    def _attn_split_kernel(
        Q, KD, KS, KZ, VD, VS, VZ, Out, PartO, PartL, Counter, Stamps,
        T, tokens_per_split, qk_scale, num_splits, n_heads, n_items, pool_start, pool_chunk, n_pool,
        stride_qb, stride_qh,
        skd_b, skd_h, skd_t, sks_b, sks_h, sks_t,
        svd_b, svd_h, svd_t, svs_b, svs_h, svs_t,
        stride_ob, stride_oh,
        stride_pb, stride_ph, stride_ps,
        G: tl.constexpr, HPP: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
        K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_N: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
        V_FULL: tl.constexpr = True, SC: tl.constexpr = False, K_FULL: tl.constexpr = False,
        VTP: tl.constexpr = False, FUSE_MERGE: tl.constexpr = False, MERGE_RB: tl.constexpr = 1,
        MERGE_SB: tl.constexpr = 1, SW: tl.constexpr = False, VF: tl.constexpr = False, PDL: tl.constexpr = False,
        KF: tl.constexpr = False, STAMP: tl.constexpr = False, PERSIST: tl.constexpr = False,
        ROT: tl.constexpr = False, POOL: tl.constexpr = False,
    ):
        """Grid (num_splits, n_heads, B): one program per work item. PERSIST: a 1-D grid of fewer programs, each
        claiming work items (split fastest, then head, then sequence: the classic launch order) from the counter
        Counter[0] until all n_items are taken; the last program to finish resets Counter[0:2] for the next
        launch."""
        if STAMP:  # probe: this program's start and end (%globaltimer, ns) and its SM, 4 int64 per program
            t_start = globaltimer()
        if PDL:  # programmatic dependent launch: the merge grid may be scheduled once every program has started
            gdc_launch_dependents()
        if PERSIST:
            item = tl.atomic_add(Counter, 1, sem="relaxed", scope="gpu")
            while item < n_items:
                rest = item // num_splits
                _attn_program(
                    item % num_splits, rest % n_heads, (rest // n_heads).to(tl.int64), n_heads, pool_start, pool_chunk,
                    n_pool,
                    Q, KD, KS, KZ, VD, VS, VZ, Out, PartO, PartL, Counter,
                    T, tokens_per_split, qk_scale, num_splits,
                    stride_qb, stride_qh,
                    skd_b, skd_h, skd_t, sks_b, sks_h, sks_t,
                    svd_b, svd_h, svd_t, svs_b, svs_h, svs_t,
                    stride_ob, stride_oh,
                    stride_pb, stride_ph, stride_ps,
                    G, HPP, M_PAD, D, K_BITS, V_BITS, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SPLIT, V_FULL, SC, K_FULL,
                    VTP, FUSE_MERGE, MERGE_RB, MERGE_SB, SW, VF, KF, ROT, POOL,
                )
                item = tl.atomic_add(Counter, 1, sem="relaxed", scope="gpu")
            done = tl.atomic_add(Counter + 1, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(0) - 1:  # every other program has left its claim loop
                tl.atomic_xchg(Counter, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(Counter + 1, 0, sem="relaxed", scope="gpu")
        else:
            _attn_program(
                tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), n_heads, pool_start, pool_chunk,
                n_pool,
                Q, KD, KS, KZ, VD, VS, VZ, Out, PartO, PartL, Counter,
                T, tokens_per_split, qk_scale, num_splits,
                stride_qb, stride_qh,
                skd_b, skd_h, skd_t, sks_b, sks_h, sks_t,
                svd_b, svd_h, svd_t, svs_b, svs_h, svs_t,
                stride_ob, stride_oh,
                stride_pb, stride_ph, stride_ps,
                G, HPP, M_PAD, D, K_BITS, V_BITS, GROUP, ASYM, BLOCK_N, MAGIC, ASM, SPLIT, V_FULL, SC, K_FULL, VTP,
                FUSE_MERGE, MERGE_RB, MERGE_SB, SW, VF, KF, ROT, POOL,
            )
        if STAMP:
            t_end = globaltimer()
            flat = ((tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0)
                    + tl.program_id(0))
            tl.store(Stamps + 4 * flat, t_start)
            tl.store(Stamps + 4 * flat + 1, t_end)
            tl.store(Stamps + 4 * flat + 2, smid().to(tl.int64))

    @triton.jit
    def _merge_rows(PartO, PartL, Out, b, h0, n_rows: tl.constexpr, num_splits, stride_pb, stride_ph, stride_ps,
                    stride_ob, stride_oh, D: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr):
        """Out[b, h0 + r] = Σ_s w_s · PartO[b, h0 + r, s] (w_s ∝ 2^lse_s, fp32) for r < n_rows, RB rows × SB
        splits × D per step (one round of loads in flight)."""
        c = tl.arange(0, D)
        for r0 in tl.static_range(0, n_rows, RB):
            r = r0 + tl.arange(0, RB)
            r_ok = r < n_rows
            base = b * stride_pb + (h0 + r).to(tl.int64) * stride_ph  # [RB]
            m = tl.full([RB], float("-inf"), tl.float32)
            l = tl.zeros([RB], tl.float32)
            acc = tl.zeros([RB, D], tl.float32)
            for s0 in range(0, num_splits, SB):
                sp = s0 + tl.arange(0, SB)
                ok = r_ok[:, None] & (sp < num_splits)[None, :]  # [RB, SB]
                lse = tl.load(PartL + (base[:, None] + sp[None, :] * stride_ps) // D, mask=ok,
                              other=float("-inf"), cache_modifier=".cg")
                o = tl.load(PartO + base[:, None, None] + sp[None, :, None] * stride_ps + c[None, None, :],
                            mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m, tl.max(lse, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: no NaN from -inf - -inf
                alpha = tl.math.exp2(m - m_use)
                w = tl.math.exp2(lse - m_use[:, None])
                acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
                l = l * alpha + tl.sum(w, 1)
                m = m_new
            l = tl.where(l > 0, l, 1.0)
            tl.store(Out + b * stride_ob + (h0 + r)[:, None].to(tl.int64) * stride_oh + c[None, :],
                     (acc / l[:, None]).to(tl.float16), mask=r_ok[:, None])

    @triton.jit
    def _merge_kernel(PartO, PartL, Out, num_splits, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
                      Hq, D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        """Out[b, h] = Σ_s w_s · PartO[b, h, s] with w_s ∝ 2^lse_s (fp32). BLOCK_S splits are read per step
        (one round of loads in flight instead of one per split). PDL: launched as a programmatic dependent of the
        split kernel, so it waits here for that grid's completion (and its memory) before reading the partials."""
        if PDL:
            gdc_wait()
        pid = tl.program_id(0)
        b = (pid // Hq).to(tl.int64)
        h = (pid % Hq).to(tl.int64)
        base = b * stride_pb + h * stride_ph
        c = tl.arange(0, D)
        m = tl.full([1], float("-inf"), tl.float32)
        l = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            ok = sp < num_splits
            lse = tl.load(PartL + (base + sp * stride_ps) // D, mask=ok, other=float("-inf"))
            o = tl.load(PartO + base + sp[:, None] * stride_ps + c[None, :], mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))  # finite: every chunk holds at least one (non-empty) split
            alpha = tl.math.exp2(m - m_new)
            w = tl.math.exp2(lse - m_new)
            acc = acc * alpha + tl.sum(o * w[:, None], 0)
            l = l * alpha + tl.sum(w, 0)
            m = m_new
        tl.store(Out + b * stride_ob + h * stride_oh + c, (acc / l).to(tl.float16))


def pdl_available(device) -> bool:
    """Whether programmatic dependent launch runs on ``device``: a CUDA device of compute capability >= 9 (Hopper),
    Triton's grid dependency control (``HAVE_PDL``), not under the interpreter. One rule for every launcher that
    offers it (``merge="pdl"`` here, ``kernels.gemv.gemv(pdl=True)``); elsewhere they take their normal path."""
    if not HAVE_PDL or _interpreting():
        return False
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H200; DEFAULT_SMS off a GPU)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


#: Most fp32 partial-output elements (splits x head dim) the merge kernel loads in one round when it reads every
#: split at once (up to 64 splits at d <= 128, 32 at d = 256; 8 warps hold 32 of them per thread).
MERGE_MAX_ELEMS = 8192
#: Whether the merge reads every split in one round by default (kernel v10; v9 read 16 per round).
ONE_ROUND_MERGE_DEFAULT = True
#: Split rule of small launches with a quantized part (kernel v10): at least this many tiles per split and at most
#: MERGE_MAX_ELEMS / d splits (so the merge reads them in one round). Large launches and 16/16 keep v9's 4 / 128.
SMALL_MIN_TILES_PER_SPLIT = 2
#: Tiles per split of the long-split rule (kernel v9's; large launches and 16/16 keep it).
LONG_SPLIT_TILES = 4
#: Kernel v11: small launches take splits shorter than LONG_SPLIT_TILES only while they have at most this many
#: programs per SM (B · heads · splits ≤ SMs × this), by the small shape's warps per program: the 4-warp shape
#: (d = 128, 256) 1, the 1-warp 32-token shape (d = 64) 4. The v10 grid (H100, against v9's): 2-tile splits won
#: at up to 128 programs of the 4-warp shape (Qwen2.5-7B B=1 T=4K 1.12-1.28x, Gemma B=1 T=1K 1.27-1.49x) and lost
#: from 256 (Qwen2.5-7B B=16 T=1K 8/8 17.4 -> 23.0 us, Gemma B=8 T=1K 0.81-0.82x); at d = 64 they won up to 512
#: programs (Qwen2.5-0.5B B=16 T=1K 1.05-1.09x) and lost from 1,024 (B=32 T=1K 0.93-0.99x).
SHORT_SPLIT_PROGRAMS_PER_SM = {4: 1, 1: 4}


def merge_shape(num_splits: int, d: int, block_s: int | None = None) -> tuple[int, int]:
    """(splits per round of loads, warps) of the split merge. Each round is a dependent L2 round trip (H100 kernel
    timeline, B=1 T=4K Qwen2.5-0.5B: 32 splits in two rounds of 16 take 2.17 us, 16 in one 1.57). ``block_s``:
    the most splits per round (a power of two; 16 = kernel v9's merge: 4 per round at <= 4 splits, else 16);
    None = every split in one round where ``next_pow2(num_splits) * d <= MERGE_MAX_ELEMS``
    (:data:`ONE_ROUND_MERGE_DEFAULT`) or kernel v9's 16. 1 warp for <= 4 per round, else 4, 8 from 4 K partials."""
    if block_s is None:
        block_s = max(16, MERGE_MAX_ELEMS // d) if ONE_ROUND_MERGE_DEFAULT else 16
    elif block_s < 1 or block_s & (block_s - 1):
        raise ValueError(f"merge_block_s must be a power of two, got {block_s}")
    if block_s == 16:
        block_s = 4 if num_splits <= 4 else 16  # kernel v9's merge
    else:
        block_s = max(4, min(block_s, triton.next_power_of_2(num_splits)))
    warps = 1 if block_s <= 4 else max(4, min(8, block_s * d // 1024))
    return block_s, warps


def choose_num_splits(B: int, Hkv: int, T: int, block_n: int = 64, sms: int = DEFAULT_SMS,
                      programs_per_sm: int = 4, min_tiles_per_split: int = 4, max_splits: int = 128,
                      short_split_programs: int | None = None) -> int:
    """Split count that fills the SMs: minimizes (waves of programs) × (tiles per program + overhead).

    ``programs_per_sm`` is how many programs one SM runs at once; a program costs about one extra tile of
    overhead (q load, epilogue, partial write); splits below ``min_tiles_per_split`` tiles are not worth it, nor
    more than two waves of programs. ``short_split_programs`` (kernel v11): splits shorter than
    :data:`LONG_SPLIT_TILES` tiles only while the launch has at most this many programs (B · Hkv · splits; None =
    no such cap).
    """
    n = B * Hkv
    tiles = max(1, -(-T // block_n))
    slots = max(1, sms * programs_per_sm)
    # at most two waves of programs (v5: beyond that, more splits only add per-program overhead — 8/4 Llama B=16
    # T=128K: 24 splits 1116 us vs 12 splits 1006)
    waves2 = (2 * slots) // n
    s_max = min(max_splits, tiles // min_tiles_per_split, waves2)
    if short_split_programs is not None and min_tiles_per_split < LONG_SPLIT_TILES:
        s_long = min(max_splits, tiles // LONG_SPLIT_TILES, waves2)
        s_max = max(s_long, min(s_max, short_split_programs // n))
    s_max = max(1, s_max)
    best, best_cost = 1, None
    for s in range(1, s_max + 1):
        per = -(-tiles // s)
        s_eff = -(-tiles // per)  # no empty splits
        waves = -(-(n * s_eff) // slots)
        cost = waves * (per + 1.0) + (0.5 if s_eff > 1 else 0.0)  # the merge launch
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = s_eff, cost
    return best


def plan_num_splits(k_bits: int, v_bits: int, d: int, B: int, prog_heads: int, T: int, sms: int, *,
                    block_n: int | None = None, num_warps: int | None = None,
                    min_tiles_per_split: int | None = None, max_splits: int | None = None,
                    short_split_programs_per_sm: int | None = None, programs_per_sm: int | None = None,
                    cfg: dict | None = None) -> int:
    """Splits :func:`decode_attention` launches for a call when ``num_splits`` is None (the same keyword
    overrides; None = :func:`default_config`'s, which ``cfg`` passes in when the caller has it), after dropping
    empty splits. Benchmarks record this."""
    cfg = default_config(k_bits, v_bits, d, B, prog_heads, T) if cfg is None else cfg
    bn = cfg["block_n"] if block_n is None else int(block_n)
    nw = cfg["num_warps"] if num_warps is None else int(num_warps)
    pps = cfg["programs_per_sm"]
    if (bn, nw) != (cfg["block_n"], cfg["num_warps"]):
        pps = shape_programs_per_sm(k_bits, v_bits, d, bn, nw)
    if programs_per_sm is not None:
        pps = int(programs_per_sm)
    mt = cfg["min_tiles_per_split"] if min_tiles_per_split is None else int(min_tiles_per_split)
    ms = cfg["max_splits"] if max_splits is None else int(max_splits)
    sp = cfg["short_split_programs_per_sm"] if short_split_programs_per_sm is None else int(short_split_programs_per_sm)
    if mt < 1 or ms < 1 or pps < 1:
        raise ValueError(f"min_tiles_per_split, max_splits and programs_per_sm must be >= 1, got {mt}, {ms}, {pps}")
    s = choose_num_splits(B, prog_heads, T, bn, sms, pps, min_tiles_per_split=mt, max_splits=ms,
                          short_split_programs=sms * sp if sp and sp > 0 else None)
    tiles = -(-T // bn)
    per = -(-tiles // min(s, tiles))
    return -(-T // (per * bn))


#: Version of the fused decode-attention kernel and its defaults, as kernels/NOTES.md names them (v1: halves path,
#: synchronous scale loads; v2: v_full option; v3: constant-stride async scales, block shape by launch size,
#: chunked split merge; v4: LARGE_WORK 2^18, 4-bit V in the token_octet cache layout at d >= 128, and a fused
#: split merge as an option (the separate merge launch stays the default); v5: 8-bit scales loaded as one row per
#: token (asynchronous copies, no division in the index), 8-bit parts use the 1-/2-warp 32-token shapes at large
#: launches, the split rule's programs per SM of the 1-warp shape tuned on the H200 (SHAPE_PROGRAMS_PER_SM: 16 for
#: 4/4, 8 for 8-bit parts and for a 16-bit part at d = 128); v6: swapped mma operands for every format with a
#: quantized part (the tile's tokens on the mma M side, the query rows on N, padded to 8 instead of 16: half the mma
#: and softmax work, 128 instead of 182 registers for 4/4 d = 128), and 16 programs per SM for the 2-warp 4/4
#: d = 256 shape; v7: V fold — with the swapped dots, a symmetric 4-bit token_octet V and K at 4 or 16 bits, V's
#: group scales multiply the P tile per group (one batched dot over the groups) instead of the V tile; v8: 4-bit V
#: in the token_octet layout at d = 64 too, so the swapped dots and the V fold run there (with an 8-bit K too); small
#: launches with a quantized part at d = 64 use the 1-warp 32-token shape; small launches of the 4-warp shape merge
#: their splits in a programmatic dependent launch).
#: Recorded in measurement provenance (kvmodel.measure.provenance); bump it with any change that alters what is
#: measured. v9: the K fold — large launches with a symmetric 4-bit K multiply K's group scales into the score tile
#: (one batched dot over the channel groups on the raw codes) instead of dequantizing the K tile. v10: the split
#: merge reads every split in one round of loads (up to MERGE_MAX_ELEMS partial elements; v9 read 16 per round),
#: and small launches with a quantized part split into at least 2 tiles per split (v9: 4), at most
#: MERGE_MAX_ELEMS / d splits (H100 probe v10: Qwen2.5-0.5B B=1 T=4K 7.9 -> 6.6 us, Qwen2.5-7B 9.5 -> 7.9). v11:
#: those short splits only while the launch has at most SMs x SHORT_SPLIT_PROGRAMS_PER_SM programs (the v10 grid:
#: they lost at B = 4-16, T = 1K-4K, e.g. Qwen2.5-7B B=16 T=1K 8/8 17.4 -> 23.0 us). v12: large 4/4 launches at
#: d = 128 assume 8 programs per SM in the split rule (was 16), and at d = 256 run the 1-warp 32-token shape with
#: the K fold at 8 programs per SM (was 2 warps at 16; H100 probe v12sp, steady-state timing: Llama-3.1-8B 4/4
#: B=8 T=32K 128.6 -> 116.3 us, B=128 T=4K 232 -> 207, B=32 T=32K 442 -> 405; Gemma-3-12B B=16 T=32K 606 -> 481,
#: B=4 T=128K 595 -> 467).
KERNEL_VERSION = "v12"

LARGE_WORK = 1 << 18  # token-heads per launch (B · program heads · T) from which the throughput configs are used


#: Programs per SM the split rule assumes for the 1-warp 32-token shape, by format class and head dim (kernel v5;
#: the 4-warp shapes and (32, 2) at d = 256 assume 4). Tuned on the H200 (NOTES.md v5), not the resource count
#: (``python -m kvmodel.kernels.sass_probe --occupancy`` prints what registers / shared memory allow: 4/4 d=128
#: 10-11, 8-bit parts 7-16, a 16-bit part 8 at d=128): the loop is issue-bound and more programs than fit at
#: once win. 4/4: 16 (2,048 programs at Llama B=32 T=32K: 525 us vs 564 at v4's 12, 667 at the resource count
#: 10; Qwen2.5-7B B=32 T=32K 274 vs 346 us); 8-bit parts 8 (8/8 Llama B=32 T=32K 922 us vs 1056 at 4; 8/4 541 vs
#: 686); a 16-bit part 8 at d=128 (630 us vs 741 at v4's 9) and 9 at d=64 (v4, not probed). v6 (swapped dots):
#: the 2-warp shape of 4/4 at d=256 assumes 16 (Gemma B=32 T=32K: 8 splits 1282 us vs 2 splits 1371 at 4;
#: :data:`TWO_WARP_D256_PROGRAMS_PER_SM`). v12 (H100 probe v12sp, K fold, steady-state timing): 4/4 at d = 128
#: assumes 8 (Llama B=8 T=32K 116 us vs 129 at 16, B=32 T=32K 405 vs 442, Qwen2.5-7B B=64 T=32K 412 vs 439; 4, 6,
#: 12 and 24 were slower at most sizes), and the 1-warp shape of 4/4 at d = 256 (the v12 default there) 8 (Gemma
#: B=16 T=32K 481 us vs 556 at 4); d = 64 keeps 16 (Qwen2.5-0.5B B=64 T=32K 114 us vs 123 at 8).
SHAPE_PROGRAMS_PER_SM = {("4/4", 64): 16, ("4/4", 128): 8, ("4/4", 256): 8, ("16-bit part", 64): 9,
                         ("16-bit part", 128): 8, ("8-bit part", 64): 8, ("8-bit part", 128): 8}
TWO_WARP_D256_PROGRAMS_PER_SM = 16


def shape_programs_per_sm(k_bits: int, v_bits: int, d: int, block_n: int, num_warps: int) -> int:
    """Programs of one block shape the split rule assumes an SM runs at once (:data:`SHAPE_PROGRAMS_PER_SM` for the
    1-warp 32-token shape with a quantized part, :data:`TWO_WARP_D256_PROGRAMS_PER_SM` for the 2-warp one of 4/4
    at d = 256; 4 for every other shape)."""
    if block_n == 32 and num_warps == 2 and d == 256 and (k_bits, v_bits) == (4, 4):
        return TWO_WARP_D256_PROGRAMS_PER_SM
    if block_n == 32 and num_warps == 1 and (k_bits, v_bits) != (16, 16):
        fmt = "8-bit part" if 8 in (k_bits, v_bits) else "4/4" if (k_bits, v_bits) == (4, 4) else "16-bit part"
        return SHAPE_PROGRAMS_PER_SM.get((fmt, d), 4)
    return 4


def default_swap(k_bits: int, v_bits: int) -> bool:
    """Whether the split kernel uses the swapped dots by default (v6: every format with a quantized part)."""
    return SWAP_DEFAULT and (k_bits, v_bits) != (16, 16)


def v_fold_possible(swap: bool, vtp: int, asym: bool, v_bits: int, v_full: bool) -> bool:
    """Whether the V fold can run: swapped dots over a symmetric 4-bit V in the token_octet layout (``vtp == 2``)."""
    return bool(swap) and vtp == 2 and not asym and v_bits == 4 and not v_full


def k_fold_possible(swap: bool, asym: bool, k_bits: int, k_full: bool) -> bool:
    """Whether the K fold (group scales on the score tile) applies: swapped dots, symmetric 4-bit K."""
    return bool(swap) and not asym and k_bits == 4 and not k_full


def default_v_fold(swap: bool, vtp: int, asym: bool, k_bits: int, v_bits: int, v_full: bool, d: int = 128) -> bool:
    """The V fold's default (v7/v8): wherever it can run, except with an 8-bit K at d >= 128 (measured slower
    folded: Llama B=32 T=32K 8/4 502 vs 464 us; at d = 64 the fold wins with an 8-bit K too: Qwen2.5-0.5B B=64
    T=16K 8/4 68.8 vs 74.1 us, probe v8)."""
    if k_bits == 8 and d != 64:
        return False
    return V_FOLD_DEFAULT and v_fold_possible(swap, vtp, asym, v_bits, v_full)


def default_config(k_bits: int, v_bits: int, d: int, B: int, prog_heads: int, T: int) -> dict:
    """Block shape, split merge and dot orientation of the split kernel for a format, head dim and size (H200
    probes, NOTES.md v3–v8).

    ``programs_per_sm`` is how many programs of that shape the split rule (:func:`choose_num_splits`) assumes an
    SM runs at once (:func:`shape_programs_per_sm`). Small launches (< ``LARGE_WORK`` token-heads) are
    latency-bound and keep 4 warps per program, except with a quantized part at d = 64 (v8: the 1-warp 32-token
    shape, 0.68-0.76x the time at B = 1-16, T = 4K); large ones with a quantized part use 1–2 warps per program
    and 32-token tiles (no cross-warp softmax reductions, more independent programs per SM). ``merge``: small
    launches of the 4-warp shape merge their splits in a programmatic dependent launch (v8: 0.4-0.7 us less at
    B = 1-4 in every probe; large launches gained nothing or lost, e.g. Llama B=8 T=4K 24.4 vs 26.2 us). ``k_fold``
    (v9): large launches with a 4-bit K fold its group scales into the score tile (symmetric caches only, the
    launcher checks; H100 probe v9kf: Llama B=16 T=128K 4/4 993 -> 852 us, Qwen2.5-7B 507 -> 443, Gemma B=4 T=128K
    670 -> 598; small launches tie or lose with it: Qwen2.5-7B B=1 T=4K 9.3 -> 11.1 us on the 1-warp shape).
    ``min_tiles_per_split`` / ``max_splits`` (v10, passed to the split rule): small launches with a quantized part
    take splits of 2 tiles, at most MERGE_MAX_ELEMS / d of them (H100 probe v10, B = 1: Qwen2.5-0.5B T=4K 64 splits
    6.6 us vs v9's 16 at 7.9, T=16K 128 splits 8.7 vs 11.6; Qwen2.5-7B T=4K 32 splits 7.9 vs 9.5); everything else
    keeps 4 / 128 (16/16: Llama B=1 T=4K 32 splits 12.6 vs 11.6). ``short_split_programs_per_sm`` (v11): those
    short splits only while the launch has at most SMs × this many programs (:data:`SHORT_SPLIT_PROGRAMS_PER_SM`);
    None where the rule keeps 4-tile splits."""
    large = B * prog_heads * T >= LARGE_WORK
    sw = default_swap(k_bits, v_bits)
    rule = dict(min_tiles_per_split=LONG_SPLIT_TILES, max_splits=128, short_split_programs_per_sm=None)
    if not large and (k_bits, v_bits) != (16, 16):
        small_warps = 1 if d == 64 else 4
        rule = dict(min_tiles_per_split=SMALL_MIN_TILES_PER_SPLIT, max_splits=MERGE_MAX_ELEMS // d,
                    short_split_programs_per_sm=SHORT_SPLIT_PROGRAMS_PER_SM[small_warps])
    if k_bits == 16 and v_bits == 16:
        bn = 128 if d == 128 and large else 64
        return dict(block_n=bn, num_warps=4, num_stages=3, programs_per_sm=4, swap=sw,
                    merge="kernel" if large else "pdl", k_fold=False, **rule)
    if not large and d != 64:
        return dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, swap=sw, merge="pdl", k_fold=False,
                    **rule)
    # 1 warp per 32-token tile; 2 at d = 256 except 4/4 (v12: 1 warp there too, with the K fold)
    bn, w = (32, 2) if d > 128 and (k_bits, v_bits) != (4, 4) else (32, 1)
    ppsm = shape_programs_per_sm(k_bits, v_bits, d, bn, w)
    kf = K_FOLD_DEFAULT and sw and large and k_bits == 4
    return dict(block_n=bn, num_warps=w, num_stages=3, programs_per_sm=ppsm, swap=sw, merge="kernel", k_fold=kf,
                **rule)


def _check_inputs(q: torch.Tensor, cache: QuantizedKVCache) -> None:
    if not isinstance(q, torch.Tensor):
        raise ValueError("q must be a torch.Tensor")
    if not isinstance(cache, QuantizedKVCache):
        raise ValueError("cache must be a QuantizedKVCache")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, d], got shape {tuple(q.shape)}")
    if q.dtype != torch.float16:
        raise ValueError(f"q must be float16, got {q.dtype}")
    B, Hq, d = q.shape
    if B != cache.batch:
        raise ValueError(f"q batch {B} != cache batch {cache.batch}")
    if d != cache.head_dim:
        raise ValueError(f"q head_dim {d} != cache head_dim {cache.head_dim}")
    if d not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256, got {d}")
    Hkv = cache.kv_heads
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if Hq // Hkv > 16:
        raise ValueError(f"GQA ratio {Hq // Hkv} > 16 is not supported")
    if not 1 <= cache.length <= cache.max_tokens:
        raise ValueError(f"cache.length must be in [1, {cache.max_tokens}], got {cache.length}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.device}")
    if cache.k.bits not in (4, 8, 16) or cache.v.bits not in (4, 8, 16):
        raise ValueError("bits must be 4, 8 or 16")
    if cache.k.group != cache.v.group or cache.k.asym != cache.v.asym:
        raise ValueError("K and V must share group and asym")
    if cache.group not in (32, 64, 128) and (cache.k_bits != 16 or cache.v_bits != 16):
        raise ValueError(f"group must be 32, 64 or 128, got {cache.group}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("decode_attention needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    for name, qt in (("k", cache.k), ("v", cache.v)):
        if qt.data.stride(-1) != 1:
            raise ValueError(f"cache.{name}.data must be contiguous in its last dimension")
        if qt.scales is not None and qt.scales.stride(-1) != 1:
            raise ValueError(f"cache.{name}.scales must be contiguous in its last dimension")
        if qt.zeros is not None and qt.zeros.stride() != qt.scales.stride():
            raise ValueError(f"cache.{name}.zeros must have the strides of its scales")


def _scales_contiguous(qt) -> bool:
    """Scales (and zeros) of consecutive tokens are adjacent: ``stride(2) == head_dim / group`` (true for every
    cache this package allocates), so one tile's scales are one contiguous range the pipeliner can copy."""
    if qt.scales is None:
        return True
    ng = qt.head_dim // qt.group
    return qt.scales.stride(2) == ng and (qt.zeros is None or qt.zeros.stride(2) == ng)


def _meta(qt):
    dummy = qt.data
    s = qt.scales if qt.scales is not None else dummy
    z = qt.zeros if qt.zeros is not None else s
    st = tuple(qt.scales.stride()[:3]) if qt.scales is not None else (0, 0, 0)
    return s, z, st


def decode_attention(q: torch.Tensor, cache: QuantizedKVCache, *, num_splits: int | None = None,
                     gqa_shared: bool = True, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, magic: bool | None = None,
                     sm_scale: float | None = None, out: torch.Tensor | None = None,
                     workspace: dict | None = None, v_full: bool | None = None, k_full: bool | None = None,
                     async_scales: bool | None = None, merge: str | None = None,
                     maxnreg: int | None = None, swap: bool | None = None,
                     v_fold: bool | None = None, k_fold: bool | None = None,
                     merge_block_s: int | None = None, min_tiles_per_split: int | None = None,
                     max_splits: int | None = None,
                     short_split_programs_per_sm: int | None = None,
                     programs_per_sm: int | None = None,
                     persistent_programs_per_sm: int | None = None, rotate_tiles: bool = False,
                     tail_pool: float = 0.0, pool_chunk_tiles: int = 4,
                     stamps: torch.Tensor | None = None) -> torch.Tensor:
    """Fused decode attention of ``q [B, Hq, d]`` fp16 over ``cache`` → ``[B, Hq, d]`` fp16.

    ``num_splits``: None = heuristic (fills the SMs), 1 = no split (the study's design).
    ``gqa_shared=False``: one program per query head (each re-reads its KV head; the ablation).
    ``workspace``: optional dict reused across calls for the split partials and merge counters (avoids an
    allocation and a memset per call; one workspace per stream: its counters must not be shared by concurrent
    launches).
    ``merge``: None = :func:`default_config`'s choice ("pdl" for small launches of the 4-warp shape, else
    "kernel"); "kernel" — a second launch merges the splits; "fused" — the last program of each head group to
    finish merges them (one launch; measured 2–30 % slower on the H200, NOTES.md v4, kept as an option); "pdl" —
    the merge launch is a programmatic dependent launch of the split kernel (Hopper+: it is scheduled while the
    split kernel's last programs run and waits on-device for its completion; elsewhere "kernel").
    ``maxnreg``: register cap per thread passed to the compiler (probe option; spills below ~160 for 4/4).
    ``swap``: swapped mma operands (the tile's tokens on the M side, the query rows on N, padded to 8 instead
    of 16).
    ``v_fold``: with ``swap`` and a symmetric 4-bit token_octet V, V's group scales multiply the P tile per group
    (one batched dot over the channel groups) instead of dequantizing V.
    ``k_fold``: with ``swap`` and a symmetric 4-bit K, K's group scales multiply the score tile (one batched dot
    over the channel groups on the raw codes) instead of dequantizing K; None = :func:`default_config`'s choice.
    ``merge_block_s``: the most splits the merge kernel reads per round of loads (a power of two; None =
    :func:`merge_shape`'s default; 16 = kernel v9's merge).
    ``min_tiles_per_split`` / ``max_splits``: the split rule's bounds when ``num_splits`` is None (None =
    :func:`default_config`'s; 4 / 128 = kernel v9's rule). ``short_split_programs_per_sm``: splits shorter than
    LONG_SPLIT_TILES tiles only while the launch has at most SMs × this many programs (None = default_config's;
    0 = no cap, kernel v10's rule). ``programs_per_sm``: the programs per SM the split rule assumes (None = the
    block shape's, :func:`shape_programs_per_sm`).
    ``persistent_programs_per_sm``: probe option — a persistent split kernel of SMs × this many programs that
    claim the work items (one per split, head and sequence) from an atomic counter, instead of one program per
    item (None / 0 = one program per item; needs more than one split and a merge other than "fused").
    ``rotate_tiles``: probe option — each program walks its split's tiles starting from a program-dependent tile
    (wrapping around), so concurrent programs do not read addresses congruent modulo the split's byte size.
    ``tail_pool``: probe option — this fraction of each (sequence, head)'s tiles (at the end) is not assigned to a
    split but cut into chunks of ``pool_chunk_tiles`` tiles that the head's split programs claim from a counter
    when their own tiles are done (into the same softmax state: the split count and the merge are unchanged), so
    programs that run slower take fewer. Needs more than one split and a merge other than "fused".
    ``stamps``: probe option (CUDA only) — an int64 tensor of at least 4 × (split-kernel programs) elements that
    receives, per program (flat index ``(b · heads + h) · splits + s``), its start and end ``%globaltimer`` (ns)
    and its SM id (``measure.program_timeline``); None (default) compiles the kernel without them.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _interpreter_compat.apply()
    _check_inputs(q, cache)
    B, Hq, d = q.shape
    Hkv = cache.kv_heads
    G = Hq // Hkv
    T = cache.length
    hpp = G if gqa_shared else 1
    prog_heads = Hkv if gqa_shared else Hq
    cfg = default_config(cache.k.bits, cache.v.bits, d, B, prog_heads, T)
    if block_n is None:
        block_n = cfg["block_n"]
    if num_warps is None:
        num_warps = cfg["num_warps"]
    if num_stages is None:
        num_stages = cfg["num_stages"]
    if magic is None:
        magic = True
    asm = bool(magic) and q.device.type == "cuda" and not _interpreting()
    if swap is None:
        swap = cfg["swap"]
    m_pad = max(SWAP_MIN_ROWS if swap else 16, triton.next_power_of_2(hpp))
    if num_splits is None:
        num_splits = plan_num_splits(cache.k.bits, cache.v.bits, d, B, prog_heads, T, num_sms(q.device),
                                     block_n=block_n, num_warps=num_warps, min_tiles_per_split=min_tiles_per_split,
                                     max_splits=max_splits, short_split_programs_per_sm=short_split_programs_per_sm,
                                     programs_per_sm=programs_per_sm, cfg=cfg)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tiles = -(-T // block_n)
    per = -(-tiles // min(num_splits, tiles))
    tokens_per_split = per * block_n
    num_splits = -(-T // tokens_per_split)
    pool = bool(tail_pool) and num_splits > 1
    pool_start = pool_chunk = n_pool = 0
    if pool:
        if not 0.0 < tail_pool < 1.0 or pool_chunk_tiles < 1:
            raise ValueError(f"tail_pool must be in (0, 1) and pool_chunk_tiles >= 1, got {tail_pool}, "
                             f"{pool_chunk_tiles}")
        per = max(1, int(tiles * (1.0 - tail_pool)) // num_splits)  # static tiles per split
        tokens_per_split = per * block_n
        pool_start = num_splits * tokens_per_split
        pool_chunk = pool_chunk_tiles * block_n
        n_pool = max(0, -(-(T - pool_start) // pool_chunk))
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(B, Hq, d, dtype=torch.float16, device=q.device)
    elif out.shape != (B, Hq, d) or out.dtype != torch.float16 or out.stride(-1) != 1:
        raise ValueError("out must be a [B, Hq, d] fp16 tensor contiguous in d")
    if merge is None:
        merge = cfg["merge"]
    if merge not in ("fused", "kernel", "pdl"):
        raise ValueError(f"merge must be 'fused', 'kernel' or 'pdl', got {merge!r}")
    pdl = merge == "pdl" and pdl_available(q.device)
    split = num_splits > 1
    fuse = split and merge == "fused"
    counter = out  # unused unless fused
    if fuse:
        ckey = ("merge_counter", B, prog_heads, q.device)
        counter = None if workspace is None else workspace.get(ckey)
        if counter is None:
            counter = torch.zeros(B * prog_heads, dtype=torch.int32, device=q.device)  # reset by the kernel
            if workspace is not None:
                workspace[ckey] = counter
    if split:
        key = (B, Hq, num_splits, d, q.device)
        ws = None if workspace is None else workspace.get(key)
        if ws is None:
            part_o = torch.empty(B, Hq, num_splits, d, dtype=torch.float32, device=q.device)
            part_l = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
            ws = (part_o, part_l)
            if workspace is not None:
                workspace[key] = ws
        part_o, part_l = ws
        assert part_o.stride() == (Hq * num_splits * d, num_splits * d, d, 1)
    else:
        part_o = part_l = out  # unused
    k, v = cache.k, cache.v
    ks, kz, kst = _meta(k)
    vs, vz, vst = _meta(v)
    if v_full is None:
        v_full = V_FULL_DEFAULT
    if k_full is None:
        k_full = False
    contiguous = _scales_contiguous(k) and _scales_contiguous(v)
    if async_scales is None:
        async_scales = contiguous
    elif async_scales and not contiguous:
        raise ValueError("async_scales needs scales contiguous along tokens (stride(2) == head_dim / group)")
    vtp = 2 if v.layout == "token_octet" else int(v.token_pair)  # V layout (kernels.quant.default_v_layout)
    if k.layout != "channel":
        raise ValueError(f"the {k.layout} layout is supported for V only")
    if vtp and (block_n < 32 or block_n % 8):
        raise ValueError(f"a {v.layout} V cache needs block_n >= 32 (a multiple of 8)")
    if v_fold is None:
        v_fold = default_v_fold(swap, vtp, cache.asym, k.bits, v.bits, v_full, d)
    if v_fold and not v_fold_possible(swap, vtp, cache.asym, v.bits, v_full):
        raise ValueError("v_fold needs swap=True and a symmetric 4-bit V in the token_octet layout")
    if k_fold is None:
        k_fold = (cfg["k_fold"] and (block_n, num_warps) == (cfg["block_n"], cfg["num_warps"])
                  and k_fold_possible(swap, cache.asym, k.bits, k_full))
    if k_fold and not k_fold_possible(swap, cache.asym, k.bits, k_full):
        raise ValueError("k_fold needs swap=True and a symmetric 4-bit K (k_full off)")
    n_items = num_splits * prog_heads * B
    persist = bool(persistent_programs_per_sm) and split
    if pool:
        if fuse or persist:
            raise ValueError("the tail pool needs merge='kernel' or 'pdl' and no persistent kernel (its counters)")
        pkey = ("pool_counter", B, prog_heads, q.device)
        counter = None if workspace is None else workspace.get(pkey)
        if counter is None:
            counter = torch.zeros(B * prog_heads, dtype=torch.int32, device=q.device)  # reset by the kernel
            if workspace is not None:
                workspace[pkey] = counter
    if persist:
        if fuse:
            raise ValueError("a persistent split kernel needs merge='kernel' or 'pdl' (its counter is the claim queue)")
        n_programs = max(1, min(n_items, num_sms(q.device) * int(persistent_programs_per_sm)))
        pkey = ("persist_counter", q.device)
        counter = None if workspace is None else workspace.get(pkey)
        if counter is None:
            counter = torch.zeros(2, dtype=torch.int32, device=q.device)  # [next item, programs done]; kernel resets
            if workspace is not None:
                workspace[pkey] = counter
        grid = (n_programs,)
    else:
        n_programs = n_items
        grid = (num_splits, prog_heads, B)
    if stamps is not None:
        if q.device.type != "cuda" or _interpreting() or globaltimer is None:
            raise ValueError("stamps needs a CUDA GPU (not the interpreter) and triton's %globaltimer")
        if stamps.dtype != torch.int64 or not stamps.is_contiguous() or stamps.numel() < 4 * n_programs:
            raise ValueError(f"stamps must be a contiguous int64 tensor of >= {4 * n_programs} elements")
    merge_sb = min(16, triton.next_power_of_2(num_splits))
    merge_rb = max(1, min(triton.next_power_of_2(hpp), 8192 // (merge_sb * d)))  # ≤ 32 KB of fp32 per step
    _attn_split_kernel[grid](
        q, k.data, ks, kz, v.data, vs, vz, out, part_o, part_l, counter, out if stamps is None else stamps,
        T, tokens_per_split, sm_scale * LOG2E, num_splits, prog_heads, n_items, pool_start, pool_chunk, n_pool,
        q.stride(0), q.stride(1),
        *k.data.stride()[:3], *kst,
        *v.data.stride()[:3], *vst,
        out.stride(0), out.stride(1),
        Hq * num_splits * d, num_splits * d, d,
        G=G, HPP=hpp, M_PAD=m_pad, D=d, K_BITS=k.bits, V_BITS=v.bits, GROUP=cache.group, ASYM=cache.asym,
        BLOCK_N=block_n, MAGIC=magic, ASM=asm, SPLIT=split, V_FULL=bool(v_full), SC=bool(async_scales),
        K_FULL=bool(k_full), VTP=vtp, FUSE_MERGE=fuse, MERGE_RB=merge_rb, MERGE_SB=merge_sb, SW=bool(swap),
        VF=bool(v_fold), PDL=bool(pdl and split), KF=bool(k_fold), STAMP=stamps is not None,
        PERSIST=persist, ROT=bool(rotate_tiles), POOL=pool,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    if split and not fuse:
        bs, mw = merge_shape(num_splits, d, merge_block_s)
        _merge_kernel[(B * Hq,)](
            part_o, part_l, out, num_splits, Hq * num_splits * d, num_splits * d, d,
            out.stride(0), out.stride(1), Hq, D=d, BLOCK_S=bs, PDL=pdl,
            num_warps=mw, **({"launch_pdl": True} if pdl else {}),
        )
    return out
