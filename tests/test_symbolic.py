"""The symbolic model: identities sympy can prove, closed forms, and invariants as hypothesis properties."""

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmodel import symbolic as S
from kvmodel import traffic
from kvmodel.specs import KVFormat

BITS = st.sampled_from([2, 3, 4, 5, 6, 8, 16])
GROUP = st.sampled_from([32, 64, 128])
HEAD_DIM = st.sampled_from([64, 128, 256])


def _vals(**kw):
    base = dict(B=1, T=1024, L=32, L_s=0, W=1, H_q=32, H_kv=8, d=128, d_v=128, d_q=128, b_k=16, b_v=16, g=32,
                m_k=0, m_v=0, b_w=2, b_a=2, h=4096, V=128256, P_always=6_979_588_096, P_lm=525_336_576,
                P_total=8_030_261_248, P_exp=0, E=1, k=1, L_moe=0, M_cap=141 * 2**30, M_ws=2 * 2**30, phi=0.05, s_kv=1)
    base.update(kw)
    return base


def _fmt_vals(k_bits, v_bits, group, asym=False):
    return traffic.kv_symbols(KVFormat(k_bits=k_bits, v_bits=v_bits, group_size=group, asymmetric=asym))


def test_reread_closed_form_equals_explicit_sum():
    assert S.reread_closed_form_matches_sum()
    # and the check can fail: a wrong closed form is not proven equal
    wrong = S.Gen * S.C0 + S.Gen**2 / 2
    assert sp.simplify(S.reread_sum_explicit.doit() - wrong) != 0


def test_reread_sum_numeric_matches_loop():
    c0, gen = 1000, 37
    assert traffic.evaluate("reread_sum", {"C_0": c0, "G_en": gen}) == sum(c0 + i for i in range(gen))


def test_kv_bytes_per_token_llama_fp16_and_int4():
    # Llama-3.1-8B: 32 layers x 8 KV heads x 128 x (K+V) x 2 bytes = 131072 B/token at FP16.
    v = _vals()
    assert traffic.evaluate("kv_bytes_per_token", v) == 131072
    # INT4 g32: 8 heads x (64 B K + 64 B V + 4 groups x 2 B x 2) = 1152 B per layer.
    v.update(_fmt_vals(4, 4, 32))
    assert traffic.evaluate("kv_bytes_per_token_layer", v) == 1152
    assert traffic.evaluate("compression_ratio", v) == pytest.approx(256 / 72)


def test_study_per_layer_kv_bytes_match_their_table():
    # model_configs.json of the study lists FP16 K+V bytes per token per layer: 2 x Hkv x d x 2.
    for hkv, d, expected in [(2, 64, 512), (4, 128, 2048), (8, 128, 4096), (4, 256, 4096), (10, 128, 5120)]:
        v = _vals(H_kv=hkv, d=d, d_v=d)
        assert traffic.evaluate("kv_bytes_per_token_layer", v) == expected


def test_asymmetric_metadata_doubles_scale_bytes():
    sym = traffic.evaluate("kv_metadata_bytes_per_token", _vals(**_fmt_vals(4, 4, 32)))
    asym = traffic.evaluate("kv_metadata_bytes_per_token", _vals(**_fmt_vals(4, 4, 32, asym=True)))
    assert asym == 2 * sym > 0


def test_lambdified_equals_sympy_substitution():
    v = _vals(B=3, T=777, **_fmt_vals(8, 4, 64))
    for name in ("kv_read_bytes", "weight_bytes_streamed", "attn_bytes_P1", "step_flops", "max_context"):
        expr = S.formula(name).expr
        subs = {s: v[s.name] for s in expr.free_symbols}
        assert float(traffic.evaluate(name, v)) == pytest.approx(float(expr.subs(subs)), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 512), T=st.integers(1, 1 << 20), kb=BITS, vb=BITS, g=GROUP, d=HEAD_DIM,
       hkv=st.integers(1, 16))
