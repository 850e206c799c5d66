"""Bytes -> seconds: saturating bandwidth curves, launch/step overheads, and the roofline compute check.

Every operation class (weight GEMV/GEMM, attention per pipeline, LM head, tier transfer) takes

    t(bytes) = t0 + smoothmax(bytes, knee) / BW,     smoothmax(x, h) = (x^n + h^n)^(1/n)

so the effective bandwidth BW_eff = bytes / (t - t0) rises with bytes and saturates at the plateau BW; below the
knee the call is latency/occupancy bound. Calibrated curves come from ``kvmodel calibrate``; uncalibrated GPUs use
:func:`default_curves`, derived from datasheet values (documented there) and labelled "uncalibrated".
"""

from __future__ import annotations

import numpy as np

from kvmodel.specs import BandwidthCurve, GPUSpec

# Documented uncalibrated defaults -----------------------------------------------------------------------------
#: Fraction of datasheet bandwidth a well-written streaming kernel sustains (H100/H200 copy/read probes reach
#: 86-93 %; SDPA's FP16 decode ~90 %). Used only when no calibration exists.
DEFAULT_BW_EFFICIENCY = 0.85
#: Per-kernel fixed cost (launch + ramp + tail), seconds, graph-captured.
DEFAULT_KERNEL_T0_S = 4e-6
#: Bytes in flight needed to reach the plateau: ~ SMs x 64 KiB of outstanding loads.
DEFAULT_KNEE_BYTES_PER_SM = 64 * 1024
#: Per decode-step fixed overhead (sampling, graph launch, host sync), seconds.
DEFAULT_STEP_OVERHEAD_S = 30e-6
#: Per layer cost of the small kernels of a decode layer (2 norms, RoPE, KV append, 2 residual adds, activation)
#: when graph-captured: ~6 kernels x ~2 us.
DEFAULT_LAYER_OVERHEAD_S = 12e-6
#: Fraction of the dense FP16 tensor rate decode GEMMs reach when compute-bound.
DEFAULT_FLOP_EFFICIENCY = 0.7

OP_CLASSES = ("weights", "lm_head", "attention:P0", "attention:P0-expand", "attention:P1", "attention:P5",
              "tier")


def smoothmax(x, h, n):
    """Smooth maximum (x^n + h^n)^(1/n); x, h >= 0. Computed stably in log space for large exponents."""
    x = np.asarray(x, dtype=float)
    h = np.asarray(h, dtype=float)
    m = np.maximum(np.maximum(x, h), 1e-300)
    return m * ((x / m) ** n + (h / m) ** n) ** (1.0 / n)


def curve_time_s(nbytes, t0_s, bw_GBps, knee_bytes=0.0, sharpness=2.0):
    """Seconds for one call moving ``nbytes`` under a saturating bandwidth curve (vectorized)."""
    return t0_s + smoothmax(nbytes, knee_bytes, sharpness) / (bw_GBps * 1e9)


def op_time_s(curve: BandwidthCurve, nbytes):
    return curve_time_s(nbytes, curve.t0_s, curve.bw_GBps, curve.knee_bytes, curve.sharpness)


def default_curves(gpu: GPUSpec) -> dict[str, BandwidthCurve]:
    """Uncalibrated curves from the datasheet: BW = DEFAULT_BW_EFFICIENCY x datasheet for every op class.

    Pipelines that materialize buffers (P0-expand, P1) carry their extra bytes in the traffic model, not here.
    """
    bw = gpu.memory_bandwidth_GBps * DEFAULT_BW_EFFICIENCY
    knee = gpu.sm_count * DEFAULT_KNEE_BYTES_PER_SM
    curve = BandwidthCurve(t0_s=DEFAULT_KERNEL_T0_S, bw_GBps=bw, knee_bytes=knee, sharpness=2.0)
    return {op: curve for op in OP_CLASSES}


def fused_curve_key(k_bits, v_bits, head_dim, shape: str | None = None) -> str:
    """Key of a fused-kernel (P5) occupancy curve in ``Calibration.fused``, spelled like the attention op keys:
    ``attention:P5:k<kb>v<vb>:d<d>`` (``attention:P5-fp16:d<d>`` at 16/16), then ``:<shape>`` for one block shape
    (:func:`kernel_config_key`)."""
    kb, vb, d = int(k_bits), int(v_bits), int(head_dim)
    base = f"attention:P5:k{kb}v{vb}:d{d}" if kb < 16 or vb < 16 else f"attention:P5-fp16:d{d}"
    return f"{base}:{shape}" if shape else base


def _curve(curves: dict[str, BandwidthCurve], op: str) -> BandwidthCurve:
    if op in curves:
        return curves[op]
    if op.startswith("attention:") and "attention:P0" in curves:
        return curves["attention:P0"]
    return curves["weights"]


