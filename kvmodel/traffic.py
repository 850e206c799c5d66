"""Numeric per-step traffic: the expressions of :mod:`kvmodel.symbolic` lambdified to numpy.

Nothing here re-types a formula. :func:`model_symbols` maps a ModelSpec / KVFormat to the symbol values;
:func:`evaluate` evaluates any registered formula, vectorized over numpy arrays (broadcasting), so sweeps over
batch x context x formats x models x GPUs are single array expressions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from kvmodel import symbolic as S
from kvmodel.architecture import param_breakdown
from kvmodel.specs import KVFormat, ModelSpec


@lru_cache(maxsize=None)
def _compiled(name: str):
    form = S.formula(name)
    syms = form.symbols
    fn = sp.lambdify(syms, form.expr, modules="numpy")
    return fn, tuple(s.name for s in syms)


def evaluate(name: str, values: dict):
    """Evaluate formula ``name`` with ``values`` (symbol name -> scalar or numpy array; broadcasting applies).

    Raises KeyError naming any symbol the formula needs and ``values`` lacks.
    """
    fn, names = _compiled(name)
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"formula {name!r} needs values for: {', '.join(missing)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return fn(*(values[n] for n in names))


def formula_inputs(name: str) -> tuple[str, ...]:
    return _compiled(name)[1]


def kv_symbols(kv: KVFormat) -> dict:
    """Symbol values of a KV format: bits, group, metadata bytes per group (0 for 16-bit / FP8)."""
    return {
        "b_k": kv.k_bits,
        "b_v": kv.v_bits,
        "g": kv.group_size,
        "m_k": kv.metadata_bytes(kv.k_bits),
        "m_v": kv.metadata_bytes(kv.v_bits),
    }


def model_symbols(m: ModelSpec) -> dict:
    """Symbol values of a model architecture (parameter classes from :func:`param_breakdown`)."""
    pb = param_breakdown(m)
    sw = m.sliding_window
    if m.mla:
        dq = m.mla.v_head_dim
    else:
        dq = m.head_dim
    return {
        "L": m.num_layers,
        "L_s": sw.num_sliding_layers if sw else 0,
        "W": sw.window_tokens if sw else 1,
        "H_q": m.num_heads,
        "H_kv": m.kv_heads_cached,
        "d": m.k_dim_cached,
        "d_v": m.v_dim_cached,
        "d_q": dq,
        "h": m.hidden_size,
        "V": m.vocab_size,
        "P_always": pb.decoder_streamed_always,
        "P_lm": pb.lm_head if pb.lm_head else pb.embedding,
        "P_total": pb.total - pb.extra,
        "P_exp": pb.expert_each,
        "E": max(pb.num_experts, 1),
        "k": m.moe.top_k if m.moe else 1,
        "L_moe": pb.num_moe_layers,
        "b_a": 2,
        "s_kv": m.kv_cache_layers / m.num_layers,
    }


def expand_reread_bytes(B, T, Hq, Hkv, d):
    """P0-expand's repeat reads of one attention-layer call (symbolic ``attn_bytes_P0_expand_reread``): each
    (sequence, KV head) slab is read once per query head of its group, the KV read counted once in
    ``attn_bytes_P0_expand``. Vectorized over array arguments."""
    return evaluate("attn_bytes_P0_expand_reread", {"B": B, "T": T, "H_q": Hq, "H_kv": Hkv, "d": d, "d_v": d,
                                                    "b_a": 2})


def attention_layer_bytes(pipeline: str, B, T, Hq, Hkv, d, k_bits=16, v_bits=16, group=32, asymmetric=False):
    """Bytes one attention-layer call must move for one decode step (q read + KV + output write + buffers).

    ``pipeline``: "P0" (FP16, GQA-aware), "P0-expand" (study baseline), "P1" (dequantize to FP16 then SDPA),
    "P1-expand" (the study's P1), "P5" (fused). FP16 pipelines (P0, P0-expand) ignore the bit arguments.
    Vectorized over array arguments.
    """
    try:
        name = S.PIPELINE_FORMULAS[pipeline]
    except KeyError:
        raise ValueError(f"unknown pipeline {pipeline!r}; one of {', '.join(S.PIPELINE_FORMULAS)}") from None
    kv = KVFormat(k_bits=16, v_bits=16) if pipeline.startswith("P0") else None
    vals = {"B": B, "T": T, "H_q": Hq, "H_kv": Hkv, "d": d, "d_v": d, "d_q": d, "b_a": 2}
    if kv is not None:
        vals.update(kv_symbols(kv))
    else:
        meta = 4 if asymmetric else 2
        k_bits = np.asarray(k_bits)
        v_bits = np.asarray(v_bits)
        vals.update({"b_k": k_bits, "b_v": v_bits, "g": group,
                     "m_k": np.where(k_bits >= 16, 0, meta), "m_v": np.where(v_bits >= 16, 0, meta)})
    return evaluate(name, vals)
