"""End-to-end decode step of a catalog architecture, with random weights, on a CUDA GPU.

What one step does (plain torch + three small Triton helpers, the whole step captured in one CUDA graph):
embedding gather of B token ids; per layer: RMSNorm, fused QKV projection (+ bias for Qwen2), RoPE on q and k and
the append of the new token's K/V into a cache preallocated at context T (one Triton kernel), attention over
T + 1 tokens by a swappable pipeline, output projection with the residual add fused (``addmm_``), RMSNorm,
fused gate/up projection, SiLU·mul (Triton), down projection with the residual add fused; final RMSNorm, LM head,
argmax. Traffic, not text, is what is measured: weights and the KV cache hold random data.

Pipelines: ``P0`` = FP16 KV through ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)``;
``P0-expand``, ``P1``, ``P5`` (``P5`` at 16/16 is our FP16 split-K kernel) through
:func:`kvmodel.kernels.pipelines.run_pipeline` on a ``QuantizedKVCache``.
Runtimes: ``kvmodel-graph`` (this step, graph-captured; projections through ``F.linear``/``addmm_``, i.e.
cuBLAS), ``kvmodel-graph-gemv`` (the same step with ``--linear triton``: the dense projections qkv, o, gate/up,
down and the LM head through the Triton weight-streaming GEMV :func:`kvmodel.kernels.gemv.gemv` at B ≤ 8,
residual adds fused; F.linear above B = 8 or in float32; MoE routed experts and routers always F.linear),
``kvmodel-graph-gemv-fused`` (``--linear triton-fused``: as ``triton``, and where the GEMV runs, the RMSNorm before
qkv and before gate/up of dense layers and the SiLU·mul before down are fused into the GEMV's prologue —
``gemv(norm_weight=)`` / ``gemv(gate_up=True)`` — dropping those three small launches per layer),
``kvmodel-graph-gemv-pdl`` (``--linear triton-pdl``: as ``triton``, with every GEMV and the RMSNorm / RoPE /
SiLU·mul kernels launched as programmatic dependents of the kernel before them (Hopper PDL: a kernel's programs
are scheduled while its predecessor drains; each GEMV program can prefetch its first ``--pdl-prefetch-bytes`` of
weights into L2 — default 0, the prefetch measured slower — then waits for the predecessor before reading its
inputs); attention and torch ops stay normal
launches; only on CUDA capability ≥ 9 — elsewhere the ``triton`` step, noted in the row), and
Hugging Face transformers' own model on the same architecture with random weights: ``hf-eager`` (DynamicCache,
eager launches) and ``hf-static-graph`` (StaticCache, the forward captured in a CUDA graph by hand;
torch.compile "reduce-overhead" as the fallback).

Rows (``e2e_decode.csv``): model,B,T,k_bits,v_bits,pipeline,runtime,median_s,... with the bytes a step must move
(``bytes_weights``, ``bytes_kv``), ``floor_s`` = those bytes / the measured read ceiling, and ``pct_of_floor``.
``attn_s`` is the time of the step's attention calls alone (all layers, graph-captured), so the step splits into
attention and the rest.

    python -m kvmodel.measure.e2e_decode --out validation/data/h200/e2e_decode.csv \
        --models Llama-3.1-8B --batches 1,16 --contexts 1k,32k --formats P0:16/16,P5:4/4 --read-ceiling 4400
    python -m kvmodel.measure.e2e_decode --out validation/data/h200/e2e_decode.csv --fill-bytes   # bytes only

torch/triton/transformers are imported lazily: the byte arithmetic here works on any machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from kvmodel import traffic
from kvmodel.architecture import param_breakdown
from kvmodel.measure.results import ResultsFile
from kvmodel.specs import KVFormat, ModelSpec, get_model, parse_tokens

E2E_FIELDS = [
    "model", "B", "T", "k_bits", "v_bits", "pipeline", "runtime", "median_s", "p10_s", "p90_s", "attn_s",
    "n_layers", "bytes_weights", "bytes_kv", "bytes_kv_pipeline", "bytes_total", "read_ceiling_GBps", "floor_s",
    "pct_of_floor", "dtype", "group", "status", "note",
]
E2E_KEYS = ["model", "B", "T", "k_bits", "v_bits", "pipeline", "runtime"]
#: our step's ``runtime`` label per ``--linear`` choice. The projection implementation is recorded in the existing
#: ``runtime`` key column, not a new one: the committed e2e_decode.csv's header has no such column and
#: ResultsFile refuses rows with columns the header lacks (a resumed run would fail). Calibration and validation
#: read "kvmodel-graph" rows only, so rows measured with the Triton GEMV stay out of them.
OUR_RUNTIMES = {"torch": "kvmodel-graph", "triton": "kvmodel-graph-gemv", "triton-fused": "kvmodel-graph-gemv-fused",
                "triton-pdl": "kvmodel-graph-gemv-pdl"}
#: the ``--linear`` choices whose step runs the Triton GEMV (at B ≤ 8, fp16/bf16)
GEMV_LINEARS = ("triton", "triton-fused", "triton-pdl")

GiB = 1024**3
DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3.1-8B", "Mistral-Small-3.1-24B")
DEFAULT_BATCHES = (1, 4, 16, 64, 128)
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
#: memory kept free beside weights + KV (CUDA context, cuBLAS workspace, activations, graph pools)
DEFAULT_MARGIN_BYTES = 6 * GiB

# Architectures used when the catalog lacks them (values from each model's config.json).
FALLBACK_MODELS = {
    "Qwen2.5-0.5B": dict(
        hf_id="Qwen/Qwen2.5-0.5B", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, intermediate_size=4864, tie_embeddings=True, qkv_bias=True,
        published_params=494032768, published_params_source="fallback in kvmodel.measure.e2e_decode"),
    "Qwen2.5-7B": dict(
        hf_id="Qwen/Qwen2.5-7B", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, intermediate_size=18944, tie_embeddings=False, qkv_bias=True,
        published_params=7615616512, published_params_source="fallback in kvmodel.measure.e2e_decode"),
    "Mistral-Small-3.1-24B": dict(
        hf_id="mistralai/Mistral-Small-3.1-24B-Base-2503", vocab_size=131072, hidden_size=5120, num_layers=40,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=32768, tie_embeddings=False,
        published_params=23572403200, published_params_source="fallback in kvmodel.measure.e2e_decode (text)"),
}


def resolve_model(name: str) -> ModelSpec:
    """A catalog model (any alias), else one of :data:`FALLBACK_MODELS`."""
    try:
        return get_model(name)
    except KeyError:
        for key, kw in FALLBACK_MODELS.items():
            if key.lower() == name.lower():
                return ModelSpec(name=key, **kw)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Bytes a step must move (no torch)
# ----------------------------------------------------------------------------------------------------------------


def _symbols(spec: ModelSpec, B=1, T=1, k_bits: int = 16, v_bits: int = 16, group: int = 32,
             bytes_per_param: float = 2.0) -> dict:
    """Symbol values of :mod:`kvmodel.symbolic` for this model, format and (B, T): the one place the byte counts
    below come from (``kvmodel.traffic.model_symbols`` / ``kv_symbols``)."""
    vals = dict(traffic.model_symbols(spec))
    vals.update(traffic.kv_symbols(KVFormat(k_bits=k_bits, v_bits=v_bits, group_size=group)))
    vals.update(B=B, T=T, b_w=bytes_per_param)
    return vals


#: extra KV-side bytes of a pipeline over its GQA-aware base: (formula, base formula), both per layer
_PIPELINE_EXTRA = {
    "P1": ("attn_bytes_P1", "attn_bytes_P5"),
    "P1-expand": ("attn_bytes_P1_expand", "attn_bytes_P5"),
    "P0-expand": ("attn_bytes_P0_expand", "attn_bytes_P0"),
}


def kv_bytes_per_token(spec: ModelSpec, k_bits: int, v_bits: int, group: int = 32) -> float:
    """KV-cache bytes per token over all layers (``kv_bytes_per_token``: data + per-group metadata)."""
    return float(traffic.evaluate("kv_bytes_per_token", _symbols(spec, 1, 1, k_bits, v_bits, group)))


def weight_bytes_per_step(spec: ModelSpec, B: int, bytes_per_param: float = 2.0,
                          experts_touched: Optional[float] = None) -> float:
    """Weights one step streams (``weight_bytes_streamed``): every always-active matrix once, the LM head once
    (the embedding table when tied), the B gathered embedding rows, and the routed experts touched — the
    uniform-routing expectation, or ``experts_touched`` per MoE layer when counted
    (``weight_bytes_streamed_given_experts``)."""
    vals = _symbols(spec, B, 1, bytes_per_param=bytes_per_param)
    if experts_touched is None:
        return float(traffic.evaluate("weight_bytes_streamed", vals))
    return float(traffic.evaluate("weight_bytes_streamed_given_experts", {**vals, "n_exp": experts_touched}))


def pipeline_extra_bytes(spec: ModelSpec, B: int, T: int, k_bits: int, v_bits: int, pipeline: str,
                         group: int = 32) -> float:
    """Bytes ``pipeline`` moves beyond its fused / GQA-aware base, all layers: P1's FP16 buffer (written and read,
    for the halves stored below 16 bits), P0-expand's per-query-head copy. The per-layer attention formulas are
    linear in T with a T-free q/o term, so their difference summed over layers is the difference evaluated at
    T = ``cached_token_layers`` (sliding-window layers contribute their window)."""
    if pipeline not in _PIPELINE_EXTRA:
        return 0.0
    name, base = _PIPELINE_EXTRA[pipeline]
    vals = _symbols(spec, B, T, k_bits, v_bits, group)
    vals["T"] = traffic.evaluate("cached_token_layers", vals)
    return float(traffic.evaluate(name, vals) - traffic.evaluate(base, vals))


def step_bytes(spec: ModelSpec, B: int, T: int, k_bits: int = 16, v_bits: int = 16, pipeline: str = "P0",
               group: int = 32, bytes_per_param: float = 2.0, experts_touched: Optional[float] = None) -> dict:
    """Compulsory bytes of one step at context T, from :mod:`kvmodel.symbolic`: ``bytes_weights`` =
    ``weight_bytes_streamed``, ``bytes_kv`` = ``kv_read_bytes`` (T cached tokens; windowed layers their window)
    + ``kv_write_bytes`` (the new token), ``bytes_total`` = their sum; ``bytes_kv_pipeline`` adds what the
    pipeline moves beyond that (:func:`pipeline_extra_bytes`)."""
    w = weight_bytes_per_step(spec, B, bytes_per_param, experts_touched)
    vals = _symbols(spec, B, T, k_bits, v_bits, group, bytes_per_param)
    kv = float(traffic.evaluate("kv_read_bytes", vals) + traffic.evaluate("kv_write_bytes", vals))
    pipe = kv + pipeline_extra_bytes(spec, B, T, k_bits, v_bits, pipeline, group)
    return {"bytes_weights": w, "bytes_kv": kv, "bytes_kv_pipeline": pipe, "bytes_total": w + kv}


def kv_cache_alloc_bytes(spec: ModelSpec, B: int, T: int, k_bits: int, v_bits: int, group: int = 32,
                         pipeline: str = "P0", slack_tokens: int = 1) -> float:
    """Device memory the cache (and, for P1/P0-expand, one layer's scratch buffers) takes in this harness, which
    caches T + ``slack_tokens`` tokens in every layer (it does not implement sliding windows). The scratch is half
    the pipeline's extra traffic of one layer at T + 1 tokens (it is written once and read once)."""
    total = B * (T + slack_tokens) * kv_bytes_per_token(spec, k_bits, v_bits, group)
    if pipeline in _PIPELINE_EXTRA:
        name, base = _PIPELINE_EXTRA[pipeline]
        vals = _symbols(spec, B, T + 1, k_bits, v_bits, group)
        total += float(traffic.evaluate(name, vals) - traffic.evaluate(base, vals)) / 2
    return total


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def fill_bytes(path, ceiling_GBps: Optional[float] = None) -> int:
    """Recompute the derived byte columns of an ``e2e_decode.csv`` in place with :func:`step_bytes`
    (:mod:`kvmodel.symbolic`): ``bytes_weights``, ``bytes_kv``, ``bytes_kv_pipeline``, ``bytes_total``, and
    ``floor_s`` = bytes_total / read ceiling, ``pct_of_floor`` = 100 · floor_s / median_s where the row has a
    ceiling (its ``read_ceiling_GBps``, else ``ceiling_GBps``) and a median. Measured columns (``median_s``,
    ``p10_s``, ``p90_s``, ``attn_s``, status, note) are never changed. MoE rows keep the uniform-routing
    expectation (the measured expert count is not in the file). Written atomically; returns the rows updated."""
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    from kvmodel.atomic import atomic_write_text  # noqa: PLC0415

    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)  # one row per line; each keeps its own line ending
    if not lines:
        return 0
    fields = next(csv.reader([lines[0]]))
    out, n = [lines[0]], 0
    for line in lines[1:]:
        body = line.rstrip("\r\n")
        if not body:
            out.append(line)
            continue
        r = dict(zip(fields, next(csv.reader([body]))))
        spec = resolve_model(r["model"])
        sb = step_bytes(spec, int(r["B"]), int(r["T"]), int(r["k_bits"]), int(r["v_bits"]), r["pipeline"],
                        int(r.get("group") or 32))
        for k, v in sb.items():
            r[k] = repr(float(v))
        ceiling = _num(r.get("read_ceiling_GBps")) or ceiling_GBps
        if ceiling:
            floor_s = sb["bytes_total"] / (ceiling * 1e9)
            r["floor_s"] = repr(floor_s)
            med = _num(r.get("median_s"))
            if med:
                r["pct_of_floor"] = repr(100.0 * floor_s / med)
        buf = io.StringIO()
        csv.writer(buf, lineterminator=line[len(body):]).writerow([r[k] for k in fields])
        out.append(buf.getvalue())
        n += 1
    atomic_write_text(path, "".join(out))
    return n


