"""KV tiering: which KV bytes must cross a link each decode step, the bandwidth that takes, and the shortfall of
every interconnect in the catalog.

Orchestration only: bytes come from the symbolic model (``kv_read_bytes``, ``kv_read_bytes_window``,
``kv_read_bytes_topk``, ``kv_overflow_fraction``, ``tier_bytes_per_step``, ``tier_bytes_window_overflow``,
``tier_required_bw``, ``tier_shortfall``, ``tier_step_time_overlapped``, ``tier_step_time_serial``), the HBM-side
time from :mod:`kvmodel.predict`.

Placements (each a scenario in the report):

- ``whole-cache``: the study's framing, every cached KV byte lives in the tier, so every byte attention reads
  crosses the link each step.
- ``overflow``: only what exceeds HBM (capacity less weights, workspace, fragmentation) lives in the tier; the
  oldest tokens of each sequence go there first. Dense and top-k access read the tier in proportion; a window
  reads it only when the window reaches past the HBM-resident tokens.
- ``layers``: a chosen fraction of layers keeps its KV in the tier (``--layers-in-tier``).

Access patterns: ``dense`` (every cached token), ``window:W`` (last W tokens), ``topk:NxB`` (MoBA: N blocks of
B tokens per layer and KV head, gate keys kept in HBM).

Timing: the required bandwidth is reported overlapped (``required_GBps``: the tier has the whole target step,
prefetch hides it under the HBM work) and serial (``required_GBps_serial``: the transfer must fit in what the HBM
work leaves of the target). Shortfall = required / link bandwidth; > 1 means the link is that many times too slow.
"""

from __future__ import annotations

import math
import re

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvmodel import traffic
from kvmodel.predict import DEFAULT_FRAGMENTATION, DEFAULT_WORKSPACE_BYTES, attention_time_s, weights_time_s
from kvmodel.specs import GPUSpec, Interconnect, KVFormat, ModelSpec, catalog
from kvmodel.timing import TimeModel


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Access(_Out):
    """How attention reads the cache each step."""

    kind: str = Field(description="dense | window | topk")
    window_tokens: int | None = None
    blocks: int | None = None
    block_tokens: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "window":
            return f"window:{self.window_tokens}"
        if self.kind == "topk":
            return f"topk:{self.blocks}x{self.block_tokens}"
        return "dense"


def parse_access(text: str) -> Access:
    """``dense``, ``window:4096`` (or ``window:4k``), ``topk:8x64`` (blocks x block tokens)."""
    from kvmodel.specs import parse_tokens

    t = text.strip().lower()
    if t == "dense":
        return Access(kind="dense")
    m = re.fullmatch(r"window:(\S+)", t)
    if m:
        return Access(kind="window", window_tokens=parse_tokens(m.group(1)))
    m = re.fullmatch(r"topk:(\d+)x(\d+)", t)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return Access(kind="topk", blocks=int(m.group(1)), block_tokens=int(m.group(2)))
    raise ValueError(f"unknown access pattern {text!r}; use dense, window:W (e.g. window:4k) or topk:NxB "
                     f"(e.g. topk:8x64)")


class LinkResult(_Out):
    name: str
    kind: str
    bandwidth_GBps: float
    shortfall: float = Field(description="required_GBps / bandwidth (overlapped); > 1: too slow by that factor")
    shortfall_serial: float
    step_time_overlapped_s: float
    step_time_serial_s: float
    meets_target: bool = Field(description="overlapped step time within the target")


class Scenario(_Out):
    placement: str = Field(description="whole-cache | overflow | layers:<fraction>")
    tier_fraction: float = Field(description="share of the KV (tokens or layers) living in the tier")
    tier_bytes_per_step: float
    required_GBps: float = Field(description="tier bytes per step / target step time (prefetch overlapped)")
    required_GBps_serial: float = Field(description="tier bytes / (target - HBM work); inf when none is left")
    hbm_time_s: float = Field(description="predicted time of the step's HBM-resident work")
    links: list[LinkResult]


class TierReport(_Out):
    gpu: str
    model: str
    context_tokens: int
    batch: int
    kv_format: str
    access: str
    target_step_s: float
    kv_cache_bytes: float
    kv_budget_bytes: float = Field(description="HBM left for KV after weights, workspace, fragmentation")
    overflow_bytes: float
    overflow_fraction: float
    kv_read_bytes_dense: float
    kv_read_bytes: float = Field(description="per step, with the access pattern (gate keys included)")
    scenarios: list[Scenario]
    timing: str
    notes: list[str] = Field(default_factory=list)


def _values(model: ModelSpec, kv: KVFormat, gpu: GPUSpec, B, T, weight_bytes_per_param: float) -> dict:
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(kv))
    v.update(B=B, T=T, b_w=weight_bytes_per_param, M_cap=gpu.memory_capacity_bytes, M_ws=DEFAULT_WORKSPACE_BYTES,
             phi=DEFAULT_FRAGMENTATION)
    return v