class TimeModel:
    """Turns per-call bytes into seconds for one GPU, from a calibration or the documented defaults."""

    def __init__(self, gpu: GPUSpec, calibration=None, kernel_version: str | None = None):
        self.gpu = gpu
        self.calibration = calibration
        #: fused-kernel version whose launch rules (split count, merge rounds) the P5 calls follow: by default the
        #: kernel that measured the calibration's P5 data (its curves describe that kernel's programs; another
        #: version's split counts would extrapolate them), else the current kernel
        cal_kv = getattr(calibration, "fused_kernel_version", "") or ""
        if kernel_version is None:
            kernel_version = cal_kv if cal_kv in KERNEL_PORT_VERSIONS else KERNEL_PORT_VERSION
        self.kernel_version = kernel_version
        _check_kernel_version(self.kernel_version)
        curves = default_curves(gpu)
        if calibration is not None:
            curves.update(calibration.ops)
        self.curves = curves
        #: fused-kernel occupancy curves (Calibration.fused), by fused_curve_key
        self.fused = {k: c.occupancy_curve() for k, c in (getattr(calibration, "fused", None) or {}).items()}
        self.calibrated = calibration is not None
        self.step_overhead_s = calibration.step_overhead_s if calibration is not None else DEFAULT_STEP_OVERHEAD_S
        lo = calibration.layer_overhead_s if calibration is not None else None
        self.layer_overhead_s = DEFAULT_LAYER_OVERHEAD_S if lo is None else lo
        self.peak_flops = gpu.fp16_dense_TFLOPS * 1e12 * DEFAULT_FLOP_EFFICIENCY

    @property
    def label(self) -> str:
        if self.calibration is None:
            return (f"uncalibrated: datasheet {self.gpu.memory_bandwidth_GBps:g} GB/s x {DEFAULT_BW_EFFICIENCY}, "
                    f"{DEFAULT_KERNEL_T0_S * 1e6:g} us per kernel")
        c = self.calibration
        kv = "" if self.kernel_version == KERNEL_PORT_VERSION else (
            f"; fused kernel {self.kernel_version}'s launch rules (its data; current {KERNEL_PORT_VERSION})")
        return f"calibrated: {c.gpu} / {c.runtime} ({c.date}, {c.device_name or 'device'}){kv}"

    def attention_op(self, pipeline: str, k_bits: int = 16, v_bits: int = 16, head_dim: int | None = None,
                     shape: str | None = None) -> str:
        """The most specific attention curve this model has for a pipeline, K/V format and head dim.

        Order (``:<shape>`` = the fused kernel's block shape, when given and calibrated, before the rest):
        ``attention:<P>:k<kb>v<vb>:d<d>`` then ``attention:<P>:k<kb>v<vb>`` (per-format calibrations of a
        quantized format), or ``attention:<P>-fp16:d<d>`` then ``attention:<P>-fp16`` (a quantized pipeline's
        kernel run at 16/16); then ``attention:<P>:d<d>``, ``attention:<P>``; op_time falls back to
        attention:P0 after that."""
        names = []
        suffix = [f":d{head_dim}", ""] if head_dim else [""]
        if head_dim and shape:  # the fused kernel's block shape (kernel_config_key), most specific of all
            suffix = [f":d{head_dim}:{shape}"] + suffix
        if k_bits < 16 or v_bits < 16:
            names += [f"attention:{pipeline}:k{k_bits}v{v_bits}{x}" for x in suffix]
        elif pipeline in ("P1", "P5"):
            names += [f"attention:{pipeline}-fp16{x}" for x in suffix]
        if head_dim:
            names.append(f"attention:{pipeline}:d{head_dim}")
        for n in names:
            if n in self.curves:
                return n
        return f"attention:{pipeline}"

    def has_fused(self, k_bits: int, v_bits: int, head_dim: int) -> bool:
        """Whether the calibration has a fused-kernel occupancy curve for this K/V format and head dim."""
        return fused_curve_key(k_bits, v_bits, head_dim) in self.fused

    def fused_curve(self, k_bits: int, v_bits: int, head_dim: int, shape: str | None = None):
        """The fused kernel's :class:`OccupancyCurve` for a format, head dim and block shape: the block shape's
        curve, else the pooled one of that format and head dim; None when the calibration has neither."""
        if shape:
            c = self.fused.get(fused_curve_key(k_bits, v_bits, head_dim, shape))
            if c is not None:
                return c
        return self.fused.get(fused_curve_key(k_bits, v_bits, head_dim))

    def op_time(self, op: str, nbytes, flops=0.0):
        """Seconds for one call of ``op`` moving ``nbytes`` and doing ``flops`` (roofline: the larger wins)."""
        t_mem = op_time_s(_curve(self.curves, op), nbytes)
        return np.maximum(t_mem, np.asarray(flops, dtype=float) / self.peak_flops)


