"""CPU tests of the end-to-end decode step: byte arithmetic, and the step's math against a naive reference
(Triton helpers run in the Triton interpreter, on CPU tensors)."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmodel import traffic
from kvmodel.architecture import param_breakdown
from kvmodel.measure import e2e_decode as e2e
from kvmodel.specs import KVFormat, ModelSpec

TINY = ModelSpec(name="tiny-test", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=96, qkv_bias=True, published_params=1,
                 published_params_source="test")


def test_resolve_fallback_models():
    for name in e2e.DEFAULT_MODELS:
        spec = e2e.resolve_model(name)
        assert spec.num_heads % spec.num_kv_heads == 0
    m = e2e.resolve_model("Mistral-Small-3.1-24B")
    assert m.head_dim == 128 and m.num_layers == 40


def _sym(spec, B=1, T=1, kb=16, vb=16, group=32):
    vals = {**traffic.model_symbols(spec), **traffic.kv_symbols(KVFormat(k_bits=kb, v_bits=vb, group_size=group))}
    vals.update(B=B, T=T, b_w=2)
    return vals


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Qwen2.5-0.5B", "Mistral-Small-3.1-24B"])
@pytest.mark.parametrize("kb,vb", [(16, 16), (4, 4), (16, 4), (8, 4)])
def test_kv_bytes_per_token_is_the_symbolic_formula(name, kb, vb):
    spec = e2e.resolve_model(name)
    assert e2e.kv_bytes_per_token(spec, kb, vb) == pytest.approx(
        traffic.evaluate("kv_bytes_per_token", _sym(spec, kb=kb, vb=vb)))


def test_kv_bytes_per_token_formats():
    spec = e2e.resolve_model("Llama-3.1-8B")
    assert e2e.kv_bytes_per_token(spec, 16, 16) / e2e.kv_bytes_per_token(spec, 4, 4) == pytest.approx(256 / 72)


MODELS_E2E = ["Llama-3.1-8B", "Qwen2.5-0.5B", "Qwen2.5-7B", "Gemma-3-12B"]


@pytest.mark.parametrize("name", MODELS_E2E)
@pytest.mark.parametrize("B,T", [(1, 1024), (16, 32768)])
@pytest.mark.parametrize("pipe,kb,vb", [("P0", 16, 16), ("P5", 4, 4), ("P1", 4, 4), ("P1", 16, 4),
                                        ("P0-expand", 16, 16)])
def test_step_bytes_are_the_symbolic_formulas(name, B, T, pipe, kb, vb):
    """Every byte column of e2e_decode.csv is a kvmodel.symbolic formula (tied embeddings, sliding windows,
    per-half P1 buffers included)."""
    try:
        spec = e2e.resolve_model(name)
    except KeyError:
        pytest.skip(f"{name} not in the catalog")
    v = _sym(spec, B, T, kb, vb)
    sb = e2e.step_bytes(spec, B, T, kb, vb, pipe)
    assert sb["bytes_weights"] == pytest.approx(traffic.evaluate("weight_bytes_streamed", v))
    kv = traffic.evaluate("kv_read_bytes", v) + traffic.evaluate("kv_write_bytes", v)
    assert sb["bytes_kv"] == pytest.approx(kv)
    assert sb["bytes_total"] == pytest.approx(sb["bytes_weights"] + kv)
    # pipeline extra: per-layer formula differences summed over layers (windowed layers at their window)
    extra = {"P1": ("attn_bytes_P1", "attn_bytes_P5"), "P0-expand": ("attn_bytes_P0_expand", "attn_bytes_P0")}
    want = 0.0
    if pipe in extra:
        sw = spec.sliding_window
        for Tl, n in ((T, spec.num_layers - (sw.num_sliding_layers if sw else 0)),
                      (min(T, sw.window_tokens) if sw else T, sw.num_sliding_layers if sw else 0)):
            vl = {**v, "T": Tl}
            want += n * (traffic.evaluate(extra[pipe][0], vl) - traffic.evaluate(extra[pipe][1], vl))
    assert sb["bytes_kv_pipeline"] - sb["bytes_kv"] == pytest.approx(want)


def test_step_bytes_known_differences():
    """The cases where the old hand-typed copy disagreed with the model."""
    tied = e2e.resolve_model("Qwen2.5-0.5B")
    pbt = param_breakdown(tied)
    assert e2e.weight_bytes_per_step(tied, 16) == 2 * (pbt.decoder_streamed_always + pbt.embedding + 16 * 896)
    spec = e2e.resolve_model("Llama-3.1-8B")
    p1_k16 = e2e.step_bytes(spec, 4, 1024, 16, 4, "P1")
    # only the 4-bit V half is dequantized into the FP16 buffer: written + read, 32 layers x 8 heads x 128 ch
    assert p1_k16["bytes_kv_pipeline"] - p1_k16["bytes_kv"] == 2 * 4 * 1024 * 32 * 8 * 128 * 2
    moe_w = e2e.weight_bytes_per_step(spec, 4, experts_touched=3.0)
    assert moe_w == e2e.weight_bytes_per_step(spec, 4)  # dense: the expert count does not enter


def test_fill_bytes_recomputes_only_derived_columns(tmp_path):
    src = Path(__file__).resolve().parents[1] / "validation/data/h200/e2e_decode.csv"
    lines = src.read_text().splitlines(keepends=True)[:6]
    p = tmp_path / "e2e.csv"
    p.write_text("".join(lines))
    import csv

    before = list(csv.DictReader(p.open(newline="")))
    for r in before:  # corrupt the derived columns
        r.update(bytes_weights="1", bytes_kv="1", bytes_total="1", floor_s="1", pct_of_floor="1")
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(before[0]))
        w.writeheader()
        w.writerows(before)
    assert e2e.fill_bytes(p) == 5
    after = list(csv.DictReader(p.open(newline="")))
    for r in after:
        spec = e2e.resolve_model(r["model"])
        sb = e2e.step_bytes(spec, int(r["B"]), int(r["T"]), int(r["k_bits"]), int(r["v_bits"]), r["pipeline"])
        for k, val in sb.items():
            assert float(r[k]) == pytest.approx(val)
        floor = sb["bytes_total"] / (float(r["read_ceiling_GBps"]) * 1e9)
        assert float(r["floor_s"]) == pytest.approx(floor)
        assert float(r["pct_of_floor"]) == pytest.approx(100 * floor / float(r["median_s"]))
    orig = list(csv.DictReader(io.StringIO("".join(lines))))
    for a, b in zip(orig, after):  # measured columns untouched
        for k in ("median_s", "p10_s", "p90_s", "attn_s", "status", "note", "read_ceiling_GBps"):
            assert a[k] == b[k]


def test_committed_e2e_csv_bytes_are_current():
    """The committed e2e_decode.csv carries the symbolic byte counts (rerun --fill-bytes after a formula change)."""
    import csv

    src = Path(__file__).resolve().parents[1] / "validation/data/h200/e2e_decode.csv"
    for r in csv.DictReader(src.open(newline="")):
        spec = e2e.resolve_model(r["model"])
        sb = e2e.step_bytes(spec, int(r["B"]), int(r["T"]), int(r["k_bits"]), int(r["v_bits"]), r["pipeline"],
                            int(r["group"]))
        for k, val in sb.items():
            assert float(r[k]) == pytest.approx(val, rel=1e-12), (r["model"], r["B"], r["T"], k)


def test_parse_formats():
    assert e2e.parse_formats("P0:16/16, P5:4/4,P1:4") == [("P0", 16, 16), ("P5", 4, 4), ("P1", 4, 4)]


def _run_interpreted(func_name: str):
    """Run ``func_name`` of this file in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before
    triton is first imported, so not in this pytest process)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    code = f"import runpy; runpy.run_path({__file__!r})[{func_name!r}]()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _naive_step(torch, model, spec, ids, cache_k, cache_v, T):
    F = torch.nn.functional
    d, Hq, Hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    G = Hq // Hkv

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    cos, sin = e2e.rope_tables(d, T, 1e6, "cpu")

    def rope(t):
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    x = model.embed[ids].clone()
    B = x.shape[0]
    for i, lay in enumerate(model.layers):
        hn = rms(x, lay["in_norm"])
        qkv = hn @ lay["qkv"].T + lay["qkv_b"]
        t = qkv.view(B, Hq + 2 * Hkv, d)
        q, k, v = rope(t[:, :Hq]), rope(t[:, Hq:Hq + Hkv]), t[:, Hq + Hkv:]
        K = torch.cat([cache_k[i][:, :, :T], k.unsqueeze(2)], 2)
        V = torch.cat([cache_v[i][:, :, :T], v.unsqueeze(2)], 2)
        K = K.repeat_interleave(G, 1)
        V = V.repeat_interleave(G, 1)
        s = torch.einsum("bhd,bhtd->bht", q, K) / math.sqrt(d)
        o = torch.einsum("bht,bhtd->bhd", s.softmax(-1), V)
        x = x + o.reshape(B, Hq * d) @ lay["o"].T
        hn = rms(x, lay["post_norm"])
        gu = hn @ lay["gu"].T
        inter = gu.shape[1] // 2
        x = x + (F.silu(gu[:, :inter]) * gu[:, inter:]) @ lay["down"].T
    return rms(x, model.final_norm) @ model.lm_head.T


