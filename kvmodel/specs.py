"""Pydantic specs for GPUs, interconnects, model architectures, KV formats and workloads, and catalog loading.

Every numeric field carries its unit in its name (bytes, GiB, GB/s, TFLOP/s, seconds). Catalog files are YAML,
read with ``yaml.safe_load`` and validated with ``extra="forbid"``; every error names the file, the field and what
is wrong (:class:`SpecError`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

GiB = 1024**3


class SpecError(ValueError):
    """A catalog file or a user-supplied spec is malformed; the message names the file and the field."""


class LookupFailed(KeyError):
    """A GPU, model or interconnect name matched nothing (or several things); ``candidates`` lists the closest."""

    def __init__(self, kind: str, query: str, candidates: list[str], ambiguous: bool = False):
        self.kind, self.query, self.candidates, self.ambiguous = kind, query, candidates, ambiguous
        if ambiguous:
            msg = f"{kind} {query!r} is ambiguous; it matches: {', '.join(candidates)}"
        else:
            hint = f"; closest: {', '.join(candidates)}" if candidates else ""
            msg = f"unknown {kind} {query!r}{hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------------------------
# Interconnects
# ----------------------------------------------------------------------------------------------------------------


class Interconnect(_Strict):
    """A link or memory tier that KV bytes (or activations) can cross."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    kind: Literal["gpu-gpu", "host", "fabric", "storage", "memory"]
    bandwidth_per_direction_GBps: float = Field(gt=0, description="sustained-peak bandwidth, one direction, GB/s")
    latency_s: float = Field(ge=0, description="one-way access latency, seconds")
    source: str = Field(description="datasheet or specification the numbers come from")
    notes: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Calibration (filled by `kvmodel calibrate`)
# ----------------------------------------------------------------------------------------------------------------


class BandwidthCurve(_Strict):
    """Time of one operation class: ``t = t0 + smoothmax(bytes, knee) / BW``.

    ``smoothmax(x, h) = (x^n + h^n)^(1/n)``: below ``knee_bytes`` the op is latency/occupancy bound (time flat),
    above it time grows at the plateau bandwidth. Equivalently BW_eff(bytes) = BW * bytes / smoothmax(bytes, knee),
    a curve that saturates at ``bw_GBps``.
    """

    t0_s: float = Field(ge=0, description="fixed cost per call (launch + sync), seconds")
    bw_GBps: float = Field(gt=0, description="plateau bandwidth, GB/s")
    knee_bytes: float = Field(ge=0, default=0.0, description="bytes below which time is flat")
    sharpness: float = Field(gt=0, default=2.0, description="exponent n of the smooth max")
    reread_weight: Optional[float] = Field(
        default=None, ge=0,
        description="P0-expand only: the curve is evaluated at bytes + reread_weight x the repeat reads DRAM serves "
                    "(kvmodel.timing.expand_charged_bytes); None: no such term")
    pairs_half: Optional[float] = Field(
        default=None, ge=0,
        description="P0 (SDPA) only: (sequence, KV head) pairs B x Hkv at which SDPA reaches 1/sqrt(2) of its "
                    "plateau bandwidth; the curve is evaluated at bytes / kvmodel.timing.sdpa_pair_efficiency "
                    "(kvmodel.timing.sdpa_charged_bytes); None: no such term")
    r2: Optional[float] = Field(default=None, description="fit quality (R^2 of log time)")
    n_points: Optional[int] = None
    median_abs_pct_error: Optional[float] = None


