"""Correctness of the small-batch weight-streaming GEMV (``kvmodel.kernels.gemv``) against its float32 reference.

Without a CUDA GPU the kernel runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd shapes (N and
K not multiples of the blocks). Pass rule: max |gemv − ref| ≤ 2 × max |F.linear − ref| + floor, where ref is
:func:`gemv_ref` (float32) and F.linear is torch's own result in the same dtype; the output is NaN-poisoned
before each call, so every element must be written.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kvmodel.kernels.gemv import MAX_B, default_config, gemv, gemv_ref

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
N_ODD, K_ODD = 37, 200  # with block_k=32: 7 chunks, the last one partial; 37 rows: a partial row block


def _inputs(B, N, K, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEV)
    return cast(x), cast(w), cast(b)


def _check(y, x, w, b, residual=None):
    assert torch.isfinite(y).all(), "output not fully written (NaN poison left)"
    ref = gemv_ref(x, w, b, residual=residual)
    theirs = torch.nn.functional.linear(x, w, b)
    if residual is not None:
        theirs = theirs + residual
    err = float((y.float() - ref).abs().max())
    err_torch = float((theirs.float() - ref).abs().max())
    assert err <= 2 * err_torch + FLOOR[x.dtype], (err, err_torch)


def _poisoned(B, N, dtype):
    return torch.full((B, N), float("nan"), dtype=dtype, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(dtype, B, bias, split_k):
    x, w, b = _inputs(B, N_ODD, K_ODD, dtype, bias, seed=B * 10 + split_k + bias)
    block_n = 8 if B == 1 else 16  # the default path for B: fp32 FMAs for B = 1, tl.dot above
    out = _poisoned(B, N_ODD, dtype)
    y = gemv(x, w, b, out=out, block_n=block_n, block_k=32, split_k=split_k)
    assert y is out and y.shape == (B, N_ODD) and y.dtype == dtype
    _check(y, x, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,dot,block_n", [(1, True, 16), (1, "swap", 32), (2, False, 4), (5, False, 2),
                                           (6, True, 32), (7, "swap", 16)])
def test_gemv_every_inner_product(dtype, B, dot, block_n):
    """Every inner product (FMA, dot, swapped dot) at B = 1 and B > 1, also the pairings the table never picks."""
    x, w, b = _inputs(B, 45, 150, dtype, True, seed=B)
    y = gemv(x, w, b, out=_poisoned(B, 45, dtype), dot=dot, block_n=block_n, block_k=64, split_k=2)
    _check(y, x, w, b)


@pytest.mark.parametrize("merge", ["fused", "kernel"])
def test_gemv_split_merge_and_workspace_reuse(merge):
    """Both split-K merges; a reused workspace (its counters reset by the kernel) gives the same result again."""
    x, w, b = _inputs(3, 40, 300, torch.float16, True, seed=7)
    ws: dict = {}
    y1 = gemv(x, w, b, out=_poisoned(3, 40, torch.float16), block_n=16, block_k=32, split_k=4, merge=merge,
              workspace=ws)
    _check(y1, x, w, b)
    if merge == "fused":
        counters = [v for k, v in ws.items() if k[0] == "gemv_counter"]
        assert counters and all(int(c.abs().sum()) == 0 for c in counters), "counters not reset"
    x2, w2, b2 = _inputs(3, 40, 300, torch.float16, True, seed=8)
    y2 = gemv(x2, w2, b2, out=_poisoned(3, 40, torch.float16), block_n=16, block_k=32, split_k=4, merge=merge,
              workspace=ws)
    _check(y2, x2, w2, b2)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dot,block_n", [(False, 8), (True, 16)])
def test_gemv_residual_in_place(split_k, dot, block_n):
    """``out += x @ w.T`` with ``residual=out`` (the residual add a decoder layer fuses)."""
    x, w, _ = _inputs(2, 33, 96, torch.float16, False, seed=3)
    r = torch.randn(2, 33).half().to(DEV)
    out = r.clone()
    y = gemv(x, w, out=out, residual=out, block_n=block_n, block_k=32, split_k=split_k, dot=dot)
    assert y is out
    _check(y, x, w, None, residual=r)


def test_gemv_strided_x_and_defaults():
    """x with a row stride (a slice of a wider buffer) and every launch parameter from the default table."""
    big = torch.randn(4, 300).half().to(DEV)
    x = big[:, :120]
    _, w, b = _inputs(4, 24, 120, torch.float16, True, seed=5)
    y = gemv(x, w, b)
    _check(y, x.contiguous(), w, b)


@pytest.mark.parametrize("N,K", [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584),
                                 (6144, 4096), (4096, 14336), (128256, 4096), (5, 7)])
@pytest.mark.parametrize("B", range(1, MAX_B + 1))
def test_default_config_is_valid(N, K, B):
    c = default_config(N, K, B)
    for key in ("block_n", "block_k", "num_warps"):
        assert c[key] > 0 and c[key] & (c[key] - 1) == 0, (key, c)
    assert c["split_k"] == 1 and c["num_stages"] >= 1
    if B == 1:  # fp32 FMAs on a tile of at most 8 x 512 (the accumulator: 32 registers a thread at 4 warps)
        assert c["dot"] is False and c["block_n"] * c["block_k"] <= 4096
        assert c["block_n"] == 1 or -(-N // c["block_n"]) >= 4 * 132  # >= 4 programs per SM where possible
    else:  # tensor cores: tiles of >= 16 rows
        assert c["dot"] in (True, "swap") and c["block_n"] >= 16 and c["block_k"] >= 16
    cfg = {k: c[k] for k in ("block_n", "block_k", "num_warps", "num_stages", "dot")}
    x, w, _ = _inputs(B, 24, 40, torch.float16, False, seed=B)
    if B == 1 or N < 1000:  # the picked path itself runs (on a small shape)
        _check(gemv(x, w, out=_poisoned(B, 24, torch.float16), **cfg), x, w, None)


# ----------------------------------------------------------------------------------------------------------------
# Prologue fusions: rmsnorm(x) @ w.T (norm_weight=) and (silu(gate) * up) @ w.T (gate_up=True)
# ----------------------------------------------------------------------------------------------------------------


def _prologue_inputs(B, N, K, dtype, kind, seed):
    """x (the gemv input: [B, K] for "norm", [B, 2K] gate|up for "gate_up"), w, bias and the norm weight."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = _inputs(B, N, K, dtype, kind == "norm", seed)
    if kind == "norm":  # a residual stream of scale ~3 and a non-trivial norm weight
        x = (x.float() * 3).to(dtype)
        nw = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype).to(DEV)
        return x, w, b, nw
    return torch.randn(B, 2 * K, generator=g).to(dtype).to(DEV), w, b, None


