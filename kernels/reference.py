"""Plain-torch references, with the signatures of the kernels and pipelines they check.

Everything here computes in float32 (dequantization included) and runs on any device.
"""

from __future__ import annotations

import math

import torch

from .quant import QuantizedKVCache, append_kv_reference, dequantize, dequantize_kv, quantize  # noqa: F401


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T · scale) v`` in float32 for ``q [B, Hq, d]``, ``k, v [B, Hkv, T, d]`` (GQA: query head h
    uses KV head h // (Hq/Hkv)). Returns float32 ``[B, Hq, d]``."""
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    qf = q.float().reshape(B, Hkv, G, d)
    kf = k.float()
    vf = v.float()
    s = torch.einsum("bhgd,bhtd->bhgt", qf, kf) * sm_scale
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgt,bhtd->bhgd", p, vf)
    return o.reshape(B, Hq, d)


def decode_attention_reference(q: torch.Tensor, cache: QuantizedKVCache, *, sm_scale: float | None = None,
                               **_ignored) -> torch.Tensor:
    """Reference for :func:`kvmodel.kernels.decode_attention.decode_attention`: dequantize in float32, then
    attention in float32. Returns float32 ``[B, Hq, d]`` (kernel options such as ``num_splits`` are ignored)."""
    k, v = dequantize_kv(cache, torch.float32)
    return attention_reference(q, k, v, sm_scale)


def run_pipeline_reference(name: str, q: torch.Tensor, cache: QuantizedKVCache, **kwargs) -> torch.Tensor:
    """Reference for :func:`kvmodel.kernels.pipelines.run_pipeline`: every pipeline computes the same function
    (attention over the dequantized cache), so each has the same float32 reference."""
    from .pipelines import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    return decode_attention_reference(q, cache, **kwargs)