# ----------------------------------------------------------------------------------------------------------------
# Small fused helpers (Triton): RMSNorm, RoPE + KV append, SiLU·mul
# ----------------------------------------------------------------------------------------------------------------

_K = {}
triton = tl = None
gdc_launch_dependents = gdc_wait = None


def _pdl_kw(pdl: bool) -> dict:
    """Launch kwargs of a small kernel's PDL variant (``{}``: the normal kernel, specialized as before)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {}


def _kernels():
    global triton, tl  # module globals: the Triton interpreter resolves `tl` through the kernel's globals
    if _K:
        return _K
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    global gdc_launch_dependents, gdc_wait  # likewise: the PDL variants' grid dependency control
    from kvmodel.kernels.decode_attention import gdc_launch_dependents, gdc_wait  # noqa: PLC0415

    # PDL (constexpr, default False: the normal kernels unchanged): launched with launch_pdl=True after another
    # kernel; lets its own dependent be scheduled at once and waits for its predecessor before the first read

    @triton.jit
    def rmsnorm_kernel(x_ptr, w_ptr, out_ptr, H, eps, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + offs, (x * r * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, Hq, Hkv, s_qkv_b,
                        sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, HALF: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        src = qkv_ptr + b * s_qkv_b + h * (2 * HALF)
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        c = tl.load(cos_ptr + offs)
        s = tl.load(sin_ptr + offs)
        if h < Hq + Hkv:
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
        else:
            y1 = x1
            y2 = x2
        if h < Hq:
            dst = q_ptr + b * sq_b + h * sq_h
        elif h < Hq + Hkv:
            dst = k_ptr + b * sk_b + (h - Hq) * sk_h
        else:
            dst = v_ptr + b * sv_b + (h - Hq - Hkv) * sv_h
        tl.store(dst + offs, y1.to(q_ptr.dtype.element_ty))
        tl.store(dst + HALF + offs, y2.to(q_ptr.dtype.element_ty))

    @triton.jit
    def silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < inter
        g = tl.load(gu_ptr + b * 2 * inter + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + b * 2 * inter + inter + offs, mask=m, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + b * inter + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    _K.update(rmsnorm=rmsnorm_kernel, rope=rope_qkv_kernel, silu=silu_mul_kernel, triton=triton)
    return _K


def rmsnorm(x, w, out, eps: float = 1e-6, pdl: bool = False):
    """``pdl``: launch the PDL variant (callers pass ``kvmodel.kernels.gemv.use_pdl(...)``: True only where
    programmatic dependent launch is available); the same for :func:`rope_qkv` and :func:`silu_mul`."""
    k = _kernels()
    B, H = x.shape
    k["rmsnorm"][(B,)](x, w, out, H, eps, BLOCK=k["triton"].next_power_of_2(H), num_warps=8 if H > 2048 else 4,
                       **_pdl_kw(pdl))
    return out


def rope_qkv(qkv, cos, sin, q_out, k_dst, v_dst, num_heads: int, num_kv_heads: int, pdl: bool = False):
    """RoPE (rotate-half) on the q and k heads of ``qkv[B, (Hq+2Hkv)·d]``; q to ``q_out[B, Hq, d]``, k and v to
    ``k_dst``/``v_dst`` (``[B, Hkv, d]`` views, e.g. the cache slot of the new token)."""
    k = _kernels()
    B = qkv.shape[0]
    d = q_out.shape[-1]
    grid = (B, num_heads + 2 * num_kv_heads)
    k["rope"][grid](qkv, cos, sin, q_out, k_dst, v_dst, num_heads, num_kv_heads, qkv.stride(0),
                    q_out.stride(0), q_out.stride(1), k_dst.stride(0), k_dst.stride(1),
                    v_dst.stride(0), v_dst.stride(1), HALF=d // 2, num_warps=1, **_pdl_kw(pdl))


def silu_mul(gu, out, pdl: bool = False):
    k = _kernels()
    B, two_i = gu.shape
    inter = two_i // 2
    BLOCK = 1024
    k["silu"][(B, k["triton"].cdiv(inter, BLOCK))](gu, out, inter, BLOCK=BLOCK, num_warps=4, **_pdl_kw(pdl))
    return out


def rope_tables(d: int, position: int, theta: float = 1e6, device="cuda"):
    import torch  # noqa: PLC0415

    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = position * inv
    return (torch.cos(ang).to(torch.float32).to(device).contiguous(),
            torch.sin(ang).to(torch.float32).to(device).contiguous())


# ----------------------------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------------------------


class Carver:
    """Hands out tensors carved from one flat random pool (so a new config needs no new random fill)."""

    def __init__(self, pool):
        self.pool = pool.view(-1).view(__import__("torch").uint8)
        self.off = 0

    def take(self, shape, dtype):
        import torch  # noqa: PLC0415

        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.off = (self.off + 255) // 256 * 256
        if self.off + n > self.pool.numel():
            raise MemoryError(f"KV pool too small: need {self.off + n} bytes, have {self.pool.numel()}")
        t = self.pool[self.off:self.off + n].view(dtype).view(shape)
        self.off += n
        return t


@dataclass
class LayerCache:
    k: object  # fp16 [B, Hkv, Tcap, d] or a pipeline's cache object
    v: object
    state: object = None  # whatever a pipeline needs


class SDPABackend:
    """P0: FP16 KV, ``scaled_dot_product_attention(enable_gqa=True)`` (PyTorch picks flash attention)."""

    name = "P0"
    k_bits = v_bits = 16
    writes_cache_directly = True

    def __init__(self, spec: ModelSpec, B: int, T: int, carver: Carver, dtype):
        import torch  # noqa: PLC0415

        self.spec, self.B, self.T = spec, B, T
        H, d = spec.num_kv_heads, spec.head_dim
        self.layers = [LayerCache(carver.take((B, H, T + 1, d), dtype), carver.take((B, H, T + 1, d), dtype))
                       for _ in range(spec.num_layers)]
        self.torch = torch

    def slot(self, layer: int):
        c = self.layers[layer]
        return c.k[:, :, self.T], c.v[:, :, self.T]

    def append(self, layer: int, k_new, v_new):  # already written by rope_qkv
        return None

    def attend(self, layer: int, q):
        """q [B, Hq, d] -> [B, Hq, d]."""
        F = self.torch.nn.functional
        c = self.layers[layer]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), c.k, c.v, enable_gqa=True)
        return o.squeeze(2)


class KernelPipelineBackend:
    """P0-expand / P1 / P5 from :mod:`kvmodel.kernels.pipelines`: rope_qkv writes the new K/V to a staging
    buffer, the kernels' append quantizes it into slot T, ``run_pipeline`` attends over T + 1 tokens."""

    writes_cache_directly = False

    def __init__(self, name: str, spec: ModelSpec, B: int, T: int, carver: Carver, dtype, k_bits: int,
                 v_bits: int, group: int = 32):
        import torch  # noqa: PLC0415

        from kvmodel.kernels import pipelines  # noqa: PLC0415 - raises ImportError until it exists

        self.name, self.spec, self.B, self.T = name, spec, B, T
        self.k_bits, self.v_bits, self.group = k_bits, v_bits, group
        self.torch = torch
        self.mod = pipelines
        H, d = spec.num_kv_heads, spec.head_dim
        dev = carver.pool.device
        self.kstage = torch.empty(B, H, d, device=dev, dtype=dtype)
        self.vstage = torch.empty(B, H, d, device=dev, dtype=dtype)
        self.impl = _make_pipeline(pipelines, name, spec, B, T, carver, dtype, k_bits, v_bits, group)

    def slot(self, layer: int):
        return self.kstage, self.vstage

    def append(self, layer: int, k_new, v_new):
        self.impl.append(layer, k_new, v_new)

    def attend(self, layer: int, q):
        return self.impl.attend(layer, q)