# ----------------------------------------------------------------------------------------------------------------
# Occupancy of fused decode-attention kernels (issue 5; optional, nothing above uses it by default)
# ----------------------------------------------------------------------------------------------------------------


class OccupancyCurve:
    """A fused kernel whose programs stream their bytes in a latency-bound loop (symbolic ``fused_wave_time``).

    ``c_res`` programs fit on an SM at once; a program alone on its SM streams ``r1_GBps``, programs sharing an
    SM ``rc_GBps`` each (plateau ``sm_count * c_res * rc_GBps``). Launch cost ``t0_s``. ``head_dim_exponent``:
    per-program rate x (d / 128)^e (wider tiles give the loop more bytes per iteration); 0 ignores d.
    """

    def __init__(self, t0_s: float, r1_GBps: float, rc_GBps: float, c_res: int = 2, head_dim_exponent: float = 0.0,
                 program_overhead_bytes: float = 0.0, merge_s: float = 0.0, merge_per_split_s: float = 0.0,
                 merge_per_round_s: float = 0.0, merge_round_splits: int = 16, one_split_rate_scale: float = 1.0,
                 l2_rate_scale: float = 1.0, sm_sharpness: float = 0.0, ceiling_GBps: float = 0.0):
        self.t0_s = float(t0_s)
        self.r1_GBps = float(r1_GBps)
        self.rc_GBps = float(rc_GBps)
        self.c_res = int(c_res)
        self.head_dim_exponent = float(head_dim_exponent)
        #: fixed work of each program (q load, epilogue, partial write) in bytes-at-its-rate; 0: none
        self.program_overhead_bytes = float(program_overhead_bytes)
        #: split-K merge kernel (second launch + log-sum-exp merge), seconds, when splits > 1; 0: none
        self.merge_s = float(merge_s)
        #: merge cost per split (each merge program walks the splits of its (sequence, head) serially), seconds
        self.merge_per_split_s = float(merge_per_split_s)
        #: merge cost per round of split loads (the v3 merge reads its splits ``merge_round_splits`` at a time, 4
        #: at a time when there are <= 4: one round of loads in flight, so its latency grows in rounds), seconds
        self.merge_per_round_s = float(merge_per_round_s)
        self.merge_round_splits = int(merge_round_splits)
        #: per-program streaming rate of the one-split launch relative to the split launch (the kernel compiles a
        #: separate specialization, SPLIT=False, that normalizes and stores the output itself); 1: the same program
        self.one_split_rate_scale = float(one_split_rate_scale)
        #: per-program rate when the loads hit in L2 relative to DRAM (a latency-bound loop runs faster on the
        #: shorter L2 latency); applied to the fraction ``l2_hit`` of :meth:`time_s`; 1: no L2 effect
        self.l2_rate_scale = float(l2_rate_scale)
        #: sharpness n of an SM's saturation in its resident programs (symbolic ``fused_wave_time_smooth``): k
        #: programs on an SM each stream smoothmin_n(r_1, c_res*r_c/k); 0: the hard min of ``fused_wave_time``.
        #: Latency-bound 1-warp programs keep gaining from co-resident programs past the knee (more loads in
        #: flight) at a falling rate: Llama 8/8 d = 128 B = 1 T = 128K, same work in 256 / 512 / 1024 programs
        #: (2 / 4 / 8 per SM): 222 / 158 / 144 us, where a hard knee at 4 gives 2 : 1 : 1.
        self.sm_sharpness = float(sm_sharpness)
        #: the chip's read ceiling the call's DRAM bytes cannot beat (:func:`fused_ceiling_time_s`), GB/s: the
        #: measured read ceiling x one fitted fraction shared by all curves (kvmodel.fused_fit); 0: off (old
        #: calibrations, whose per-program rates were fitted without it)
        self.ceiling_GBps = float(ceiling_GBps or 0.0)

    def as_dict(self) -> dict:
        return dict(t0_s=self.t0_s, r1_GBps=self.r1_GBps, rc_GBps=self.rc_GBps, c_res=self.c_res,
                    head_dim_exponent=self.head_dim_exponent, program_overhead_bytes=self.program_overhead_bytes,
                    merge_s=self.merge_s, merge_per_split_s=self.merge_per_split_s,
                    merge_per_round_s=self.merge_per_round_s, merge_round_splits=self.merge_round_splits,
                    one_split_rate_scale=self.one_split_rate_scale, l2_rate_scale=self.l2_rate_scale,
                    sm_sharpness=self.sm_sharpness, ceiling_GBps=self.ceiling_GBps)

    def plateau_GBps(self, sm_count: int) -> float:
        return sm_count * self.c_res * self.rc_GBps

    def time_s(self, programs, nbytes, sm_count: int, head_dim=128, splits=None, l2_hit=None,
               merge_round_splits=None):
        """Seconds for one call of ``programs`` programs loading ``nbytes`` in total (vectorized). ``splits``: the
        split count per call (adds ``merge_s + merge_per_split_s * splits + merge_per_round_s * rounds`` where
        > 1). ``l2_hit``: fraction of the loads served from L2 (e.g. :func:`l2_hit_fraction`), default none.
        ``merge_round_splits``: splits the timed kernel's merge loads per round (its version's,
        :func:`kernel_config`), default the calibrated kernel's (``self.merge_round_splits``)."""
        p = np.maximum(np.asarray(programs, dtype=float), 1.0)
        nb = np.asarray(nbytes, dtype=float) + p * self.program_overhead_bytes
        t = fused_kernel_time_s(p, nb, sm_count, self.c_res, self.r1_GBps, self.rc_GBps, self.t0_s,
                                head_dim=head_dim, head_dim_exponent=self.head_dim_exponent,
                                sm_sharpness=self.sm_sharpness)
        if splits is not None and self.one_split_rate_scale != 1.0:
            one = np.asarray(splits, dtype=float) <= 1
            t = np.where(one, self.t0_s + (t - self.t0_s) / self.one_split_rate_scale, t)
        h = 0.0 if l2_hit is None else np.clip(np.asarray(l2_hit, dtype=float), 0.0, 1.0)
        if l2_hit is not None and self.l2_rate_scale != 1.0:
            t = self.t0_s + (t - self.t0_s) / (1.0 + h * (self.l2_rate_scale - 1.0))
        if self.ceiling_GBps > 0:
            # the call's DRAM bytes (its counted loads, less what L2 serves) at the chip's read ceiling
            dram = np.asarray(nbytes, dtype=float) * (1.0 - h)
            t = fused_ceiling_time_s(t - self.t0_s, dram, self.ceiling_GBps, self.t0_s)
        if splits is not None and (self.merge_s or self.merge_per_split_s or self.merge_per_round_s):
            ns = np.asarray(splits, dtype=float)
            t = t + np.where(ns > 1, self.merge_s + self.merge_per_split_s * ns
                             + self.merge_per_round_s * merge_rounds(
                                 ns, self.merge_round_splits if merge_round_splits is None else merge_round_splits),
                             0.0)
        return t

    def occupancy(self, programs, sm_count: int):
        """Achieved / plateau bandwidth at this many programs (symbolic ``fused_occupancy``)."""
        from kvmodel import traffic

        return traffic.evaluate("fused_occupancy", dict(
            P_prog=np.asarray(programs, dtype=float), N_SM=sm_count, c_res=self.c_res, r_1=self.r1_GBps * 1e9,
            r_c=self.rc_GBps * 1e9, W_prog=1.0, t_k0=0.0))


