"""Quantized KV-cache format: quantize / dequantize (torch references) and the Triton append kernel.

Format (one tensor, K or V, each with its own bit width):

* 16 bits: ``data`` is fp16 ``[B, Hkv, T_max, d]``; no metadata.
* 8 bits: ``data`` is uint8 ``[B, Hkv, T_max, d]``.
* 4 bits: ``data`` is uint8 ``[B, Hkv, T_max, d/2]``, two values per byte along head_dim, the even channel in
  the low nibble.
* 4 bits, ``layout="token_pair"`` (opt-in, V only; measured 8-15 % slower than the channel layout, kept as an option): ``data`` is uint8
  ``[B, Hkv, ceil(T_max/2), d]``, one byte per channel of two consecutive tokens: token 2i in the low nibble,
  token 2i+1 in the high nibble, so the P·V contraction over tokens reads packed bytes along its own axis.
  Scales are unchanged (per token and channel group).
* 4 bits, ``layout="token_octet"`` (V only; what 4-bit V caches get by default (every head dim since kernel v8),
  :func:`default_v_layout`): ``data`` is uint8 ``[B, Hkv, ceil(T_max/8), 4*d]``, one
  32-bit word per channel of eight consecutive tokens: for octet row r (tokens 8r..8r+7) and channel c, byte
  ``[r, 4c + m]`` (m = 0..3) holds token 8r+m in its low nibble and token 8r+m+4 in its high nibble, so that one
  word's low nibbles are the fp16x2 pairs (t0, t1), (t2, t3) and its high nibbles (t4, t5), (t6, t7) of the P·V
  mma B fragment (kernels/decode_attention.py ``_load_v_octets``). Scales are unchanged; the row capacity is
  ``8 * ceil(T_max/8)`` tokens (slots past T_max in the last row are padding).
* For 4 and 8 bits, ``scales`` (and, when asymmetric, ``zeros``) are fp16 ``[B, Hkv, T_max, d/group]``: one per
  group of ``group`` consecutive channels per token per KV head.

Symmetric (the default, the study's format): ``scale = absmax / (2^(b-1) - 1)``,
``q = clamp(round(x / scale), -(2^(b-1)-1), 2^(b-1)-1)`` stored offset-binary as ``q + 2^(b-1)``
(INT4 stored +8 in a nibble, INT8 stored +128); ``x ≈ (stored - 2^(b-1)) * scale``.
Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = min``, ``q = clamp(round((x - zero) / scale), 0, 2^b-1)``;
``x ≈ q * scale + zero``.

Rounding is round-half-up (``floor(y + 0.5)``), the quotient an IEEE float32 division by the stored (fp16)
scale, so the torch reference and the Triton append kernel give the same codes.

Layout ``[B, Hkv, T_max, packed_d]`` contiguous: one decode program (batch, KV head) streams one contiguous
range of ``T * packed_d`` bytes, and its scales from another contiguous range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

try:  # Triton is optional: the torch references work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

SUPPORTED_BITS = (4, 8, 16)
SUPPORTED_GROUPS = (32, 64, 128)
# 4-bit packing: two channels of a token per byte (default), two tokens of a channel per byte, or eight tokens of
# a channel per 32-bit word
LAYOUTS = ("channel", "token_pair", "token_octet")
TOKENS_PER_ROW = {"channel": 1, "token_pair": 2, "token_octet": 8}  # tokens per row of the 4-bit data


def _check_layout(layout: str, bits: int) -> str:
    """The effective layout: ``token_pair`` / ``token_octet`` apply to 4-bit data only (8/16-bit data is stored as
    always)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout if bits == 4 else "channel"


