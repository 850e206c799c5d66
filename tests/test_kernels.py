"""Correctness of the quantized-KV kernels against float32 torch references.

On a machine without a CUDA GPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on a
stratified subset of the shape × format cross product; the full cross product is marked ``gpu``.

Pass rule for attention: max |kernel − ref| ≤ 2 × max |P1 − ref| + floor, where ref is float32 attention over
the dequantized cache and P1 is torch dequantize + SDPA on the same quantized cache; no NaN (outputs are
NaN-poisoned before each run and every element must be written).
"""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kvmodel.kernels import (  # noqa: E402
    PIPELINES,
    append_kv,
    append_kv_reference,
    choose_num_splits,
    decode_attention,
    decode_attention_reference,
    dequantize,
    dequantize_kv,
    empty_cache,
    quantize,
    quantize_kv,
    run_pipeline,
    run_pipeline_reference,
)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
BIT_PAIRS = [(kb, vb) for kb in (4, 8, 16) for vb in (4, 8, 16)]
T_VALUES = (1, 7, 63, 64, 65, 1000, 4097)
G_VALUES = (1, 2, 4, 7, 8)
D_VALUES = (64, 128, 256)
B_VALUES = (1, 3)
ABS_FLOOR = 2e-3


def _make_cache(B, Hkv, T, d, kb, vb, group, asym, seed, slack=5, v_layout="channel"):
    """Random K/V (fresh per seed; scaled, with an outlier channel) quantized into a cache with ``slack``
    poisoned slots past T (NaN for fp16 data, random bytes otherwise): the kernel must never read them. With
    ``v_layout="token_pair"`` (4-bit V) the pair rows past T and, for odd T, the high nibbles of the last valid
    row are poisoned."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, T, d, generator=g) * (0.5 + torch.rand(1, generator=g).item())
    v = torch.randn(B, Hkv, T, d, generator=g)
    k[..., seed % d] *= 4.0  # an outlier channel, as real keys have
    cache = quantize_kv(k.half(), v.half(), kb, vb, group, asym, max_tokens=T + slack, v_layout=v_layout)
    for qt in (cache.k, cache.v):
        tail = qt.data[:, :, T:]
        if qt.token_pair:
            tail = qt.data[:, :, (T + 1) // 2:]
            if T % 2:
                last = qt.data[:, :, T // 2]
                last.copy_((last & 0x0F) | (torch.randint(0, 16, last.shape, generator=g, dtype=torch.uint8) << 4))
        if qt.bits == 16:
            tail.fill_(float("nan"))
        else:
            tail.copy_(torch.randint(0, 256, tail.shape, generator=g, dtype=torch.uint8))
            qt.scales[:, :, T:] = float("nan")
            if qt.zeros is not None:
                qt.zeros[:, :, T:] = float("nan")
    return _to(cache, DEV), g


def _to(cache, device):
    for qt in (cache.k, cache.v):
        qt.data = qt.data.to(device)
        if qt.scales is not None:
            qt.scales = qt.scales.to(device)
        if qt.zeros is not None:
            qt.zeros = qt.zeros.to(device)
    return cache


def _p1_reference_error(q, cache, ref):
    """Error of torch dequantize + SDPA on the same quantized cache (fp16 compute), vs the float32 reference."""
    k, v = dequantize_kv(cache, torch.float16)
    if k.device.type == "cpu":  # CPU SDPA in fp16 is slow or absent: compute in fp16-rounded float32 steps
        G = q.shape[1] // k.shape[1]
        kf = k.float().repeat_interleave(G, 1)
        vf = v.float().repeat_interleave(G, 1)
        s = torch.einsum("bhd,bhtd->bht", q.float(), kf) / math.sqrt(q.shape[-1])
        p = torch.softmax(s, -1).half().float()
        o = torch.einsum("bht,bhtd->bhd", p, vf).half().float()
    else:
        o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
    return (o.float() - ref).abs().max().item()


def check_attention(B, G, Hkv, d, T, kb, vb, group=32, asym=False, seed=0, v_layout="channel", **opts):
    cache, g = _make_cache(B, Hkv, T, d, kb, vb, group, asym, seed, v_layout=v_layout)
    Hq = G * Hkv
    q = (torch.randn(B, Hq, d, generator=g) * 1.5).half().to(DEV)
    ref = decode_attention_reference(q, cache)
    out = torch.full((B, Hq, d), float("nan"), dtype=torch.float16, device=DEV)
    res = decode_attention(q, cache, out=out, **opts)
    assert res is out
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    err = (out.float() - ref).abs().max().item()
    base = _p1_reference_error(q, cache, ref)
    tol = 2.0 * base + ABS_FLOOR
    assert err <= tol, f"err {err:.3e} > tol {tol:.3e} (P1 err {base:.3e})"
    return err, base


def _cpu_cases():
    """Stratified subset: every value of every axis and every K/V bit pair at least once, small enough for
    the interpreter (T·d·B stays small at large T)."""
    cases = []
    # every T with a rotating (G, d, B, bits)
    for i, T in enumerate(T_VALUES):
        G = G_VALUES[i % len(G_VALUES)]
        d = D_VALUES[i % len(D_VALUES)] if T < 1000 else 64
        B = B_VALUES[i % 2] if T < 4000 else 1
        kb, vb = BIT_PAIRS[(3 * i) % len(BIT_PAIRS)]
        cases.append((B, G, 1, d, T, kb, vb, 32, False))
    # every bit pair, with rotating G / d / group / asym at moderate T
    for i, (kb, vb) in enumerate(BIT_PAIRS):
        G = G_VALUES[(i + 2) % len(G_VALUES)]
        d = D_VALUES[i % len(D_VALUES)]
        group = (32, 64, 128)[i % 3] if d >= 128 else (32, 64)[i % 2]
        asym = i % 4 == 3
        B = B_VALUES[(i + 1) % 2]
        T = (65, 63, 130, 7)[i % 4]
        cases.append((B, G, 2 if i % 3 == 0 else 1, d, T, kb, vb, group, asym))
    # G = 16, and the study's 4/4 at a long context
    cases.append((1, 16, 1, 64, 100, 4, 4, 32, False))
    cases.append((1, 4, 2, 128, 1000, 4, 4, 32, False))
    return cases


@pytest.mark.parametrize("B,G,Hkv,d,T,kb,vb,group,asym", _cpu_cases())
def test_decode_attention_subset(B, G, Hkv, d, T, kb, vb, group, asym):
    seed = hash((B, G, Hkv, d, T, kb, vb, group, asym)) % 10_000
    check_attention(B, G, Hkv, d, T, kb, vb, group, asym, seed=seed)


@pytest.mark.parametrize("num_splits", [1, 2, 5, None])
@pytest.mark.parametrize("gqa_shared", [True, False])
def test_decode_attention_options(num_splits, gqa_shared):
    check_attention(2, 4, 2, 64, 200, 4, 4, seed=17 + (num_splits or 0), num_splits=num_splits,
                    gqa_shared=gqa_shared, block_n=32)


@pytest.mark.parametrize("merge", ["fused", "kernel"])
@pytest.mark.parametrize("G,d,num_splits", [(4, 64, 5), (7, 128, 3), (16, 64, 2), (1, 256, 4)])
def test_split_merge_fused_and_separate(merge, G, d, num_splits):
    check_attention(2, G, 2, d, 150, 4, 4, seed=60 + G + num_splits, num_splits=num_splits, block_n=32,
                    merge=merge)


def test_fused_merge_resets_its_counters_across_calls():
    """A workspace reused across calls (as under CUDA-graph replay) must give the same answer every call: the
    last program of each head group resets its counter after merging."""
    cache, g = _make_cache(2, 2, 300, 64, 4, 4, 32, False, seed=71)
    q = (torch.randn(2, 8, 64, generator=g) * 1.5).half().to(DEV)
    ws = {}
    first = decode_attention(q, cache, num_splits=4, block_n=32, workspace=ws, merge="fused").clone()
    counters = [v for k, v in ws.items() if k[0] == "merge_counter"]
    assert len(counters) == 1 and int(counters[0].abs().sum()) == 0
    for _ in range(2):
        again = decode_attention(q, cache, num_splits=4, block_n=32, workspace=ws, merge="fused")
        assert torch.equal(again, first)
    assert int(counters[0].abs().sum()) == 0
    with pytest.raises(ValueError, match="merge"):
        decode_attention(q, cache, merge="later")


@pytest.mark.parametrize("v_full", [False, True])
def test_decode_attention_v_layouts(v_full):
    for i, (kb, vb) in enumerate(BIT_PAIRS):
        check_attention(1, 3, 1, 64, 70, kb, vb, group=(32, 64)[i % 2], asym=i == 4, seed=40 + i, v_full=v_full)


@pytest.mark.parametrize("k_full,async_scales", [(False, False), (True, True), (True, False)])
def test_decode_attention_k_layouts_and_scale_loads(k_full, async_scales):
    """K full width or as halves, scales read with a constant (async-copyable) or the run-time stride."""
    for i, (kb, vb) in enumerate([(4, 4), (8, 8), (8, 4), (4, 8), (16, 8)]):
        check_attention(1, 4, 1, 128 if i % 2 else 64, 70, kb, vb, group=(32, 64)[i % 2], asym=i == 2,
                        seed=60 + i, k_full=k_full, async_scales=async_scales)


def test_async_scales_needs_contiguous_scales():
    cache, g = _make_cache(1, 1, 40, 64, 4, 4, 32, False, seed=2)
    wide = torch.zeros(1, 1, 45, 4, dtype=torch.float16, device=DEV)
    wide[..., :2] = cache.k.scales
    cache.k.scales = wide[..., :2]  # stride(2) = 4 != d / group = 2
    q = torch.randn(1, 2, 64, generator=g).half().to(DEV)
    with pytest.raises(ValueError, match="async_scales"):
        decode_attention(q, cache, async_scales=True)
    ref = decode_attention_reference(q, cache)
    assert (decode_attention(q, cache).float() - ref).abs().max().item() < 5e-3  # falls back to the strided loads


def test_decode_attention_no_magic():
    check_attention(1, 2, 1, 64, 70, 4, 8, seed=3, magic=False)
    check_attention(1, 2, 1, 64, 70, 8, 4, group=64, asym=True, seed=4, magic=False)


def test_default_config():
    from kvmodel.kernels.decode_attention import default_config

    assert default_config(4, 4, 128, 32, 8, 32768)["num_warps"] == 1  # large 4-bit: 1-warp programs
    assert default_config(4, 4, 256, 32, 8, 32768)["num_warps"] == 2
    assert default_config(4, 4, 128, 1, 8, 4096)["num_warps"] == 4  # small: latency-bound, 4 warps
    assert default_config(16, 16, 128, 32, 8, 32768)["block_n"] == 128
    assert default_config(8, 8, 128, 32, 8, 32768)["block_n"] == 64
    for kb, vb in BIT_PAIRS:
        for d in D_VALUES:
            c = default_config(kb, vb, d, 64, 8, 131072)
            assert c["block_n"] in (32, 64, 128) and c["programs_per_sm"] >= 1


@pytest.mark.parametrize("block_n,num_warps", [(32, 1), (32, 2), (128, 4)])
def test_decode_attention_block_shapes(block_n, num_warps):
    """The block shapes default_config picks for large launches, on small inputs."""
    for i, (kb, vb) in enumerate([(4, 4), (16, 4), (4, 16), (16, 16)]):
        d = (64, 128, 256)[i % 3] if block_n < 128 else 128
        check_attention(2, (4, 7, 2, 1)[i], 1, d, 150, kb, vb, seed=80 + i, block_n=block_n, num_warps=num_warps)


@pytest.mark.gpu
@pytest.mark.parametrize("kb,vb,d,G", [(4, 4, 128, 4), (4, 4, 256, 2), (16, 16, 128, 4), (16, 4, 128, 4),
                                       (4, 4, 64, 7)])
def test_decode_attention_large_launch_gpu(kb, vb, d, G):
    """A launch past LARGE_WORK token-heads, so the default (throughput) block shape and split count are used."""
    check_attention(2, G, 8, d, 65543, kb, vb, seed=kb + vb + d + G)


def test_split_heuristic():
    assert choose_num_splits(1, 8, 4096, 64, 132) > 1  # B=1 must split to fill the SMs
    assert choose_num_splits(128, 8, 32768, 64, 132) <= 2  # 1024 programs already fill 132 SMs
    assert choose_num_splits(1, 8, 1, 64, 132) == 1
    for B, Hkv, T in [(1, 1, 4097), (4, 8, 1000), (64, 2, 131072)]:
        s = choose_num_splits(B, Hkv, T, 64, 132)
        per = -(-(-(-T // 64)) // s)
        assert -(-(-(-T // 64)) // per) == s  # no empty split


def test_pipelines_agree():
    cache, g = _make_cache(2, 2, 77, 64, 16, 16, 32, False, seed=11)
    q = torch.randn(2, 8, 64, generator=g).half().to(DEV)
    ref = run_pipeline_reference("P5", q, cache)
    for name in PIPELINES:
        out = run_pipeline(name, q, cache)
        assert out.shape == (2, 8, 64) and out.dtype == torch.float16
        assert (out.float() - ref).abs().max().item() < 5e-3, name
    qc, g = _make_cache(1, 2, 50, 64, 4, 8, 32, False, seed=12)
    q = torch.randn(1, 4, 64, generator=g).half().to(DEV)
    ref = run_pipeline_reference("P1", q, qc)
    for name in ("P1", "P5"):
        assert (run_pipeline(name, q, qc).float() - ref).abs().max().item() < 5e-3
    with pytest.raises(ValueError):
        run_pipeline("P0", q, qc)  # P0 needs an FP16 cache
    with pytest.raises(ValueError):
        run_pipeline("P9", q, qc)


def test_launcher_validation():
    cache, g = _make_cache(1, 2, 10, 64, 4, 4, 32, False, seed=1)
    q = torch.randn(1, 4, 64, generator=g).half().to(DEV)
    with pytest.raises(ValueError, match="float16"):
        decode_attention(q.float(), cache)
    with pytest.raises(ValueError, match=r"\[B, Hq, d\]"):
        decode_attention(q[0], cache)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q[..., :32].contiguous(), cache)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 64, generator=g).half().to(DEV), cache)
    with pytest.raises(ValueError, match="batch"):
        decode_attention(torch.randn(2, 4, 64, generator=g).half().to(DEV), cache)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, cache, num_splits=0)
    cache.length = 0
    with pytest.raises(ValueError, match="length"):
        decode_attention(q, cache)
    with pytest.raises(ValueError):
        quantize(torch.randn(2, 64), bits=3)
    with pytest.raises(ValueError):
        quantize(torch.randn(2, 48), bits=4, group=32)


# ------------------------------------------------------------------------- token_pair 4-bit V (v4 candidate)
@pytest.mark.parametrize("block_n,num_warps", [(32, 1), (64, 4)])
def test_decode_attention_token_pair_v(block_n, num_warps):
    """4-bit V packed two tokens per byte: every K width, odd and even T (incl. T = 1), asym, splits, no GQA."""
    cases = [(1, 4, 64, 1, 4, 32, False, {}), (2, 3, 128, 7, 16, 64, True, {}), (1, 2, 64, 64, 8, 32, False, {}),
             (2, 4, 64, 65, 4, 64, True, dict(num_splits=3)), (1, 7, 128, 130, 4, 32, False, {}),
             (1, 2, 256, 33, 4, 128, False, dict(gqa_shared=False))]
    for i, (B, G, d, T, kb, group, asym, opts) in enumerate(cases):
        check_attention(B, G, 1, d, T, kb, 4, group, asym, seed=90 + i + block_n, v_layout="token_pair",
                        block_n=block_n, num_warps=num_warps, **opts)


def test_decode_attention_token_octet_v_experiment():
    """The kernel-only token_octet V path (kernels/probe_v4.py builds its caches) on the same pass rule."""
    from kvmodel.kernels.probe_v4 import to_token_octet

    for i, (B, G, d, T, kb, group, asym, opts) in enumerate([(1, 4, 64, 7, 4, 32, False, {}),
                                                              (2, 3, 128, 65, 16, 64, True, dict(num_splits=3)),
                                                              (1, 4, 128, 130, 4, 32, False, dict(block_n=32,
                                                                                                  num_warps=1))]):
        cache, g = _make_cache(B, 1, T, d, kb, 4, group, asym, seed=110 + i)
        q = (torch.randn(B, G, d, generator=g) * 1.5).half().to(DEV)
        ref = decode_attention_reference(q, cache)
        base = _p1_reference_error(q, cache, ref)
        cache.v = to_token_octet(cache.v)
        err = (decode_attention(q, cache, **opts).float() - ref).abs().max().item()
        assert err <= 2.0 * base + ABS_FLOOR, (i, err, base)


def test_token_pair_layout_roundtrip_and_p1():
    """token_pair stores the same codes as the channel layout (dequantize agrees bit for bit, also over a prefix
    of odd length), 8/16-bit V ignore it, and the P1 path (Triton dequantize + SDPA) reads it."""
    from kvmodel.kernels import dequantize_fp16
    from kvmodel.kernels.quant import to_token_pair

    g = torch.Generator().manual_seed(7)
    for T, asym in ((1, False), (6, True), (9, False)):
        x = torch.randn(2, 3, T, 128, generator=g).half()
        a = quantize(x, 4, 32, asym)
        b = quantize(x, 4, 32, asym, layout="token_pair")
        assert b.data.shape == (2, 3, (T + 1) // 2, 128) and b.tokens == T and b.shape == a.shape
        assert torch.equal(dequantize(a), dequantize(b))
        assert torch.equal(to_token_pair(a).data, b.data)
        n = max(1, T - 2)
        assert torch.equal(dequantize(a, length=n), dequantize(b, length=n))
        for t in (b.data, b.scales) + ((b.zeros,) if asym else ()):
            t.data = t.data.to(DEV)
        assert torch.equal(dequantize_fp16(b, n).cpu(), dequantize(a, torch.float16, n))
    assert quantize(torch.randn(4, 64), 8, 32, layout="token_pair").layout == "channel"
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 64), 4, 32, layout="tokens")
    cache, g = _make_cache(2, 2, 77, 64, 4, 4, 32, False, seed=13, v_layout="token_pair")
    q = torch.randn(2, 8, 64, generator=g).half().to(DEV)
    ref = run_pipeline_reference("P1", q, cache)
    for name in ("P1", "P5"):
        assert (run_pipeline(name, q, cache).float() - ref).abs().max().item() < 5e-3, name


@pytest.mark.parametrize("kb,asym", [(4, False), (16, True)])
def test_token_pair_append_then_attend(kb, asym):
    """Append (nibble read-modify-write of the pair byte) from an odd and an even prefix equals quantizing the
    whole sequence at once, in the Triton kernel and the torch reference, and attends like the channel layout."""
    g = torch.Generator().manual_seed(21 + kb)
    B, Hkv, d, T0, steps = 2, 2, 64, 19, 4
    k = torch.randn(B, Hkv, T0 + steps, d, generator=g).half()
    v = torch.randn(B, Hkv, T0 + steps, d, generator=g).half()
    full = _to(quantize_kv(k, v, kb, 4, 32, asym, v_layout="token_pair"), DEV)
    inc = _to(quantize_kv(k[:, :, :T0], v[:, :, :T0], kb, 4, 32, asym, max_tokens=T0 + steps,
                          v_layout="token_pair"), DEV)
    ref = _to(quantize_kv(k[:, :, :T0], v[:, :, :T0], kb, 4, 32, asym, max_tokens=T0 + steps,
                          v_layout="token_pair"), DEV)
    for t in range(T0, T0 + steps):
        kt, vt = k[:, :, t].contiguous().to(DEV), v[:, :, t].contiguous().to(DEV)
        append_kv(inc, kt, vt, t)
        append_kv_reference(ref, kt, vt, t)
        inc.length = ref.length = t + 1
    for c in (inc, ref):
        assert torch.equal(c.v.data, full.v.data) and torch.equal(c.v.scales, full.v.scales)
        assert torch.equal(c.k.data, full.k.data)
    # per-batch positions of different parity in one step (one writer per byte)
    pos = torch.tensor([T0 + steps - 2, T0 + steps - 1])
    kt, vt = (torch.randn(B, Hkv, d, generator=g).half().to(DEV) for _ in range(2))
    append_kv(inc, kt, vt, pos)
    append_kv_reference(ref, kt, vt, pos)
    assert torch.equal(inc.v.data, ref.v.data) and torch.equal(inc.v.scales, ref.v.scales)
    q = torch.randn(B, 4, d, generator=g).half().to(DEV)
    chan = _to(quantize_kv(k, v, kb, 4, 32, asym), DEV)
    assert torch.allclose(decode_attention(q, full).float(), decode_attention(q, chan).float(), atol=1e-3)


# ------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_layout_and_codes(bits, asym, group):
    g = torch.Generator().manual_seed(bits * 100 + group + asym)
    x = torch.randn(2, 3, 5, 128, generator=g).half()
    qt = quantize(x, bits, group, asym)
    if bits == 16:
        assert qt.data.dtype == torch.float16 and torch.equal(qt.data, x)
        return
    assert qt.data.dtype == torch.uint8
    assert qt.data.shape == (2, 3, 5, 64 if bits == 4 else 128)
    assert qt.scales.shape == (2, 3, 5, 128 // group) and qt.scales.dtype == torch.float16
    assert (qt.zeros is not None) == asym
    if bits == 4:  # even channel in the low nibble
        lo = (qt.data & 0xF).int()
        hi = (qt.data >> 4).int()
        xr = dequantize(qt, torch.float32)
        s = qt.scales.float().repeat_interleave(group, -1)
        if not asym:
            assert torch.allclose(xr[..., 0::2], (lo - 8) * s[..., 0::2])
            assert torch.allclose(xr[..., 1::2], (hi - 8) * s[..., 1::2])
    if not asym:  # symmetric: absmax maps to ±(2^(b-1)-1), stored offset-binary
        qmax = 2 ** (bits - 1) - 1
        ref_scale = (x.float().reshape(2, 3, 5, 128 // group, group).abs().amax(-1) / qmax).half()
        assert torch.equal(qt.scales, ref_scale)


hyp = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, 128]), asym=st.booleans(),
       seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-6, 4), tokens=st.integers(1, 4))
def test_roundtrip_error_bound(bits, group, asym, seed, log_scale, tokens):
    """Every dequantized element is within half a quantization step of its input (plus fp16 subnormal slack)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, 128, generator=g) * (2.0**log_scale)).half()
    qt = quantize(x, bits, group, asym)
    xr = dequantize(qt, torch.float32)
    s = qt.scales.float().repeat_interleave(group, -1)
    err = (xr - x.float()).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-3) + 1e-6), (err - s / 2).max()
    codes = torch.stack([qt.data & 0xF, qt.data >> 4], -1).flatten(-2) if bits == 4 else qt.data
    if not asym:  # symmetric codes never use the most negative value
        assert int(codes.min()) >= 1


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64]), asym=st.booleans(),
       c=st.floats(-100, 100).filter(lambda v: abs(v) > 1e-3))