def _composition(x, w, b, nw, kind, residual):
    """The unfused step in x's dtype: e2e_decode.rmsnorm (x * r * g in fp32, one rounding) or silu_mul (one
    rounding), then F.linear (+ residual)."""
    F = torch.nn.functional
    xf = x.float()
    if kind == "norm":
        a = (xf * (1.0 / torch.sqrt(xf.pow(2).sum(-1, keepdim=True) / x.shape[1] + 1e-6)) * nw.float()).to(x.dtype)
    else:
        gate, up = xf.chunk(2, dim=-1)
        a = (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)
    y = F.linear(a, w, b)
    return y if residual is None else y + residual


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("res", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("kind", ["norm", "gate_up"])
def test_gemv_prologue_matches_composition(dtype, B, res, kind):
    """Fused prologue vs the fp32 reference, within 2x the unfused torch composition's error + floor; the
    default path for B (FMA at B = 1, tl.dot at B = 3), odd N and K, poisoned or in-place residual output."""
    N, K = N_ODD, K_ODD
    x, w, b, nw = _prologue_inputs(B, N, K, dtype, kind, seed=100 + B + 2 * res)
    kw = {"norm_weight": nw} if kind == "norm" else {"gate_up": True}
    block_n = 8 if B == 1 else 16
    r = torch.randn(B, N, generator=torch.Generator().manual_seed(B)).to(dtype).to(DEV) if res else None
    out = r.clone() if res else _poisoned(B, N, dtype)
    y = gemv(x, w, b, out=out, residual=out if res else None, block_n=block_n, block_k=32, **kw)
    assert y is out and torch.isfinite(y).all()
    ref = gemv_ref(x, w, b, residual=r, **kw)
    err = float((y.float() - ref).abs().max())
    err_torch = float((_composition(x, w, b, nw, kind, r).float() - ref).abs().max())
    assert err <= 2 * err_torch + FLOOR[dtype], (err, err_torch)


@pytest.mark.parametrize("kind", ["norm", "gate_up"])
@pytest.mark.parametrize("B,dot,block_n,split_k", [(1, False, 8, 3), (2, False, 4, 1), (3, "swap", 16, 2)])
def test_gemv_prologue_other_paths(kind, B, dot, block_n, split_k):
    """The prologues on split-K (norm: whole-row sums of squares first) and the per-row FMA path."""
    dtype = torch.bfloat16 if B == 3 else torch.float16
    x, w, b, nw = _prologue_inputs(B, 21, 70, dtype, kind, seed=7 + B)
    kw = {"norm_weight": nw} if kind == "norm" else {"gate_up": True}
    y = gemv(x, w, b, out=_poisoned(B, 21, dtype), dot=dot, block_n=block_n, block_k=16, split_k=split_k, **kw)
    assert torch.isfinite(y).all()
    ref = gemv_ref(x, w, b, **kw)
    err = float((y.float() - ref).abs().max())
    err_torch = float((_composition(x, w, b, nw, kind, None).float() - ref).abs().max())
    assert err <= 2 * err_torch + FLOOR[dtype], (err, err_torch)


def _bad_calls():
    h = torch.float16
    x = torch.randn(2, 16).to(h).to(DEV)
    w = torch.randn(8, 16).to(h).to(DEV)
    return {
        "B=9": lambda: gemv(torch.randn(9, 16).to(h).to(DEV), w),
        "B=0": lambda: gemv(torch.randn(0, 16).to(h).to(DEV), w),
        "x 1-D": lambda: gemv(x[0], w),
        "x 3-D": lambda: gemv(x[None], w),
        "w 1-D": lambda: gemv(x, w[0]),
        "K mismatch": lambda: gemv(x, torch.randn(8, 17).to(h).to(DEV)),
        "w not contiguous": lambda: gemv(x, torch.randn(16, 8).to(h).to(DEV).t()),
        "float32": lambda: gemv(x.float(), w.float()),
        "dtype mismatch": lambda: gemv(x, w.bfloat16()),
        "bias shape": lambda: gemv(x, w, torch.zeros(9, dtype=h, device=DEV)),
        "bias dtype": lambda: gemv(x, w, torch.zeros(8, dtype=torch.float32, device=DEV)),
        "out shape": lambda: gemv(x, w, out=torch.empty(2, 9, dtype=h, device=DEV)),
        "out dtype": lambda: gemv(x, w, out=torch.empty(2, 8, dtype=torch.float32, device=DEV)),
        "residual shape": lambda: gemv(x, w, residual=torch.empty(1, 8, dtype=h, device=DEV)),
        "block_n not pow2": lambda: gemv(x, w, block_n=12),
        "block_k not pow2": lambda: gemv(x, w, block_k=48),
        "split_k 0": lambda: gemv(x, w, split_k=0),
        "dot block_n 8": lambda: gemv(x, w, dot=True, block_n=8),
        "dot mode": lambda: gemv(x, w, dot="wgmma"),
        "merge": lambda: gemv(x, w, split_k=2, merge="atomic"),
        "not a tensor": lambda: gemv(x.tolist(), w),
        "norm_weight shape": lambda: gemv(x, w, norm_weight=torch.ones(15, dtype=h, device=DEV)),
        "norm_weight dtype": lambda: gemv(x, w, norm_weight=torch.ones(16, dtype=torch.float32, device=DEV)),
        "norm_weight 2-D": lambda: gemv(x, w, norm_weight=torch.ones(1, 16, dtype=h, device=DEV)),
        "norm_weight list": lambda: gemv(x, w, norm_weight=[1.0] * 16),
        "eps negative": lambda: gemv(x, w, norm_weight=torch.ones(16, dtype=h, device=DEV), eps=-1.0),
        "gate_up odd width": lambda: gemv(torch.randn(2, 17).to(h).to(DEV), w, gate_up=True),
        "gate_up width != 2K": lambda: gemv(x, w, gate_up=True),
        "norm and gate_up": lambda: gemv(torch.randn(2, 32).to(h).to(DEV), w, gate_up=True,
                                         norm_weight=torch.ones(16, dtype=h, device=DEV)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_gemv_rejects_bad_inputs(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU rule, which only applies without a GPU")
def test_gemv_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        gemv(torch.randn(1, 16).half(), torch.randn(4, 16).half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 2, 4, 8])
@pytest.mark.parametrize("N,K", [(4608, 3584), (3584, 18944), (1000, 1000)])
def test_gemv_gpu_default_configs(dtype, B, N, K):
    x, w, b = _inputs(B, N, K, dtype, True, seed=B)
    _check(gemv(x, w, b, out=_poisoned(B, N, dtype)), x, w, b)


# ----------------------------------------------------------------------------------------------------------------
# The end-to-end step's hook (kvmodel.measure.e2e_decode, linear="triton")
# ----------------------------------------------------------------------------------------------------------------


def _tiny_spec():
    from kvmodel.specs import ModelSpec

    return ModelSpec(name="tiny-gemv", vocab_size=97, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=96, qkv_bias=True, published_params=1,
                     published_params_source="test")


def _run_step(spec, linear, dtype_name, B, T, **model_kw):
    from kvmodel.measure import e2e_decode as e2e

    model = e2e.DecodeModel(spec, dtype_name, device=DEV, linear=linear, **model_kw)
    for lay in model.layers:  # a non-zero bias, so the fused bias is exercised
        lay["qkv_b"].copy_(torch.randn(lay["qkv_b"].shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    dt = model.dtype
    need = e2e.kv_cache_alloc_bytes(spec, B, T, 16, 16) * 4
    pool = torch.randn(int(need) // 2 + 4096, generator=torch.Generator().manual_seed(2)).to(dt).to(DEV)
    backend = e2e.SDPABackend(spec, B, T, e2e.Carver(pool), dt)
    torch.manual_seed(3)  # build_step draws the token ids from the global generator
    step, _, _ = model.build_step(B, T, backend)
    step()
    return step.state


def test_e2e_step_hook_uses_gemv(monkeypatch):
    """``DecodeModel(linear="triton")`` routes qkv, o, gate_up, down (per layer) and the LM head through gemv
    (the residual adds fused) and gives the logits of the F.linear step."""
    import kvmodel.kernels.gemv as gemv_mod  # noqa: F401 - the submodule (kvmodel.kernels exports the function)

    mod = __import__("sys").modules["kvmodel.kernels.gemv"]
    calls = []
    orig = mod.gemv

    def counting(x, w, bias=None, **kw):
        calls.append((tuple(w.shape), bias is not None, kw.get("residual") is not None))
        return orig(x, w, bias, **kw)

    monkeypatch.setattr(mod, "gemv", counting)
    spec = _tiny_spec()
    B, T = 2, 9
    ours = _run_step(spec, "triton", "float16", B, T)
    assert ours["gemv"] is True
    assert len(calls) == 4 * spec.num_layers + 1
    assert sum(r for _, _, r in calls) == 2 * spec.num_layers  # o and down add into the residual stream
    assert sum(b for _, b, _ in calls) == spec.num_layers  # the qkv bias
    ref = _run_step(spec, "torch", "float16", B, T)
    assert ref["gemv"] is False
    a, b = ours["logits"].float(), ref["logits"].float()
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 1e-2
    assert torch.equal(ours["ids"], ref["ids"])


def test_e2e_step_hook_falls_back():
    """float32 (gemv takes fp16/bf16) and an unknown choice."""
    from kvmodel.measure import e2e_decode as e2e

    spec = _tiny_spec()
    assert _run_step(spec, "triton", "float32", 1, 5)["gemv"] is False
    with pytest.raises(ValueError):
        e2e.DecodeModel(spec, "float16", device=DEV, linear="cutlass")
    assert e2e.OUR_RUNTIMES["torch"] == "kvmodel-graph"  # the committed rows' label is unchanged


def test_e2e_step_hook_fused(monkeypatch):
    """``DecodeModel(linear="triton-fused")``: the two RMSNorms of each layer go into the qkv and gate_up GEMVs
    and SiLU·mul into down (only the final norm launches), and the logits match the ``triton`` step's."""
    from kvmodel.measure import e2e_decode as e2e

    mod = __import__("sys").modules["kvmodel.kernels.gemv"]
    calls, small = [], []
    orig_gemv, orig_norm, orig_silu = mod.gemv, e2e.rmsnorm, e2e.silu_mul

    def counting(x, w, bias=None, **kw):
        calls.append((tuple(w.shape), kw.get("norm_weight") is not None, bool(kw.get("gate_up"))))
        return orig_gemv(x, w, bias, **kw)

    monkeypatch.setattr(mod, "gemv", counting)
    monkeypatch.setattr(e2e, "rmsnorm", lambda *a, **k: small.append("norm") or orig_norm(*a, **k))
    monkeypatch.setattr(e2e, "silu_mul", lambda *a, **k: small.append("silu") or orig_silu(*a, **k))
    spec = _tiny_spec()
    B, T = 2, 9
    fused = _run_step(spec, "triton-fused", "float16", B, T)
    assert fused["gemv"] is True and fused["fused"] is True
    L = spec.num_layers
    assert len(calls) == 4 * L + 1
    assert sum(n for _, n, _ in calls) == 2 * L and sum(g for _, _, g in calls) == L
    assert small == ["norm"]  # the final norm before the LM head
    calls.clear()
    small.clear()
    ref = _run_step(spec, "triton", "float16", B, T)
    assert ref["fused"] is False and small.count("norm") == 2 * L + 1 and small.count("silu") == L
    a, b = fused["logits"].float(), ref["logits"].float()
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 1e-2
    assert torch.equal(fused["ids"], ref["ids"])
    assert e2e.OUR_RUNTIMES["triton-fused"] == "kvmodel-graph-gemv-fused"
    assert _run_step(spec, "triton-fused", "float32", 1, 5)["fused"] is False  # falls back with the GEMV


# ----------------------------------------------------------------------------------------------------------------
# Programmatic dependent launch (gemv(pdl=True), e2e_decode --linear triton-pdl)
# ----------------------------------------------------------------------------------------------------------------


def _gemv_mod():
    import kvmodel.kernels.gemv  # noqa: F401 - the submodule (kvmodel.kernels exports the function)

    return __import__("sys").modules["kvmodel.kernels.gemv"]


@pytest.mark.parametrize("B,split_k,merge,residual", [(1, 1, "fused", False), (3, 1, "fused", True),
                                                      (2, 3, "fused", False), (5, 3, "kernel", True)])
@pytest.mark.parametrize("prefetch", [None, 0, 4096])
def test_gemv_pdl_gives_the_default_results(B, split_k, merge, residual, prefetch):
    """``pdl=True`` (any prefetch size) writes bit for bit what the default launch writes: off a Hopper GPU it is
    the default path, on one the same arithmetic launched as a programmatic dependent."""
    x, w, b = _inputs(B, N_ODD, K_ODD, torch.float16, True, seed=B + split_k)
    r = torch.randn(B, N_ODD).half().to(DEV) if residual else None
    kw = {"block_n": 8 if B == 1 else 16, "block_k": 32, "split_k": split_k, "merge": merge}
    y0 = gemv(x, w, b, out=_poisoned(B, N_ODD, torch.float16), residual=r, **kw)
    y1 = gemv(x, w, b, out=_poisoned(B, N_ODD, torch.float16), residual=r, pdl=True, prefetch_bytes=prefetch, **kw)
    assert torch.equal(y0, y1)
    _check(y1, x, w, b, residual=r)


@pytest.mark.parametrize("bad", [-16, 65552, 1.5, True, "16k"])
def test_gemv_rejects_bad_prefetch_bytes(bad):
    x, w, _ = _inputs(1, 8, 32, torch.float16, False, seed=0)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        gemv(x, w, pdl=True, prefetch_bytes=bad)


def test_use_pdl_only_on_hopper_cuda_without_the_interpreter(monkeypatch):
    """The rule that decides the PDL path: requested, Triton has grid dependency control, not interpreting, a
    CUDA device of capability >= 9 (the capability query is faked, so this runs anywhere)."""
    import importlib

    mod = _gemv_mod()
    da = importlib.import_module("kvmodel.kernels.decode_attention")  # the shared rule, kernels' pdl_available
    cap = {"v": (9, 0)}
    monkeypatch.setattr(mod.torch.cuda, "get_device_capability", lambda dev=None: cap["v"])
    monkeypatch.setattr(da, "HAVE_PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert mod.use_pdl(True, "cuda") is True
    assert mod.use_pdl(True, torch.device("cuda", 0)) is True
    assert mod.use_pdl(False, "cuda") is False
    assert mod.use_pdl(True, "cpu") is False
    cap["v"] = (8, 9)  # Ada / Ampere: no PDL
    assert mod.use_pdl(True, "cuda") is False
    cap["v"] = (10, 0)
    assert mod.use_pdl(True, "cuda") is True
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mod.use_pdl(True, "cuda") is False
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(da, "HAVE_PDL", False)
    assert mod.use_pdl(True, "cuda") is False


def test_pdl_launch_kwargs_prefetch_split_and_alignment():
    """Off: no extra kwargs (the kernel specialized as before). On: PDL, launch_pdl and the per-row prefetch
    (prefetch_bytes over min(block_n, threads) rows, rounded down to 16 B; 0 where an address would be unaligned)."""
    f = _gemv_mod().pdl_launch_kwargs
    assert f(False, 16384, 8, 4, 0, 7168, 7168) == {}
    assert f(True, 16384, 8, 4, 256, 7168, 7168) == {"PDL": True, "PF_ROW": 2048, "launch_pdl": True}
    assert f(True, 16384, 4, 4, 256, 7168, 7168)["PF_ROW"] == 4096
    assert f(True, 16384, 64, 1, 256, 7168, 7168)["PF_ROW"] == 512  # 32 threads prefetch 32 of the 64 rows
    assert f(True, 1000, 8, 4, 256, 7168, 7168)["PF_ROW"] == 112  # 125 -> a multiple of 16
    assert f(True, 0, 8, 4, 256, 7168, 7168)["PF_ROW"] == 0
    assert f(True, 16384, 8, 4, 258, 7168, 7168)["PF_ROW"] == 0  # weight not 16-byte aligned
    assert f(True, 16384, 8, 4, 256, 7170, 7168)["PF_ROW"] == 0  # row pitch K*2 not a multiple of 16
    assert f(True, 16384, 8, 4, 256, 7168, 40)["PF_ROW"] == 0  # split-K range not a multiple of 16 bytes


class _FakeLaunch:
    """Stands in for a @triton.jit kernel: records each launch's grid and kwargs."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, kw))


@pytest.mark.parametrize("split_k,merge", [(1, "fused"), (3, "fused"), (3, "kernel")])
def test_gemv_pdl_launch_kwargs_reach_both_kernels(monkeypatch, split_k, merge):
    """With PDL available (faked), gemv(pdl=True) launches the GEMV and the split-K merge kernel with
    launch_pdl=True and PDL=True (the GEMV with its prefetch); gemv() and gemv(pdl=False) pass none of those
    kwargs, so the default kernel's specialization is the one measured before."""
    mod = _gemv_mod()
    fake_g, fake_m = _FakeLaunch(), _FakeLaunch()
    monkeypatch.setattr(mod, "_gemv_kernel", fake_g)
    monkeypatch.setattr(mod, "_merge_kernel", fake_m)
    monkeypatch.setattr(mod, "use_pdl", lambda requested, device: bool(requested))
    x, w, _ = _inputs(1, 64, 256, torch.float16, False, seed=1)
    kw = {"block_n": 8, "block_k": 32, "split_k": split_k, "merge": merge}
    mod.gemv(x, w, **kw)
    mod.gemv(x, w, pdl=False, **kw)
    mod.gemv(x, w, pdl=True, prefetch_bytes=8192, **kw)
    new = {"PDL", "PF_ROW", "launch_pdl"}
    (_, k0), (_, k1), (_, k2) = fake_g.calls
    assert not new & set(k0) and not new & set(k1) and k0 == k1
    assert k2["PDL"] is True and k2["launch_pdl"] is True and k2["PF_ROW"] == 8192 // 8
    assert {k: v for k, v in k2.items() if k not in new} == k0
    if merge == "kernel":
        (_, m0), (_, m1), (_, m2) = fake_m.calls
        assert "PDL" not in m0 and "launch_pdl" not in m0 and m0 == m1
        assert m2["PDL"] is True and m2["launch_pdl"] is True
    else:
        assert fake_m.calls == []


def test_e2e_step_pdl_falls_back_to_the_triton_step_off_hopper():
    """``linear="triton-pdl"`` without PDL (CPU / interpreter) is the ``triton`` step: same logits bit for bit,
    and the row note says PDL was not active."""
    from kvmodel.measure import e2e_decode as e2e

    spec = _tiny_spec()
    pdl = _run_step(spec, "triton-pdl", "float16", 2, 9)
    ref = _run_step(spec, "triton", "float16", 2, 9)
    assert pdl["gemv"] is True and (pdl["pdl"] is False or HAS_CUDA)
    if not pdl["pdl"]:
        assert torch.equal(pdl["logits"], ref["logits"])
        assert "without PDL" in e2e.step_note("triton-pdl", pdl, 16384)
    assert e2e.OUR_RUNTIMES["triton-pdl"] == "kvmodel-graph-gemv-pdl"
    assert e2e.OUR_RUNTIMES["triton"] == "kvmodel-graph-gemv"  # the committed labels are unchanged
    assert "triton-pdl" in e2e.GEMV_LINEARS
    assert _run_step(spec, "triton-pdl", "float32", 1, 5)["pdl"] is False  # F.linear: no PDL kernels either


def test_e2e_step_pdl_routes_every_triton_kernel_through_pdl(monkeypatch):
    """With PDL available (faked), the ``triton-pdl`` step passes pdl=True (and its prefetch size) to every GEMV
    (qkv, o, gate_up, down per layer, LM head) and to every RMSNorm, RoPE and SiLU·mul launch; the kernels are
    then run without PDL here (the interpreter has none) and give the ``triton`` step's logits."""
    from kvmodel.measure import e2e_decode as e2e

    mod = _gemv_mod()
    orig_gemv, orig = mod.gemv, {n: getattr(e2e, n) for n in ("rmsnorm", "rope_qkv", "silu_mul")}
    seen = []

    def gemv_stub(x, w, bias=None, **kw):
        seen.append(("gemv", kw.pop("pdl", False), kw.pop("prefetch_bytes", None)))
        return orig_gemv(x, w, bias, **kw)

    def small(name):
        def f(*a, pdl=False, **k):
            seen.append((name, pdl, None))
            return orig[name](*a, **k)
        return f

    monkeypatch.setattr(mod, "use_pdl", lambda requested, device: bool(requested))
    monkeypatch.setattr(mod, "gemv", gemv_stub)
    for n in orig:
        monkeypatch.setattr(e2e, n, small(n))
    spec = _tiny_spec()
    L = spec.num_layers
    out = _run_step(spec, "triton-pdl", "float16", 2, 9, pdl_prefetch_bytes=8192)
    assert out["pdl"] is True
    names = [s[0] for s in seen]
    assert names.count("gemv") == 4 * L + 1 and names.count("rmsnorm") == 2 * L + 1
    assert names.count("rope_qkv") == L and names.count("silu_mul") == L
    assert all(p is True for _, p, _ in seen)
    assert all(pf == 8192 for n, _, pf in seen if n == "gemv")
    assert e2e.step_note("triton-pdl", out, 8192) == "linear=triton-pdl gemv pdl prefetch_bytes=8192"
    seen.clear()
    ref = _run_step(spec, "triton", "float16", 2, 9)
    assert all(p is False for _, p, _ in seen)
    assert torch.equal(out["logits"], ref["logits"])


def test_e2e_step_note_records_what_ran():
    from kvmodel.measure import e2e_decode as e2e

    assert e2e.step_note("triton", {"gemv": True}) == "linear=triton gemv"
    assert e2e.step_note("triton-pdl", {"gemv": False}).endswith("F.linear (B > 8 or float32)")
    assert e2e.step_note("triton-pdl", {"gemv": True, "pdl": True}, 0) == \
        "linear=triton-pdl gemv pdl prefetch_bytes=0"


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("split_k,merge", [(1, "fused"), (4, "kernel")])
def test_gemv_pdl_chain_in_a_cuda_graph_matches_reference(B, split_k, merge):
    """A chain of dependent gemv(pdl=True) calls (each reads the previous output; every other one adds into its
    input in place), captured in one CUDA graph and replayed: the same values as the default launches, and the
    fp32 reference within the usual bound — i.e. each wait really orders the reads after the predecessor."""
    g = torch.Generator().manual_seed(B)
    H, n = 1024, 6
    ws = [(torch.randn(H, H, generator=g) / H**0.5).half().cuda() for _ in range(n)]
    x0 = torch.randn(B, H, generator=g).half().cuda()
    bufs = [torch.empty(B, H, dtype=torch.float16, device="cuda") for _ in range(n + 1)]
    wsd: dict = {}

    def chain(pdl):
        bufs[0].copy_(x0)
        for i, w in enumerate(ws):
            if i % 2:  # bufs[i + 1] = bufs[i] + bufs[i] @ w.T, the residual add in place in the output
                bufs[i + 1].copy_(bufs[i])
                gemv(bufs[i], w, out=bufs[i + 1], residual=bufs[i + 1], split_k=split_k, merge=merge,
                     workspace=wsd, pdl=pdl)
            else:
                gemv(bufs[i], w, out=bufs[i + 1], split_k=split_k, merge=merge, workspace=wsd, pdl=pdl)
        return bufs[-1].clone()

    plain = chain(False)
    chain(True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(True)
    for _ in range(3):
        bufs[-1].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bufs[-1], plain)
    ref = x0.float()
    for i, w in enumerate(ws):
        ref = ref @ w.float().T + (ref if i % 2 else 0)
    assert float((plain.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_e2e_step_pdl_in_a_cuda_graph_matches_the_triton_step():
    """The ``triton-pdl`` step captured in a CUDA graph gives the ``triton`` step's logits and tokens (PDL is
    active on capability >= 9)."""
    from kvmodel.measure import e2e_decode as e2e

    spec = _tiny_spec()
    outs = {}
    for linear in ("triton", "triton-pdl"):
        model = e2e.DecodeModel(spec, "float16", device="cuda", linear=linear)
        B, T = 1, 33
        need = e2e.kv_cache_alloc_bytes(spec, B, T, 16, 16) * 4
        pool = torch.randn(int(need) // 2 + 4096, generator=torch.Generator().manual_seed(2)).half().cuda()
        backend = e2e.SDPABackend(spec, B, T, e2e.Carver(pool), model.dtype)
        torch.manual_seed(3)
        step, _, _ = model.build_step(B, T, backend)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_ids = step()
        out_ids.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        outs[linear] = (step.state["logits"].float().clone(), out_ids.clone(), step.state["pdl"])
    assert outs["triton-pdl"][2] is (torch.cuda.get_device_capability()[0] >= 9)
    a, b = outs["triton-pdl"][0], outs["triton"][0]
    assert torch.isfinite(a).all() and float((a - b).norm() / b.norm()) < 1e-3
    assert torch.equal(outs["triton-pdl"][1], outs["triton"][1])


def test_gemv_pdl_sass_keeps_the_prefetch_before_the_wait():
    """Offline sm_90 build (Triton's bundled ptxas, no GPU; a subprocess, as the interpreter is on here): the PDL
    GEMV issues launch_dependents (PREEXIT), the L2 bulk prefetch (UBLKPF.L2, not dropped by the compiler) and
    griddepcontrol.wait (ACQBULK) in that order, all before its first global load; kvmodel.kernels.gemv_pdl_sass
    exits 1 otherwise."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "kvmodel.kernels.gemv_pdl_sass", "--quick"], check=False, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode not in (0, 1):
        pytest.skip(f"offline sm_90 compile unavailable: {r.stderr[-300:]}")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout + r.stderr
    assert "(x1)" in r.stdout  # one bulk prefetch instruction in the build