def test_kv_bytes_monotone_in_batch_and_context_and_linear_in_heads(B, T, kb, vb, g, d, hkv):
    v = _vals(B=B, T=T, H_kv=hkv, d=d, d_v=d, **_fmt_vals(kb, vb, g))
    base = traffic.evaluate("kv_read_bytes", v)
    assert traffic.evaluate("kv_read_bytes", {**v, "B": B + 1}) > base
    assert traffic.evaluate("kv_read_bytes", {**v, "T": T + 1}) > base
    assert traffic.evaluate("step_bytes", {**v, "T": T + 1}) > traffic.evaluate("step_bytes", v)
    assert traffic.evaluate("kv_read_bytes", {**v, "H_kv": 2 * hkv}) == pytest.approx(2 * base)


@settings(max_examples=60, deadline=None)
@given(kb=BITS, vb=BITS, g=GROUP, d=HEAD_DIM, dk=st.sampled_from([1, 2, 4, 8]))
def test_fewer_bits_never_more_bytes(kb, vb, g, d, dk):
    v = _vals(d=d, d_v=d, **_fmt_vals(kb, vb, g))
    fewer = max(kb - dk, 2)
    if fewer == kb:
        return
    fewer = min([b for b in (2, 3, 4, 5, 6, 8) if b <= fewer], default=2)
    v2 = _vals(d=d, d_v=d, **_fmt_vals(fewer, vb, g))
    assert traffic.evaluate("kv_bytes_per_token", v2) <= traffic.evaluate("kv_bytes_per_token", v)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 256), T=st.integers(1, 1 << 18), kb=st.sampled_from([2, 4, 8]), vb=st.sampled_from([2, 4, 8]),
       g=GROUP, d=HEAD_DIM, G=st.integers(1, 8))
def test_non_fused_quantized_moves_more_than_fp16_and_fused_less(B, T, kb, vb, g, d, G):
    v = _vals(B=B, T=T, H_q=8 * G, H_kv=8, d=d, d_v=d, d_q=d, **_fmt_vals(kb, vb, g))
    v16 = _vals(B=B, T=T, H_q=8 * G, H_kv=8, d=d, d_v=d, d_q=d)
    p0 = traffic.evaluate("attn_bytes_P0", v16)
    assert traffic.evaluate("attn_bytes_P1", v) > p0
    assert traffic.evaluate("attn_bytes_P5", v) < p0
    assert traffic.evaluate("attn_bytes_P0_expand", v16) >= p0


@settings(max_examples=60, deadline=None)
@given(f=st.floats(0, 1), r=st.floats(1, 16))
def test_ideal_speedup_between_one_and_compression_ratio(f, r):
    s = float(traffic.evaluate("ideal_speedup", {"f": f, "r": r}))
    assert 1 - 1e-12 <= s <= r + 1e-9


def test_amdahl_example_of_the_study_is_2_76_not_3_6():
    # 1 / (1 - 3f/4) at f = 0.85 (r = 4): the study wrote 3.6x.
    assert float(traffic.evaluate("ideal_speedup", {"f": 0.85, "r": 4})) == pytest.approx(2.7586, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4096), E=st.integers(2, 256), k=st.integers(1, 8))
def test_experts_touched_between_k_and_E(B, E, k):
    k = min(k, E)
    t = float(traffic.evaluate("experts_touched", {"B": B, "E": E, "k": k}))
    assert k - 1e-9 <= t <= E + 1e-9
    if B == 1:
        assert t == pytest.approx(k)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 64), kb=BITS, vb=BITS)
def test_max_context_is_the_largest_that_fits(B, kb, vb):
    v = _vals(B=B, **_fmt_vals(kb, vb, 32))
    tmax = float(traffic.evaluate("max_context", v))
    assert tmax > 0
    fits = lambda t: traffic.evaluate("footprint", {**v, "T": t}) <= traffic.evaluate("usable_memory", v)  # noqa
    assert fits(tmax)
    assert not fits(tmax + 1)


def test_max_context_with_sliding_window_layers():
    # 28 of 34 layers windowed at 1024 (Gemma-3 style): global layers carry the growth past the window.
    v = _vals(L=34, L_s=28, W=1024, H_kv=4, d=256, d_v=256)
    tmax = float(traffic.evaluate("max_context", v))
    fits = lambda t: traffic.evaluate("footprint", {**v, "T": t}) <= traffic.evaluate("usable_memory", v)  # noqa
    assert fits(tmax) and not fits(tmax + 1)
    dense = float(traffic.evaluate("max_context", {**v, "L_s": 0}))
    assert tmax > 5 * dense