def test_decode_step_matches_naive_reference():
    _run_interpreted("_check_step_against_reference")


def _check_step_against_reference():
    import torch

    B, T = 3, 7
    model = e2e.DecodeModel(TINY, "float32", device="cpu")
    for lay in model.layers:  # non-trivial norms and biases
        lay["in_norm"].uniform_(0.5, 1.5)
        lay["post_norm"].uniform_(0.5, 1.5)
        lay["qkv_b"].normal_(0, 0.1)
    need = e2e.kv_cache_alloc_bytes(TINY, B, T, 16, 16) * 2  # float32 here: twice the fp16 bytes
    pool = torch.randn(int(need) // 4 + 4096)
    backend = e2e.SDPABackend(TINY, B, T, e2e.Carver(pool), torch.float32)
    step, attn_only, touched = model.build_step(B, T, backend)
    assert touched is None
    ck = [c.k.clone() for c in backend.layers]
    cv = [c.v.clone() for c in backend.layers]
    ids_out = step()
    logits = step.state["logits"]
    ref = _naive_step(torch, model, TINY, step.state["ids"], ck, cv, T)
    err = float((logits - ref).norm() / ref.norm())
    assert err < 1e-4, err
    assert torch.equal(ids_out, ref.argmax(-1))
    # the new token's K/V landed in slot T of every layer's cache, nothing else changed
    for i, c in enumerate(backend.layers):
        assert torch.equal(c.k[:, :, :T], ck[i][:, :, :T])
        assert not torch.equal(c.k[:, :, T], ck[i][:, :, T])
    attn_only()  # runs


def test_fits_and_skip_logic():
    spec = e2e.resolve_model("Mistral-Small-3.1-24B")
    w = param_breakdown(spec).total * 2
    c_big = e2e.Config(128, 32768, 16, 16, "P0")
    c_small = e2e.Config(1, 1024, 16, 16, "P0")
    total = 143771 * 1024**2
    assert not e2e._fits(spec, c_big, w, total, 32, e2e.DEFAULT_MARGIN_BYTES)[0]
    assert e2e._fits(spec, c_small, w, total, 32, e2e.DEFAULT_MARGIN_BYTES)[0]


@pytest.mark.gpu
def test_self_check_gpu():
    r = e2e.self_check()
    assert r["ok"], r


def test_module_imports_without_gpu():
    # byte arithmetic and planning need neither CUDA nor transformers
    r = subprocess.run([sys.executable, "-c", "import sys, kvmodel.measure.e2e_decode as e; "
                        "e.step_bytes(e.resolve_model('Llama-3.1-8B'), 1, 1024); "
                        "assert 'torch' not in sys.modules and 'triton' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert e2e.E2E_KEYS[:6] == ["model", "B", "T", "k_bits", "v_bits", "pipeline"]


TINY64 = TINY.model_copy(update=dict(name="tiny64", head_dim=64, hidden_size=128))


def test_kernel_pipelines_in_step():
    _run_interpreted("_check_kernel_pipelines")


def _check_kernel_pipelines():
    import torch

    pytest.importorskip("kvmodel.kernels.pipelines")
    B, T = 2, 70
    model = e2e.DecodeModel(TINY64, "float16", device="cpu")
    need = e2e.kv_cache_alloc_bytes(TINY64, B, T, 16, 16) * 2
    pool = torch.randn(int(need) // 2 + 4096, dtype=torch.float16)
    # P5 at 16/16 (our FP16 split-K kernel) reproduces the naive step
    backend = e2e.make_backend("P5", TINY64, B, T, e2e.Carver(pool), torch.float16, 16, 16)
    step, _, _ = model.build_step(B, T, backend)
    ck = [c.k.data.float().clone() for c in backend.impl.caches]
    cv = [c.v.data.float().clone() for c in backend.impl.caches]
    step()
    got = step.state["logits"].float()
    m32 = e2e.DecodeModel(TINY64, "float32", device="cpu")
    for a, b in zip(m32.layers, model.layers):
        for key in a:
            if isinstance(a[key], torch.Tensor):
                a[key].copy_(b[key])
    m32.embed.copy_(model.embed)
    m32.lm_head = m32.embed if TINY64.tie_embeddings else m32.lm_head.copy_(model.lm_head)
    ref = _naive_step(torch, m32, TINY64, step.state["ids"], ck, cv, T)
    err = float((got - ref).norm() / ref.norm())
    assert err < 2e-2, err
    # quantized formats run through append + attend and give finite logits
    for pipe in ("P5", "P1"):
        backend = e2e.make_backend(pipe, TINY64, B, T, e2e.Carver(pool), torch.float16, 4, 4)
        step, attn_only, _ = model.build_step(B, T, backend)
        step()
        assert torch.isfinite(step.state["logits"]).all(), pipe
        attn_only()