class _PipelineImpl:
    """Per-layer QuantizedKVCache objects carved from the pool; append + attend through the kernels package."""

    def __init__(self, pipelines, name, spec, B, T, carver, dtype, k_bits, v_bits, group, options=None):
        import torch  # noqa: PLC0415

        from kvmodel.kernels import quant  # noqa: PLC0415

        if name not in pipelines.PIPELINES:
            raise ValueError(f"unknown pipeline {name!r}; known: {list(pipelines.PIPELINES)}")
        if dtype != torch.float16:
            raise ValueError("the kernels' pipelines take float16 q/K/V")
        if name in ("P0", "P0-expand") and (k_bits, v_bits) != (16, 16):
            raise ValueError(f"{name} reads an FP16 cache")
        self.torch, self.quant, self.pipelines, self.name = torch, quant, pipelines, name
        H, d = spec.num_kv_heads, spec.head_dim
        dev = carver.pool.device

        # Capacity rounded up to a multiple of 64 tokens, as serving caches are allocated (paged blocks, or a
        # preallocated max length): per-head strides stay 16-byte aligned, which the kernel's asynchronous
        # (cp.async) scale loads need. Only T + 1 tokens are attended.
        cap = -(-(T + 1) // 64) * 64

        def qtensor(bits, layout="channel"):
            if bits == 16:
                return quant.QuantizedTensor(carver.take((B, H, cap, d), torch.float16), None, None, 16,
                                             group, False, d)
            rows = quant.data_rows(cap, layout, bits)
            data = carver.take((B, H, rows, quant.packed_dim(d, bits, layout)), torch.uint8)
            scales = carver.take((B, H, cap, d // group), torch.float16)
            scales.uniform_(0.005, 0.02)  # finite, realistic scales (the data bytes are random codes)
            return quant.QuantizedTensor(data, scales, None, bits, group, False, d, layout)

        # V in the layout serving caches are allocated in by default (kernels.quant.default_v_layout)
        self.caches = [quant.QuantizedKVCache(qtensor(k_bits), qtensor(v_bits, quant.default_v_layout(v_bits, d)),
                                              T + 1)
                       for _ in range(spec.num_layers)]
        self.pos = torch.full((B,), T, dtype=torch.int32, device=dev)
        self.options = dict(options or {})
        if name == "P5":
            self.options.setdefault("workspace", {})

    def append(self, layer, k_new, v_new):
        """quant.append_kv without its host-side position check (a device sync, not allowed in graph capture)."""
        self.quant.launch_append(self.caches[layer], k_new, v_new, self.pos)

    def attend(self, layer, q):
        return self.pipelines.run_pipeline(self.name, q, self.caches[layer], **self.options)


def _make_pipeline(pipelines, name, spec, B, T, carver, dtype, k_bits, v_bits, group):
    """Adapter to :mod:`kvmodel.kernels.pipelines` (``run_pipeline(name, q, QuantizedKVCache)``)."""
    return _PipelineImpl(pipelines, name, spec, B, T, carver, dtype, k_bits, v_bits, group)


def make_backend(pipeline: str, spec, B, T, carver, dtype, k_bits, v_bits, group=32):
    if pipeline == "P0":
        if (k_bits, v_bits) != (16, 16):
            raise ValueError("P0 is FP16 KV")
        return SDPABackend(spec, B, T, carver, dtype)
    return KernelPipelineBackend(pipeline, spec, B, T, carver, dtype, k_bits, v_bits, group)


# ----------------------------------------------------------------------------------------------------------------
# Our decode step
# ----------------------------------------------------------------------------------------------------------------


class DecodeModel:
    """Random weights of ``spec`` on the GPU, laid out as a fused-projection decode runtime would hold them."""

    def __init__(self, spec: ModelSpec, dtype_name: str = "float16", seed: int = 0, device: str = "cuda",
                 linear: str = "torch", pdl_prefetch_bytes: Optional[int] = None):
        """``linear``: "torch" (F.linear / addmm_, cuBLAS), "triton" (:func:`kvmodel.kernels.gemv.gemv` for
        the dense projections when B ≤ 8 and the dtype is fp16/bf16), "triton-fused" (as "triton", with the
        RMSNorm / SiLU·mul prologues fused into the qkv, gate/up and down GEMVs) or "triton-pdl" (as "triton",
        the GEMVs and the small Triton kernels as programmatic dependent launches, each GEMV program prefetching
        ``pdl_prefetch_bytes`` of weights, default ``gemv.DEFAULT_PREFETCH_BYTES``; see the module docstring)."""
        import torch  # noqa: PLC0415

        if linear not in OUR_RUNTIMES:
            raise ValueError(f"linear must be one of {list(OUR_RUNTIMES)}, got {linear!r}")
        self.linear = linear
        self.pdl_prefetch_bytes = pdl_prefetch_bytes
        if spec.mla:
            raise NotImplementedError(f"{spec.name}: MLA attention is not implemented in the e2e step")
        if spec.head_dim & (spec.head_dim - 1):
            raise NotImplementedError(f"{spec.name}: head_dim {spec.head_dim} is not a power of two")
        self.spec, self.torch = spec, torch
        self.dtype = getattr(torch, dtype_name)
        self.dtype_name = dtype_name
        self.device = device
        g = torch.Generator(device=device).manual_seed(seed)
        dt, dev = self.dtype, device
        h, d, L = spec.hidden_size, spec.head_dim, spec.num_layers
        Hq, Hkv = spec.num_heads, spec.num_kv_heads

        def W(n, k):
            t = torch.empty(n, k, device=dev, dtype=dt)
            t.normal_(0.0, 1.0 / math.sqrt(k), generator=g)
            return t

        self.embed = W(spec.vocab_size, h)
        self.lm_head = self.embed if spec.tie_embeddings else W(spec.vocab_size, h)
        self.final_norm = torch.ones(h, device=dev, dtype=dt)
        self.layers = []
        gated = spec.mlp == "gated"
        for i in range(L):
            lay = {
                "in_norm": torch.ones(h, device=dev, dtype=dt),
                "post_norm": torch.ones(h, device=dev, dtype=dt),
                "qkv": W((Hq + 2 * Hkv) * d, h),
                "qkv_b": (torch.zeros((Hq + 2 * Hkv) * d, device=dev, dtype=dt) if spec.qkv_bias else None),
                "o": W(h, Hq * d),
            }
            moe = spec.moe
            if moe and i >= moe.first_dense_layers:
                ie = moe.expert_intermediate_size
                lay["router"] = W(moe.num_experts, h)
                lay["experts_gu"] = [W(2 * ie if gated else ie, h) for _ in range(moe.num_experts)]
                lay["experts_d"] = [W(h, ie) for _ in range(moe.num_experts)]
                if moe.num_shared_experts:
                    si = (moe.shared_intermediate_size or ie) * moe.num_shared_experts
                    lay["gu"] = W(2 * si if gated else si, h)
                    lay["down"] = W(h, si)
            else:
                lay["gu"] = W(2 * spec.intermediate_size if gated else spec.intermediate_size, h)
                lay["down"] = W(h, spec.intermediate_size)
            self.layers.append(lay)
        if device != "cpu":
            torch.cuda.synchronize()

    def weight_bytes_resident(self) -> int:
        t = self.torch
        n = self.embed.numel() + (0 if self.lm_head is self.embed else self.lm_head.numel())
        for lay in self.layers:
            for v in lay.values():
                if isinstance(v, t.Tensor):
                    n += v.numel()
                elif isinstance(v, list):
                    n += sum(x.numel() for x in v)
        return n * self.embed.element_size()

    def build_step(self, B: int, T: int, backend, theta: float = 1e6, routing_seed: int = 0):
        """A closure that runs one decode step at batch B over context T (static shapes: graph-capturable),
        and a closure that runs only the attention calls of every layer."""
        torch, spec = self.torch, self.spec
        F = torch.nn.functional
        dt, dev = self.dtype, self.device
        h, d = spec.hidden_size, spec.head_dim
        Hq, Hkv = spec.num_heads, spec.num_kv_heads
        gated = spec.mlp == "gated"
        ids = torch.randint(0, spec.vocab_size, (B,), device=dev)
        x = torch.empty(B, h, device=dev, dtype=dt)
        hn = torch.empty(B, h, device=dev, dtype=dt)
        q = torch.empty(B, Hq, d, device=dev, dtype=dt)
        cos, sin = rope_tables(d, T, theta, dev)
        out_ids = torch.empty(B, dtype=torch.long, device=dev)
        bufs = {}

        def buf(name, shape):
            if name not in bufs:
                bufs[name] = torch.empty(*shape, device=dev, dtype=dt)
            return bufs[name]

        # Dense projections: y = src @ W.T (+ b) and dst += src @ W.T, through the Triton GEMV when asked for
        # (small batch, half precision), else F.linear / addmm_ (cuBLAS).
        use_gemv = False
        if self.linear in GEMV_LINEARS:
            from kvmodel.kernels.gemv import DTYPES, MAX_B, gemv, use_pdl  # noqa: PLC0415

            use_gemv = B <= MAX_B and dt in DTYPES
        # "triton-fused": rmsnorm into the qkv / gate_up GEMVs, silu_mul into down (dense MLPs: MoE layers keep hn)
        fused = use_gemv and self.linear == "triton-fused"
        # "triton-pdl": where the GEMV runs and the device has PDL (else exactly the "triton" step)
        pdl = use_gemv and self.linear == "triton-pdl" and use_pdl(True, x.device)
        gkw = {"pdl": True, "prefetch_bytes": self.pdl_prefetch_bytes} if pdl else {}
        gemv_ws = {}  # split-K partials and counters, allocated on the first (eager) call, reused in the graph

        def lin(src, w, b=None):
            if use_gemv:
                return gemv(src, w, b, workspace=gemv_ws, **gkw)
            return F.linear(src, w, b)

        def lin_add_(dst, src, w):
            if use_gemv:
                gemv(src, w, out=dst, residual=dst, workspace=gemv_ws, **gkw)
            else:
                dst.addmm_(src, w.t())

        # MoE routing is drawn once here (static for capture): each token picks top_k distinct experts.
        touched = {}
        gen = torch.Generator().manual_seed(routing_seed)
        if spec.moe:
            for i, lay in enumerate(self.layers):
                if "router" in lay:
                    picks = torch.stack([torch.randperm(spec.moe.num_experts, generator=gen)[: spec.moe.top_k]
                                         for _ in range(B)])
                    touched[i] = sorted(set(picks.flatten().tolist()))

        def mlp(lay, src, dst, norm_w=None):  # dst += MLP(src) (MLP(rmsnorm(src, norm_w)) when norm_w is given)
            if "gu" in lay:
                if norm_w is not None:
                    gu = gemv(src, lay["gu"], norm_weight=norm_w, workspace=gemv_ws)
                else:
                    gu = lin(src, lay["gu"])
                if gated and fused:
                    gemv(gu, lay["down"], out=dst, residual=dst, gate_up=True, workspace=gemv_ws)
                    return
                if gated:
                    a = silu_mul(gu, buf(f"act{gu.shape[1]}", (B, gu.shape[1] // 2)), pdl=pdl)
                else:
                    a = F.gelu(gu)
                lin_add_(dst, a, lay["down"])

        def step():
            torch.index_select(self.embed, 0, ids, out=x)
            for i, lay in enumerate(self.layers):
                if fused:
                    qkv = gemv(x, lay["qkv"], lay["qkv_b"], norm_weight=lay["in_norm"], workspace=gemv_ws)
                else:
                    rmsnorm(x, lay["in_norm"], hn, pdl=pdl)
                    qkv = lin(hn, lay["qkv"], lay["qkv_b"])
                k_dst, v_dst = backend.slot(i)
                rope_qkv(qkv, cos, sin, q, k_dst, v_dst, Hq, Hkv, pdl=pdl)
                if not backend.writes_cache_directly:
                    backend.append(i, k_dst, v_dst)
                o = backend.attend(i, q)
                lin_add_(x, o.reshape(B, Hq * d), lay["o"])
                if fused and "router" not in lay:
                    mlp(lay, x, x, norm_w=lay["post_norm"])  # reads x whole (the norm) before down writes it
                    continue
                rmsnorm(x, lay["post_norm"], hn, pdl=pdl)
                if "router" in lay:
                    F.linear(hn, lay["router"]).softmax(-1)
                    mlp(lay, hn, x)  # shared experts, if any
                    for e in touched[i]:
                        gu = F.linear(hn, lay["experts_gu"][e])
                        a = (silu_mul(gu, buf(f"act{gu.shape[1]}", (B, gu.shape[1] // 2)), pdl=pdl) if gated
                             else F.gelu(gu))
                        x.addmm_(a, lay["experts_d"][e].t())
                else:
                    mlp(lay, hn, x)
            rmsnorm(x, self.final_norm, hn, pdl=pdl)
            logits = lin(hn, self.lm_head)
            torch.argmax(logits, dim=-1, out=out_ids)
            state["logits"] = logits
            return out_ids

        state = {"ids": ids, "x": x, "touched": touched, "gemv": use_gemv, "fused": fused, "pdl": pdl}
        step.state = state

        def attention_only():
            for i in range(len(self.layers)):
                backend.attend(i, q)

        n_touched = (sum(len(v) for v in touched.values()) / max(1, len(touched))) if touched else None
        return step, attention_only, n_touched


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers runtimes
# ----------------------------------------------------------------------------------------------------------------


def hf_config(spec: ModelSpec):
    """A transformers config for ``spec`` (Llama / Qwen2 / Mistral class by name and biases); no download."""
    import transformers  # noqa: PLC0415

    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, tie_word_embeddings=spec.tie_embeddings,
        max_position_embeddings=max(spec.max_context_tokens, 40000), rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    name = spec.name.lower()
    if spec.moe or spec.mla:
        raise NotImplementedError(f"{spec.name}: HF runtimes cover dense GQA models only here")
    if name.startswith("qwen2") or (spec.qkv_bias and spec.hidden_size // spec.num_heads == spec.head_dim):
        cfg = transformers.Qwen2Config(**common)
    elif name.startswith("mistral"):
        cfg = transformers.MistralConfig(head_dim=spec.head_dim, sliding_window=None, **common)
    else:
        cfg = transformers.LlamaConfig(head_dim=spec.head_dim, attention_bias=spec.qkv_bias, **common)
    return cfg


class HFRunner:
    def __init__(self, spec: ModelSpec, dtype_name: str = "float16"):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.torch, self.spec = torch, spec
        self.dtype = getattr(torch, dtype_name)
        self.cfg = hf_config(spec)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device("cuda"):
                self.model = transformers.AutoModelForCausalLM.from_config(self.cfg, trust_remote_code=False)
        finally:
            torch.set_default_dtype(prev)
        self.model = self.model.to(self.dtype).eval()
        self.transformers = transformers

    def _kv(self, B, T):
        t = self.torch
        s = self.spec
        return (t.randn(B, s.num_kv_heads, T, s.head_dim, device="cuda", dtype=self.dtype),
                t.randn(B, s.num_kv_heads, T, s.head_dim, device="cuda", dtype=self.dtype))

    def time_eager(self, B: int, T: int, min_time_s: float = 0.3, max_steps: int = 30):
        """Median seconds of one ``model(...)`` step with a DynamicCache holding T tokens (cropped back to T
        after each step, outside the timed region)."""
        torch = self.torch
        cache = self.transformers.DynamicCache(config=self.cfg)
        for layer in range(self.spec.num_layers):
            k, v = self._kv(B, T)
            cache.update(k, v, layer)
            del k, v
        ids = torch.randint(0, self.spec.vocab_size, (B, 1), device="cuda")
        pos = torch.full((B, 1), T, device="cuda", dtype=torch.long)
        times = []
        with torch.inference_mode():
            for i in range(max_steps + 2):
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
                b.record()
                b.synchronize()
                cache.crop(-1)
                if i >= 2:
                    times.append(a.elapsed_time(b) * 1e-3)
                    if sum(times) > min_time_s and len(times) >= 5:
                        break
        del cache
        return _median(times), "DynamicCache, eager"

    def time_static_graph(self, B: int, T: int, min_time_s: float = 0.3, max_replays: int = 30):
        """Median seconds of one step with a StaticCache (max_cache_len T+64) replayed from a CUDA graph captured
        by hand; torch.compile(mode='reduce-overhead') if capture fails."""
        torch = self.torch
        cache = self.transformers.StaticCache(config=self.cfg, max_cache_len=T + 64)
        for layer in range(self.spec.num_layers):
            k, v = self._kv(B, T)
            cache.layers[layer].update(k, v)
            del k, v
        ids = torch.randint(0, self.spec.vocab_size, (B, 1), device="cuda")
        pos = torch.full((B, 1), T, device="cuda", dtype=torch.long)

        def reset():
            for lay in cache.layers:
                lay.cumulative_length.fill_(T)

        def fwd():
            return self.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits

        detail = "StaticCache, manual CUDA graph"
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    reset()
                    fwd()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            try:
                graph = torch.cuda.CUDAGraph()
                reset()
                with torch.cuda.graph(graph):
                    fwd()
                run = graph.replay
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                graph = None
                err = f"{type(e).__name__}: {str(e)[:120]}"
                compiled = torch.compile(fwd, mode="reduce-overhead", fullgraph=False)
                for _ in range(3):
                    reset()
                    compiled()
                run = compiled
                detail = f"StaticCache, torch.compile reduce-overhead (manual capture failed: {err})"
            times = []
            for i in range(max_replays + 2):
                reset()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                b.synchronize()
                if i >= 2:
                    times.append(a.elapsed_time(b) * 1e-3)
                    if sum(times) > min_time_s and len(times) >= 5:
                        break
        del graph, cache
        return _median(times), detail


def _median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    B: int
    T: int
    k_bits: int
    v_bits: int
    pipeline: str
    runtime: str = "kvmodel-graph"


def parse_formats(text: str) -> list[tuple[str, int, int]]:
    """``P0:16/16,P5:4/4,P1:4/4`` -> [(pipeline, k_bits, v_bits)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        pipe, _, bits = item.partition(":")
        kb, _, vb = (bits or "16/16").partition("/")
        out.append((pipe.strip(), int(kb), int(vb or kb)))
    return out


def _base_row(spec, c: Config, dtype_name, group, read_ceiling_GBps) -> dict:
    sb = step_bytes(spec, c.B, c.T, c.k_bits, c.v_bits, c.pipeline, group)
    row = {k: "" for k in E2E_FIELDS}
    row.update(model=spec.name, B=c.B, T=c.T, k_bits=c.k_bits, v_bits=c.v_bits, pipeline=c.pipeline,
               runtime=c.runtime, n_layers=spec.num_layers, dtype=dtype_name, group=group, **sb)
    if read_ceiling_GBps:
        row["read_ceiling_GBps"] = read_ceiling_GBps
        row["floor_s"] = sb["bytes_total"] / (read_ceiling_GBps * 1e9)
    return row


def _finish(row, median_s):
    row["median_s"] = median_s
    if row.get("floor_s") not in ("", None):
        row["pct_of_floor"] = 100.0 * float(row["floor_s"]) / median_s
    return row


def run_e2e(out_csv, models: Sequence[str] = DEFAULT_MODELS, batches: Sequence[int] = DEFAULT_BATCHES,
            contexts: Sequence[int] = DEFAULT_CONTEXTS, formats: Sequence[tuple[str, int, int]] = (("P0", 16, 16),),
            hf_runtimes: Sequence[str] = (), hf_points: Optional[Sequence[tuple[int, int]]] = None,
            read_ceiling_GBps: Optional[float] = None, resume: bool = True, dtype_name: str = "float16",
            group: int = 32, attn_split: bool = True, margin_bytes: float = DEFAULT_MARGIN_BYTES,
            log: Callable[[str], None] = print, progress: Optional[Callable[[int, int, str], None]] = None,
            deadline_s: Optional[float] = None, linear: str = "torch",
            pdl_prefetch_bytes: Optional[int] = None) -> ResultsFile:
    """Measure our graph-captured step (and HF's runtimes at ``hf_points`` (B, T)) for every model × batch ×
    context × (pipeline, k_bits, v_bits); append rows to ``out_csv``; resumable. Configs that do not fit in
    memory get a ``status=skipped`` row; a pipeline that cannot be built gets a ``status=unavailable`` row.
    ``deadline_s`` (``time.time()`` value): stop cleanly when passed (rows so far are kept).
    ``linear``: "torch", "triton", "triton-fused" or "triton-pdl" (the step's dense projections; its rows get
    ``runtime`` = ``OUR_RUNTIMES[linear]``); ``pdl_prefetch_bytes``: the GEMVs' L2 prefetch per program with
    "triton-pdl" (None: ``gemv.DEFAULT_PREFETCH_BYTES``; recorded in the provenance and each row's note — rows of
    two prefetch sizes share their key, so measure each size into its own file)."""
    from kvmodel.measure.probes import require_cuda, time_graph  # noqa: PLC0415

    if linear not in OUR_RUNTIMES:
        raise ValueError(f"linear must be one of {list(OUR_RUNTIMES)}, got {linear!r}")
    ours_rt = OUR_RUNTIMES[linear]
    torch = require_cuda()
    rf = ResultsFile(out_csv, E2E_KEYS, fieldnames=E2E_FIELDS)
    extra = {"read_ceiling_GBps": read_ceiling_GBps, "dtype": dtype_name, "linear": linear}
    if linear in GEMV_LINEARS:
        from kvmodel.kernels.gemv import DEFAULT_PREFETCH_BYTES, KERNEL_VERSION, PDL_VERSION  # noqa: PLC0415

        extra["gemv_kernel"] = KERNEL_VERSION
        if linear == "triton-pdl":
            if pdl_prefetch_bytes is None:
                pdl_prefetch_bytes = DEFAULT_PREFETCH_BYTES
            extra.update(gemv_pdl=PDL_VERSION, pdl_prefetch_bytes=pdl_prefetch_bytes)
    rf.write_provenance(extra=extra)
    done = rf.done_keys() if resume else set()
    total_mem = torch.cuda.get_device_properties(0).total_memory
    specs = [resolve_model(m) for m in models]
    plan = []
    for spec in specs:
        cfgs = [Config(B, T, kb, vb, p, ours_rt) for (p, kb, vb) in formats for B in batches for T in contexts]
        for rt in hf_runtimes:
            pts = hf_points if hf_points is not None else [(B, T) for B in batches for T in contexts]
            cfgs += [Config(B, T, 16, 16, "hf-sdpa", rt) for B, T in pts]
        cfgs = [c for c in cfgs if rf.key_of(_base_row(spec, c, dtype_name, group, None)) not in done]
        plan.append((spec, cfgs))
    n_total = sum(len(c) for _, c in plan)
    n_done = 0
    for spec, cfgs in plan:
        if not cfgs:
            continue
        if deadline_s and time.time() > deadline_s:
            log(f"# deadline reached; {n_total - n_done} configs left for --resume")
            break
        ours = [c for c in cfgs if c.runtime in OUR_RUNTIMES.values()]
        hfs = [c for c in cfgs if c.runtime not in OUR_RUNTIMES.values()]
        if ours:
            n_done = _run_ours(spec, ours, rf, torch, total_mem, dtype_name, group, attn_split, margin_bytes,
                               read_ceiling_GBps, log, progress, n_done, n_total, deadline_s, time_graph, linear,
                               pdl_prefetch_bytes)
        if hfs:
            n_done = _run_hf(spec, hfs, rf, torch, total_mem, dtype_name, group, margin_bytes,
                             read_ceiling_GBps, log, progress, n_done, n_total, deadline_s)
    return rf


def step_note(linear: str, state: dict, pdl_prefetch_bytes: Optional[int] = None) -> str:
    """A GEMV row's ``note``: what the step really ran (the GEMV or the F.linear fallback; with "triton-pdl"
    whether PDL was active and the prefetch size)."""
    if not state["gemv"]:
        return f"linear={linear} requested; F.linear (B > 8 or float32)"
    if linear != "triton-pdl":
        return f"linear={linear} gemv"
    if not state.get("pdl"):
        return f"linear={linear} requested; gemv without PDL (needs CUDA capability >= 9)"
    return f"linear={linear} gemv pdl prefetch_bytes={pdl_prefetch_bytes}"


def _fits(spec, c, weights_bytes, total_mem, group, margin_bytes, hf=False):
    kv = kv_cache_alloc_bytes(spec, c.B, c.T, c.k_bits, c.v_bits, group, c.pipeline,
                              slack_tokens=64 if hf else 1)
    if hf and c.runtime == "hf-eager":
        kv += kv / spec.num_layers * 2  # DynamicCache's cat makes a new layer tensor each step
    logits = c.B * spec.vocab_size * 4 * (2 if hf else 1)
    need = weights_bytes + kv + logits + margin_bytes
    return need <= total_mem, need, kv


def _run_ours(spec, cfgs, rf, torch, total_mem, dtype_name, group, attn_split, margin_bytes, ceiling, log,
              progress, n_done, n_total, deadline_s, time_graph, linear="torch", pdl_prefetch_bytes=None):
    wbytes = param_breakdown(spec).total * 2
    fit, skip = [], []
    for c in cfgs:
        ok, need, kv = _fits(spec, c, wbytes, total_mem, group, margin_bytes)
        (fit if ok else skip).append((c, need, kv))
    for c, need, _ in skip:
        row = _base_row(spec, c, dtype_name, group, ceiling)
        row.update(status="skipped", note=f"needs {need / 1e9:.1f} GB > {total_mem / 1e9:.1f} GB")
        rf.append(row)
        n_done += 1
        log(f"  skip {spec.name} B={c.B} T={c.T} {c.pipeline} {c.k_bits}/{c.v_bits}: needs {need / 1e9:.0f} GB")
    if not fit:
        return n_done
    import gc  # noqa: PLC0415

    gc.collect()
    torch.cuda.empty_cache()  # the previous model's pool must go back to the driver before this one's
    try:
        model = DecodeModel(spec, dtype_name, linear=linear, pdl_prefetch_bytes=pdl_prefetch_bytes)
    except (NotImplementedError, torch.OutOfMemoryError) as e:
        for c, _, _ in fit:
            row = _base_row(spec, c, dtype_name, group, ceiling)
            row.update(status="unavailable", note=str(e)[:200])
            rf.append(row)
        return n_done + len(fit)
    free, _ = torch.cuda.mem_get_info()
    pool_bytes = int(max(kv for _, _, kv in fit) * 1.02) + 64 * 1024**2
    room = int(free - margin_bytes + 2 * GiB)  # the margin counted the CUDA context, which is already in use
    if pool_bytes > room:
        log(f"# {spec.name}: KV pool cut to {room / 1e9:.1f} GB of free memory (wanted {pool_bytes / 1e9:.1f})")
        pool_bytes = room
    pool = torch.empty(pool_bytes // 2, device="cuda", dtype=model.dtype)
    pool.normal_(0.0, 1.0)
    log(f"# {spec.name}: weights {model.weight_bytes_resident() / 1e9:.1f} GB, KV pool {pool_bytes / 1e9:.1f} GB, "
        f"{len(fit)} configs")
    fit.sort(key=lambda x: (x[0].pipeline, x[0].B, x[0].T))
    for c, _, _ in fit:
        if deadline_s and time.time() > deadline_s:
            break
        row = _base_row(spec, c, dtype_name, group, ceiling)
        t_start = time.time()
        step = attn_only = backend = None
        try:
            backend = make_backend(c.pipeline, spec, c.B, c.T, Carver(pool), model.dtype, c.k_bits, c.v_bits,
                                   group)
        except MemoryError as e:
            row.update(status="skipped", note=f"KV pool: {str(e)[:160]}")
            rf.append(row)
            n_done += 1
            log(f"  {spec.name} B={c.B} T={c.T} {c.pipeline}: skipped ({e})")
            continue
        except (ImportError, NotImplementedError, ValueError, AttributeError, TypeError) as e:
            row.update(status="unavailable", note=f"{type(e).__name__}: {str(e)[:160]}")
            rf.append(row)
            n_done += 1
            log(f"  {spec.name} {c.pipeline}: unavailable ({e})")
            continue
        try:
            step, attn_only, n_touched = model.build_step(c.B, c.T, backend)
            t = time_graph([step], min_time_s=0.2, max_replays=30, min_replays=5)
            _finish(row, t.median_s)
            row.update(p10_s=t.p10_s, p90_s=t.p90_s, status="ok" if t.graph else "ok-eager")
            if linear in GEMV_LINEARS:
                row["note"] = step_note(linear, step.state, pdl_prefetch_bytes)
            if attn_split:
                ta = time_graph([attn_only], min_time_s=0.1, max_replays=20, min_replays=5)
                row["attn_s"] = ta.median_s
            if n_touched is not None:
                row.update(step_bytes(spec, c.B, c.T, c.k_bits, c.v_bits, c.pipeline, group,
                                      experts_touched=n_touched))
                if ceiling:
                    row["floor_s"] = row["bytes_total"] / (ceiling * 1e9)
                    row["pct_of_floor"] = 100.0 * row["floor_s"] / t.median_s
        except torch.OutOfMemoryError as e:
            row.update(status="oom", note=str(e)[:160])
        except Exception as e:  # noqa: BLE001 - record and go on
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:160]}")
            log(traceback.format_exc(limit=3))
        rf.append(row)
        n_done += 1
        pct = f"{row['pct_of_floor']:.1f}% of floor" if row.get("pct_of_floor") not in ("", None) else ""
        ms = f"{row['median_s'] * 1e3:8.3f} ms" if row.get("median_s") not in ("", None) else row["status"]
        log(f"  {spec.name:22s} B={c.B:<4d} T={c.T:<6d} {c.pipeline:4s} {c.k_bits}/{c.v_bits}  {ms}  {pct}"
            f"  {'' if linear == 'torch' else 'gemv '}({time.time() - t_start:.1f} s)")
        if progress:
            progress(n_done, n_total, f"{spec.name} B={c.B} T={c.T} {c.pipeline}")
        step = attn_only = backend = None  # noqa: F841 - drop the closures that hold views of the pool
    del model, pool
    gc.collect()
    torch.cuda.empty_cache()
    return n_done


def _run_hf(spec, cfgs, rf, torch, total_mem, dtype_name, group, margin_bytes, ceiling, log, progress, n_done,
            n_total, deadline_s):
    import gc  # noqa: PLC0415

    wbytes = param_breakdown(spec).total * 2
    gc.collect()
    torch.cuda.empty_cache()
    try:
        runner = HFRunner(spec, dtype_name)
    except Exception as e:  # noqa: BLE001
        for c in cfgs:
            row = _base_row(spec, c, dtype_name, group, ceiling)
            row.update(status="unavailable", note=f"{type(e).__name__}: {str(e)[:160]}")
            rf.append(row)
        log(f"  HF {spec.name}: unavailable ({type(e).__name__}: {e})")
        return n_done + len(cfgs)
    for c in sorted(cfgs, key=lambda c: (c.runtime, c.B, c.T)):
        if deadline_s and time.time() > deadline_s:
            break
        row = _base_row(spec, c, dtype_name, group, ceiling)
        ok, need, _ = _fits(spec, c, wbytes, total_mem, group, margin_bytes, hf=True)
        if not ok:
            row.update(status="skipped", note=f"needs {need / 1e9:.1f} GB")
            rf.append(row)
            n_done += 1
            continue
        t_start = time.time()
        try:
            if c.runtime == "hf-eager":
                med, detail = runner.time_eager(c.B, c.T)
            elif c.runtime == "hf-static-graph":
                med, detail = runner.time_static_graph(c.B, c.T)
            else:
                raise ValueError(f"unknown runtime {c.runtime}")
            _finish(row, med)
            row.update(status="ok", note=detail[:200])
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", note=f"{type(e).__name__}: {str(e)[:180]}")
            log(traceback.format_exc(limit=4))
        torch.cuda.empty_cache()
        rf.append(row)
        n_done += 1
        ms = f"{row['median_s'] * 1e3:8.3f} ms" if row.get("median_s") not in ("", None) else row["status"]
        pct = f"{row['pct_of_floor']:.1f}% of floor" if row.get("pct_of_floor") not in ("", None) else ""
        log(f"  {spec.name:22s} B={c.B:<4d} T={c.T:<6d} {c.runtime:15s} {ms}  {pct}  ({time.time() - t_start:.1f} s)")
        if progress:
            progress(n_done, n_total, f"{spec.name} {c.runtime} B={c.B} T={c.T}")
    del runner
    torch.cuda.empty_cache()
    return n_done


def self_check(atol: float = 2e-2) -> dict:
    """Compare the Triton helpers with torch references on random inputs (GPU). Returns max errors."""
    import torch  # noqa: PLC0415

    out = {}
    B, h, Hq, Hkv, d = 3, 896, 14, 2, 64
    x = torch.randn(B, h, device="cuda", dtype=torch.float16)
    w = torch.randn(h, device="cuda", dtype=torch.float16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float())
    got = rmsnorm(x, w, torch.empty_like(x)).float()
    out["rmsnorm"] = float(((got - ref).norm() / ref.norm()).item())
    qkv = torch.randn(B, (Hq + 2 * Hkv) * d, device="cuda", dtype=torch.float16)
    cos, sin = rope_tables(d, 1234, 1e6)
    qo = torch.full((B, Hq, d), float("nan"), device="cuda", dtype=torch.float16)
    K = torch.full((B, Hkv, 9, d), float("nan"), device="cuda", dtype=torch.float16)
    V = torch.full_like(K, float("nan"))
    rope_qkv(qkv, cos, sin, qo, K[:, :, 5], V[:, :, 5], Hq, Hkv)
    t = qkv.float().view(B, Hq + 2 * Hkv, d)
    x1, x2 = t[..., : d // 2], t[..., d // 2:]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    err = max(float((qo.float() - rot[:, :Hq]).abs().max()), float((K[:, :, 5].float() - rot[:, Hq:Hq + Hkv]).abs().max()),
              float((V[:, :, 5].float() - t[:, Hq + Hkv:]).abs().max()))
    out["rope_qkv"] = err
    gu = torch.randn(B, 2 * 4864, device="cuda", dtype=torch.float16)
    ref = torch.nn.functional.silu(gu[:, :4864].float()) * gu[:, 4864:].float()
    got = silu_mul(gu, torch.empty(B, 4864, device="cuda", dtype=torch.float16)).float()
    out["silu_mul"] = float(((got - ref).norm() / ref.norm()).item())
    from kvmodel.kernels.gemv import use_pdl  # noqa: PLC0415

    if use_pdl(True, x.device):  # the PDL variants write exactly what the normal kernels write (0 = equal)
        a1, a2 = (silu_mul(gu, torch.empty(B, 4864, device="cuda", dtype=torch.float16), pdl=p) for p in (False, True))
        n1, n2 = (rmsnorm(x, w, torch.empty_like(x), pdl=p) for p in (False, True))
        q2 = torch.empty_like(qo)
        rope_qkv(qkv, cos, sin, q2, K[:, :, 6], V[:, :, 6], Hq, Hkv, pdl=True)
        same = (torch.equal(a1, a2) and torch.equal(n1, n2) and torch.equal(q2, qo)
                and torch.equal(K[:, :, 6], K[:, :, 5]) and torch.equal(V[:, :, 6], V[:, :, 5]))
        out["pdl_mismatch"] = 0.0 if same else 1.0
    out["ok"] = all(v < atol for k, v in out.items() if k != "ok")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="End-to-end decode step sweep (kvmodel-graph and HF runtimes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fill-bytes", action="store_true",
                    help="only recompute the byte, floor_s and pct_of_floor columns of --out from kvmodel.symbolic "
                         "(measured columns untouched); needs no GPU")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--contexts", default="1k,4k,16k,32k")
    ap.add_argument("--formats", default="P0:16/16", help="pipeline:kbits/vbits list, e.g. P0:16/16,P5:4/4")
    ap.add_argument("--hf", default="", help="comma list of hf-eager,hf-static-graph")
    ap.add_argument("--hf-points", default="", help="B:T list for the HF runtimes, e.g. 1:1k,16:4k (default all)")
    ap.add_argument("--read-ceiling", type=float, default=None, help="GB/s; default: from --probes CSV")
    ap.add_argument("--probes", default=None, help="probes.csv to take the read ceiling from")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--no-attn-split", action="store_true")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    ap.add_argument("--linear", choices=sorted(OUR_RUNTIMES), default="torch",
                    help="dense projections of our step: torch (F.linear, cuBLAS; the committed data), triton "
                         "(kvmodel.kernels.gemv at B <= 8), triton-fused (triton, with RMSNorm fused into the "
                         "qkv/gate_up GEMVs and SiLU*mul into down) or triton-pdl (triton, GEMVs and the small "
                         "Triton kernels as programmatic dependent launches, Hopper); rows get runtime " +
                         " / ".join(f"{v} ({k})" for k, v in OUR_RUNTIMES.items()))
    ap.add_argument("--pdl-prefetch-bytes", type=int, default=None,
                    help="with --linear triton-pdl: L2 weight prefetch per GEMV program before it waits on its "
                         "predecessor (default kvmodel.kernels.gemv.DEFAULT_PREFETCH_BYTES; 0: PDL alone). Rows of "
                         "different sizes share their key: write each size to its own --out")
    a = ap.parse_args(argv)
    if a.pdl_prefetch_bytes is not None:
        if a.linear != "triton-pdl":
            ap.error("--pdl-prefetch-bytes goes with --linear triton-pdl")
        from kvmodel.kernels.gemv import MAX_PREFETCH_BYTES  # noqa: PLC0415

        if not 0 <= a.pdl_prefetch_bytes <= MAX_PREFETCH_BYTES:
            ap.error(f"--pdl-prefetch-bytes must be in [0, {MAX_PREFETCH_BYTES}]")
    if a.fill_bytes:
        print(f"updated {fill_bytes(a.out, a.read_ceiling)} rows of {a.out}", flush=True)
        return 0
    from kvmodel.measure.probes import GPUUnavailable, read_ceiling_GBps  # noqa: PLC0415

    try:
        if a.self_check:
            r = self_check()
            print(f"# self-check: {r}", flush=True)
            if not r["ok"]:
                return 3
        ceiling = a.read_ceiling
        if ceiling is None and a.probes:
            ceiling = read_ceiling_GBps(ResultsFile(a.probes, ["op"]).rows())
        pts = None
        if a.hf_points:
            pts = []
            for item in a.hf_points.split(","):
                b, _, t = item.partition(":")
                pts.append((int(b), parse_tokens(t)))
        run_e2e(a.out, models=[m for m in a.models.split(",") if m], batches=[int(b) for b in a.batches.split(",")],
                contexts=[parse_tokens(t) for t in a.contexts.split(",")], formats=parse_formats(a.formats),
                hf_runtimes=[r for r in a.hf.split(",") if r], hf_points=pts, read_ceiling_GBps=ceiling,
                resume=not a.no_resume, dtype_name=a.dtype, attn_split=not a.no_attn_split,
                log=lambda s: print(s, flush=True),
                deadline_s=(time.time() + a.budget_s) if a.budget_s else None, linear=a.linear,
                pdl_prefetch_bytes=a.pdl_prefetch_bytes)
    except GPUUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