def access_read_bytes(v: dict, access: Access):
    """KV bytes attention reads per step with ``access`` (formula per pattern)."""
    if access.kind == "window":
        return traffic.evaluate("kv_read_bytes_window", {**v, "W_sp": access.window_tokens})
    if access.kind == "topk":
        return traffic.evaluate("kv_read_bytes_topk", {**v, "n_blk": access.blocks, "b_blk": access.block_tokens})
    return traffic.evaluate("kv_read_bytes", v)


def access_selected_bytes(v: dict, access: Access):
    """KV bytes of the *selected tokens* (what a tier holding them must deliver; top-k gate keys stay in HBM)."""
    if access.kind == "window":
        return traffic.evaluate("kv_read_bytes_window", {**v, "W_sp": access.window_tokens})
    if access.kind == "topk":
        sel = traffic.evaluate("kv_read_bytes_window", {**v, "W_sp": access.blocks * access.block_tokens})
        return np.minimum(sel, traffic.evaluate("kv_read_bytes", v))
    return traffic.evaluate("kv_read_bytes", v)


def tier_bytes(v: dict, access: Access, fraction, placement: str):
    """Bytes crossing the link per step for a placement with ``fraction`` of the cache in the tier."""
    if placement == "overflow" and access.kind == "window":
        return traffic.evaluate("tier_bytes_window_overflow", {**v, "W_sp": access.window_tokens, "f_tier": fraction})
    return traffic.evaluate("tier_bytes_per_step", {"f_tier": fraction, "X_kv": access_selected_bytes(v, access)})


def interconnects(names: list[str] | None = None) -> list[Interconnect]:
    links = list(catalog().interconnects.values())
    if names:
        from kvmodel.specs import get_interconnect

        links = [get_interconnect(n) for n in names]
    return links


def _hbm_time(tm: TimeModel, model: ModelSpec, kv: KVFormat, v: dict, hbm_read_bytes: float, w_bpp: float,
              pipeline: str) -> float:
    """Weights + overheads + attention over the KV bytes still read from HBM. The attention call is timed as a
    dense read of the same bytes (an equivalent context T_eff = bytes / (B x kv_bytes_per_token))."""
    B = v["B"]
    overhead = tm.step_overhead_s + model.num_layers * tm.layer_overhead_s
    t = overhead + float(weights_time_s(tm, model, B, w_bpp))
    per_tok = float(traffic.evaluate("kv_bytes_per_token", v)) * B
    T_eff = hbm_read_bytes / per_tok if per_tok > 0 else 0.0
    if T_eff >= 1e-9:
        t += float(attention_time_s(tm, model, kv, B, T_eff, pipeline))
    return t