def _check_bits_group(bits: int, group: int, d: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if bits != 16:
        if group not in SUPPORTED_GROUPS:
            raise ValueError(f"group must be one of {SUPPORTED_GROUPS}, got {group}")
        if d % group != 0:
            raise ValueError(f"head_dim {d} is not a multiple of group {group}")


def packed_dim(d: int, bits: int, layout: str = "channel") -> int:
    """Last-dimension size of the stored data for head_dim ``d``."""
    if bits == 4 and layout == "token_octet":
        return 4 * d
    if bits == 4 and layout == "token_pair":
        return d
    return d // 2 if bits == 4 else d


def data_rows(tokens: int, layout: str = "channel", bits: int = 4) -> int:
    """Rows of stored data (dim -2) that hold ``tokens`` token slots: ``ceil(tokens / 2)`` for token_pair,
    ``ceil(tokens / 8)`` for token_octet, ``tokens`` otherwise."""
    n = TOKENS_PER_ROW[layout] if bits == 4 else 1
    return -(-tokens // n)


def default_v_layout(bits: int, head_dim: int) -> str:
    """The V layout the fused kernel measured fastest for (H200 probes): ``token_octet`` for 4-bit V at every head
    dim (kernel v4 at d = 128 / 256: 10-20 % faster than ``channel``; kernel v8 at d = 64: with the swapped dots and
    the V fold, 0.66-0.79x the channel layout's time, ``kernels/NOTES.md``), ``channel`` for 8/16-bit data (one
    layout). What ``v_layout="auto"`` (the default of :func:`empty_cache` and :func:`quantize_kv`) means."""
    return "token_octet" if bits == 4 else "channel"


@dataclass
class QuantizedTensor:
    """One quantized tensor ``[..., T_max, d]`` (K or V of a cache)."""

    data: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int
    group: int
    asym: bool
    head_dim: int
    layout: str = "channel"  # "token_pair" / "token_octet": 4-bit, packed along tokens (see the module docstring)

    @property
    def token_pair(self) -> bool:
        return self.layout == "token_pair"

    @property
    def token_octet(self) -> bool:
        return self.layout == "token_octet"

    @property
    def tokens_per_row(self) -> int:
        """Tokens per row of ``data`` (dim -2): 1 (channel, 8/16-bit), 2 (token_pair) or 8 (token_octet)."""
        return TOKENS_PER_ROW[self.layout] if self.bits == 4 else 1

    @property
    def tokens(self) -> int:
        """Token slots (T_max) along dim -2 (for data packed along tokens: of the scales, the data has
        ceil(T_max/2) (token_pair) or ceil(T_max/8) (token_octet) rows)."""
        if self.tokens_per_row > 1:
            return self.scales.shape[-2]
        return self.data.shape[-2]

    def rows(self, tokens: int) -> int:
        """Rows of ``data`` holding the first ``tokens`` token slots."""
        return -(-tokens // self.tokens_per_row)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-2]) + (self.tokens, self.head_dim)

    def bytes_per_token(self) -> int:
        """Stored bytes per token and head (data + metadata)."""
        d = self.head_dim
        if self.bits == 16:
            return 2 * d
        meta = (d // self.group) * 2 * (2 if self.asym else 1)
        return d * self.bits // 8 + meta


@dataclass
class QuantizedKVCache:
    """A preallocated KV cache of ``max_tokens`` slots, of which the first ``length`` are valid."""

    k: QuantizedTensor
    v: QuantizedTensor
    length: int
    extra: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.k.data.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.data.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.k.tokens

    @property
    def head_dim(self) -> int:
        return self.k.head_dim

    @property
    def k_bits(self) -> int:
        return self.k.bits

    @property
    def v_bits(self) -> int:
        return self.v.bits

    @property
    def group(self) -> int:
        return self.k.group

    @property
    def asym(self) -> bool:
        return self.k.asym

    @property
    def device(self) -> torch.device:
        return self.k.data.device

    def bytes_per_token_head(self) -> int:
        return self.k.bytes_per_token() + self.v.bytes_per_token()


# ----------------------------------------------------------------------------------------------- torch reference
def _round_half_up(y: torch.Tensor) -> torch.Tensor:
    return torch.floor(y + 0.5)


def quantize(x: torch.Tensor, bits: int, group: int = 32, asym: bool = False,
             layout: str = "channel") -> QuantizedTensor:
    """Quantize ``x [..., d]`` (any float dtype) into the cache format. Torch reference.

    ``layout="token_pair"`` (4 bits; needs ``x [..., T, d]``): tokens 2i and 2i+1 of a channel share a byte (low,
    high nibble); an odd T leaves the last high nibble 0. ``layout="token_octet"`` (4 bits; ``x [..., T, d]``):
    tokens 8r..8r+7 of channel c share the word ``[r, 4c:4c+4]`` (byte m: token 8r+m low, 8r+m+4 high nibble);
    T not a multiple of 8 leaves the last row's nibbles of the missing tokens 0."""
    layout = _check_layout(layout, bits)
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    d = x.shape[-1]
    _check_bits_group(bits, group, d)
    if bits == 4 and d % 2:
        raise ValueError("head_dim must be even for 4-bit packing")
    if bits == 16:
        return QuantizedTensor(x.to(torch.float16).contiguous(), None, None, 16, group, asym, d)
    xf = x.to(torch.float16).float()  # the cache quantizes fp16 activations
    xg = xf.reshape(*x.shape[:-1], d // group, group)
    if asym:
        qmax = 2**bits - 1
        mn = xg.amin(-1)
        mx = xg.amax(-1)
        scale16 = ((mx - mn) / qmax).to(torch.float16)
        zero16 = mn.to(torch.float16)
        s = scale16.float().unsqueeze(-1)
        y = torch.where(s > 0, (xg - zero16.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0), 0.0)
        q = _round_half_up(y).clamp(0, qmax)
        zeros = zero16
    else:
        qmax = 2 ** (bits - 1) - 1
        absmax = xg.abs().amax(-1)
        scale16 = (absmax / qmax).to(torch.float16)
        s = scale16.float().unsqueeze(-1)
        y = torch.where(s > 0, xg / torch.where(s > 0, s, 1.0), 0.0)
        q = _round_half_up(y).clamp(-qmax, qmax) + 2 ** (bits - 1)
        zeros = None
    q = q.reshape(*x.shape[:-1], d).to(torch.uint8)
    if bits == 4 and layout != "channel":
        if q.dim() < 2:
            raise ValueError(f"{layout} layout needs x [..., T, d]")
        q = _pack_octets(q) if layout == "token_octet" else _pack_pairs(q)
    elif bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedTensor(q.contiguous(), scale16.contiguous(), zeros, bits, group, asym, d, layout)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., T, d]`` (uint8) → token_pair bytes ``[..., ceil(T/2), d]``."""
    if q.shape[-2] % 2:
        q = torch.nn.functional.pad(q, (0, 0, 0, 1))
    return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def _pack_octets(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., T, d]`` (uint8) → token_octet bytes ``[..., ceil(T/8), 4·d]``: byte ``[r, 4c + m]`` =
    token 8r+m (low nibble) | token 8r+m+4 (high nibble) of channel c; missing tokens of the last row are 0."""
    T, d = q.shape[-2:]
    pad = (-T) % 8
    if pad:
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
    q = q.reshape(*q.shape[:-2], -1, 2, 4, d)  # [..., r, e, m, c]: token 8r + 4e + m
    w = q[..., 0, :, :] | (q[..., 1, :, :] << 4)  # [..., r, m, c]
    return w.transpose(-1, -2).reshape(*w.shape[:-2], 4 * d)  # [..., r, 4c + m]


def _repack(qt: QuantizedTensor, layout: str) -> QuantizedTensor:
    if qt.bits != 4 or qt.layout == layout:
        return qt
    q = unpack_codes(qt).to(torch.uint8)  # [..., T, d]
    if layout == "token_octet":
        data = _pack_octets(q)
    elif layout == "token_pair":
        data = _pack_pairs(q)
    else:
        data = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedTensor(data.contiguous(), qt.scales, qt.zeros, qt.bits, qt.group, qt.asym, qt.head_dim, layout)


def to_token_pair(qt: QuantizedTensor) -> QuantizedTensor:
    """The same 4-bit tensor re-packed in the ``token_pair`` layout (codes and scales unchanged)."""
    return _repack(qt, "token_pair")


def to_token_octet(qt: QuantizedTensor) -> QuantizedTensor:
    """The same 4-bit tensor re-packed in the ``token_octet`` layout (codes and scales unchanged; data
    ``[..., ceil(T_max/8), 4·d]``). 8/16-bit tensors are returned as they are."""
    return _repack(qt, "token_octet")


def to_layout(qt: QuantizedTensor, layout: str) -> QuantizedTensor:
    """The same tensor re-packed in ``layout`` (one of :data:`LAYOUTS`; 8/16-bit tensors are returned as they
    are)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _repack(qt, layout)


def unpack_codes(qt: QuantizedTensor) -> torch.Tensor:
    """The stored integer codes as int32 ``[..., d]`` (4 and 8 bits)."""
    if qt.bits == 16:
        raise ValueError("16-bit data has no codes")
    q = qt.data.to(torch.int32)
    if qt.bits == 4 and qt.token_octet:
        w = q.reshape(*q.shape[:-1], qt.head_dim, 4).transpose(-1, -2)  # [..., r, m, c]
        q = torch.stack([w & 0xF, w >> 4], dim=-3)  # [..., r, e, m, c]: token 8r + 4e + m
        q = q.reshape(*q.shape[:-4], 8 * q.shape[-4], qt.head_dim)
        return q[..., : qt.tokens, :]
    if qt.bits == 4 and qt.token_pair:
        q = torch.stack([q & 0xF, q >> 4], dim=-2).reshape(*q.shape[:-2], 2 * q.shape[-2], qt.head_dim)
        return q[..., : qt.tokens, :]
    if qt.bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*q.shape[:-1], qt.head_dim)
    return q


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16, length: int | None = None) -> torch.Tensor:
    """Dequantize ``qt`` (optionally only its first ``length`` tokens along dim -2). Torch reference."""
    if qt.bits == 16:
        out = qt.data if length is None else qt.data[..., :length, :]
        return out.to(dtype)
    data = qt.data if length is None else qt.data[..., : qt.rows(length), :]
    scales = qt.scales if length is None else qt.scales[..., :length, :]
    sub = QuantizedTensor(data, scales, None, qt.bits, qt.group, qt.asym, qt.head_dim, qt.layout)
    q = unpack_codes(sub).float()
    d = qt.head_dim
    qg = q.reshape(*q.shape[:-1], d // qt.group, qt.group)
    s = scales.float().unsqueeze(-1)
    if qt.asym:
        zeros = qt.zeros if length is None else qt.zeros[..., :length, :]
        x = qg * s + zeros.float().unsqueeze(-1)
    else:
        x = (qg - 2 ** (qt.bits - 1)) * s
    return x.reshape(*q.shape[:-1], d).to(dtype)


def empty_quantized(shape_prefix: tuple[int, ...], d: int, bits: int, group: int, asym: bool,
                    device: torch.device | str = "cpu", layout: str = "channel") -> QuantizedTensor:
    """Allocate (uninitialized) storage for ``[*shape_prefix, d]`` in the cache format (``shape_prefix`` ends
    with the token count)."""
    _check_bits_group(bits, group, d)
    layout = _check_layout(layout, bits)
    if bits == 16:
        return QuantizedTensor(torch.empty(*shape_prefix, d, dtype=torch.float16, device=device), None, None,
                               16, group, asym, d)
    rows = data_rows(shape_prefix[-1], layout, bits)  # token_octet: ceil(T_max/8) rows, 8·rows >= T_max slots
    data = torch.empty(*shape_prefix[:-1], rows, packed_dim(d, bits, layout), dtype=torch.uint8, device=device)
    scales = torch.empty(*shape_prefix, d // group, dtype=torch.float16, device=device)
    zeros = torch.empty_like(scales) if asym else None
    return QuantizedTensor(data, scales, zeros, bits, group, asym, d, layout)


def empty_cache(B: int, Hkv: int, max_tokens: int, d: int, k_bits: int, v_bits: int, group: int = 32,
                asym: bool = False, device: torch.device | str = "cpu", v_layout: str = "auto") -> QuantizedKVCache:
    """A preallocated, empty (length 0) cache of ``max_tokens`` slots (``v_layout="token_pair"`` /
    ``"token_octet"``: 4-bit V packed two tokens per byte / eight tokens per 32-bit word; ``"auto"``: :func:`default_v_layout`, the one the kernel measured fastest)."""
    if v_layout == "auto":
        v_layout = default_v_layout(v_bits, d)
    k = empty_quantized((B, Hkv, max_tokens), d, k_bits, group, asym, device)
    v = empty_quantized((B, Hkv, max_tokens), d, v_bits, group, asym, device, v_layout)
    return QuantizedKVCache(k, v, 0)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, k_bits: int, v_bits: int, group: int = 32, asym: bool = False,
                max_tokens: int | None = None, v_layout: str = "auto") -> QuantizedKVCache:
    """Build a cache holding ``k, v [B, Hkv, T, d]`` (T valid tokens, optionally ``max_tokens`` slots; V in
    ``v_layout``, ``"auto"`` = :func:`default_v_layout`)."""
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, Hkv, T, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    if v_layout == "auto":
        v_layout = default_v_layout(v_bits, k.shape[-1])
    T = k.shape[2]
    if max_tokens is not None and max_tokens > T:
        pad = (0, 0, 0, max_tokens - T)
        k = torch.nn.functional.pad(k, pad)
        v = torch.nn.functional.pad(v, pad)
    return QuantizedKVCache(quantize(k, k_bits, group, asym), quantize(v, v_bits, group, asym, v_layout), T)


def dequantize_kv(cache: QuantizedKVCache, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid part of the cache as ``(k, v)`` ``[B, Hkv, T, d]`` in ``dtype``. Torch reference."""
    return (dequantize(cache.k, dtype, cache.length), dequantize(cache.v, dtype, cache.length))


def _positions(pos, B: int, device) -> torch.Tensor:
    if isinstance(pos, int):
        return torch.full((B,), pos, dtype=torch.int32, device=device)
    if not isinstance(pos, torch.Tensor) or pos.shape != (B,):
        raise ValueError(f"pos must be an int or a [B]={B} tensor")
    return pos.to(device=device, dtype=torch.int32)


def _check_append(cache: QuantizedKVCache, k_new: torch.Tensor, v_new: torch.Tensor, pos) -> torch.Tensor:
    B, Hkv, d = cache.batch, cache.kv_heads, cache.head_dim
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
        if x.shape != (B, Hkv, d):
            raise ValueError(f"{name} must be [B, Hkv, d] = {(B, Hkv, d)}, got {tuple(x.shape)}")
        if x.dtype != torch.float16:
            raise ValueError(f"{name} must be float16, got {x.dtype}")
        if x.device != cache.device:
            raise ValueError(f"{name} is on {x.device}, the cache on {cache.device}")
    p = _positions(pos, B, cache.device)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= cache.max_tokens):
        raise ValueError(f"positions must lie in [0, {cache.max_tokens})")
    return p


def append_kv_reference(cache: QuantizedKVCache, k_new: torch.Tensor, v_new: torch.Tensor, pos) -> None:
    """Quantize ``k_new, v_new [B, Hkv, d]`` into slot ``pos`` (int or [B] tensor) in place. Torch reference."""
    p = _check_append(cache, k_new, v_new, pos)
    for qt, x in ((cache.k, k_new), (cache.v, v_new)):
        new = quantize(x, qt.bits, qt.group, qt.asym)
        packed = qt.bits == 4 and qt.layout != "channel"
        codes = unpack_codes(new).to(torch.uint8) if packed else None  # [B, Hkv, d]
        for b in range(cache.batch):
            t = int(p[b])
            if qt.bits == 4 and qt.token_octet:  # nibble RMW of byte t % 4 of each channel's word in row t // 8
                old = qt.data[b, :, t // 8, t % 4::4]  # [Hkv, d]
                hi = t % 8 >= 4
                qt.data[b, :, t // 8, t % 4::4] = (old & 0x0F) | (codes[b] << 4) if hi else (old & 0xF0) | codes[b]
                continue
            if packed:  # token_pair nibble read-modify-write: even token low nibble, odd token high nibble
                old = qt.data[b, :, t // 2]
                qt.data[b, :, t // 2] = (old & 0xF0) | codes[b] if t % 2 == 0 else (old & 0x0F) | (codes[b] << 4)
                continue
            qt.data[b, :, t] = new.data[b]
        for b in range(cache.batch):
            t = int(p[b])
            if qt.scales is not None:
                qt.scales[b, :, t] = new.scales[b]
            if qt.zeros is not None:
                qt.zeros[b, :, t] = new.zeros[b]


# ----------------------------------------------------------------------------------------------- Triton append
if triton is not None:

    @triton.jit
    def _quant_group_codes(x, s, z, BITS: tl.constexpr, ASYM: tl.constexpr):
        """Codes (float, already offset) of x [NG, W] with per-row scale s [NG] (and zero z)."""
        sb = s[:, None]
        safe = tl.where(sb > 0, sb, 1.0)
        if ASYM:
            y = tl.math.div_rn(x - z[:, None], safe)
            q = tl.floor(y + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1.0)
        else:
            y = tl.math.div_rn(x, safe)
            q = tl.floor(y + 0.5)
            qmax = 2.0 ** (BITS - 1) - 1.0
            q = tl.minimum(tl.maximum(q, -qmax), qmax) + 2.0 ** (BITS - 1)
        return tl.where(sb > 0, q, 0.0 if ASYM else 2.0 ** (BITS - 1))

    @triton.jit
    def _append_one(x_ptr, d_ptr, s_ptr, z_ptr, d_off, s_off, t,
                    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                    TP: tl.constexpr = False, TO: tl.constexpr = False):
        """Quantize one token. TP (4-bit token_pair layout): d_off is the start of the pair row t // 2, and the
        codes go into its low (t even) or high (t odd) nibbles by a read-modify-write of the row's d bytes.
        TO (4-bit token_octet layout): d_off is the start of the octet row t // 8; channel c's code goes into
        byte 4c + t % 4, low nibble for t % 8 < 4, high nibble otherwise (read-modify-write of d bytes)."""
        if BITS == 16:
            offs = tl.arange(0, D)
            tl.store(d_ptr + d_off + offs, tl.load(x_ptr + offs))
        else:
            NG: tl.constexpr = D // GROUP
            HALF: tl.constexpr = GROUP // 2
            g = tl.arange(0, NG)[:, None]
            j = tl.arange(0, HALF)[None, :]
            # even and odd channels of each group, [NG, GROUP/2] each
            xe = tl.load(x_ptr + g * GROUP + 2 * j).to(tl.float32)
            xo = tl.load(x_ptr + g * GROUP + 2 * j + 1).to(tl.float32)
            if ASYM:
                mn = tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1))
                mx = tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1))
                s16 = tl.math.div_rn(mx - mn, 2.0**BITS - 1.0).to(tl.float16)
                z16 = mn.to(tl.float16)
                z = z16.to(tl.float32)
                tl.store(z_ptr + s_off + tl.arange(0, NG), z16)
            else:
                amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
                s16 = tl.math.div_rn(amax, 2.0 ** (BITS - 1) - 1.0).to(tl.float16)
                z = amax  # unused
            tl.store(s_ptr + s_off + tl.arange(0, NG), s16)
            s = s16.to(tl.float32)
            qe = _quant_group_codes(xe, s, z, BITS, ASYM).to(tl.uint8)
            qo = _quant_group_codes(xo, s, z, BITS, ASYM).to(tl.uint8)
            if TO:
                pe = d_ptr + d_off + 4 * (g * GROUP + 2 * j) + t % 4  # channel 2j (even) of each group
                hi = (t % 8) >= 4
                sh = hi.to(tl.uint8) * 4
                keep = tl.where(hi, 0x0F, 0xF0).to(tl.uint8)  # the other token's nibble
                tl.store(pe, (tl.load(pe) & keep) | (qe << sh))
                tl.store(pe + 4, (tl.load(pe + 4) & keep) | (qo << sh))
            elif TP:
                pe = d_ptr + d_off + g * GROUP + 2 * j
                sh = (t % 2).to(tl.uint8) * 4
                keep = tl.where(t % 2 == 0, 0xF0, 0x0F).to(tl.uint8)  # the other token's nibble
                tl.store(pe, (tl.load(pe) & keep) | (qe << sh))
                tl.store(pe + 1, (tl.load(pe + 1) & keep) | (qo << sh))
            elif BITS == 4:
                tl.store(d_ptr + d_off + g * HALF + j, qe | (qo << 4))
            else:
                tl.store(d_ptr + d_off + g * GROUP + 2 * j, qe)
                tl.store(d_ptr + d_off + g * GROUP + 2 * j + 1, qo)

    @triton.jit
    def _append_kernel(K_new, V_new, Pos,
                       KD, KS, KZ, VD, VS, VZ,
                       stride_nb, stride_nh,
                       skd_b, skd_h, skd_t, sks_b, sks_h, sks_t,
                       svd_b, svd_h, svd_t, svs_b, svs_h, svs_t,
                       D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                       GROUP: tl.constexpr, ASYM: tl.constexpr, K_TP: tl.constexpr = False,
                       V_TP: tl.constexpr = False, K_TO: tl.constexpr = False, V_TO: tl.constexpr = False):
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.load(Pos + b).to(tl.int64)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        src = b64 * stride_nb + h64 * stride_nh
        tk = t // 8 if K_TO else (t // 2 if K_TP else t)
        tv = t // 8 if V_TO else (t // 2 if V_TP else t)
        _append_one(K_new + src, KD, KS, KZ, b64 * skd_b + h64 * skd_h + tk * skd_t,
                    b64 * sks_b + h64 * sks_h + t * sks_t, t, D, K_BITS, GROUP, ASYM, K_TP, K_TO)
        _append_one(V_new + src, VD, VS, VZ, b64 * svd_b + h64 * svd_h + tv * svd_t,
                    b64 * svs_b + h64 * svs_h + t * svs_t, t, D, V_BITS, GROUP, ASYM, V_TP, V_TO)


def _meta_strides(qt: QuantizedTensor) -> tuple[int, int, int]:
    if qt.scales is None:
        return (0, 0, 0)
    return tuple(qt.scales.stride()[:3])


def append_kv(cache: QuantizedKVCache, k_new: torch.Tensor, v_new: torch.Tensor, pos) -> None:
    """Quantize ``k_new, v_new [B, Hkv, d]`` fp16 into slot ``pos`` (int or [B] tensor) in place (Triton).

    Does not change ``cache.length``: the caller advances it (``cache.length = max(pos) + 1``).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    p = _check_append(cache, k_new, v_new, pos)
    for qt in (cache.k, cache.v):
        if not qt.data.is_contiguous() or (qt.scales is not None and not qt.scales.is_contiguous()):
            raise ValueError("cache tensors must be contiguous")
    k_new = k_new.contiguous()
    v_new = v_new.contiguous()
    if v_new.stride() != k_new.stride():
        raise ValueError("k_new and v_new must have the same strides")
    launch_append(cache, k_new, v_new, p)


def launch_append(cache: QuantizedKVCache, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor) -> None:
    """The append kernel's launch alone: no checks and no host sync (``pos`` a [B] int32 device tensor), so a
    CUDA graph can capture it (the e2e step does); :func:`append_kv` is the checked entry point."""
    k, v = cache.k, cache.v
    dummy = k.data  # any pointer for absent metadata
    _append_kernel[(cache.batch, cache.kv_heads)](
        k_new, v_new, pos,
        k.data, k.scales if k.scales is not None else dummy, k.zeros if k.zeros is not None else dummy,
        v.data, v.scales if v.scales is not None else dummy, v.zeros if v.zeros is not None else dummy,
        k_new.stride(0), k_new.stride(1),
        *k.data.stride()[:3], *_meta_strides(k),
        *v.data.stride()[:3], *_meta_strides(v),
        D=cache.head_dim, K_BITS=k.bits, V_BITS=v.bits, GROUP=cache.group, ASYM=cache.asym,
        K_TP=k.bits == 4 and k.token_pair, V_TP=v.bits == 4 and v.token_pair,
        K_TO=k.bits == 4 and k.token_octet, V_TO=v.bits == 4 and v.token_octet, num_warps=1,
    )


# ----------------------------------------------------------------------------------------------- Triton dequantize
if triton is not None:

    @triton.jit
    def _dequant_kernel(D_ptr, S_ptr, Z_ptr, Out, T, s_dh, s_dt, s_sh, s_st, s_oh, s_ot,
                        D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                        BLOCK_T: tl.constexpr, TP: tl.constexpr = False, TO: tl.constexpr = False):
        bh = tl.program_id(0).to(tl.int64)  # flattened (batch, head)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = (t < T)[:, None, None]
        t3 = t.to(tl.int64)[:, None, None]
        NG: tl.constexpr = D // GROUP
        gh = tl.arange(0, NG)[None, :, None]
        s = tl.load(S_ptr + bh * s_sh + t3 * s_st + gh, mask=tm, other=0.0).to(tl.float32)
        if ASYM:
            z = tl.load(Z_ptr + bh * s_sh + t3 * s_st + gh, mask=tm, other=0.0).to(tl.float32)
        if TO:  # token_octet: byte (t // 8, 4·channel + t % 4) holds token t, low nibble for t % 8 < 4, else high
            w = tl.arange(0, GROUP)[None, None, :]
            # mask by octet row, not by token: constant over 8 tokens, so the 4 bytes of a word load as one even
            # when T is not a multiple of 4 (a per-token mask made this 2.7x slower at T = 16K + 1 on the H200);
            # the last row is allocated whole, and tokens >= T are not stored
            rm = ((t3 // 8) < (T + 7) // 8)
            b = tl.load(D_ptr + bh * s_dh + (t3 // 8) * s_dt + 4 * (gh * GROUP + w) + t3 % 4, mask=rm, other=0)
            c = ((b >> (((t3 % 8) // 4) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            if ASYM:
                x = c * s + z
            else:
                x = (c - 8.0) * s
        elif TP:  # token_pair: byte (t // 2, channel) holds token t in its low (t even) or high (t odd) nibble
            w = tl.arange(0, GROUP)[None, None, :]
            b = tl.load(D_ptr + bh * s_dh + (t3 // 2) * s_dt + gh * GROUP + w, mask=tm, other=0)
            c = ((b >> ((t3 % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            if ASYM:
                x = c * s + z
            else:
                x = (c - 8.0) * s
        elif BITS == 4:
            W: tl.constexpr = GROUP // 2
            w = tl.arange(0, W)[None, None, :]
            b = tl.load(D_ptr + bh * s_dh + t3 * s_dt + gh * W + w, mask=tm, other=0)
            lo = (b & 0xF).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            if ASYM:
                lo = lo * s + z
                hi = hi * s + z
            else:
                lo = (lo - 8.0) * s
                hi = (hi - 8.0) * s
            x = tl.reshape(tl.join(lo, hi), (BLOCK_T, NG, GROUP))
        else:
            w = tl.arange(0, GROUP)[None, None, :]
            b = tl.load(D_ptr + bh * s_dh + t3 * s_dt + gh * GROUP + w, mask=tm, other=0).to(tl.float32)
            if ASYM:
                x = b * s + z
            else:
                x = (b - 128.0) * s
        wo = tl.arange(0, GROUP)[None, None, :]
        tl.store(Out + bh * s_oh + t3 * s_ot + gh * GROUP + wo, x.to(tl.float16), mask=tm)


def dequantize_fp16(qt: QuantizedTensor, length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the first ``length`` tokens of a ``[B, H, T_max, *]`` cache tensor into a new (or given)
    contiguous fp16 buffer ``[B, H, length, d]`` with one Triton kernel (reads the codes once, writes fp16 once).
    16-bit data is returned as a view (no copy). Off a GPU it falls back to :func:`dequantize`."""
    T = qt.tokens if length is None else length
    if qt.bits == 16:
        return qt.data[:, :, :T]
    if triton is None or (qt.data.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"):
        return dequantize(qt, torch.float16, T)
    B, H = qt.data.shape[:2]
    d = qt.head_dim
    if out is None:
        out = torch.empty(B, H, T, d, dtype=torch.float16, device=qt.data.device)
    if not (qt.data.is_contiguous() and qt.scales.is_contiguous() and out.is_contiguous()):
        raise ValueError("dequantize_fp16 needs contiguous tensors")
    block_t = 64 if d <= 128 else 32
    _dequant_kernel[(B * H, triton.cdiv(T, block_t))](
        qt.data, qt.scales, qt.zeros if qt.zeros is not None else qt.scales, out, T,
        qt.data.stride(1), qt.data.stride(2), qt.scales.stride(1), qt.scales.stride(2), out.stride(1), out.stride(2),
        D=d, BITS=qt.bits, GROUP=qt.group, ASYM=qt.asym, BLOCK_T=block_t, TP=qt.bits == 4 and qt.token_pair,
        TO=qt.bits == 4 and qt.token_octet, num_warps=4,
    )
    return out