def test_roundtrip_constant_groups(bits, group, asym, c):
    """A constant group dequantizes (almost) exactly; a zero group exactly."""
    x = torch.full((2, 64), c).half()
    x[1] = 0
    xr = dequantize(quantize(x, bits, group, asym), torch.float32)
    assert torch.all(xr[1] == 0)
    assert torch.allclose(xr[0], x[0].float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("kb,vb,group,asym", [(4, 4, 32, False), (8, 4, 64, True), (16, 8, 32, False),
                                              (4, 16, 128, True), (8, 8, 32, False)])
def test_append_matches_reference(kb, vb, group, asym):
    g = torch.Generator().manual_seed(kb * 10 + vb + group)
    B, Hkv, d, Tm = 3, 2, 128, 9
    c1 = empty_cache(B, Hkv, Tm, d, kb, vb, group, asym, device=DEV)
    c2 = empty_cache(B, Hkv, Tm, d, kb, vb, group, asym, device=DEV)
    for c in (c1, c2):
        for qt in (c.k, c.v):
            qt.data.zero_()
            if qt.scales is not None:
                qt.scales.zero_()
            if qt.zeros is not None:
                qt.zeros.zero_()
    for step in range(3):
        k = (torch.randn(B, Hkv, d, generator=g) * 2).half().to(DEV)
        v = torch.randn(B, Hkv, d, generator=g).half().to(DEV)
        pos = torch.tensor([step, step + 2, 8 - step])
        append_kv(c1, k, v, pos)
        append_kv_reference(c2, k, v, pos)
    for a, b in ((c1.k, c2.k), (c1.v, c2.v)):
        assert torch.equal(a.data, b.data)
        if a.scales is not None:
            assert torch.equal(a.scales, b.scales)
        if a.zeros is not None:
            assert torch.equal(a.zeros, b.zeros)
    # the appended token dequantizes to its input within the quantization error
    c1.length = Tm
    kk, _ = dequantize_kv(c1, torch.float32)
    last_scale = c1.k.scales[0, :, 2].float().repeat_interleave(group, -1) if kb != 16 else torch.zeros(1)
    assert torch.all((kk[0, :, 2] - k[0].float()).abs().cpu() <= last_scale.cpu() / 2 * 1.001 + 1e-6)


def test_append_then_attend():
    """Prefill by quantize_kv, decode steps by append_kv: equals quantizing the whole sequence at once."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, d, T0, steps = 2, 2, 64, 20, 3
    k = torch.randn(B, Hkv, T0 + steps, d, generator=g).half()
    v = torch.randn(B, Hkv, T0 + steps, d, generator=g).half()
    full = _to(quantize_kv(k, v, 4, 8, 32, False), DEV)
    inc = _to(quantize_kv(k[:, :, :T0], v[:, :, :T0], 4, 8, 32, False, max_tokens=T0 + steps), DEV)
    for t in range(T0, T0 + steps):
        append_kv(inc, k[:, :, t].contiguous().to(DEV), v[:, :, t].contiguous().to(DEV), t)
        inc.length = t + 1
    assert torch.equal(inc.k.data, full.k.data) and torch.equal(inc.v.scales, full.v.scales)
    q = torch.randn(B, 4, d, generator=g).half().to(DEV)
    assert torch.allclose(decode_attention(q, inc).float(), decode_attention(q, full).float(), atol=1e-3)


def test_append_validation():
    c = empty_cache(1, 2, 4, 64, 4, 4, device=DEV)
    k = torch.randn(1, 2, 64).half().to(DEV)
    with pytest.raises(ValueError):
        append_kv(c, k.float(), k, 0)
    with pytest.raises(ValueError):
        append_kv(c, k, k, 4)
    with pytest.raises(ValueError):
        append_kv(c, k[:, :1], k, 0)


# ------------------------------------------------------------------------------------------- GPU: everything
def _gpu_cases():
    # (G, d, bits) outermost: consecutive tests share compiled kernels (pytest-xdist hands out runs of them)
    for G, d, (kb, vb), T, B in itertools.product(G_VALUES, D_VALUES, BIT_PAIRS, T_VALUES, B_VALUES):
        yield pytest.param(B, G, 2, d, T, kb, vb, id=f"B{B}-G{G}-d{d}-T{T}-k{kb}v{vb}")


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,Hkv,d,T,kb,vb", list(_gpu_cases()))
def test_decode_attention_full_gpu(B, G, Hkv, d, T, kb, vb):
    check_attention(B, G, Hkv, d, T, kb, vb, seed=T * 7 + G * 3 + d + B + kb * 5 + vb)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("group,asym", [(32, True), (64, False), (128, True)])
@pytest.mark.parametrize("num_splits,gqa_shared", [(1, True), (None, False), (3, True)])
def test_decode_attention_options_gpu(G, group, asym, num_splits, gqa_shared):
    check_attention(3, G, 2, 128, 1000, 4, 8, group, asym, seed=G + group, num_splits=num_splits,
                    gqa_shared=gqa_shared)


@pytest.mark.parametrize("bits,group,asym", [(4, 32, False), (8, 64, False), (4, 128, True), (8, 32, True)])
def test_dequantize_fp16_kernel(bits, group, asym):
    from kvmodel.kernels import dequantize_fp16

    g = torch.Generator().manual_seed(bits + group)
    x = torch.randn(2, 3, 70, 128, generator=g).half()
    qt = quantize(x, bits, group, asym)
    qt.data, qt.scales = qt.data.to(DEV), qt.scales.to(DEV)
    if qt.zeros is not None:
        qt.zeros = qt.zeros.to(DEV)
    out = dequantize_fp16(qt, 65)
    ref = dequantize(qt, torch.float16, 65)
    assert out.shape == (2, 3, 65, 128) and out.dtype == torch.float16
    assert torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------ the model's port
def test_timing_port_of_block_shape_and_split_rules_matches_the_kernel():
    """kvmodel.timing ports the kernel's default_config / choose_num_splits / LARGE_WORK (the analytic core imports
    no torch). A kernel change that is not mirrored in the model fails here."""
    import numpy as np

    import importlib

    from kvmodel import timing

    da = importlib.import_module("kvmodel.kernels.decode_attention")  # the module (the package exports a function)
    assert timing.KERNEL_LARGE_WORK == da.LARGE_WORK
    sms = 132
    n = 0
    for kb, vb, d, B, Hkv, T in itertools.product((4, 8, 16), (4, 8, 16), (64, 128, 256), (1, 2, 4, 16, 64, 128),
                                                  (1, 2, 4, 8), (1, 63, 64, 1000, 4096, 32767, 32768, 131072)):
        want = da.default_config(kb, vb, d, B, Hkv, T)
        got = timing.kernel_config(kb, vb, d, B, Hkv, T)
        key = (kb, vb, d, B, Hkv, T)
        assert (got["block_n"], got["num_warps"], got["programs_per_sm"]) == (
            want["block_n"], want["num_warps"], want["programs_per_sm"]), key
        assert got["large"] == (B * Hkv * T >= da.LARGE_WORK), key
        splits = da.choose_num_splits(B, Hkv, T, want["block_n"], sms, want["programs_per_sm"])
        assert float(timing.kernel_split_count(kb, vb, d, B, Hkv, T, sms)) == splits, key
        n += 1
    assert n == 3 * 3 * 3 * 6 * 4 * 8
    # split_count is choose_num_splits for any tile size / occupancy (vectorized over B*Hkv and T)
    BH = np.array([1, 8, 32, 512, 1024])
    for block_n, pps, sm in itertools.product((16, 32, 64, 128), (1, 4, 9, 12), (78, 132)):
        for T in (1, 100, 4096, 65536, 131072):
            got = timing.split_count(BH, T, sm, block_n=block_n, programs_per_sm=pps)
            want = [da.choose_num_splits(int(b), 1, T, block_n, sm, pps) for b in BH]
            assert list(got) == want, (block_n, pps, sm, T)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), G=st.integers(1, 8), d=st.sampled_from([64, 128, 256]), T=st.integers(1, 300),
       kb=st.sampled_from([4, 8, 16]), vb=st.sampled_from([4, 8, 16]), asym=st.booleans(),
       seed=st.integers(0, 2**31 - 1), token_pair=st.booleans())
def test_decode_attention_random_shapes(B, G, d, T, kb, vb, asym, seed, token_pair):
    """Any small shape, format and fresh random data: the fused kernel stays within the pass rule of the
    torch dequantize + SDPA path against the float32 reference (hypothesis draws new cases every run; 4-bit V
    in either layout)."""
    check_attention(B, G, 1, d, T, kb, vb, 32, asym, seed=seed, v_layout="token_pair" if token_pair else "channel")