#: Sharpness n of the smooth max between a fused call's streaming time and its bytes at the read ceiling
#: (:func:`fused_ceiling_time_s`), fixed. 3: the fp16 d = 128 T = 1K one-wave launches (2 / 4 / 8 / 16 MB, 16-128
#: programs, the same bytes per program: 7.46 / 7.81 / 8.26 / 9.72 us) rise with their bytes, while large launches at
#: 60-70 % of the ceiling are not slowed much ((1 + 0.7^3)^(1/3) = 1.10; n = 2 charged them 1.22 and the int4
#: d = 64 large launches went to +16-22 %). Validation split, n = 2 / 3 / 4 / 6: training-fit p90 7.14 / 6.89 / 6.97 /
#: 6.99 % (n = 3 lowest), held-out attention max 16.2 / 14.3 / 16.4 / 16.9 % (also compared when choosing: a mild
#: selection on the held-out rows, stated in the validation report), fitted ceiling fraction 1.00 / 1.00 / 0.98 / 0.99.
FUSED_CEILING_SHARPNESS = 3.0


def fused_ceiling_time_s(stream_s, dram_bytes, ceiling_GBps, t0_s=0.0, sharpness=FUSED_CEILING_SHARPNESS):
    """Seconds of a fused (P5) call with the chip's read ceiling (symbolic ``fused_ceiling_time``):
    ``t0_s + smoothmax_n(stream_s, dram_bytes / ceiling)``. ``stream_s``: seconds the programs stream their bytes
    (the occupancy curve's wave time less t0; per-program, latency-bound); ``dram_bytes``: bytes of the whole call
    DRAM serves; ``ceiling_GBps``: the chip's read ceiling (GB/s; the measured one x a fitted fraction).
    Why: within one wave of at most one program per SM the wave time is flat in the number of programs, but no
    launch streams its bytes faster than the chip reads: H200 fp16 d = 128 T = 1K, 16 / 32 / 64 / 128 programs of the
    same bytes each (2 / 4 / 8 / 16 MB) take 7.46 / 7.81 / 8.26 / 9.72 us (16 MB need 3.7 us at 4.5 TB/s). Never
    below ``t0_s + dram_bytes / ceiling``, monotone in both inputs; ``ceiling_GBps`` <= 0: ``t0_s + stream_s``
    (off). Vectorized."""
    from kvmodel import traffic

    st = np.asarray(stream_s, dtype=float)
    if not ceiling_GBps or ceiling_GBps <= 0:
        return t0_s + st
    return traffic.evaluate("fused_ceiling_time", dict(
        t_k0=float(t0_s), t_stream=np.maximum(st, 0.0), W_dram=np.asarray(dram_bytes, dtype=float),
        BW_ceil=float(ceiling_GBps) * 1e9, n_ceil=float(sharpness)))


