"""Speculative decoding on top of the traffic model, and its composition with KV quantization.

Orchestration only; every expression is a registered formula (``expected_tokens_per_verify[_q|_tree]``,
``tree_nodes``, ``attn_bytes_verify_P0/P1/P5``, ``dequant_ops``, ``spec_speedup``, ``spec_quant_speedup``,
``quant_speedup``, ``composition_ratio``, ``composition_ratio_bound``).

One verification runs the target model on n_q query tokens per sequence (k + 1 for a linear draft of k tokens,
nodes + 1 for a tree). It reads the weights once (routed experts touched by n_q x B tokens), does n_q x the
FLOPs, and reads the KV cache ``1 + eta (n_q - 1)`` times: eta = 0 is a kernel whose KV tiles serve all queries
(the plain traffic model), eta = 1 a kernel that re-reads the cache per query. The four times

    t_base   plain step, FP16 KV          t_quant  plain step, quantized KV
    t_ver    verification, FP16 KV        t_ver_q  verification, quantized KV

and the expected tokens per verification in each arm give S_spec, S_quant, S_combined and
rho = S_combined / (S_quant x S_spec).

Mechanisms that move rho away from 1 (each a switch here, each discussed in docs/speculation.md):

- ``eta``: KV re-read per verification query -> rho > 1, growing with the KV share (context, batch).
- compute: verification does n_q x the FLOPs; where it turns compute-bound the bytes quantization saves no
  longer shorten it -> rho < 1 (large batch). Always on (roofline in the timing model).
- ``verify_pipeline='P1'``: the quantized arm verifies through a dequantize-to-FP16 buffer -> rho < 1.
- ``dequant_ops``: scalar dequantization work per element read, on the CUDA cores -> rho < 1.
- acceptance alpha(B, T): lowers both arms alike -> rho unchanged; ``alpha_quant`` != ``alpha`` (the quantized
  model drafts/accepts differently) -> rho = E_q / E x the traffic rho.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvmodel import traffic
from kvmodel.predict import FP16, step_time_s, weights_time_s
from kvmodel.specs import GPUSpec, KVFormat, ModelSpec, SpecError
from kvmodel.timing import TimeModel

#: Scalar (CUDA-core) rate as a fraction of the dense FP16 tensor rate, for dequantization work (H100: 67 of
#: 989 TFLOP/s FP32 non-tensor, A100: 19.5 of 312). Used only when dequant_ops > 0.
SCALAR_RATE_FRACTION = 1 / 16

VERIFY_FORMULAS = {"P0": "attn_bytes_verify_P0", "P5": "attn_bytes_verify_P5", "P1": "attn_bytes_verify_P1"}


# ----------------------------------------------------------------------------------------------------------------
# Acceptance
# ----------------------------------------------------------------------------------------------------------------


class AcceptanceTable:
    """alpha(B, T) from a CSV with columns ``batch, context, alpha`` (optional ``alpha_quant``), interpolated
    linearly in (log2 B, log2 T) inside the table and held at the nearest point outside it."""

    def __init__(self, rows: list[dict], source: str = "table"):
        if not rows:
            raise SpecError(f"{source}: acceptance table has no rows")
        self.source = source
        self.B = np.array([r["batch"] for r in rows], dtype=float)
        self.T = np.array([r["context"] for r in rows], dtype=float)
        self.alpha = np.array([r["alpha"] for r in rows], dtype=float)
        aq = [r.get("alpha_quant") for r in rows]
        self.alpha_quant = None if any(a is None for a in aq) else np.array(aq, dtype=float)
        for name, arr in (("alpha", self.alpha), ("alpha_quant", self.alpha_quant)):
            if arr is not None and ((arr <= 0) | (arr >= 1)).any():
                raise SpecError(f"{source}: {name} must lie strictly between 0 and 1")

    @classmethod
    def from_csv(cls, path: str | Path) -> AcceptanceTable:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"{path}: cannot read: {e.strerror}") from None
        reader = csv.DictReader(text.splitlines())
        need = {"batch", "context", "alpha"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise SpecError(f"{path}: acceptance CSV needs columns batch, context, alpha (optional alpha_quant); "
                            f"got {', '.join(reader.fieldnames or []) or 'none'}")
        extra = set(reader.fieldnames) - need - {"alpha_quant"}
        if extra:
            raise SpecError(f"{path}: unknown column(s) {', '.join(sorted(extra))}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                from kvmodel.specs import parse_tokens

                row = {"batch": int(r["batch"]), "context": parse_tokens(r["context"]), "alpha": float(r["alpha"])}
                if r.get("alpha_quant") not in (None, ""):
                    row["alpha_quant"] = float(r["alpha_quant"])
                if row["batch"] <= 0:
                    raise ValueError("batch must be positive")
            except (ValueError, TypeError) as e:
                raise SpecError(f"{path}: line {i}: {e}") from None
            rows.append(row)
        return cls(rows, source=str(path))

    def _interp(self, values: np.ndarray, B, T):
        from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

        x = np.log2(self.B)
        y = np.log2(self.T)
        qB = np.log2(np.asarray(B, dtype=float))
        qT = np.log2(np.asarray(T, dtype=float))
        if len(np.unique(x)) == 1 or len(np.unique(y)) == 1:
            axis, q = (y, qT) if len(np.unique(x)) == 1 else (x, qB)
            order = np.argsort(axis)
            return np.interp(q, axis[order], values[order])
        pts = np.column_stack([x, y])
        lin = LinearNDInterpolator(pts, values)(qB, qT)
        near = NearestNDInterpolator(pts, values)(qB, qT)
        return np.where(np.isfinite(lin), lin, near)

    def alpha_at(self, B, T):
        return self._interp(self.alpha, B, T)

    def alpha_quant_at(self, B, T):
        return None if self.alpha_quant is None else self._interp(self.alpha_quant, B, T)


def expected_tokens(alpha, k: int, branching: int = 1):
    """Expected tokens per verification: linear (branching 1) or a uniform tree of depth k."""
    alpha = np.clip(np.asarray(alpha, dtype=float), 1e-9, 1 - 1e-9)
    if branching == 1:
        return traffic.evaluate("expected_tokens_per_verify", {"alpha": alpha, "k_d": k})
    return traffic.evaluate("expected_tokens_per_verify_tree", {"alpha": alpha, "k_d": k, "b_tree": branching})


def verify_queries(k: int, branching: int = 1) -> float:
    """Query tokens per sequence in one verification: the drafted tokens plus the last accepted one."""
    return 1.0 + float(traffic.evaluate("tree_nodes", {"b_tree": np.float64(branching), "k_d": np.float64(k)}))


def alpha_from_tokens(E, k: int) -> float:
    """Invert expected_tokens_per_verify for alpha (linear draft); E clipped to (1, k + 1)."""
    from scipy.optimize import brentq

    E = float(E)
    if E <= 1 + 1e-9:
        return 1e-6
    if E >= k + 1 - 1e-9:
        return 1 - 1e-6
    return brentq(lambda a: float(expected_tokens(a, k)) - E, 1e-9, 1 - 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Verification time
# ----------------------------------------------------------------------------------------------------------------


def verify_time_s(tm: TimeModel, model: ModelSpec, kv: KVFormat, B, T, n_q: float, eta: float = 0.0,
                  pipeline: str = "P5", weight_bytes_per_param: float = 2.0, dequant_ops: float = 0.0):
    """Seconds for one verification forward of n_q query tokens per sequence (vectorized over B and T).

    Weights: every matrix once with n_q x B tokens of FLOPs (roofline-checked); attention per layer from the
    ``attn_bytes_verify_*`` formula; plus scalar dequantization work when ``dequant_ops`` > 0.
    ``n_q = 1, eta = 0`` with pipeline P0/P5 equals step_time_s exactly (checked in the tests)."""
    if pipeline not in VERIFY_FORMULAS:
        raise ValueError(f"verification pipeline must be one of {', '.join(VERIFY_FORMULAS)}")
    fmt = FP16 if pipeline == "P0" else kv
    B = np.asarray(B, dtype=float)
    T = np.asarray(T, dtype=float)
    overhead = tm.step_overhead_s + model.num_layers * tm.layer_overhead_s
    t = overhead + weights_time_s(tm, model, B * n_q, weight_bytes_per_param)
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(fmt))
    v.update(B=B, n_q=n_q, eta=eta)
    op = "attention:P1" if pipeline == "P1" else ("attention:P0" if pipeline == "P0" else "attention:P5")
    flops_per_tok = 2.0 * B * v["H_q"] * (v["d"] + max(v["d_v"], v["d_q"])) * n_q
    name = VERIFY_FORMULAS[pipeline]
    L, L_s, W = v["L"], v["L_s"], v["W"]
    t = t + (L - L_s) * tm.op_time(op, traffic.evaluate(name, {**v, "T": T}), flops_per_tok * T)
    if L_s:
        Tw = np.minimum(T, W)
        t = t + L_s * tm.op_time(op, traffic.evaluate(name, {**v, "T": Tw}), flops_per_tok * Tw)
    if dequant_ops and pipeline != "P0":
        ops = traffic.evaluate("dequant_ops", {**v, "T": T, "c_dq": dequant_ops})
        t = t + ops / (tm.peak_flops * SCALAR_RATE_FRACTION)
    return t


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecConfig(_Out):
    """Speculation and mechanism settings."""

    k: int = Field(default=5, ge=1, le=64, description="drafted tokens (tree depth)")
    branching: int = Field(default=1, ge=1, le=8, description="tree branches per node (1: linear)")
    alpha: float = Field(default=0.8, gt=0, lt=1, description="per-token acceptance, FP16 arm")
    alpha_quant: float | None = Field(default=None, gt=0, lt=1, description="acceptance, quantized arm")
    eta: float = Field(default=0.0, ge=0, le=1, description="KV re-read fraction per extra verification query")
    verify_pipeline_quant: str = Field(default="P5", description="P5 fused or P1 dequantize-to-buffer")
    dequant_ops: float = Field(default=0.0, ge=0, description="scalar ops per KV element dequantized")
    draft_cost: float = Field(default=0.0, ge=0, description="draft time per drafted token / plain step time")
    weight_bytes_per_param: float = Field(default=2.0, gt=0)


class SpecResult(_Out):
    gpu: str
    model: str
    batch: int
    context_tokens: int
    kv_format: str
    config: SpecConfig
    alpha: float
    alpha_quant: float
    queries_per_verify: float
    expected_tokens: float
    expected_tokens_quant: float
    t_base_s: float
    t_quant_s: float
    t_verify_s: float
    t_verify_quant_s: float
    t_draft_s: float
    speedup_quant: float
    speedup_spec: float
    speedup_combined: float
    composition_ratio: float
    composition_ratio_bound: float = Field(description="largest rho bytes allow at equal acceptance: r / S_quant")
    tokens_per_s: float = Field(description="aggregate, speculation on quantized KV")
    timing: str


def speculate(gpu: GPUSpec, model: ModelSpec, kv: KVFormat, batch: int, context_tokens: int,
              cfg: SpecConfig | None = None, acceptance: AcceptanceTable | None = None,
              calibration=None) -> SpecResult:
    """S_quant, S_spec, S_combined and rho for one operating point under ``cfg`` (default SpecConfig())."""
    cfg = cfg if cfg is not None else SpecConfig()
    if cfg.verify_pipeline_quant not in ("P5", "P1"):
        raise ValueError("verify_pipeline_quant must be P5 (fused) or P1 (dequantize to an FP16 buffer)")
    tm = TimeModel(gpu, calibration)
    B, T = batch, context_tokens
    a = float(acceptance.alpha_at(B, T)) if acceptance is not None else cfg.alpha
    aq_t = acceptance.alpha_quant_at(B, T) if acceptance is not None else None
    aq = float(aq_t) if aq_t is not None else (cfg.alpha_quant if cfg.alpha_quant is not None else a)
    nq = verify_queries(cfg.k, cfg.branching)
    wb = cfg.weight_bytes_per_param
    t_base = float(step_time_s(tm, model, FP16, B, T, "P0", wb))
    t_quant = float(step_time_s(tm, model, kv, B, T, "P5", wb))
    t_ver = float(verify_time_s(tm, model, FP16, B, T, nq, cfg.eta, "P0", wb))
    t_ver_q = float(verify_time_s(tm, model, kv, B, T, nq, cfg.eta, cfg.verify_pipeline_quant, wb,
                                  cfg.dequant_ops))
    t_draft = cfg.draft_cost * cfg.k * t_base
    E = float(expected_tokens(a, cfg.k, cfg.branching))
    Eq = float(expected_tokens(aq, cfg.k, cfg.branching))
    vals = dict(E_tok=E, E_tok_q=Eq, t_base=t_base, t_quant=t_quant, t_ver=t_ver, t_ver_q=t_ver_q, t_draft=t_draft)
    ev = lambda n: float(traffic.evaluate(n, vals))
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(kv))
    r = float(traffic.evaluate("compression_ratio", v))
    return SpecResult(
        gpu=gpu.name, model=model.name, batch=B, context_tokens=T, kv_format=kv.label, config=cfg, alpha=a,
        alpha_quant=aq, queries_per_verify=nq, expected_tokens=E, expected_tokens_quant=Eq, t_base_s=t_base,
        t_quant_s=t_quant, t_verify_s=t_ver, t_verify_quant_s=t_ver_q, t_draft_s=t_draft,
        speedup_quant=ev("quant_speedup"), speedup_spec=ev("spec_speedup"), speedup_combined=ev("spec_quant_speedup"),
        composition_ratio=ev("composition_ratio"),
        composition_ratio_bound=float(traffic.evaluate("composition_ratio_bound",
                                                       {"r": r, "t_quant": t_quant, "t_base": t_base})),
        tokens_per_s=B * ev("spec_quant_speedup") / t_base, timing=tm.label)


def render_spec(s: SpecResult) -> str:
    c = s.config
    kind = "linear" if c.branching == 1 else f"tree (branching {c.branching})"
    lines = [
        f"Speculative decoding - {s.model} on {s.gpu}: batch {s.batch}, context {s.context_tokens:,}, KV "
        f"{s.kv_format}",
        f"  {kind} draft k = {c.k}: {s.queries_per_verify:g} queries per verification; acceptance {s.alpha:.3f} "
        f"(FP16) / {s.alpha_quant:.3f} (quantized) -> {s.expected_tokens:.2f} / {s.expected_tokens_quant:.2f} "
        f"tokens per verification",
        f"  mechanisms: KV re-read eta = {c.eta:g}, quantized verification {c.verify_pipeline_quant}, dequant ops "
        f"{c.dequant_ops:g}/element, draft cost {c.draft_cost:g} step/token",
        f"  times: step {s.t_base_s * 1e3:.3f} ms (FP16) / {s.t_quant_s * 1e3:.3f} ms ({s.kv_format}); verification "
        f"{s.t_verify_s * 1e3:.3f} ms / {s.t_verify_quant_s * 1e3:.3f} ms; draft {s.t_draft_s * 1e3:.3f} ms",
        f"  S_quant {s.speedup_quant:.3f}  S_spec {s.speedup_spec:.3f}  S_combined {s.speedup_combined:.3f}  "
        f"rho {s.composition_ratio:.3f}  (bytes-only bound at equal acceptance: {s.composition_ratio_bound:.3f})",
        f"  throughput with both: {s.tokens_per_s:,.0f} tokens/s",
        f"  timing: {s.timing}",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The study's measurements (spev06) and what the model makes of them
# ----------------------------------------------------------------------------------------------------------------

#: spev06 stage J (A100-SXM4-80GB, vLLM, ngram-5 prompt-lookup speculation, FP8 KV cache as the quantized arm),
#: public repository mcgrof/public-knlp-key-results at commit 48c0c0f, decode/spev06/json/
#: stageJ_composition_analysis.json: (model, context, batch, baseline, fp8-only, spec-only, combined) tokens/s.
SPEV06 = {
    "source": "mcgrof/public-knlp-key-results@48c0c0f decode/spev06/json/stageJ_composition_analysis.json",
    "gpu": "A100-SXM4-80GB", "runtime": "vLLM", "speculation": "ngram-5 (k = 5)", "quant": "fp8",
    "rows": [
        ("Qwen2.5-7B", 2048, 1, 73.3, 77.01, 410.35, 289.52),
        ("Qwen2.5-7B", 2048, 4, 289.64, 306.62, 1397.3, 870.54),
        ("Qwen2.5-7B", 2048, 16, 1110.76, 1162.74, 3960.68, 2940.62),
        ("Qwen2.5-7B", 4096, 1, 74.38, 76.13, 379.54, 247.26),
        ("Qwen2.5-7B", 4096, 4, 286.73, 303.14, 1272.96, 737.57),
        ("Qwen2.5-7B", 4096, 16, 1078.75, 1137.53, 3697.58, 2254.94),
        ("Qwen2.5-7B", 8192, 1, 73.06, 75.1, 310.34, 220.75),
        ("Qwen2.5-7B", 8192, 4, 280.77, 297.74, 960.82, 594.31),
        ("Qwen2.5-7B", 8192, 16, 1008.87, 1055.95, 2741.17, 1730.29),
        ("Qwen2.5-7B", 16384, 1, 72.18, 76.1, 230.01, 153.1),
        ("Qwen2.5-7B", 16384, 4, 271.99, 283.11, 655.73, 452.43),
        ("Qwen2.5-7B", 16384, 16, 806.37, 862.12, 1745.28, 1072.56),
        ("Llama-3.1-8B", 2048, 1, 67.51, 70.98, 389.94, 372.77),
        ("Llama-3.1-8B", 2048, 4, 267.24, 285.75, 1308.62, 1296.8),
        ("Llama-3.1-8B", 2048, 16, 872.14, 1090.11, 3633.09, 3409.01),
        ("Llama-3.1-8B", 4096, 1, 67.85, 71.53, 354.17, 373.74),
        ("Llama-3.1-8B", 4096, 4, 263.61, 278.47, 1092.49, 1206.67),
        ("Llama-3.1-8B", 4096, 16, 847.73, 977.81, 3103.32, 2605.26),
        ("Llama-3.1-8B", 8192, 1, 66.73, 70.08, 287.21, 360.82),
        ("Llama-3.1-8B", 8192, 4, 255.43, 274.69, 881.33, 1085.25),
        ("Llama-3.1-8B", 8192, 16, 782.15, 775.93, 2669.85, 2082.0),
        ("Llama-3.1-8B", 16384, 1, 65.53, 68.72, 212.88, 335.61),
        ("Llama-3.1-8B", 16384, 4, 248.26, 264.75, 598.73, 809.31),
        ("Llama-3.1-8B", 16384, 16, 575.3, 558.21, 1705.62, 1357.36),
        ("Llama-3.1-8B", 32768, 1, 64.97, 67.48, 139.18, 282.56),
        ("Llama-3.1-8B", 32768, 4, 198.73, 214.94, 367.66, 604.92),
        ("Llama-3.1-8B", 32768, 16, 377.09, 368.3, 960.75, 894.33),
        ("Mistral-7B-v0.3", 2048, 1, 68.49, 71.27, 422.66, 400.94),
        ("Mistral-7B-v0.3", 2048, 4, 269.83, 285.5, 1377.94, 1430.03),
        ("Mistral-7B-v0.3", 2048, 16, 878.34, 1114.12, 3862.14, 2349.12),
        ("Mistral-7B-v0.3", 4096, 1, 67.38, 71.07, 378.85, 388.95),
        ("Mistral-7B-v0.3", 4096, 4, 267.08, 286.21, 1059.96, 1156.32),
        ("Mistral-7B-v0.3", 4096, 16, 865.56, 1018.47, 3098.58, 2620.14),
        ("Mistral-7B-v0.3", 8192, 1, 66.7, 70.97, 303.07, 366.87),
        ("Mistral-7B-v0.3", 8192, 4, 260.4, 280.45, 862.42, 999.16),
        ("Mistral-7B-v0.3", 8192, 16, 814.53, 810.42, 2161.56, 1750.82),
        ("Mistral-7B-v0.3", 16384, 1, 66.37, 70.62, 222.71, 353.78),
        ("Mistral-7B-v0.3", 16384, 4, 251.97, 273.13, 589.12, 807.36),
        ("Mistral-7B-v0.3", 16384, 16, 593.21, 577.04, 1109.04, 1137.07),
    ],
}

#: The mechanisms compared against the measurements (name -> SpecConfig overrides).
MECHANISMS = {
    "plain": dict(),
    "reread": dict(eta=1.0),
    "dequant-buffer": dict(verify_pipeline_quant="P1"),
    "reread+buffer": dict(eta=1.0, verify_pipeline_quant="P1"),
    "dequant-compute": dict(eta=1.0, dequant_ops=4.0),
}


class StudyRow(_Out):
    model: str
    context: int
    batch: int
    measured_speedup_quant: float
    measured_speedup_spec: float
    measured_speedup_combined: float
    measured_rho: float
    model_rho: dict[str, float] = Field(description="rho per mechanism at equal acceptance in both arms")
    model_speedup_quant: float
    rho_bound_measured: float = Field(description="r / measured S_quant: most rho bytes allow at equal acceptance")
    alpha_spec: float = Field(description="acceptance that reproduces the measured S_spec (plain verification)")
    tokens_ratio_needed: float = Field(description="E_quant / E_fp16 that reproduces measured rho (plain traffic)")
    tokens_ratio_needed_reread: float = Field(description="E_quant / E_fp16 needed on top of per-query re-reads")
    alpha_quant_needed: float | None = Field(description="acceptance in the FP8 arm that would give it")


def study_comparison(gpu: GPUSpec, models: dict[str, ModelSpec] | None = None, k: int = 5,
                     kv: KVFormat | None = None) -> list[StudyRow]:
    """Model the spev06 composition table under each mechanism (equal acceptance), and solve for the
    acceptance ratio the measured rho needs under plain traffic."""
    from kvmodel.specs import get_model, parse_kv_format

    kv = kv or parse_kv_format("fp8")
    out = []
    cache: dict[str, ModelSpec] = dict(models or {})
    for name, T, B, base, quant, spec, comb in SPEV06["rows"]:
        m = cache.get(name) or cache.setdefault(name, get_model(name))
        s_q, s_s, s_c = quant / base, spec / base, comb / base
        rho_m = {}
        res = {}
        for mech, over in MECHANISMS.items():
            res[mech] = speculate(gpu, m, kv, B, T, SpecConfig(k=k, alpha=0.8, **over))
            rho_m[mech] = res[mech].composition_ratio
        plain = res["plain"]
        v = traffic.model_symbols(m)
        v.update(traffic.kv_symbols(kv))
        r = float(traffic.evaluate("compression_ratio", v))
        # acceptance reproducing S_spec under plain verification: E = S_spec x t_ver / t_base
        E = s_s * plain.t_verify_s / plain.t_base_s
        a = alpha_from_tokens(E, k)
        need = (s_c / (s_q * s_s)) / rho_m["plain"]
        Eq = need * float(expected_tokens(a, k))
        aq = alpha_from_tokens(Eq, k) if 1 < Eq < k + 1 else None
        out.append(StudyRow(
            model=m.name, context=T, batch=B, measured_speedup_quant=s_q, measured_speedup_spec=s_s,
            measured_speedup_combined=s_c, measured_rho=s_c / (s_q * s_s), model_rho=rho_m,
            model_speedup_quant=plain.speedup_quant, rho_bound_measured=r / s_q, alpha_spec=a,
            tokens_ratio_needed=need, tokens_ratio_needed_reread=(s_c / (s_q * s_s)) / rho_m["reread"],
            alpha_quant_needed=aq))
    return out


class TrendRow(_Out):
    model: str
    context: int
    batch: int
    measured_spec: float
    measured_combined: float
    plain_spec: float
    plain_combined: float
    reread_spec: float
    reread_combined: float
    implied_reads_fp16: float | None = Field(description="KV reads per FP16 verification that match S_spec "
                                                "(acceptance of the reread fit)")
    implied_reads_quant: float | None = Field(description="KV reads per quantized verification matching S_comb")


def _implied_reads(tm, m, kv, B, T, nq, pipeline, t_needed, wb=2.0) -> float | None:
    """Number of times a verification must read the KV cache to take ``t_needed`` (None outside 0.2..200)."""
    from scipy.optimize import brentq

    f = lambda reads: float(verify_time_s(tm, m, kv, B, T, nq, (reads - 1) / (nq - 1), pipeline, wb)) - t_needed
    lo, hi = 0.2, 200.0
    if f(lo) > 0 or f(hi) < 0:
        return None
    return brentq(f, lo, hi)


def study_trend(gpu: GPUSpec, batch: int = 1, k: int = 5, kv: KVFormat | None = None) -> list[TrendRow]:
    """Hold acceptance at the value that reproduces each model's shortest-context S_spec (fitted separately under
    plain and re-read verification), then predict S_spec and S_combined at every context of the study: does the
    mechanism alone explain how speculation loses speed with context, and how FP8 keeps it?"""
    from kvmodel.specs import get_model, parse_kv_format

    kv = kv or parse_kv_format("fp8")
    rows = [r for r in SPEV06["rows"] if r[2] == batch]
    out = []
    for name in dict.fromkeys(r[0] for r in rows):
        m = get_model(name)
        mine = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        fit = {}
        for mech, eta in (("plain", 0.0), ("reread", 1.0)):
            _, T0, B0, base, _, spec, _ = mine[0]
            r0 = speculate(gpu, m, kv, B0, T0, SpecConfig(k=k, eta=eta))
            fit[mech] = alpha_from_tokens(spec / base * r0.t_verify_s / r0.t_base_s, k)
        for _, T, B, base, quant, spec, comb in mine:
            res = {mech: speculate(gpu, m, kv, B, T, SpecConfig(k=k, eta=eta, alpha=fit[mech]))
                   for mech, eta in (("plain", 0.0), ("reread", 1.0))}
            rr = res["reread"]
            tm = TimeModel(gpu)
            t16 = rr.expected_tokens * rr.t_base_s / (spec / base)
            tq = rr.expected_tokens_quant * rr.t_base_s / (comb / base)
            out.append(TrendRow(model=m.name, context=T, batch=B, measured_spec=spec / base,
                                measured_combined=comb / base, plain_spec=res["plain"].speedup_spec,
                                plain_combined=res["plain"].speedup_combined, reread_spec=rr.speedup_spec,
                                reread_combined=rr.speedup_combined,
                                implied_reads_fp16=_implied_reads(tm, m, FP16, B, T, rr.queries_per_verify, "P0", t16),
                                implied_reads_quant=_implied_reads(tm, m, kv, B, T, rr.queries_per_verify, "P5", tq)))
    return out


def render_trend(rows: list[TrendRow]) -> str:
    lines = ["| model | T | B | S_spec meas | S_spec plain | S_spec reread | S_comb meas | S_comb plain | "
             "S_comb reread | KV reads/verify FP16 | KV reads/verify quant |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    for r in rows:
        lines.append(f"| {r.model} | {r.context} | {r.batch} | {r.measured_spec:.2f} | {r.plain_spec:.2f} | "
                     f"{r.reread_spec:.2f} | {r.measured_combined:.2f} | {r.plain_combined:.2f} | "
                     f"{r.reread_combined:.2f} | {fmt(r.implied_reads_fp16)} | {fmt(r.implied_reads_quant)} |")
    return "\n".join(lines) + "\n"


def render_study(rows: list[StudyRow], gpu_name: str) -> str:
    """Markdown tables of the comparison (what docs/speculation.md shows)."""
    mechs = list(MECHANISMS)
    lines = [
        f"Measured: {SPEV06['source']} ({SPEV06['gpu']}, {SPEV06['runtime']}, {SPEV06['speculation']}, quantized "
        f"arm = {SPEV06['quant']} KV). Modelled on {gpu_name} (uncalibrated unless a calibration exists), equal "
        "acceptance in both arms unless stated.",
        "",
        "| model | T | B | S_q meas | S_q model | S_spec meas | S_comb meas | rho meas | "
        + " | ".join(f"rho {m}" for m in mechs)
        + " | bound r/S_q | alpha (spec) | E_q/E needed | E_q/E needed w/ reread | alpha_q needed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(mechs) + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        aq = f"{r.alpha_quant_needed:.3f}" if r.alpha_quant_needed is not None else "none in (0,1)"
        lines.append(
            f"| {r.model} | {r.context} | {r.batch} | {r.measured_speedup_quant:.3f} | {r.model_speedup_quant:.3f} | "
            f"{r.measured_speedup_spec:.2f} | {r.measured_speedup_combined:.2f} | **{r.measured_rho:.3f}** | "
            + " | ".join(f"{r.model_rho[m]:.3f}" for m in mechs)
            + f" | {r.rho_bound_measured:.3f} | {r.alpha_spec:.3f} | {r.tokens_ratio_needed:.3f} | "
              f"{r.tokens_ratio_needed_reread:.3f} | {aq} |")
    lines.append("")
    by_model: dict[str, list[StudyRow]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    lines.append("| model | rho meas (mean, min-max) | " + " | ".join(f"rho {m} (min-max)" for m in mechs)
                 + " | rows above bound r/S_q |")
    lines.append("|---|---|" + "---|" * len(mechs) + "---:|")
    for name, rs in by_model.items():
        meas = [r.measured_rho for r in rs]
        cells = []
        for m in mechs:
            vals = [r.model_rho[m] for r in rs]
            cells.append(f"{min(vals):.3f}-{max(vals):.3f}")
        above = sum(r.measured_rho > r.rho_bound_measured for r in rs)
        lines.append(f"| {name} | {np.mean(meas):.3f} ({min(meas):.3f}-{max(meas):.3f}) | " + " | ".join(cells)
                     + f" | {above} of {len(rs)} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "MECHANISMS",
    "SPEV06",
    "AcceptanceTable",
    "SpecConfig",
    "SpecResult",
    "alpha_from_tokens",
    "expected_tokens",
    "render_spec",
    "render_study",
    "render_trend",
    "speculate",
    "study_comparison",
    "study_trend",
    "verify_queries",
    "verify_time_s",
]
