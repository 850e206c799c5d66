"""Decode-attention pipelines behind one calling convention.

``run_pipeline(name, q, cache, **options) -> out``: ``q [B, Hq, d]`` fp16, ``cache`` a
:class:`~kvmodel.kernels.quant.QuantizedKVCache` (T = ``cache.length`` valid tokens), ``out [B, Hq, d]`` fp16.

* ``P0``: torch SDPA with ``enable_gqa=True`` on the FP16 cache (needs 16/16; reads K/V once per KV head).
* ``P0-expand``: ``repeat_interleave`` K/V to every query head, then SDPA (the study's baseline; needs 16/16).
* ``P1``: dequantize K/V into FP16 buffers (one Triton kernel each: codes read once, fp16 written once), then SDPA with ``enable_gqa`` (non-fused; any format).
* ``P5``: the fused split-K Triton kernel (any format; at 16/16 it is our FP16 split-K kernel). Options are
  passed to :func:`~kvmodel.kernels.decode_attention.decode_attention` (``num_splits``, ``gqa_shared``, ...).

The cache's valid length T may be below its allocated ``max_tokens``: the torch pipelines use a view of the first
T tokens (no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decode_attention import decode_attention
from .quant import QuantizedKVCache, dequantize_fp16

PIPELINES = ("P0", "P0-expand", "P1", "P5")


def _check(q: torch.Tensor, cache: QuantizedKVCache) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a [B, Hq, d] tensor")
    if q.dtype != torch.float16:
        raise ValueError(f"q must be float16, got {q.dtype}")
    if not isinstance(cache, QuantizedKVCache):
        raise ValueError("cache must be a QuantizedKVCache")
    B, Hq, d = q.shape
    if B != cache.batch or d != cache.head_dim or Hq % cache.kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache (B={cache.batch}, Hkv={cache.kv_heads}, "
                         f"d={cache.head_dim})")
    if not 1 <= cache.length <= cache.max_tokens:
        raise ValueError(f"cache.length must be in [1, {cache.max_tokens}]")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.device}")


def _fp16_views(cache: QuantizedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
    if cache.k_bits != 16 or cache.v_bits != 16:
        raise ValueError("P0 and P0-expand read an FP16 cache (k_bits = v_bits = 16)")
    T = cache.length
    return cache.k.data[:, :, :T], cache.v.data[:, :, :T]


def p0(q: torch.Tensor, cache: QuantizedKVCache) -> torch.Tensor:
    k, v = _fp16_views(cache)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def p0_expand(q: torch.Tensor, cache: QuantizedKVCache) -> torch.Tensor:
    k, v = _fp16_views(cache)
    G = q.shape[1] // cache.kv_heads
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v).squeeze(2)


def p1(q: torch.Tensor, cache: QuantizedKVCache) -> torch.Tensor:
    T = cache.length
    k = dequantize_fp16(cache.k, T)
    v = dequantize_fp16(cache.v, T)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def p5(q: torch.Tensor, cache: QuantizedKVCache, **options) -> torch.Tensor:
    return decode_attention(q, cache, **options)


def run_pipeline(name: str, q: torch.Tensor, cache: QuantizedKVCache, **options) -> torch.Tensor:
    """Run pipeline ``name`` (one of :data:`PIPELINES`) on ``q`` over ``cache``; returns ``[B, Hq, d]`` fp16."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {list(PIPELINES)}")
    _check(q, cache)
    if name == "P5":
        return p5(q, cache, **options)
    if options:
        raise ValueError(f"pipeline {name} takes no options, got {sorted(options)}")
    return {"P0": p0, "P0-expand": p0_expand, "P1": p1}[name](q, cache)
