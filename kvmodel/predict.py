"""The public API: predict(gpu, model, workload) -> Prediction, and the vectorized grid it is built on.

Bytes come from :mod:`kvmodel.traffic` (the symbolic model), seconds from :mod:`kvmodel.timing`. One decode step
is charged: a fixed per-step overhead, per-layer small-kernel overhead, one saturating-bandwidth call per weight
matrix (roofline-checked), routed experts touched, one attention call per layer for the chosen pipeline, and the
LM head.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvmodel import traffic
from kvmodel.architecture import param_breakdown, weight_calls
from kvmodel.specs import GiB, GPUSpec, KVFormat, ModelSpec, Workload
from kvmodel.symbolic import PIPELINE_FORMULAS
from kvmodel.timing import (KERNEL_LARGE_WORK, KERNEL_PORT_VERSION, TimeModel, expand_charged_bytes,
                            expand_reread_miss, kernel_config, kernel_config_key, kernel_split_count,
                            sdpa_charged_bytes)

#: Memory reserved beside weights and KV (CUDA context, activations, allocator slack), bytes.
DEFAULT_WORKSPACE_BYTES = 2 * GiB
#: Fraction of capacity lost to fragmentation / allocator granularity.
DEFAULT_FRAGMENTATION = 0.05

FP16 = KVFormat(k_bits=16, v_bits=16)


def _values(model: ModelSpec, kv: KVFormat, weight_bytes_per_param: float, **extra) -> dict:
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(kv))
    v["b_w"] = weight_bytes_per_param
    v["M_ws"] = DEFAULT_WORKSPACE_BYTES
    v["phi"] = DEFAULT_FRAGMENTATION
    v.update(extra)
    return v


def weights_time_s(tm: TimeModel, model: ModelSpec, B, weight_bytes_per_param: float = 2.0, tp: int = 1):
    """Seconds to stream the step's weights at batch B (vectorized over B): one call per matrix per layer,
    routed experts as one grouped call per MoE layer, plus the LM head.

    ``tp``: tensor-parallel degree; each GPU streams 1/tp of every matrix (and does 1/tp of its FLOPs).
    ``tp = 1`` is the single-GPU model, unchanged."""
    B = np.asarray(B, dtype=float)
    shard = (lambda x: x) if tp == 1 else (lambda x: x / tp)  # noqa: E731
    t = np.zeros_like(B)
    for c in weight_calls(model):
        t = t + c.layers * tm.op_time("weights", shard(c.params * weight_bytes_per_param),
                                      shard(2.0 * B * c.params))
    pb = param_breakdown(model)
    if pb.num_moe_layers:
        vals = _values(model, FP16, weight_bytes_per_param, B=B)
        touched = traffic.evaluate("experts_touched", vals)
        nbytes = touched * pb.expert_each * weight_bytes_per_param
        flops = 2.0 * B * model.moe.top_k * pb.expert_each
        t = t + pb.num_moe_layers * tm.op_time("weights", shard(nbytes), shard(flops))
    lm = pb.lm_head or pb.embedding
    t = t + tm.op_time("lm_head", shard(lm * weight_bytes_per_param), shard(2.0 * B * lm))
    return t


@lru_cache(maxsize=1 << 16)
def _fused_launch(k_bits: int, v_bits: int, head_dim: int, batch: float, kv_heads: float, context: float,
                  sm_count: int, version: str = KERNEL_PORT_VERSION) -> tuple[float, str, int]:
    """(splits, block-shape key, merge splits per round) of one fused-kernel call: the kernel's own rules, ported
    (:func:`kvmodel.timing.kernel_config`, :func:`kvmodel.timing.kernel_split_count`); cached per call shape."""
    cfg = kernel_config(k_bits, v_bits, head_dim, batch, kv_heads, context, version)
    ns = float(kernel_split_count(k_bits, v_bits, head_dim, batch, kv_heads, context, sm_count, version))
    return ns, kernel_config_key(cfg), int(cfg["merge_round_splits"])


def fused_launches(k_bits: int, v_bits: int, head_dim: int, B, Hkv, T, sm_count: int,
                   version: str = KERNEL_PORT_VERSION):
    """Splits, block-shape keys and the merge's splits per round of fused-kernel calls (kernel ``version``,
    default the current one), vectorized over B, Hkv and T (broadcast): each distinct (B, Hkv, T) is evaluated
    once. Returns (splits, shape-key object array, merge splits per round), of the broadcast shape."""
    B, H, T = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (B, Hkv, T)))
    trip = np.stack([B.ravel(), H.ravel(), T.ravel()], axis=1)
    uniq, inv = np.unique(trip, axis=0, return_inverse=True)
    res = [_fused_launch(int(k_bits), int(v_bits), int(head_dim), float(b), float(h), float(t), int(sm_count),
                         version) for b, h, t in uniq]
    inv = np.asarray(inv).reshape(-1)
    splits = np.array([r[0] for r in res], dtype=float)[inv].reshape(B.shape)
    keys = np.array([r[1] for r in res], dtype=object)[inv].reshape(B.shape)
    rounds = np.array([r[2] for r in res], dtype=float)[inv].reshape(B.shape)
    return splits, keys, rounds


def _attention_op_time(tm: TimeModel, pipeline: str, fmt: KVFormat, head_dim: int, B, Hkv, T, nbytes, flops,
                       reread_bytes=None):
    """Seconds of one attention call (B sequences, Hkv KV heads, T cached tokens) from its bytes and FLOPs.

    Non-fused pipelines: the most specific calibrated bandwidth curve. The fused kernel (P5) runs one of its
    compiled block shapes, chosen by its launch size (the kernel's own rule, ported as
    :func:`kvmodel.timing.kernel_config`), with the split count of :func:`kvmodel.timing.kernel_split_count`. When
    the calibration has an occupancy curve for the format and head dim (``Calibration.fused``), the call is timed
    by program waves: programs = ``fused_programs_splitk`` (B x Hkv x splits), the block shape's curve (else the
    pooled one), no L2 hits (a decode step's KV exceeds the L2), roofline-checked like every op. Otherwise each
    block shape's bandwidth curve (``attention:P5:...:<shape>`` where calibrated). P0-expand: with
    ``reread_bytes`` (symbolic ``attn_bytes_P0_expand_reread``) and a curve fitted with a repeat-read weight, the
    repeat reads L2 cannot serve are charged too (:func:`kvmodel.timing.expand_charged_bytes`). P0: with a curve
    fitted with its pair term (``pairs_half``), at the bytes charged for B x Hkv (sequence, KV head) pairs
    (:func:`kvmodel.timing.sdpa_charged_bytes`)."""
    if pipeline != "P5":
        op = tm.attention_op(pipeline, fmt.k_bits, fmt.v_bits, head_dim)
        w = getattr(tm.curves.get(op), "reread_weight", None)
        if pipeline == "P0-expand" and reread_bytes is not None and w:
            miss = expand_reread_miss(T, head_dim, tm.gpu.l2_cache_MiB * 2**20)
            nbytes = expand_charged_bytes(nbytes, reread_bytes, miss, w)
        h = getattr(tm.curves.get(op), "pairs_half", None)
        if pipeline == "P0" and h:  # SDPA's bandwidth saturates in its (sequence, KV head) pairs
            nbytes = sdpa_charged_bytes(nbytes, np.asarray(B, dtype=float) * np.asarray(Hkv, dtype=float), h)
        return tm.op_time(op, nbytes, flops)
    kb, vb = fmt.k_bits, fmt.v_bits
    if not tm.has_fused(kb, vb, head_dim):
        large = np.asarray(B, dtype=float) * np.asarray(Hkv, dtype=float) * np.asarray(T, dtype=float) \
            >= KERNEL_LARGE_WORK
        t_small, t_large = (
            tm.op_time(tm.attention_op("P5", kb, vb, head_dim, kernel_config_key(
                kernel_config(kb, vb, head_dim, 1, 1, KERNEL_LARGE_WORK if flag else 1))), nbytes, flops)
            for flag in (False, True))
        return np.where(large, t_large, t_small)
    splits, keys, rounds = fused_launches(kb, vb, head_dim, B, Hkv, T, tm.gpu.sm_count, tm.kernel_version)
    shape = np.broadcast_shapes(splits.shape, np.shape(nbytes), np.shape(flops))
    splits, keys, rounds = (np.broadcast_to(x, shape) for x in (splits, keys, rounds))
    nb = np.broadcast_to(np.asarray(nbytes, dtype=float), shape)
    fl = np.broadcast_to(np.asarray(flops, dtype=float), shape)
    programs = np.broadcast_to(traffic.evaluate("fused_programs_splitk", {
        "B": np.asarray(B, dtype=float), "H_kv": np.asarray(Hkv, dtype=float), "n_split": splits}), shape)
    out = np.empty(shape)
    for key in sorted(set(keys.ravel())):
        m = keys == key
        occ = tm.fused_curve(kb, vb, head_dim, key)  # the shape's curve, else the pooled one (has_fused)
        t = occ.time_s(programs[m], nb[m], tm.gpu.sm_count, head_dim=head_dim, splits=splits[m],
                       merge_round_splits=rounds[m])
        out[m] = np.maximum(t, fl[m] / tm.peak_flops)
    return out


def attention_call_time_s(tm: TimeModel, pipeline: str, kv: KVFormat, B, T, Hq, Hkv, head_dim):
    """Predicted seconds of ONE attention-layer call (the unit the decode-attention benchmark times): bytes from
    :func:`kvmodel.traffic.attention_layer_bytes`, FLOPs 2*B*Hq*2d*T, and the curve :func:`attention_time_s`
    charges each layer. Vectorized over B, T, Hq and Hkv."""
    fmt = FP16 if pipeline.startswith("P0") else kv
    B = np.asarray(B, dtype=float)
    T = np.asarray(T, dtype=float)
    nbytes = traffic.attention_layer_bytes(pipeline, B, T, Hq, Hkv, head_dim, fmt.k_bits, fmt.v_bits,
                                           fmt.group_size, fmt.asymmetric)
    flops = 2.0 * B * Hq * (2.0 * head_dim) * T
    reread = None
    if pipeline == "P0-expand":
        reread = traffic.expand_reread_bytes(B, T, Hq, Hkv, head_dim)
    return _attention_op_time(tm, pipeline, fmt, head_dim, B, Hkv, T, nbytes, flops, reread)


def attention_time_s(tm: TimeModel, model: ModelSpec, kv: KVFormat, B, T, pipeline: str, tp: int = 1):
    """Seconds for one step's attention over all layers (windowed layers read min(T, W) tokens).

    ``tp``: tensor-parallel degree; each GPU holds ceil(H_kv / tp) KV heads (replicated when H_kv < tp) and
    ceil(H_q / tp) query heads. ``tp = 1`` is the single-GPU model, unchanged."""
    if pipeline not in PIPELINE_FORMULAS:
        raise ValueError(f"unknown pipeline {pipeline!r}; one of {', '.join(PIPELINE_FORMULAS)}")
    fmt = FP16 if pipeline.startswith("P0") else kv
    B = np.asarray(B, dtype=float)
    T = np.asarray(T, dtype=float)
    vals = _values(model, fmt, 2.0, B=B)
    if tp != 1:
        vals.update(tp_head_values(vals, tp))
    name = PIPELINE_FORMULAS[pipeline]
    d = model.k_dim_cached
    L, L_s, W = vals["L"], vals["L_s"], vals["W"]
    flops_per_tok = 2.0 * B * vals["H_q"] * (vals["d"] + max(vals["d_v"], vals["d_q"]))

    def layer_time(T_layer):
        nbytes = traffic.evaluate(name, {**vals, "T": T_layer})
        reread = (traffic.evaluate("attn_bytes_P0_expand_reread", {**vals, "T": T_layer})
                  if pipeline == "P0-expand" else None)
        return _attention_op_time(tm, pipeline, fmt, d, B, vals["H_kv"], T_layer, nbytes, flops_per_tok * T_layer,
                                  reread)

    t = (L - L_s) * layer_time(T)
    if L_s:
        t = t + L_s * layer_time(np.minimum(T, W))
    return t


def step_time_s(tm: TimeModel, model: ModelSpec, kv: KVFormat, B, T, pipeline: str = "P5",
                weight_bytes_per_param: float = 2.0, tp: int = 1, allreduce_latency_s: Optional[float] = None):
    """Predicted seconds per decode step (vectorized over B and T; they broadcast).

    ``tp`` > 1: N-way tensor parallelism over the GPU's catalog ``gpu_link``: per-GPU weight and attention time
    plus two all-reduces per layer (:func:`allreduce_time_s`). ``tp = 1`` gives exactly the single-GPU time."""
    overhead = tm.step_overhead_s + model.num_layers * tm.layer_overhead_s
    if tp == 1:
        return (overhead + weights_time_s(tm, model, B, weight_bytes_per_param)
                + attention_time_s(tm, model, kv, B, T, pipeline))
    link, lat = allreduce_terms(tm, tp, allreduce_latency_s)
    return (overhead + weights_time_s(tm, model, B, weight_bytes_per_param, tp=tp)
            + attention_time_s(tm, model, kv, B, T, pipeline, tp=tp)
            + allreduce_time_s(model, B, tp, link, lat))


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallelism (issue 8, analytic half)
# ----------------------------------------------------------------------------------------------------------------

#: Fixed cost of one all-reduce call beside the link hops (NCCL kernel launch + sync), seconds.
DEFAULT_ALLREDUCE_LAUNCH_S = 5e-6


def tp_head_values(vals: dict, tp: int) -> dict:
    """Per-GPU head counts under ``tp``-way tensor parallelism: ceil(H_kv / N) KV heads (replicated when
    H_kv < N; MLA's single latent is on every GPU) and ceil(H_q / N) query heads."""
    return {"H_kv": traffic.evaluate("kv_heads_per_gpu", {"H_kv": vals["H_kv"], "N": tp}),
            "H_q": float(np.ceil(vals["H_q"] / tp))}


def tp_link(gpu: GPUSpec, tp: int):
    """The GPU-GPU link of ``gpu`` from the interconnect catalog (None for tp = 1).

    Raises ValueError for tp > 1 when the GPU has no ``gpu_link`` (e.g. a PCIe-only consumer card)."""
    if tp < 1 or int(tp) != tp:
        raise ValueError(f"tensor-parallel degree must be a positive integer, got {tp!r}")
    if tp == 1:
        return None
    if not gpu.gpu_link:
        raise ValueError(f"{gpu.name} has no GPU-GPU link in the catalog (gpu_link); tensor parallelism "
                         f"--tp {tp} needs one")
    from kvmodel.specs import get_interconnect

    return get_interconnect(gpu.gpu_link)


def allreduce_latency_default_s(link, tp: int) -> float:
    """Per all-reduce latency: a launch cost plus 2(N-1) ring hops of the link's one-way latency."""
    return DEFAULT_ALLREDUCE_LAUNCH_S + 2 * (tp - 1) * link.latency_s


def allreduce_terms(tm: TimeModel, tp: int, latency_s: Optional[float] = None):
    """(link, per-call latency) for the all-reduces at degree ``tp``: the catalog link and default latency, or
    the calibration's measured terms (``Calibration.tp_link``) when it has them; ``latency_s`` overrides."""
    link = tp_link(tm.gpu, tp)
    if link is None:
        return None, 0.0
    cal = tm.calibration.tp_link if tm.calibration is not None else None
    if cal is not None:
        lat, bw = cal.terms(tp)
        link = link.model_copy(update={"bandwidth_per_direction_GBps": bw,
                                       "name": f"{link.name} (calibrated)"})
    else:
        lat = allreduce_latency_default_s(link, tp)
    return link, (lat if latency_s is None else latency_s)


def allreduce_time_s(model: ModelSpec, B, tp: int, link, latency_s: Optional[float] = None):
    """Seconds per step of the two all-reduces per layer of B x hidden activations over ``link``
    (formula ``allreduce_time``); 0 for tp = 1. Vectorized over B."""
    B = np.asarray(B, dtype=float)
    if tp == 1:
        return np.zeros_like(B)
    lat = allreduce_latency_default_s(link, tp) if latency_s is None else latency_s
    return traffic.evaluate("allreduce_time", {
        "L": model.num_layers, "lambda_ar": lat, "N": tp, "B": B, "h": model.hidden_size, "b_a": 2,
        "BW_link": link.bandwidth_per_direction_GBps * 1e9})


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepBytes(_Out):
    weights_streamed: float = Field(description="weights read per step (embedding rows not gathered excluded)")
    weights_paper_convention: float = Field(description="params x bytes incl. embedding (the study's count)")
    kv_read: float
    kv_write: float
    kv_metadata_read: float = Field(description="scale/zero bytes inside kv_read")
    activations: float
    total: float


class PipelineResult(_Out):
    pipeline: str
    kv_format: str
    step_time_s: float
    tokens_per_s: float = Field(description="aggregate over the batch")
    tokens_per_s_per_sequence: float
    attention_bytes_per_step: float
    speedup_vs_fp16: float


class Memory(_Out):
    weights_bytes: float
    kv_cache_bytes: float = Field(description="when the last generated token is decoded: context + gen - 1 tokens")
    workspace_bytes: float
    footprint_bytes: float
    capacity_bytes: float
    usable_bytes: float
    fits: bool
    max_context_tokens: Optional[float] = Field(description="at this batch; None when unbounded")
    max_batch: float = Field(description="at this context")


class Prediction(_Out):
    gpu: str
    model: str
    batch: int
    context_tokens: int
    gen_tokens: int
    kv_format: str
    weight_bytes_per_param: float
    timing: str = Field(description="which calibration was used, or 'uncalibrated: ...'")
    bytes: StepBytes
    kv_fraction: float
    regime: str = Field(description="weight-bound or KV-bound (which traffic dominates)")
    crossover_context_tokens: Optional[float] = Field(description="context where KV reads equal weights")
    compression_ratio: float
    ideal_speedup: float = Field(description="Amdahl bound from the KV fraction and compression ratio")
    fp16: PipelineResult
    fused: PipelineResult
    non_fused: PipelineResult
    memory: Memory
    flops_per_step: float
    arithmetic_intensity_flop_per_byte: float
    ridge_point_flop_per_byte: float
    reread_token_reads: float = Field(description="cached-token reads per layer and KV head over the generation")
    kv_bytes_over_generation: float
    notes: list[str] = Field(default_factory=list)


class TPReport(_Out):
    """Tensor-parallel terms of a prediction (per GPU unless said otherwise)."""

    degree: int
    link: str = Field(description="GPU-GPU interconnect (the GPU spec's gpu_link)")
    link_bandwidth_GBps: float
    allreduce_latency_s: float = Field(description="per all-reduce call")
    kv_heads_per_gpu: int = Field(description="ceil(H_kv / N): replicated when H_kv < N")
    weights_streamed_per_gpu: float
    kv_read_per_gpu: float
    allreduce_bytes_per_step: float = Field(description="2 all-reduces per layer of B x hidden activations")
    allreduce_time_s: float
    footprint_per_gpu_bytes: float
    fits_per_gpu: bool


class TPPrediction(Prediction):
    """A Prediction under N-way tensor parallelism: times include the all-reduces, ``memory`` is per GPU."""

    tensor_parallel: TPReport


def _pipeline_result(tm, model, kv, w: Workload, pipeline: str, t_fp16: Optional[float], tp: int = 1,
                     allreduce_latency_s: Optional[float] = None) -> PipelineResult:
    if tp == 1:
        t = float(step_time_s(tm, model, kv, w.batch, w.context_tokens, pipeline, w.weight_bytes_per_param))
    else:
        t = float(step_time_s(tm, model, kv, w.batch, w.context_tokens, pipeline, w.weight_bytes_per_param,
                              tp=tp, allreduce_latency_s=allreduce_latency_s))
    vals = _values(model, FP16 if pipeline.startswith("P0") else kv, w.weight_bytes_per_param,
                   B=w.batch, T=w.context_tokens)
    att = float(traffic.evaluate(PIPELINE_FORMULAS[pipeline], vals)) * model.num_layers
    return PipelineResult(
        pipeline=pipeline,
        kv_format="fp16" if pipeline.startswith("P0") else kv.label,
        step_time_s=t,
        tokens_per_s=w.batch / t,
        tokens_per_s_per_sequence=1.0 / t,
        attention_bytes_per_step=att,
        speedup_vs_fp16=(t_fp16 / t) if t_fp16 else 1.0,
    )


def predict(gpu: GPUSpec, model: ModelSpec, workload: Workload, calibration=None, tp: int = 1,
            allreduce_latency_s: Optional[float] = None) -> Prediction:
    """Predict one decode operating point: bytes, regime, times for FP16 / fused / non-fused, memory, capacity.

    ``tp`` > 1: N-way tensor parallelism over the GPU's ``gpu_link`` (ValueError when it has none). Step times
    then include two all-reduces per layer, ``memory`` is per GPU, ``bytes`` stay the whole model's, and the
    result is a :class:`TPPrediction` with the per-GPU terms. ``tp = 1`` returns exactly the single-GPU
    prediction."""
    kv = workload.kv
    if kv.k_bits < 16 and model.k_dim_cached % kv.group_size or kv.v_bits < 16 and model.v_dim_cached % kv.group_size:
        raise ValueError(f"group size {kv.group_size} does not divide head_dim {model.k_dim_cached} of {model.name}")
    link = tp_link(gpu, tp)
    tm = TimeModel(gpu, calibration)
    B, T, G = workload.batch, workload.context_tokens, workload.gen_tokens
    v = _values(model, kv, workload.weight_bytes_per_param, B=B, T=T, M_cap=gpu.memory_capacity_bytes,
                C_0=T, G_en=G)
    ev = lambda name, **kw: float(traffic.evaluate(name, {**v, **kw}))  # noqa: E731
    # memory terms: per GPU under TP (weight shard, ceil(H_kv / N) heads); the single-GPU values for tp = 1
    vm = v if tp == 1 else {**v, "P_total": v["P_total"] / tp, **tp_head_values(v, tp)}
    evm = lambda name, **kw: float(traffic.evaluate(name, {**vm, **kw}))  # noqa: E731
    weights = ev("weight_bytes_streamed")
    kv_read = ev("kv_read_bytes")
    meta = ev("kv_metadata_bytes_per_token") / v["L"] * ev("cached_token_layers") * B
    step_bytes = StepBytes(
        weights_streamed=weights,
        weights_paper_convention=ev("weight_bytes_paper"),
        kv_read=kv_read,
        kv_write=ev("kv_write_bytes"),
        kv_metadata_read=meta,
        activations=ev("activation_bytes"),
        total=ev("step_bytes"),
    )
    f = ev("kv_fraction")
    # The ideal speedup compares with FP16: its f and r come from the FP16 traffic.
    v16 = _values(model, FP16, workload.weight_bytes_per_param, B=B, T=T)
    f16 = float(traffic.evaluate("kv_fraction", v16))
    r = ev("compression_ratio")
    ideal = float(traffic.evaluate("ideal_speedup", {"f": f16, "r": r}))
    cross = ev("crossover_context")
    cross = cross if np.isfinite(cross) and cross > 0 else None

    fp16 = _pipeline_result(tm, model, kv, workload, "P0", None, tp, allreduce_latency_s)
    fused = _pipeline_result(tm, model, kv, workload, "P5", fp16.step_time_s, tp, allreduce_latency_s)
    nonfused = _pipeline_result(tm, model, kv, workload, "P1", fp16.step_time_s, tp, allreduce_latency_s)

    kv_cache = evm("kv_cache_bytes", T=T + G - 1)
    footprint = evm("footprint", T=T + G - 1)
    usable = ev("usable_memory")
    max_ctx = evm("max_context")
    max_batch = evm("max_batch", T=T + G - 1)
    flops = ev("step_flops")
    notes = []
    if not tm.calibrated:
        notes.append("uncalibrated: times use datasheet bandwidth x efficiency; run `kvmodel calibrate` on this GPU")
    if model.synthetic:
        notes.append(f"{model.name} is a synthetic stand-in shape, not a released checkpoint")
    if footprint > usable:
        notes.append(
            f"does not fit{'' if tp == 1 else f' (per GPU, tp {tp})'}: needs {footprint / GiB:.1f} GiB "
            f"(weights {evm('weight_bytes_resident') / GiB:.1f} + "
            f"KV {kv_cache / GiB:.1f} + workspace {DEFAULT_WORKSPACE_BYTES / GiB:.1f}) of "
            f"{gpu.memory_capacity_GiB:g} GiB ({usable / GiB:.1f} GiB usable)"
        )
    if T + G - 1 > model.max_context_tokens:
        notes.append(f"context {T + G - 1} exceeds {model.name}'s trained maximum {model.max_context_tokens}")
    out = dict(
        gpu=gpu.name,
        model=model.name,
        batch=B,
        context_tokens=T,
        gen_tokens=G,
        kv_format=kv.label,
        weight_bytes_per_param=workload.weight_bytes_per_param,
        timing=tm.label,
        bytes=step_bytes,
        kv_fraction=f,
        regime="KV-bound" if kv_read > weights else "weight-bound",
        crossover_context_tokens=cross,
        compression_ratio=r,
        ideal_speedup=ideal,
        fp16=fp16,
        fused=fused,
        non_fused=nonfused,
        memory=Memory(
            weights_bytes=evm("weight_bytes_resident"),
            kv_cache_bytes=kv_cache,
            workspace_bytes=DEFAULT_WORKSPACE_BYTES,
            footprint_bytes=footprint,
            capacity_bytes=gpu.memory_capacity_bytes,
            usable_bytes=usable,
            fits=bool(footprint <= usable),
            max_context_tokens=max_ctx if np.isfinite(max_ctx) else None,
            max_batch=max(max_batch, 0.0),
        ),
        flops_per_step=flops,
        arithmetic_intensity_flop_per_byte=ev("arithmetic_intensity"),
        ridge_point_flop_per_byte=gpu.ridge_flop_per_byte,
        reread_token_reads=ev("reread_sum"),
        kv_bytes_over_generation=ev("kv_bytes_per_token_layer") * B * v["L"] * ev("reread_sum"),
        notes=notes,
    )
    if tp == 1:
        return Prediction(**out)
    link, lat = allreduce_terms(tm, tp, allreduce_latency_s)
    notes.append(f"tensor parallel x{tp} over {link.name}: memory is per GPU; bytes are the whole model's")
    return TPPrediction(**out, tensor_parallel=TPReport(
        degree=tp,
        link=link.name,
        link_bandwidth_GBps=link.bandwidth_per_direction_GBps,
        allreduce_latency_s=lat,
        kv_heads_per_gpu=int(vm["H_kv"]),
        weights_streamed_per_gpu=ev("weight_bytes_per_gpu", N=tp),
        kv_read_per_gpu=ev("kv_read_bytes_per_gpu", N=tp),
        allreduce_bytes_per_step=ev("allreduce_bytes"),
        allreduce_time_s=float(allreduce_time_s(model, B, tp, link, lat)),
        footprint_per_gpu_bytes=ev("footprint_per_gpu", N=tp, T=T + G - 1),
        fits_per_gpu=bool(ev("footprint_per_gpu", N=tp, T=T + G - 1) <= usable),
    ))


# ----------------------------------------------------------------------------------------------------------------
# Vectorized grid
# ----------------------------------------------------------------------------------------------------------------

GRID_FIELDS = ("step_time_s", "tokens_per_s", "fp16_step_time_s", "speedup_vs_fp16", "weights_bytes",
               "kv_read_bytes", "kv_fraction", "footprint_bytes", "fits")


def predict_grid(gpus, models, formats, batches, contexts, pipeline: str = "P5",
                 weight_bytes_per_param: float = 2.0, calibrations=None) -> dict[str, np.ndarray]:
    """Predictions over the product gpus x models x formats x batches x contexts.

    Returns arrays of shape (len(gpus), len(models), len(formats), len(batches), len(contexts)) for each of
    GRID_FIELDS. Loops over gpu x model x format; batch x context is one vectorized numpy evaluation.
    ``calibrations``: optional dict gpu name -> Calibration.
    """
    batches = np.asarray(batches, dtype=float)[:, None]
    contexts = np.asarray(contexts, dtype=float)[None, :]
    shape = (len(gpus), len(models), len(formats), batches.shape[0], contexts.shape[1])
    out = {k: np.empty(shape, dtype=bool if k == "fits" else float) for k in GRID_FIELDS}
    for gi, gpu in enumerate(gpus):
        tm = TimeModel(gpu, (calibrations or {}).get(gpu.name))
        for mi, model in enumerate(models):
            overhead = tm.step_overhead_s + model.num_layers * tm.layer_overhead_s
            t_w = overhead + weights_time_s(tm, model, batches, weight_bytes_per_param)
            t16 = t_w + attention_time_s(tm, model, FP16, batches, contexts, "P0")
            for fi, kv in enumerate(formats):
                t = t16 if (pipeline.startswith("P0") or kv == FP16 and pipeline == "P5") else (
                    t_w + attention_time_s(tm, model, kv, batches, contexts, pipeline))
                v = _values(model, kv, weight_bytes_per_param, B=batches, T=contexts,
                            M_cap=gpu.memory_capacity_bytes)
                kv_read = traffic.evaluate("kv_read_bytes", v)
                w = traffic.evaluate("weight_bytes_streamed", v)
                fp = traffic.evaluate("footprint", v)
                idx = (gi, mi, fi)
                out["step_time_s"][idx] = t
                out["tokens_per_s"][idx] = batches / t
                out["fp16_step_time_s"][idx] = t16
                out["speedup_vs_fp16"][idx] = t16 / t
                out["weights_bytes"][idx] = w
                out["kv_read_bytes"][idx] = kv_read
                out["kv_fraction"][idx] = kv_read / (kv_read + w)
                out["footprint_bytes"][idx] = fp
                out["fits"][idx] = fp <= traffic.evaluate("usable_memory", v)
    return out