def l2_hit_fraction(span_bytes, l2_bytes):
    """Fraction of a call's loads served by L2 when its inputs are one of a rotating set spanning ``span_bytes``
    in total, revisited in turn (a benchmark's rotation pool, or a step's whole KV): all of it when the span fits in
    the L2, none when it does not (cyclic reuse over more than the cache thrashes it). Vectorized."""
    return np.where(np.asarray(span_bytes, dtype=float) <= float(l2_bytes), 1.0, 0.0)


def expand_reread_miss(context, head_dim, l2_bytes):
    """Fraction of P0-expand's repeat reads (symbolic ``attn_bytes_P0_expand_reread``: each (sequence, KV head) slab
    is read once per query head of its group) that DRAM serves. ``repeat_interleave`` along the head axis is an
    expand + contiguous clone: it writes the G copies of one slab of T x d fp16 values one after the other, so
    between two reads of a source line the copy reads the rest of that slab and writes one copy of it, 2 x T x d x 2
    bytes; L2 serves the repeats while that fits (:func:`l2_hit_fraction`), DRAM when it does not (H200, 50 MiB:
    d = 128 from T = 128K, d = 64 not at 128K). Vectorized over context / head_dim."""
    span = 2.0 * np.asarray(context, dtype=float) * np.asarray(head_dim, dtype=float) * 2.0
    return 1.0 - l2_hit_fraction(span, l2_bytes)


def expand_charged_bytes(nbytes, reread_bytes, miss, weight: float):
    """Bytes a P0-expand curve is evaluated at: its counted traffic (``attn_bytes_P0_expand``, the KV read once)
    plus ``weight`` x the repeat reads DRAM serves (``reread_bytes`` x ``miss``, :func:`expand_reread_miss`).
    ``weight``: the time of a DRAM-served repeat read relative to a counted byte (the copy is not bound by DRAM
    bandwidth, so less than 1), fitted; 0 switches the term off. Vectorized."""
    return (np.asarray(nbytes, dtype=float)
            + float(weight) * np.asarray(reread_bytes, dtype=float) * np.asarray(miss, dtype=float))


#: Sharpness of SDPA's (P0) saturation in its (sequence, KV head) pairs (:func:`sdpa_pair_efficiency`), fixed: with
#: 2 the H200 rows at T = 128K (2 / 4 / 8 / 16 / 32 pairs: 2.38 / 3.27 / 3.86-4.11 / 4.34 / 4.47 TB/s) follow one
#: saturation parameter; the training split identifies that parameter, not the shape.
SDPA_PAIRS_SHARPNESS = 2.0


def sdpa_pair_efficiency(pairs, pairs_half):
    """Fraction of its plateau bandwidth SDPA (P0, FlashAttention decode) reaches with ``pairs`` (sequence, KV head)
    pairs in the call (B x Hkv), symbolic ``sdpa_pair_efficiency``: ``(1 + (pairs_half / pairs)^n)^(-1/n)``, n = :data:`SDPA_PAIRS_SHARPNESS`,
    dimensionless, in (0, 1], rising with pairs. Why: the kernel parallelizes over (sequence, head) pairs and
    splits the context among them; with few pairs fewer loads are in flight than DRAM needs (H200, T = 128K: 2 pairs
    2.38 TB/s, 32 pairs 4.47 TB/s), which the bytes alone do not show. ``pairs_half`` (pairs at which the efficiency
    is 1/sqrt(2)), fitted; None or 0 switches the term off (1). Vectorized."""
    from kvmodel import traffic

    if not pairs_half:
        return np.ones(np.shape(pairs)) if np.ndim(pairs) else 1.0
    return traffic.evaluate("sdpa_pair_efficiency", dict(
        P_pairs=np.maximum(np.asarray(pairs, dtype=float), 1e-9), P_half=float(pairs_half),
        n_pairs=SDPA_PAIRS_SHARPNESS))