class FusedKernelCurve(_Strict):
    """Time of one fused decode-attention (P5) call by program occupancy: the parameters of
    :class:`kvmodel.timing.OccupancyCurve` (programs run in waves of ``c_res`` per SM; symbolic ``fused_wave_time``),
    fitted by :mod:`kvmodel.fused_fit`."""

    t0_s: float = Field(ge=0, description="fixed cost per call (launch), seconds")
    r1_GBps: float = Field(gt=0, description="streaming rate of a program alone on its SM, GB/s")
    rc_GBps: float = Field(gt=0, description="streaming rate of each of c_res programs sharing an SM, GB/s")
    c_res: int = Field(gt=0, description="programs resident per SM at once")
    head_dim_exponent: float = Field(default=0.0, description="per-program rate x (head_dim / 128)^e")
    program_overhead_bytes: float = Field(
        default=0.0, ge=0, description="fixed work per program (q load, epilogue, partial write), bytes at its rate")
    merge_s: float = Field(default=0.0, ge=0, description="split-K merge launch when splits > 1, seconds")
    merge_per_split_s: float = Field(default=0.0, ge=0, description="merge cost per split, seconds")
    merge_per_round_s: float = Field(default=0.0, ge=0, description="merge cost per round of split loads, seconds")
    merge_round_splits: int = Field(default=16, gt=0, description="splits the merge loads per round (> 4 splits)")
    one_split_rate_scale: float = Field(
        default=1.0, gt=0, description="per-program rate of the one-split launch relative to the split launch")
    l2_rate_scale: float = Field(
        default=1.0, gt=0, description="per-program rate of L2-served loads relative to DRAM-served ones")
    sm_sharpness: float = Field(
        default=0.0, ge=0, description="sharpness of an SM's saturation in resident programs (symbolic "
                                       "fused_wave_time_smooth); 0: the hard min of fused_wave_time")
    ceiling_GBps: float = Field(
        default=0.0, ge=0, description="the chip's read ceiling x the fitted fraction, GB/s: the call's DRAM bytes "
                                       "at this rate bound its streaming time (kvmodel.timing.fused_ceiling_time_s, "
                                       "a smooth max); 0: off")
    r2: Optional[float] = Field(default=None, description="fit quality (R^2 of log time)")
    n_points: Optional[int] = None
    median_abs_pct_error: Optional[float] = None

    def occupancy_curve(self):
        """This curve as a :class:`kvmodel.timing.OccupancyCurve`."""
        from kvmodel.timing import OccupancyCurve

        return OccupancyCurve(**self.model_dump(exclude={"r2", "n_points", "median_abs_pct_error"}))


class TPLinkDegree(_Strict):
    """All-reduce terms fitted at one tensor-parallel degree: t = latency + 2(N-1)/N x bytes / bandwidth."""

    latency_s: float = Field(ge=0)
    bw_GBps: float = Field(gt=0)
    r2: Optional[float] = None
    median_abs_pct_error: Optional[float] = None
    n_points: Optional[int] = None


class TPLinkCalibration(_Strict):
    """Measured GPU-GPU all-reduce terms (kvmodel.tp_fit); per degree where measured, else the joint fit."""

    bw_GBps: float = Field(gt=0, description="joint bus bandwidth fit, GB/s")
    launch_s: float = Field(ge=0, description="per-call launch cost, seconds")
    hop_latency_s: float = Field(ge=0, description="per ring hop, seconds (latency = launch + 2(N-1) hop)")
    joint_r2: Optional[float] = None
    source: str = ""
    per_tp: dict[int, TPLinkDegree] = Field(default_factory=dict)

    def terms(self, tp: int) -> tuple[float, float]:
        """(latency_s, bw_GBps) for degree ``tp``."""
        if tp in self.per_tp:
            d = self.per_tp[tp]
            return d.latency_s, d.bw_GBps
        return self.launch_s + 2 * (tp - 1) * self.hop_latency_s, self.bw_GBps