def tier_report(gpu: GPUSpec, model: ModelSpec, kv: KVFormat, context_tokens: int, batch: int,
                target_step_s: float, access: Access | None = None,
                layers_in_tier: float | None = None, links: list[Interconnect] | None = None,
                weight_bytes_per_param: float = 2.0, pipeline: str = "P5", calibration=None) -> TierReport:
    """Tier bytes, required bandwidth and per-link shortfall for one operating point (see module doc).
    ``access`` defaults to dense."""
    access = access if access is not None else Access(kind="dense")
    if target_step_s <= 0:
        raise ValueError("target step time must be positive")
    if layers_in_tier is not None and not 0 <= layers_in_tier <= 1:
        raise ValueError(f"--layers-in-tier must be a fraction in [0, 1], got {layers_in_tier}")
    tm = TimeModel(gpu, calibration)
    B, T = batch, context_tokens
    v = _values(model, kv, gpu, B, T, weight_bytes_per_param)
    ev = lambda name, **kw: float(traffic.evaluate(name, {**v, **kw}))
    cache = ev("kv_cache_bytes")
    budget = ev("kv_budget_bytes")
    over_b = ev("kv_overflow_bytes")
    over_f = ev("kv_overflow_fraction")
    links = links if links is not None else interconnects()
    notes = []

    placements: list[tuple[str, float]] = [("whole-cache", 1.0), ("overflow", over_f)]
    if layers_in_tier is not None:
        placements.append((f"layers:{layers_in_tier:g}", layers_in_tier))
    elif over_f > 0:
        f_min = math.ceil(over_f * model.num_layers) / model.num_layers
        placements.append((f"layers:{f_min:g}", f_min))
        notes.append(f"layers:{f_min:g} is the fewest whole layers ({math.ceil(over_f * model.num_layers)} of "
                     f"{model.num_layers}) whose KV must leave HBM")
    if budget <= 0:
        notes.append("the weights and workspace alone exceed this GPU's usable memory: the model does not run on "
                     "one GPU even with the whole KV cache in a tier (see --tp in predict/plan)")
    if over_f == 0:
        notes.append("the KV cache fits in HBM: nothing overflows (the overflow scenario moves no bytes)")

    read_all = float(access_read_bytes(v, access))
    scenarios = []
    for name, frac in placements:
        placement = "overflow" if name == "overflow" else ("layers" if name.startswith("layers") else name)
        xb = float(tier_bytes(v, access, frac, placement))
        t_hbm = _hbm_time(tm, model, kv, v, max(read_all - xb, 0.0), weight_bytes_per_param, pipeline)
        req = float(traffic.evaluate("tier_required_bw", {"X_tier": xb, "t_step": target_step_s}))
        left = target_step_s - t_hbm
        req_serial = float(traffic.evaluate("tier_required_bw", {"X_tier": xb, "t_step": left})) if left > 0 \
            else (0.0 if xb == 0 else math.inf)
        lr = []
        for link in links:
            bw = link.bandwidth_per_direction_GBps * 1e9
            lat = link.latency_s if xb > 0 else 0.0
            t_ov = float(traffic.evaluate("tier_step_time_overlapped",
                                          {"t_hbm": t_hbm, "lambda_link": lat, "X_tier": xb, "BW_link": bw}))
            t_se = float(traffic.evaluate("tier_step_time_serial",
                                          {"t_hbm": t_hbm, "lambda_link": lat, "X_tier": xb, "BW_link": bw}))
            lr.append(LinkResult(
                name=link.name, kind=link.kind, bandwidth_GBps=link.bandwidth_per_direction_GBps,
                shortfall=float(traffic.evaluate("tier_shortfall",
                                                 {"X_tier": xb, "t_step": target_step_s, "BW_link": bw})),
                shortfall_serial=req_serial / bw if math.isfinite(req_serial) else math.inf,
                step_time_overlapped_s=t_ov, step_time_serial_s=t_se,
                meets_target=bool(t_ov <= target_step_s),
            ))
        scenarios.append(Scenario(placement=name, tier_fraction=frac, tier_bytes_per_step=xb, required_GBps=req / 1e9,
                                  required_GBps_serial=req_serial / 1e9, hbm_time_s=t_hbm, links=lr))
    hbm_only = _hbm_time(tm, model, kv, v, read_all, weight_bytes_per_param, pipeline)
    if hbm_only > target_step_s:
        notes.append(f"even with every byte in HBM the predicted step is {hbm_only * 1e3:.2f} ms, over the "
                     f"{target_step_s * 1e3:g} ms target")
    if not tm.calibrated:
        notes.append("uncalibrated HBM timing (datasheet x efficiency)")
    else:
        notes.append(f"HBM timing {tm.label}")
    return TierReport(
        gpu=gpu.name, model=model.name, context_tokens=T, batch=B, kv_format=kv.label, access=access.label,
        target_step_s=target_step_s, kv_cache_bytes=cache, kv_budget_bytes=budget, overflow_bytes=over_b,
        overflow_fraction=over_f, kv_read_bytes_dense=ev("kv_read_bytes"),
        kv_read_bytes=read_all, scenarios=scenarios, timing=tm.label, notes=notes)


def render_tier(r: TierReport) -> str:
    """Plain-text report."""
    gb = 1e9
    lines = [
        f"KV tiering - {r.model} on {r.gpu}: context {r.context_tokens:,}, batch {r.batch}, KV {r.kv_format}, "
        f"access {r.access}, target {r.target_step_s * 1e3:g} ms/step",
        f"  KV cache {r.kv_cache_bytes / gb:.2f} GB; HBM room for KV {r.kv_budget_bytes / gb:.2f} GB; overflow "
        f"{r.overflow_bytes / gb:.2f} GB ({r.overflow_fraction:.1%})",
        f"  KV read per step: dense {r.kv_read_bytes_dense / gb:.3f} GB, with {r.access} {r.kv_read_bytes / gb:.3f} GB",
        "",
    ]
    for s in r.scenarios:
        ser = "inf" if not math.isfinite(s.required_GBps_serial) else f"{s.required_GBps_serial:,.1f}"
        lines.append(f"{s.placement} (tier holds {s.tier_fraction:.1%}): {s.tier_bytes_per_step / gb:.3f} GB/step "
                     f"-> needs {s.required_GBps:,.1f} GB/s overlapped, {ser} GB/s serial "
                     f"(HBM work {s.hbm_time_s * 1e3:.2f} ms)")
        lines.append(f"  {'link':<24}{'GB/s':>9}{'shortfall':>11}{'serial':>10}{'step ms':>10}  meets")
        for lk in s.links:
            sf = f"{lk.shortfall:,.1f}x" if lk.shortfall >= 0.1 else f"{lk.shortfall:.3f}x"
            ss = "inf" if not math.isfinite(lk.shortfall_serial) else f"{lk.shortfall_serial:,.1f}x"
            lines.append(f"  {lk.name:<24}{lk.bandwidth_GBps:>9,.1f}{sf:>11}{ss:>10}"
                         f"{lk.step_time_overlapped_s * 1e3:>10.2f}  {'yes' if lk.meets_target else 'no'}")
        lines.append("")
    for n in r.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"