def sdpa_charged_bytes(nbytes, pairs, pairs_half):
    """Bytes a P0 (SDPA) curve is evaluated at: its counted traffic (``attn_bytes_P0``) over
    :func:`sdpa_pair_efficiency` (bytes; the curve's byte term streams at the plateau bandwidth x the efficiency,
    while below its knee the launch-bound floor is left alone). ``pairs_half`` None or 0: the counted bytes.
    Vectorized."""
    return np.asarray(nbytes, dtype=float) / sdpa_pair_efficiency(pairs, pairs_half)


def dequant_v_layout(v_bits, head_dim) -> str:
    """Layout of a V cache as the kernels allocate it by default (``kernels.quant.default_v_layout``, kernel v8,
    ported): 'token_octet' for 4-bit V at every head dim, else 'channel'. K is always 'channel'. ``head_dim`` is
    kept in the signature: the layout was head-dim dependent up to kernel v7 (channel at d = 64)."""
    return "token_octet" if int(v_bits) == 4 else "channel"


#: Layouts the non-fused pipeline's dequantize kernel reads (``kernels.quant.dequantize_fp16``: K in channel layout,
#: V in :func:`dequant_v_layout`); each is its own code path with its own rate.
DEQUANT_LAYOUTS = ("channel", "token_octet")


def dequant_step_time_s(bytes_k, bytes_v, v_layout, curves: dict):
    """Seconds of P1's dequantize step: one kernel per half stored below 16 bits (``bytes_k`` / ``bytes_v`` > 0:
    symbolic ``attn_bytes_P1_dequant_k`` / ``_v``; a 16-bit half is used in place, no launch), each timed by the
    bandwidth curve of the layout it reads (``curves[layout]``: K 'channel', V ``v_layout``,
    :func:`dequant_v_layout`), so a call pays one launch floor per dequantized half. Vectorized over the bytes
    (``v_layout`` one string, or an array of them)."""
    bk = np.asarray(bytes_k, dtype=float)
    bv = np.asarray(bytes_v, dtype=float)

    def launch(nb, c):
        return np.where(nb > 0, curve_time_s(nb, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness), 0.0)

    lay = np.broadcast_to(np.asarray(v_layout, dtype=object), np.broadcast_shapes(bk.shape, bv.shape))
    tv = np.zeros(lay.shape)
    for name in set(lay.ravel()):
        m = lay == name
        tv = np.where(m, launch(bv, curves[name]), tv)
    return launch(bk, curves["channel"]) + tv


def merge_rounds(splits, round_splits: int = 16):
    """Rounds of loads the split-K merge makes: ``ceil(splits / r)`` with r = 4 for <= 4 splits, else
    ``round_splits`` (kernels.decode_attention's merge launch, BLOCK_S: 16 up to kernel v9; v10 reads
    KERNEL_MERGE_MAX_ELEMS / d per round, i.e. one round at every small-launch split count). Vectorized."""
    ns = np.asarray(splits, dtype=float)
    r = np.where(ns <= 4, 4.0, np.asarray(round_splits, dtype=float))
    return np.ceil(ns / r)


def fused_kernel_time_s(programs, nbytes, sm_count, c_res, r1_GBps, rc_GBps, t0_s=0.0, head_dim=128,
                        head_dim_exponent=0.0, sm_sharpness=0.0):
    """Seconds of a fused kernel: ``programs`` programs share ``nbytes`` equally, run in waves of c_res per SM
    (symbolic ``fused_wave_time``; with ``sm_sharpness`` n > 0 ``fused_wave_time_smooth``, the SM's throughput
    saturating smoothly in its resident programs). Vectorized over programs / nbytes / head_dim."""
    from kvmodel import traffic

    programs = np.maximum(np.asarray(programs, dtype=float), 1.0)
    scale = (np.asarray(head_dim, dtype=float) / 128.0) ** head_dim_exponent
    vals = dict(P_prog=programs, N_SM=float(sm_count), c_res=float(c_res), r_1=r1_GBps * 1e9 * scale,
                r_c=rc_GBps * 1e9 * scale, W_prog=np.asarray(nbytes, dtype=float) / programs, t_k0=t0_s)
    if sm_sharpness and sm_sharpness > 0:
        return traffic.evaluate("fused_wave_time_smooth", dict(vals, n_sat=float(sm_sharpness)))
    return traffic.evaluate("fused_wave_time", vals)