class Calibration(_Strict):
    """Measured parameters for one GPU and one runtime; written by ``kvmodel calibrate``."""

    gpu: str = Field(description="catalog name of the GPU it was measured on")
    runtime: str = Field(default="kvmodel-graph", description="which decode runtime the curves describe")
    device_name: str = ""
    driver: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""
    command: str = ""
    read_bw_GBps: float = Field(gt=0, description="measured streaming-read ceiling, GB/s")
    copy_bw_GBps: Optional[float] = Field(default=None, description="measured copy bandwidth (read+write), GB/s")
    step_overhead_s: float = Field(ge=0, default=0.0, description="per decode step fixed overhead, seconds")
    layer_overhead_s: Optional[float] = Field(
        default=None, ge=0, description="per layer cost of the small kernels (norms, RoPE, KV append), seconds"
    )
    ops: dict[str, BandwidthCurve] = Field(default_factory=dict, description="curves per operation class")
    fused: dict[str, FusedKernelCurve] = Field(
        default_factory=dict,
        description="fused-kernel (P5) occupancy curves, keyed like attention ops: 'attention:P5:k4v4:d128' "
                    "(block shapes pooled), 'attention:P5:k4v4:d128:n32w1' (one block shape), "
                    "'attention:P5-fp16:d128'; P5 calls without one use ``ops``")
    tp_link: Optional[TPLinkCalibration] = Field(default=None, description="measured all-reduce terms (TP)")
    fused_kernel_version: str = Field(
        default="", description="fused-kernel version that measured the P5 data (its decode-attention grid's "
                                "provenance): predictions with this calibration follow that kernel's launch rules "
                                "(split count, merge rounds); empty: unknown (the current kernel's rules)")
    notes: str = ""


# ----------------------------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------------------------


class GPUSpec(_Strict):
    """Datasheet values of one GPU (dense rates, no sparsity), each with its source in ``sources``."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    vendor: Literal["NVIDIA", "AMD", "Intel"]
    architecture: str
    memory_capacity_GiB: float = Field(gt=0, description="device memory as marketed (GB ~ GiB on these parts)")
    memory_bandwidth_GBps: float = Field(gt=0, description="datasheet memory bandwidth, GB/s")
    fp16_dense_TFLOPS: float = Field(gt=0, description="dense FP16/BF16 tensor rate, TFLOP/s")
    int8_dense_TOPS: Optional[float] = Field(default=None, gt=0, description="dense INT8 tensor rate, TOP/s")
    fp8_dense_TFLOPS: Optional[float] = Field(default=None, gt=0, description="dense FP8 tensor rate, TFLOP/s")
    sm_count: int = Field(gt=0, description="streaming multiprocessors (NVIDIA) or compute units (AMD)")
    l2_cache_MiB: float = Field(gt=0, description="last-level on-chip cache (L2; Infinity Cache on AMD), MiB")
    host_link: str = Field(description="interconnect catalog name of the host link")
    gpu_link: Optional[str] = Field(default=None, description="interconnect catalog name of the GPU-GPU link")
    tdp_W: Optional[float] = None
    sources: dict[str, str] = Field(description="field name (or 'all') -> datasheet citation")
    calibration: Optional[Calibration] = None

    @property
    def memory_capacity_bytes(self) -> float:
        return self.memory_capacity_GiB * GiB

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the FP16 roofline bends, from datasheet rates."""
        return self.fp16_dense_TFLOPS * 1e12 / (self.memory_bandwidth_GBps * 1e9)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class MoESpec(_Strict):
    num_experts: int = Field(gt=0, description="routed experts per MoE layer")
    top_k: int = Field(gt=0, description="routed experts per token")
    num_shared_experts: int = Field(ge=0, default=0)
    expert_intermediate_size: int = Field(gt=0)
    shared_intermediate_size: Optional[int] = Field(default=None, description="defaults to expert size")
    first_dense_layers: int = Field(ge=0, default=0, description="leading layers with a dense MLP instead")
    router_bias: bool = Field(default=False, description="per-expert score-correction bias (DeepSeek-V3)")

    @model_validator(mode="after")
    def _k_le_e(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self


class MLASpec(_Strict):
    """Multi-head latent attention: the cache holds one latent (kv_lora_rank) + rope key per token and layer."""

    q_lora_rank: Optional[int] = Field(default=None, description="None: plain q projection")
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)


class SlidingWindow(_Strict):
    window_tokens: int = Field(gt=0)
    num_sliding_layers: int = Field(ge=0, description="layers that attend only to the last window_tokens")