def test_crossover_context_equalizes_kv_and_weights():
    v = _vals(B=4)
    tstar = float(traffic.evaluate("crossover_context", v))
    kv = traffic.evaluate("kv_read_bytes", {**v, "T": tstar})
    assert kv == pytest.approx(traffic.evaluate("weight_bytes_streamed", v), rel=1e-12)


def test_weights_streamed_exclude_embedding_table_but_paper_convention_includes_it():
    v = _vals(B=1)
    streamed = traffic.evaluate("weight_bytes_streamed", v)
    paper = traffic.evaluate("weight_bytes_paper", v)
    assert paper - streamed == pytest.approx(2 * (128256 * 4096 - 4096), rel=1e-12)


def test_allreduce_vanishes_for_one_gpu_apart_from_latency():
    v = {"L": 32, "lambda_ar": 0.0, "N": 1, "B": 8, "h": 4096, "b_a": 2, "BW_link": 450e9}
    assert float(traffic.evaluate("allreduce_time", v)) == 0.0
    assert float(traffic.evaluate("allreduce_time", {**v, "N": 2})) > 0


def test_every_formula_lambdifies_and_has_doc():
    for name, f in S.FORMULAS.items():
        assert f.doc and f.unit, name
        vals = {s: 0.5 for s in traffic.formula_inputs(name)}  # alpha = 1 is a pole
        vals.update({k: v for k, v in _vals().items() if k in vals})
        out = traffic.evaluate(name, vals)
        assert np.all(np.isfinite(np.asarray(out, dtype=float))) or name == "max_context", name


@pytest.mark.parametrize("kb,vb", [(4, 4), (16, 4), (4, 16), (8, 4), (16, 16)])
def test_verify_P1_matches_P1_at_one_query_and_buffers_only_quantized_halves(kb, vb):
    """attn_bytes_verify_P1 uses the same per-half FP16 buffer as attn_bytes_P1 (none for a 16-bit half)."""
    v = _vals(B=4, T=4096, **_fmt_vals(kb, vb, 32))
    p1 = traffic.evaluate("attn_bytes_P1", v)
    assert traffic.evaluate("attn_bytes_verify_P1", {**v, "n_q": 1, "eta": 0}) == pytest.approx(p1)
    assert traffic.evaluate("attn_bytes_verify_P1", {**v, "n_q": 5, "eta": 0.5}) > p1
    # eta = 1, n_q = 3: quantized read + buffer write once, then every half read 3 times at FP16
    B, T, Hkv, d = 4, 4096, 8, 128
    quant = B * T * traffic.evaluate("kv_bytes_per_token_layer", v)
    buf = B * T * Hkv * d * 2 * ((kb < 16) + (vb < 16))
    plain = B * T * Hkv * d * 2 * ((kb == 16) + (vb == 16))
    qo = 2 * B * 32 * 128 * 2
    got = traffic.evaluate("attn_bytes_verify_P1", {**v, "n_q": 3, "eta": 1})
    assert got == pytest.approx(quant + buf + 3 * buf + 2 * plain + 3 * qo)


def test_weights_given_experts_and_ring_factor():
    v = _vals(B=16, P_exp=1_000_000, E=64, k=4, L_moe=10)
    expect = traffic.evaluate("experts_touched", v)
    assert traffic.evaluate("weight_bytes_streamed_given_experts", {**v, "n_exp": expect}) == pytest.approx(
        traffic.evaluate("weight_bytes_streamed", v))
    assert traffic.evaluate("weight_bytes_streamed_given_experts", {**v, "n_exp": 0}) == pytest.approx(
        traffic.evaluate("weight_bytes_streamed", {**v, "L_moe": 0}))
    assert traffic.evaluate("allreduce_ring_factor", {"N": 8}) == pytest.approx(1.75)
    t = traffic.evaluate("allreduce_time", {"L": 1, "lambda_ar": 0, "N": 4, "B": 1, "h": 1000, "b_a": 2,
                                            "BW_link": 1e9})
    assert t == pytest.approx(2 * 1.5 * 2000 / 1e9)