#: Tiles per split of the long-split rule (``kernels.decode_attention.LONG_SPLIT_TILES``); v11 caps shorter splits.
KERNEL_LONG_SPLIT_TILES = 4


def split_count(batch_kv_heads, context_tokens, sm_count: int, block_n: int = 64, programs_per_sm: int = 4,
                min_tiles_per_split: int = 4, max_splits: int = 128, short_split_programs: int | None = None):
    """Splits along the context that fill the SMs: the rule of kernels.decode_attention.choose_num_splits (minimize
    waves x (tiles per program + 1) + 0.5 for the merge launch, at most two waves; splits shorter than 4 tiles only
    while the launch has at most ``short_split_programs`` programs, None = no cap), ported without torch.
    Vectorized (element-wise)."""

    def one(n, T):
        n = max(int(n), 1)
        tiles = max(1, -(-int(T) // block_n))
        slots = max(1, sm_count * programs_per_sm)
        waves2 = (2 * slots) // n  # at most two waves
        s_max = min(max_splits, tiles // min_tiles_per_split, waves2)
        if short_split_programs is not None and min_tiles_per_split < KERNEL_LONG_SPLIT_TILES:
            s_long = min(max_splits, tiles // KERNEL_LONG_SPLIT_TILES, waves2)
            s_max = max(s_long, min(s_max, short_split_programs // n))
        s_max = max(1, s_max)
        best, best_cost = 1, None
        for s in range(1, s_max + 1):
            per = -(-tiles // s)
            s_eff = -(-tiles // per)
            cost = -(-(n * s_eff) // slots) * (per + 1.0) + (0.5 if s_eff > 1 else 0.0)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = s_eff, cost
        return float(best)

    return np.vectorize(one, otypes=[float])(batch_kv_heads, context_tokens)


#: Token-heads per launch (B · program heads · T) from which the fused kernel switches to its throughput block
#: shapes (``kernels.decode_attention.LARGE_WORK``, kernel v4; v3 used 2^20).
KERNEL_LARGE_WORK = 1 << 18


#: Fused-kernel version this port mirrors (``kernels.decode_attention.KERNEL_VERSION``; tests/test_kernels.py
#: checks they agree, tests/test_validation.py holds the port to the committed grid of this version).
KERNEL_PORT_VERSION = "v12"
#: Most fp32 partial-output elements (splits x head dim) the merge reads in one round of loads
#: (``kernels.decode_attention.MERGE_MAX_ELEMS``, kernel v10).
KERNEL_MERGE_MAX_ELEMS = 8192


#: Kernel versions the port can describe: v8-v11 share the block shapes; v10 changed the split bounds of small
#: launches and the merge's splits per round, v11 capped v10's short splits by the launch's programs (so committed
#: grids of each version are predicted with their own rules), v12 changed the large 4/4 launches (d = 128: 8
#: programs per SM in the split rule instead of 16; d = 256: the 1-warp shape with the K fold at 8 instead of 2 warps
#: at 16).
KERNEL_PORT_VERSIONS = ("v8", "v9", "v10", "v11", "v12")


#: Programs per SM the split rule assumes for the 1-warp 32-token shape, by format class and head dim
#: (``kernels.decode_attention.SHAPE_PROGRAMS_PER_SM``; other shapes: 4). v5-v11, then v12's (4/4 at d = 128 and
#: the 1-warp 4/4 shape at d = 256: 8).
KERNEL_ONE_WARP_PROGRAMS_PER_SM = {("4/4", 64): 16, ("4/4", 128): 16, ("16-bit part", 64): 9,
                                   ("16-bit part", 128): 8, ("8-bit part", 64): 8, ("8-bit part", 128): 8}
KERNEL_ONE_WARP_PROGRAMS_PER_SM_V12 = {**KERNEL_ONE_WARP_PROGRAMS_PER_SM, ("4/4", 128): 8, ("4/4", 256): 8}


def _check_kernel_version(version: str) -> int:
    if version not in KERNEL_PORT_VERSIONS:
        raise ValueError(f"kernel version {version!r} is not ported (known: {', '.join(KERNEL_PORT_VERSIONS)})")
    return int(version[1:])


def kernel_config(k_bits, v_bits, head_dim, batch, prog_heads, context, version: str = KERNEL_PORT_VERSION) -> dict:
    """The fused split-K kernel's block shape for one call: the rule of ``kernels.decode_attention.default_config``
    (kernel ``version``, default the current one), ported without torch. Returns block_n, num_warps,
    programs_per_sm (what the kernel's split rule assumes), ``k_fold`` (K's group scales folded into the score
    tile, symmetric 4-bit K, v9+), ``merge`` ('pdl': the split merge as a programmatic dependent launch, small
    launches of the 4-warp shape; else 'kernel'), ``min_tiles_per_split`` / ``max_splits`` (the split rule's
    bounds: v10 2 / MERGE_MAX_ELEMS / d for small launches with a quantized part, else 4 / 128),
    ``short_split_programs_per_sm`` (v11: those 2-tile splits only while the launch has at most SMs × this many
    programs: 1 for the 4-warp shape, 4 for the 1-warp one at d = 64; None = no cap),
    ``merge_round_splits`` (splits the merge loads per round beyond 4: v10 max(16, MERGE_MAX_ELEMS / d), before
    16) and ``large`` (B·heads·T ≥ KERNEL_LARGE_WORK). The choice is a deterministic function of the call, so a
    model may use it: the two sides of the threshold are different programs with different per-token costs."""
    kb, vb, d = int(k_bits), int(v_bits), int(head_dim)
    v = _check_kernel_version(version)
    large = float(batch) * float(prog_heads) * float(context) >= KERNEL_LARGE_WORK
    rule = dict(min_tiles_per_split=KERNEL_LONG_SPLIT_TILES, max_splits=128, merge_round_splits=16,
                short_split_programs_per_sm=None)
    if v >= 10:
        rule["merge_round_splits"] = max(16, KERNEL_MERGE_MAX_ELEMS // d)
        if not large and (kb, vb) != (16, 16):
            rule.update(min_tiles_per_split=2, max_splits=KERNEL_MERGE_MAX_ELEMS // d)
            if v >= 11:  # short splits only up to SMs x 1 programs (4-warp shape) or x 4 (1-warp, d = 64)
                rule["short_split_programs_per_sm"] = 4 if d == 64 else 1
    if kb == 16 and vb == 16:
        bn = 128 if d == 128 and large else 64
        return dict(block_n=bn, num_warps=4, programs_per_sm=4, merge="kernel" if large else "pdl", large=large,
                    k_fold=False, **rule)
    if not large and d != 64:
        return dict(block_n=64, num_warps=4, programs_per_sm=4, merge="pdl", large=large, k_fold=False, **rule)
    k_fold = large and kb == 4 and v >= 9  # v9: K's group scales folded into the score tile (symmetric caches)
    if d > 128 and not (v >= 12 and (kb, vb) == (4, 4)):
        return dict(block_n=32, num_warps=2, programs_per_sm=16 if (kb, vb) == (4, 4) else 4, merge="kernel",
                    large=large, k_fold=k_fold, **rule)
    fmt = "8-bit part" if 8 in (kb, vb) else "4/4" if (kb, vb) == (4, 4) else "16-bit part"
    table = KERNEL_ONE_WARP_PROGRAMS_PER_SM_V12 if v >= 12 else KERNEL_ONE_WARP_PROGRAMS_PER_SM
    pps = table.get((fmt, d), 4)
    return dict(block_n=32, num_warps=1, programs_per_sm=pps, merge="kernel", large=large, k_fold=k_fold, **rule)


def kernel_config_key(cfg: dict) -> str:
    """A short name of a block shape: 'n<BLOCK_N>w<warps>' (e.g. 'n64w4', the small-launch shape)."""
    return f"n{cfg['block_n']}w{cfg['num_warps']}"


def short_programs(cfg: dict, sm_count: int) -> int | None:
    """Most programs a launch of ``cfg`` (:func:`kernel_config`) may have while its splits are shorter than 4
    tiles (kernel v11: SMs × ``short_split_programs_per_sm``); None = no such cap."""
    pps = cfg.get("short_split_programs_per_sm")
    return int(sm_count) * int(pps) if pps else None


def kernel_split_count(k_bits, v_bits, head_dim, batch, kv_heads, context, sm_count: int,
                       version: str = KERNEL_PORT_VERSION):
    """Splits the fused kernel (``version``, default the current one) actually launches: its block shape from
    :func:`kernel_config`, then :func:`split_count` with that shape's tile size, programs per SM and split bounds
    (vectorized over batch / context)."""

    def one(B, T):
        c = kernel_config(k_bits, v_bits, head_dim, B, kv_heads, T, version)
        return float(split_count(B * kv_heads, T, sm_count, block_n=c["block_n"],
                                 programs_per_sm=c["programs_per_sm"],
                                 min_tiles_per_split=c["min_tiles_per_split"], max_splits=c["max_splits"],
                                 short_split_programs=short_programs(c, sm_count)))

    return np.vectorize(one, otypes=[float])(batch, context)