class ModelSpec(_Strict):
    """A decoder-only transformer architecture; ``head_dim`` is taken as given, never hidden/heads."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    hf_id: Optional[str] = Field(default=None, description="Hugging Face repository the config comes from")
    synthetic: bool = Field(default=False, description="a stand-in shape, not a released checkpoint")
    notes: str = ""
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="dense MLP width (MoE: width of the first dense layers)")
    mlp: Literal["gated", "plain"] = Field(default="gated", description="gated = 3 matrices (SwiGLU/GeGLU)")
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norms_per_layer: int = Field(default=2, ge=0)
    qk_norm: bool = Field(default=False, description="per-head RMSNorm on q and k (Qwen3, Gemma-3)")
    moe: Optional[MoESpec] = None
    mla: Optional[MLASpec] = None
    sliding_window: Optional[SlidingWindow] = None
    max_context_tokens: int = Field(gt=0, default=131072)
    # Gemma-3n extensions (defaults: absent). See kvmodel.architecture.param_breakdown for how they are counted.
    per_layer_input_dim: int = Field(
        default=0, ge=0, description="per-layer embedding width (Gemma-3n hidden_size_per_layer_input); 0: none"
    )
    per_layer_vocab_size: Optional[int] = Field(
        default=None, gt=0, description="rows of the per-layer embedding table (default: vocab_size)"
    )
    altup_num_inputs: int = Field(default=1, ge=1, description="AltUp residual streams (Gemma-3n: 4); 1: none")
    laurel_rank: int = Field(default=0, ge=0, description="LAuReL low-rank residual rank (Gemma-3n: 64); 0: none")
    num_kv_shared_layers: int = Field(
        default=0,
        ge=0,
        description="last layers reusing an earlier layer's K/V: no KV cache, no k/v projections of their own",
    )
    extra_params: int = Field(default=0, ge=0, description="parameters outside the text decoder (vision tower...)")
    extra_params_note: str = ""
    published_params: int = Field(gt=0, description="parameter count the publisher reports")
    published_params_source: str

    @model_validator(mode="after")
    def _shapes(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window and self.sliding_window.num_sliding_layers > self.num_layers:
            raise ValueError("sliding_window.num_sliding_layers exceeds num_layers")
        if self.moe and self.moe.first_dense_layers > self.num_layers:
            raise ValueError("moe.first_dense_layers exceeds num_layers")
        if self.num_kv_shared_layers >= self.num_layers:
            raise ValueError("num_kv_shared_layers must be smaller than num_layers")
        return self

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_cache_layers(self) -> int:
        """Layers that keep their own KV cache (all, except Gemma-3n's KV-shared layers)."""
        return self.num_layers - self.num_kv_shared_layers

    @property
    def kv_heads_cached(self) -> int:
        """Heads stored in the KV cache per layer (1 latent 'head' for MLA)."""
        return 1 if self.mla else self.num_kv_heads

    @property
    def k_dim_cached(self) -> int:
        """Channels of the cached key per head (MLA: latent + rope key)."""
        if self.mla:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return self.head_dim

    @property
    def v_dim_cached(self) -> int:
        """Channels of the cached value per head (MLA: 0, values are re-projected from the shared latent)."""
        return 0 if self.mla else self.head_dim


# ----------------------------------------------------------------------------------------------------------------
# KV formats and workloads
# ----------------------------------------------------------------------------------------------------------------


class KVFormat(_Strict):
    """Key and value precisions (bits) with per-group fp16 metadata for the integer formats."""

    k_bits: Literal[2, 3, 4, 5, 6, 8, 16] = 16
    v_bits: Literal[2, 3, 4, 5, 6, 8, 16] = 16
    group_size: int = Field(default=32, gt=0, description="channels sharing one scale (per token, per KV head)")
    asymmetric: bool = Field(default=False, description="scale + zero point (4 bytes/group) instead of scale only")
    float8: bool = Field(default=False, description="8-bit as FP8 e4m3 with no group metadata")

    @property
    def label(self) -> str:
        if self.float8:
            return "fp8"
        if self.k_bits == self.v_bits == 16:
            return "fp16"
        base = f"int{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"
        suffix = f"-g{self.group_size}" + ("-asym" if self.asymmetric else "")
        return base + suffix

    @property
    def meta_bytes_per_group(self) -> int:
        """Metadata bytes per quantization group: fp16 scale (2) or scale + zero (4)."""
        return 4 if self.asymmetric else 2

    def metadata_bytes(self, bits: int) -> int:
        """Metadata bytes per group for a tensor stored at ``bits`` (none for 16-bit or FP8)."""
        return 0 if (bits >= 16 or self.float8) else self.meta_bytes_per_group


_KV_NAMED = {
    "fp16": dict(k_bits=16, v_bits=16),
    "bf16": dict(k_bits=16, v_bits=16),
    "fp8": dict(k_bits=8, v_bits=8, float8=True),
    "int8": dict(k_bits=8, v_bits=8),
    "int4": dict(k_bits=4, v_bits=4),
}


def parse_kv_format(text: str, group_size: int = 32, asymmetric: bool = False) -> KVFormat:
    """Parse ``fp16|fp8|int8|int4|k8v4|k16v4|...`` into a :class:`KVFormat` (no eval, a fixed grammar)."""
    t = text.strip().lower()
    if t in _KV_NAMED:
        kw = dict(_KV_NAMED[t])
    else:
        m = re.fullmatch(r"k(\d+)v(\d+)", t) or re.fullmatch(r"int(\d+)", t)
        if not m:
            raise ValueError(
                f"unknown KV format {text!r}; use fp16, fp8, int8, int4, or kNvM such as k8v4, k16v4"
            )
        bits = [int(g) for g in m.groups()]
        kw = dict(k_bits=bits[0], v_bits=bits[-1])
    try:
        return KVFormat(group_size=group_size, asymmetric=asymmetric, **kw)
    except ValidationError as e:
        raise ValueError(f"invalid KV format {text!r}: {_first_error(e)}") from None


class Workload(_Strict):
    """One decode operating point."""

    batch: int = Field(default=1, gt=0)
    context_tokens: int = Field(gt=0, description="tokens already in the KV cache per sequence")
    kv: KVFormat = Field(default_factory=KVFormat)
    weight_bytes_per_param: float = Field(default=2.0, gt=0)
    gen_tokens: int = Field(default=1, gt=0, description="tokens generated (for the reread sum)")


# ----------------------------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------------------------

#: Largest context accepted (1 Gi tokens): far past any model, small enough for exact float64 byte counts.
MAX_TOKENS = 1 << 30

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_tokens(text: str | int) -> int:
    """Parse a token count: ``4096``, ``128k`` (=131072, k = 1024), ``1m`` (=1048576). Positive only."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ValueError(f"not a token count: {text!r} (examples: 4096, 32k, 128k, 1m)")
        mult = {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
        f = float(m.group(1)) * mult
        if f != int(f):
            raise ValueError(f"not a whole number of tokens: {text!r}")
        value = int(f)
    if value <= 0:
        raise ValueError(f"token count must be positive, got {text!r}")
    if value > MAX_TOKENS:
        raise ValueError(f"token count {value:,} is above the supported maximum {MAX_TOKENS:,} (1 Gi tokens)")
    return value


def _first_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def load_yaml_spec(path: Path | str, cls: type[BaseModel], text: str | None = None):
    """Load one YAML file into ``cls``; any problem becomes a :class:`SpecError` naming the file and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(text if text is not None else path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: malformed YAML: {e}") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: invalid {cls.__name__}: {_first_error(e)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Catalogs
# ----------------------------------------------------------------------------------------------------------------


def _package_files(package: str, pattern: str = "*.yaml") -> list[Path]:
    root = resources.files(package)
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(pattern.lstrip("*")))


@dataclass(frozen=True)
class Catalog:
    gpus: dict[str, GPUSpec]
    models: dict[str, ModelSpec]
    interconnects: dict[str, Interconnect]


def _normalize(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", name.strip().lower())


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """Load every shipped GPU, model and interconnect spec (cached)."""
    gpus = {}
    for p in _package_files("kvmodel.hardware"):
        if p.name == "interconnects.yaml":
            continue
        g = load_yaml_spec(p, GPUSpec)
        gpus[g.name] = g
    models = {}
    for p in _package_files("kvmodel.models"):
        m = load_yaml_spec(p, ModelSpec)
        models[m.name] = m
    inter = {}
    ipath = Path(str(resources.files("kvmodel.hardware") / "interconnects.yaml"))
    if ipath.exists():
        raw = yaml.safe_load(ipath.read_text()) or {}
        for i, item in enumerate(raw.get("interconnects", [])):
            try:
                link = Interconnect.model_validate(item)
            except ValidationError as e:
                raise SpecError(f"{ipath}: interconnects[{i}]: {_first_error(e)}") from None
            inter[link.name] = link
    for g in gpus.values():
        for field in ("host_link", "gpu_link"):
            ref = getattr(g, field)
            if ref is not None and inter and ref not in inter:
                raise SpecError(f"GPU {g.name}: field '{field}': unknown interconnect {ref!r}")
    return Catalog(gpus=gpus, models=models, interconnects=inter)


def _resolve(kind: str, query: str, items: dict, extra_keys=None) -> object:
    q = _normalize(query)
    table: dict[str, str] = {}
    for name, spec in items.items():
        table[_normalize(name)] = name
        for a in getattr(spec, "aliases", []):
            table.setdefault(_normalize(a), name)
    if q in table:
        return items[table[q]]
    if extra_keys:
        hits = extra_keys(re.sub(r"\s+", "", query.lower()))  # raw, not normalized: keep the "." of "0.5b"
        if len(hits) == 1:
            return items[hits[0]]
        if len(hits) > 1:
            raise LookupFailed(kind, query, sorted(hits), ambiguous=True)
    close = difflib.get_close_matches(q, list(table), n=5, cutoff=0.4)
    names = list(dict.fromkeys(table[c] for c in close))
    if not names:
        names = [n for n in items if q and q in _normalize(n)][:5]
    raise LookupFailed(kind, query, names)


def get_gpu(query: str) -> GPUSpec:
    """A GPU by catalog name or alias (case/punctuation-insensitive)."""
    return _resolve("GPU", query, catalog().gpus)


_VENDOR_PREFIX = re.compile(r"^\s*(nvidia|amd)\s+", re.I)


def gpu_for_device_name(device_name: str) -> GPUSpec:
    """The catalog GPU of a device name as the driver reports it (``torch.cuda.get_device_name``:
    "NVIDIA H100 80GB HBM3", "AMD Instinct MI300X"): as a name or alias, else without the vendor prefix.
    Raises :class:`LookupFailed` (a KeyError) naming the closest entries."""
    try:
        return get_gpu(device_name)
    except KeyError:
        short = _VENDOR_PREFIX.sub("", device_name).strip()
        if short == device_name.strip():
            raise
        return get_gpu(short)


def get_interconnect(query: str) -> Interconnect:
    return _resolve("interconnect", query, catalog().interconnects)


_SHORTHAND = re.compile(r"^(\d+(?:\.\d+)?)b$")


def _size_shorthand_hits(q: str) -> list[str]:
    """Models whose published size rounds to the shorthand ('24b' -> Mistral-Small-3.1-24B)."""
    m = _SHORTHAND.match(q)
    if not m:
        return []
    want = float(m.group(1))
    hits = []
    for name, spec in catalog().models.items():
        # "(?<![\d.xX])": the 7 of "8x7B" is an expert size, not the model's size
        sizes = {float(x) for x in re.findall(r"(?<![\d.xX])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", name)}
        if want in sizes:
            hits.append(name)
    return hits


def get_model(query: str) -> ModelSpec:
    """A model by catalog name, alias, unique size shorthand ('24b'), or path to a Hugging Face config.json."""
    p = Path(query)
    if query.endswith(".json") or (p.exists() and p.is_file()):
        return model_from_hf_config(p)
    return _resolve("model", query, catalog().models, extra_keys=_size_shorthand_hits)


def model_from_hf_config(path: Path | str) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` (Llama/Qwen2/Mistral/Gemma/Mixtral/DeepSeek-V3 keys).

    The parameter count is computed from the architecture (there is no published count to check against).
    """
    from kvmodel.architecture import param_breakdown  # local import: architecture imports specs

    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object")
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg, **cfg["text_config"]}
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    missing = [k for k in need if k not in cfg]
    if missing:
        raise SpecError(f"{path}: missing field(s) {', '.join(missing)} (not a decoder config.json?)")
    def num(key: str, default=None, minimum: int = 1) -> int:
        """An integer field of the config (bools and non-integral values refused), >= minimum."""
        value = cfg.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise SpecError(f"{path}: field '{key}': expected an integer, got {value!r}")
        if int(value) < minimum:
            raise SpecError(f"{path}: field '{key}': must be >= {minimum}, got {value!r}")
        return int(value)

    heads = num("num_attention_heads")
    hidden = num("hidden_size")
    kv = num("num_key_value_heads", heads)
    head_dim = num("head_dim", hidden // heads) if cfg.get("head_dim") is not None else hidden // heads
    if head_dim < 1:
        raise SpecError(f"{path}: field 'head_dim': hidden_size / num_attention_heads is below 1")
    mtype = str(cfg.get("model_type", "")).lower()
    act = str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))).lower()
    kw = dict(
        name=str(cfg.get("_name_or_path") or path.parent.name or path.stem),
        vocab_size=num("vocab_size"),
        hidden_size=hidden,
        num_layers=num("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=num("intermediate_size"),
        mlp="plain" if act in ("gelu_new", "gelu") and mtype in ("gpt2", "phi") else "gated",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", mtype in ("qwen2",))),
        qk_norm=mtype in ("qwen3", "gemma3", "gemma3_text", "qwen3_moe"),
        norms_per_layer=4 if mtype.startswith("gemma2") or mtype.startswith("gemma3") else 2,
        max_context_tokens=num("max_position_embeddings", 131072),
        published_params=1,
        published_params_source=f"computed from {path}",
    )
    try:
        n_exp = cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts")
        if n_exp:
            kw["moe"] = MoESpec(
                num_experts=num("num_local_experts" if cfg.get("num_local_experts") else
                                "n_routed_experts" if cfg.get("n_routed_experts") else "num_experts"),
                top_k=num("num_experts_per_tok", 2),
                num_shared_experts=num("n_shared_experts", 0, minimum=0),
                expert_intermediate_size=num("moe_intermediate_size", kw["intermediate_size"]),
                first_dense_layers=num("first_k_dense_replace", 0, minimum=0),
            )
        if cfg.get("kv_lora_rank"):
            q_lora = cfg.get("q_lora_rank")
            kw["mla"] = MLASpec(
                q_lora_rank=None if q_lora is None else num("q_lora_rank"),
                kv_lora_rank=num("kv_lora_rank"),
                qk_nope_head_dim=num("qk_nope_head_dim"),
                qk_rope_head_dim=num("qk_rope_head_dim"),
                v_head_dim=num("v_head_dim"),
            )
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", mtype.startswith("gemma")):
            pattern = num("sliding_window_pattern", 0, minimum=0)
            n_slide = kw["num_layers"] - kw["num_layers"] // pattern if pattern else kw["num_layers"]
            kw["sliding_window"] = SlidingWindow(window_tokens=num("sliding_window"), num_sliding_layers=n_slide)
        spec = ModelSpec(**kw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_first_error(e)}") from None
    total = param_breakdown(spec).total
    return spec.model_copy(update={"published_params": total})
