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


def _curve(curves: dict[str, BandwidthCurve], op: str) -> BandwidthCurve:
    if op in curves:
        return curves[op]
    if op.startswith("attention:") and "attention:P0" in curves:
        return curves["attention:P0"]
    return curves["weights"]


class TimeModel:
    """Turns per-call bytes into seconds for one GPU, from a calibration or the documented defaults."""

    def __init__(self, gpu: GPUSpec, calibration=None):
        self.gpu = gpu
        self.calibration = calibration
        curves = default_curves(gpu)
        if calibration is not None:
            curves.update(calibration.ops)
        self.curves = curves
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
        return f"calibrated: {c.gpu} / {c.runtime} ({c.date}, {c.device_name or 'device'})"

    def op_time(self, op: str, nbytes, flops=0.0):
        """Seconds for one call of ``op`` moving ``nbytes`` and doing ``flops`` (roofline: the larger wins)."""
        t_mem = op_time_s(_curve(self.curves, op), nbytes)
        return np.maximum(t_mem, np.asarray(flops, dtype=float) / self.peak_flops)
