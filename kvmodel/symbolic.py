"""Every formula of the model, once, as a sympy expression.

This module is the single source of truth: ``traffic.py`` lambdifies these expressions to numpy, ``kvmodel
explain`` prints them, and the tests prove identities on them (e.g. the reread closed form equals the explicit
sum). Nothing here is re-typed elsewhere.

Units: bytes, seconds, FLOPs; bandwidths in bytes/s inside the formulas (GB/s = 1e9 B/s at the edges).
Per decode step; "per layer" quantities are multiplied by layer counts explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

# ----------------------------------------------------------------------------------------------------------------
# Symbols
# ----------------------------------------------------------------------------------------------------------------
_pos = dict(positive=True)
_nonneg = dict(nonnegative=True)

B = sp.Symbol("B", **_pos)  # batch (sequences decoded together)
T = sp.Symbol("T", **_pos)  # context: tokens already cached per sequence
L = sp.Symbol("L", **_pos)  # layers
L_s = sp.Symbol("L_s", **_nonneg)  # sliding-window layers (subset of L)
W = sp.Symbol("W", **_pos)  # sliding window, tokens
Hq = sp.Symbol("H_q", **_pos)  # query heads
Hkv = sp.Symbol("H_kv", **_pos)  # KV heads cached per layer (1 latent head for MLA)
d = sp.Symbol("d", **_pos)  # key channels per cached head
dv = sp.Symbol("d_v", **_nonneg)  # value channels per cached head (0 for MLA: values come from the latent)
s_kv = sp.Symbol("s_kv", **_pos)  # fraction of layers that own a KV cache (Gemma-3n shares KV across layers)
dq = sp.Symbol("d_q", **_pos)  # query/output channels per query head
bk = sp.Symbol("b_k", **_pos)  # key bits
bv = sp.Symbol("b_v", **_pos)  # value bits
g = sp.Symbol("g", **_pos)  # quantization group (channels per scale)
mk = sp.Symbol("m_k", **_nonneg)  # metadata bytes per key group (0 for 16-bit/FP8, 2 symmetric, 4 asymmetric)
mv = sp.Symbol("m_v", **_nonneg)  # metadata bytes per value group
bw = sp.Symbol("b_w", **_pos)  # bytes per weight parameter
ba = sp.Symbol("b_a", **_pos)  # bytes per activation element (2 for fp16/bf16)
h = sp.Symbol("h", **_pos)  # hidden size
V = sp.Symbol("V", **_pos)  # vocabulary
P_always = sp.Symbol("P_always", **_nonneg)  # params streamed every step (attention, dense MLP, norms, routers)
P_lm = sp.Symbol("P_lm", **_nonneg)  # LM-head params (V*h; the embedding table itself when tied)
P_total = sp.Symbol("P_total", **_pos)  # all params of the text decoder (embedding included)
P_exp = sp.Symbol("P_exp", **_nonneg)  # params of one routed expert
E = sp.Symbol("E", **_pos)  # routed experts per MoE layer
k_top = sp.Symbol("k", **_pos)  # routed experts per token
L_moe = sp.Symbol("L_moe", **_nonneg)  # MoE layers
r = sp.Symbol("r", **_pos)  # KV compression ratio (FP16 bytes / quantized bytes)
f = sp.Symbol("f", **_nonneg)  # KV fraction of step bytes
C0 = sp.Symbol("C_0", **_nonneg)  # prompt length
Gen = sp.Symbol("G_en", **_pos)  # tokens generated
i = sp.Symbol("i", integer=True, nonnegative=True)  # summation index
M_cap = sp.Symbol("M_cap", **_pos)  # device memory capacity, bytes
M_ws = sp.Symbol("M_ws", **_nonneg)  # workspace reserve (activations, allocator), bytes
phi = sp.Symbol("phi", **_nonneg)  # fragmentation fraction of capacity lost
k_draft = sp.Symbol("k_d", **_nonneg)  # speculative draft length
alpha = sp.Symbol("alpha", **_pos)  # per-token acceptance probability (0 < alpha < 1)
t_step = sp.Symbol("t_step", **_pos)  # target step time, seconds
BW_link = sp.Symbol("BW_link", **_pos)  # tier link bandwidth, bytes/s
N_tp = sp.Symbol("N", **_pos)  # tensor-parallel degree
lat_ar = sp.Symbol("lambda_ar", **_nonneg)  # per all-reduce latency, seconds


# ----------------------------------------------------------------------------------------------------------------
# Formula registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Formula:
    name: str
    expr: sp.Expr
    unit: str
    doc: str

    @property
    def symbols(self) -> list[sp.Symbol]:
        return sorted(self.expr.free_symbols, key=lambda s: s.name)


FORMULAS: dict[str, Formula] = {}


def _def(name: str, expr, unit: str, doc: str) -> sp.Expr:
    FORMULAS[name] = Formula(name, sp.sympify(expr), unit, doc)
    return FORMULAS[name].expr


# KV cache ------------------------------------------------------------------------------------------------------
kv_bytes_per_token_layer = _def(
    "kv_bytes_per_token_layer",
    Hkv * (d * bk + dv * bv) / 8 + Hkv * (sp.ceiling(d / g) * mk + sp.ceiling(dv / g) * mv),
    "bytes",
    "KV bytes one token adds to one layer: packed K and V plus per-group metadata (m = 0 for 16-bit).",
)
kv_bytes_per_token = _def(
    "kv_bytes_per_token", L * kv_bytes_per_token_layer, "bytes", "KV bytes one token adds, all layers."
)
kv_metadata_bytes_per_token = _def(
    "kv_metadata_bytes_per_token",
    L * Hkv * (sp.ceiling(d / g) * mk + sp.ceiling(dv / g) * mv),
    "bytes",
    "Scale/zero bytes per token, all layers (part of kv_bytes_per_token).",
)
kv_fp16_bytes_per_token_layer = _def(
    "kv_fp16_bytes_per_token_layer",
    kv_bytes_per_token_layer.subs({bk: 16, bv: 16, mk: 0, mv: 0}),
    "bytes",
    "The same token at FP16 (the uncompressed reference).",
)
cached_token_layers = _def(
    "cached_token_layers",
    (L - L_s) * T + L_s * sp.Min(T, W),
    "token-layers",
    "Tokens attended per sequence summed over layers: sliding-window layers see at most W tokens.",
)
kv_read_bytes = _def(
    "kv_read_bytes",
    B * kv_bytes_per_token_layer * cached_token_layers,
    "bytes",
    "KV bytes read per decode step (every cached token of every sequence, every layer).",
)
kv_write_bytes = _def(
    "kv_write_bytes", s_kv * B * kv_bytes_per_token, "bytes",
    "KV bytes written per step (the new token), only in layers that own a cache (s_kv of them)."
)

# Weights ---------------------------------------------------------------------------------------------------------
experts_touched = _def(
    "experts_touched",
    E * (1 - (1 - k_top / E) ** B),
    "experts",
    "Expected distinct routed experts per MoE layer touched by B tokens each drawing k of E (uniform routing).",
)
n_exp = sp.Symbol("n_exp", **_nonneg)  # routed experts per MoE layer actually touched (a measured count)


def _weights_streamed(touched):
    return bw * (P_always + P_lm + B * h + L_moe * P_exp * touched)


weight_bytes_streamed = _def(
    "weight_bytes_streamed",
    _weights_streamed(experts_touched),
    "bytes",
    "Weights read per step: every always-active matrix once, the LM head once, B embedding rows gathered, and "
    "the routed experts some token picked. The embedding table itself is not streamed (unless tied, as LM head).",
)
weight_bytes_streamed_given_experts = _def(
    "weight_bytes_streamed_given_experts",
    _weights_streamed(n_exp),
    "bytes",
    "weight_bytes_streamed with the routed experts touched per MoE layer given (n_exp, e.g. counted from the "
    "router's picks in a measured step) instead of the uniform-routing expectation.",
)
weight_bytes_paper = _def(
    "weight_bytes_paper",
    bw * P_total,
    "bytes",
    "The study's convention: parameters x bytes, embedding table and all experts included.",
)
activation_bytes = _def(
    "activation_bytes",
    ba * B * (V + 4 * h * L),
    "bytes",
    "Activations crossing HBM per step (logits, residual in/out per layer); small, kept for completeness.",
)

step_bytes = _def(
    "step_bytes",
    weight_bytes_streamed + kv_read_bytes + kv_write_bytes + activation_bytes,
    "bytes",
    "All bytes a decode step must move with a fused attention kernel (P5/P0).",
)
kv_fraction = _def(
    "kv_fraction",
    kv_read_bytes / step_bytes,
    "1",
    "f: share of step bytes that is KV reads.",
)
crossover_context = _def(
    "crossover_context",
    (weight_bytes_streamed / (B * kv_bytes_per_token_layer) - L_s * W) / (L - L_s),
    "tokens",
    "Context T* where KV reads equal streamed weights (weight-bound below, KV-bound above); solves "
    "kv_read_bytes = weight_bytes_streamed for T >= W (windowed layers saturate at W).",
)
ideal_speedup = _def(
    "ideal_speedup",
    1 / (f / r + 1 - f),
    "1",
    "Amdahl: step speedup when the KV fraction f shrinks by compression ratio r and nothing else changes.",
)

# Attention pipelines, per layer and step ---------------------------------------------------------------------
_kv16_layer = B * T * Hkv * (d + dv) * 2
_kvq_layer = B * T * kv_bytes_per_token_layer
# FP16 staging buffer of the non-fused path: only the halves stored below 16 bits are dequantized into it.
_dequant_k = sp.Piecewise((1, bk < 16), (0, True))
_dequant_v = sp.Piecewise((1, bv < 16), (0, True))
_buf16_layer = B * T * Hkv * (d * _dequant_k + dv * _dequant_v) * 2
_kv_expanded = B * T * Hq * (d + dv) * 2
_qo = 2 * B * Hq * dq * ba
attn_P0 = _def("attn_bytes_P0", _kv16_layer + _qo, "bytes",
               "P0: FP16 KV read once by a GQA-aware kernel (SDPA enable_gqa), plus q read and output write.")
attn_P0_expand = _def(
    "attn_bytes_P0_expand", _kv16_layer + 2 * _kv_expanded + _qo, "bytes",
    "P0-expand (the study's baseline): FP16 KV read, repeated to every query head (write), re-read by SDPA.")
attn_P0_expand_reread = _def(
    "attn_bytes_P0_expand_reread", _kv_expanded - _kv16_layer, "bytes",
    "P0-expand: the repeat copy reads each (sequence, KV head) slab once per query head of its group; the G - 1 "
    "repeat reads are served by L2 while one slab and its copy fit there, else by DRAM "
    "(kvmodel.timing.expand_reread_miss). Not in attn_bytes_P0_expand, which counts the KV read once.")
attn_P1 = _def(
    "attn_bytes_P1", _kvq_layer + 2 * _buf16_layer + _qo, "bytes",
    "P1 (non-fused): quantized KV read, FP16 buffer written for each half stored below 16 bits, SDPA reads "
    "the buffer (and any 16-bit half straight from the cache).")
# the dequantize step of P1, per half: one kernel per half stored below 16 bits (a 16-bit half is used in place), each
# reading that half's codes and scales and writing its FP16 buffer; K + V = attn_bytes_P1 - attn_bytes_P0
_kq_layer = B * T * Hkv * (d * bk / 8 + sp.ceiling(d / g) * mk)
_vq_layer = B * T * Hkv * (dv * bv / 8 + sp.ceiling(dv / g) * mv)
attn_P1_dequant_k = _def(
    "attn_bytes_P1_dequant_k", _dequant_k * (_kq_layer + B * T * Hkv * d * 2), "bytes",
    "P1's K dequantize kernel (launched when K is stored below 16 bits): K codes and scales read, FP16 K written.")
attn_P1_dequant_v = _def(
    "attn_bytes_P1_dequant_v", _dequant_v * (_vq_layer + B * T * Hkv * dv * 2), "bytes",
    "P1's V dequantize kernel (launched when V is stored below 16 bits): V codes and scales read, FP16 V written.")
attn_P1_expand = _def(
    "attn_bytes_P1_expand", _kvq_layer + 2 * _buf16_layer + 2 * _kv_expanded + _qo, "bytes",
    "The study's P1: dequantize to FP16, then expand to every query head, then SDPA.")
attn_P5 = _def("attn_bytes_P5", _kvq_layer + _qo, "bytes",
               "P5 (fused): quantized KV and metadata read once, dequantized in registers.")
compression_ratio = _def(
    "compression_ratio", kv_fp16_bytes_per_token_layer / kv_bytes_per_token_layer, "1",
    "r: FP16 KV bytes over quantized KV bytes (metadata included).")

# FLOPs and intensity ---------------------------------------------------------------------------------------------
step_flops = _def(
    "step_flops",
    2 * B * (P_always + P_lm + L_moe * P_exp * k_top) + 2 * B * Hq * (d + sp.Max(dv, dq)) * cached_token_layers,
    "FLOP",
    "Matmul FLOPs per step: 2 per weight per token (routed experts: k per token) plus QK^T and PV.",
)
arithmetic_intensity = _def(
    "arithmetic_intensity", step_flops / step_bytes, "FLOP/byte", "Step FLOPs over step bytes (roofline x).")

# Generation totals ------------------------------------------------------------------------------------------------
reread_sum = _def(
    "reread_sum",
    Gen * C0 + Gen * (Gen - 1) / 2,
    "token-reads",
    "Cached tokens read over a generation of G_en tokens from a prompt of C_0, per layer and KV head "
    "(closed form of sum_{i=0}^{G_en-1} (C_0 + i)).",
)
reread_sum_explicit = sp.Sum(C0 + i, (i, 0, Gen - 1))

# Memory footprint and capacity -----------------------------------------------------------------------------------
weight_bytes_resident = _def(
    "weight_bytes_resident", bw * P_total, "bytes", "Weights resident in device memory (all parameters).")
kv_cache_bytes = _def(
    "kv_cache_bytes", s_kv * B * kv_bytes_per_token_layer * cached_token_layers, "bytes",
    "KV cache held for B sequences at context T (sliding-window layers keep W tokens; layers that reuse "
    "another layer's cache hold none: s_kv).")
usable_memory = _def(
    "usable_memory", M_cap * (1 - phi), "bytes",
    "Capacity less the fraction lost to fragmentation; a config fits when footprint <= usable_memory.")
footprint = _def(
    "footprint", weight_bytes_resident + kv_cache_bytes + M_ws, "bytes",
    "Device memory needed: weights + KV cache + workspace.")
_kv_budget = M_cap * (1 - phi) - M_ws - weight_bytes_resident
max_batch = _def(
    "max_batch", sp.floor(_kv_budget / (s_kv * kv_bytes_per_token_layer * cached_token_layers)), "sequences",
    "Largest batch whose KV cache fits at context T.")
max_context = _def(
    "max_context",
    sp.floor(sp.Piecewise(
        ((_kv_budget / (s_kv * B * kv_bytes_per_token_layer) - L_s * W) / (L - L_s),
         _kv_budget / (s_kv * B * kv_bytes_per_token_layer) >= L * W),
        (_kv_budget / (s_kv * B * kv_bytes_per_token_layer * L), True),
    )),
    "tokens",
    "Longest context whose KV cache fits at batch B (global layers grow with T, window layers stop at W). "
    "With every layer windowed (L_s = L) and the budget past L*W, context is unbounded (division by zero -> inf).",
)

# Speculative decoding ---------------------------------------------------------------------------------------------
expected_tokens_per_verify = _def(
    "expected_tokens_per_verify", (1 - alpha ** (k_draft + 1)) / (1 - alpha), "tokens",
    "Expected tokens emitted per verification of k drafted tokens with i.i.d. acceptance alpha.")

# Tiering ------------------------------------------------------------------------------------------------------------
tier_required_bw = _def(
    "tier_required_bw", sp.Symbol("X_tier", **_nonneg) / t_step, "bytes/s",
    "Bandwidth a tier must supply: tier bytes per step over the target step time.")
tier_shortfall = _def(
    "tier_shortfall", tier_required_bw / BW_link, "1",
    "Required over available link bandwidth (>1: the link is that many times too slow).")

# Tensor parallelism -------------------------------------------------------------------------------------------------
kv_heads_per_gpu = _def(
    "kv_heads_per_gpu", sp.ceiling(Hkv / N_tp), "heads",
    "KV heads each GPU holds under TP (replicated when H_kv < N).")
allreduce_ring_factor = _def(
    "allreduce_ring_factor", 2 * (N_tp - 1) / N_tp, "1",
    "Bytes each GPU sends (and receives) per byte of message in a ring all-reduce over N GPUs.")
allreduce_time = _def(
    "allreduce_time",
    2 * L * (lat_ar + allreduce_ring_factor * B * h * ba / BW_link),
    "s",
    "Two ring all-reduces per layer of B x h activations: per call latency + 2(N-1)/N of the message over the "
    "link.",
)


# ================================================================================================================
# What-if studies (issue 6) and tensor parallelism (issue 8): added formulas. Nothing above is changed.
# ================================================================================================================

# Symbols of the studies ------------------------------------------------------------------------------------------
L_hp = sp.Symbol("L_hp", **_nonneg)  # layers kept at the higher-precision (policy) format
bk_hp = sp.Symbol("b_k_hp", **_pos)  # key bits of the high-precision layers
bv_hp = sp.Symbol("b_v_hp", **_pos)  # value bits of the high-precision layers
mk_hp = sp.Symbol("m_k_hp", **_nonneg)  # metadata bytes per key group, high-precision layers
mv_hp = sp.Symbol("m_v_hp", **_nonneg)  # metadata bytes per value group, high-precision layers
n_q = sp.Symbol("n_q", **_pos)  # query tokens per sequence in one forward (1 decode; k+1 or tree nodes+1 verify)
eta = sp.Symbol("eta", **_nonneg)  # KV re-read fraction per extra query (0: tile shared by all queries, 1: per query)
b_tree = sp.Symbol("b_tree", **_pos)  # tree speculation: branches per node (uniform tree)
alpha_q = sp.Symbol("alpha_q", **_pos)  # acceptance in the quantized-KV arm
t_base = sp.Symbol("t_base", **_pos)  # step time, no speculation, FP16 KV
t_quant = sp.Symbol("t_quant", **_pos)  # step time, no speculation, quantized KV
t_ver = sp.Symbol("t_ver", **_pos)  # verification time, FP16 KV
t_ver_q = sp.Symbol("t_ver_q", **_pos)  # verification time, quantized KV
t_draft = sp.Symbol("t_draft", **_nonneg)  # drafting time per verification (0 for n-gram / prompt lookup)
E_tok = sp.Symbol("E_tok", **_pos)  # expected tokens per verification (FP16 arm)
E_tok_q = sp.Symbol("E_tok_q", **_pos)  # expected tokens per verification (quantized arm)
X_kv = sp.Symbol("X_kv", **_nonneg)  # KV bytes read per step by the chosen access pattern
f_tier = sp.Symbol("f_tier", **_nonneg)  # fraction of the KV (layers) placed in the tier
t_hbm = sp.Symbol("t_hbm", **_nonneg)  # time of the step's HBM-resident work, seconds
lat_link = sp.Symbol("lambda_link", **_nonneg)  # tier link latency per step's transfer, seconds
W_sp = sp.Symbol("W_sp", **_pos)  # sparse access: attention window (tokens)
n_blk = sp.Symbol("n_blk", **_pos)  # sparse access: top-k blocks selected (MoBA)
b_blk = sp.Symbol("b_blk", **_pos)  # sparse access: tokens per block (MoBA)
f_layers_L = sp.Symbol("L_t", **_nonneg)  # layers whose KV lives in the tier

# Per-layer K/V precision (a policy: L_hp layers at (b_k_hp, b_v_hp), the rest at (b_k, b_v)) -------------------
_kv_layer_hp = kv_bytes_per_token_layer.subs({bk: bk_hp, bv: bv_hp, mk: mk_hp, mv: mv_hp}, simultaneous=True)
kv_bytes_per_token_layer_hp = _def(
    "kv_bytes_per_token_layer_hp", _kv_layer_hp, "bytes",
    "KV bytes one token adds to one high-precision layer of a per-layer policy (its own bits and metadata).")
kv_bytes_per_token_mixed = _def(
    "kv_bytes_per_token_mixed",
    (L - L_hp) * kv_bytes_per_token_layer + L_hp * _kv_layer_hp,
    "bytes",
    "KV bytes per token, all layers, under a two-class per-layer policy: L_hp layers keep (b_k_hp, b_v_hp), the "
    "others use (b_k, b_v). Equals kv_bytes_per_token when L_hp = 0.",
)
kv_read_bytes_mixed = _def(
    "kv_read_bytes_mixed",
    B * T * kv_bytes_per_token_mixed,
    "bytes",
    "KV read per step under a two-class per-layer policy (global-attention layers; windowed layers are handled "
    "per layer group by kvmodel.policies).",
)

# MoE: weight traffic against batch ---------------------------------------------------------------------------
moe_expert_bytes = _def(
    "moe_expert_bytes",
    bw * L_moe * P_exp * experts_touched,
    "bytes",
    "Routed-expert weights read per step: the distinct experts some token of the batch picked, every MoE layer.",
)

# Tensor parallelism ----------------------------------------------------------------------------------------------
weight_bytes_per_gpu = _def(
    "weight_bytes_per_gpu", weight_bytes_streamed / N_tp, "bytes",
    "Weights each GPU streams per step under N-way tensor parallelism (every matrix split N ways; the few "
    "replicated norm vectors are neglected).")
kv_bytes_per_token_layer_per_gpu = _def(
    "kv_bytes_per_token_layer_per_gpu",
    kv_bytes_per_token_layer.subs(Hkv, sp.ceiling(Hkv / N_tp)),
    "bytes",
    "KV bytes one token adds to one layer on one GPU: ceil(H_kv / N) heads (a head is replicated when H_kv < N; "
    "MLA's single latent is replicated on every GPU).",
)
kv_read_bytes_per_gpu = _def(
    "kv_read_bytes_per_gpu",
    B * kv_bytes_per_token_layer_per_gpu * cached_token_layers,
    "bytes",
    "KV bytes each GPU reads per step under tensor parallelism.",
)
kv_cache_bytes_per_gpu = _def(
    "kv_cache_bytes_per_gpu",
    B * kv_bytes_per_token_layer_per_gpu * cached_token_layers,
    "bytes",
    "KV cache each GPU holds under tensor parallelism (replicated heads counted on every GPU).",
)
footprint_per_gpu = _def(
    "footprint_per_gpu", weight_bytes_resident / N_tp + kv_cache_bytes_per_gpu + M_ws, "bytes",
    "Device memory each GPU needs under N-way tensor parallelism: its weight shard + its KV heads + workspace.")
allreduce_bytes = _def(
    "allreduce_bytes", 2 * L * B * h * ba, "bytes",
    "Activation bytes all-reduced per step: two all-reduces per layer (after attention and after the MLP) of "
    "B x h activations.")

# Speculative decoding -----------------------------------------------------------------------------------------------
expected_tokens_per_verify_q = _def(
    "expected_tokens_per_verify_q", (1 - alpha_q ** (k_draft + 1)) / (1 - alpha_q), "tokens",
    "Expected tokens per verification in the quantized-KV arm (its own acceptance alpha_q).")
_p_level = 1 - (1 - alpha) ** b_tree
tree_accept_per_level = _def(
    "tree_accept_per_level", _p_level, "1",
    "Uniform tree speculation: probability that some of the b_tree i.i.d. candidates at a depth is accepted.")
expected_tokens_per_verify_tree = _def(
    "expected_tokens_per_verify_tree", (1 - _p_level ** (k_draft + 1)) / (1 - _p_level), "tokens",
    "Expected tokens per verification of a uniform draft tree of depth k, b_tree branches per node (b_tree = 1 is "
    "linear speculation).")
tree_nodes = _def(
    "tree_nodes", sp.Sum(b_tree ** i, (i, 1, k_draft)).doit(), "tokens",
    "Draft tokens in a uniform tree of depth k with b_tree branches per node (k for a linear chain).")
verify_kv_read_bytes = _def(
    "verify_kv_read_bytes",
    kv_read_bytes * (1 + eta * (n_q - 1)),
    "bytes",
    "KV read by one verification of n_q query tokens per sequence: once when every KV tile serves all n_q "
    "queries (eta = 0), n_q times when the kernel re-reads the cache per query (eta = 1).",
)
verify_step_bytes = _def(
    "verify_step_bytes",
    bw * (P_always + P_lm + n_q * B * h + L_moe * P_exp * experts_touched.subs(B, n_q * B))
    + verify_kv_read_bytes + n_q * kv_write_bytes + n_q * activation_bytes,
    "bytes",
    "Bytes of one verification forward of n_q tokens per sequence: weights once (experts touched by n_q*B tokens), "
    "KV per verify_kv_read_bytes, n_q new tokens written, n_q times the activations. n_q = 1, eta = 0 is step_bytes.",
)
verify_step_flops = _def(
    "verify_step_flops",
    n_q * step_flops,
    "FLOP",
    "Matmul FLOPs of a verification: n_q query tokens per sequence, each as a decode token (QK^T and PV over the "
    "cached context included).",
)
_verify_rr = 1 + eta * (n_q - 1)
attn_verify_P0 = _def(
    "attn_bytes_verify_P0", _kv16_layer * _verify_rr + n_q * _qo, "bytes",
    "Verification attention, FP16 KV (per layer): the cache read once (eta = 0) up to n_q times (eta = 1), n_q "
    "queries in and outputs out.")
attn_verify_P5 = _def(
    "attn_bytes_verify_P5", _kvq_layer * _verify_rr + n_q * _qo, "bytes",
    "Verification attention, fused quantized KV (per layer): quantized bytes and metadata read once up to n_q times.")
# the halves kept at 16 bits: SDPA reads them straight from the cache (no buffer), so a re-read pays them again
_plain16_layer = B * T * Hkv * (d * (1 - _dequant_k) + dv * (1 - _dequant_v)) * 2
attn_verify_P1 = _def(
    "attn_bytes_verify_P1",
    _kvq_layer + _buf16_layer + _buf16_layer * _verify_rr + _plain16_layer * (_verify_rr - 1) + n_q * _qo,
    "bytes",
    "Verification attention, non-fused (per layer): quantized KV read once, the halves stored below 16 bits "
    "dequantized into an FP16 buffer once, the buffer read once up to n_q times (a 16-bit half is read from the "
    "cache, once per re-read). Equals attn_bytes_P1 at n_q = 1.")
dequant_ops = _def(
    "dequant_ops", B * cached_token_layers * Hkv * (d + dv) * _verify_rr * sp.Symbol("c_dq", **_nonneg), "ops",
    "Scalar operations to dequantize the KV a verification reads (c_dq operations per element, per read).")
spec_speedup = _def(
    "spec_speedup", E_tok * t_base / (t_ver + t_draft), "1",
    "Speculation speedup over plain decode: tokens per verification x (plain step time / (verification + draft)).")
spec_quant_speedup = _def(
    "spec_quant_speedup", E_tok_q * t_base / (t_ver_q + t_draft), "1",
    "Speedup of speculation on a quantized-KV cache over plain FP16 decode.")
quant_speedup = _def(
    "quant_speedup", t_base / t_quant, "1", "Speedup of the quantized KV cache alone (no speculation).")
composition_ratio = _def(
    "composition_ratio",
    (E_tok_q * t_base / (t_ver_q + t_draft)) / ((t_base / t_quant) * (E_tok * t_base / (t_ver + t_draft))),
    "1",
    "rho = S_combined / (S_quant x S_spec). Simplifies to (E_q/E) x (t_quant/t_base) x (t_ver+t_d)/(t_ver_q+t_d): "
    "exactly 1 when acceptance is the same in both arms and quantization shortens verification and plain steps "
    "by the same factor.",
)
composition_ratio_bound = _def(
    "composition_ratio_bound", r * t_quant / t_base, "1",
    "Largest rho a bytes-only model allows with equal acceptance: verification can shrink at most by the "
    "compression ratio r (every byte KV), so rho <= r / S_quant.",
)

# Tiering --------------------------------------------------------------------------------------------------------------
kv_read_bytes_window = _def(
    "kv_read_bytes_window",
    B * kv_bytes_per_token_layer * ((L - L_s) * sp.Min(T, W_sp) + L_s * sp.Min(T, W, W_sp)),
    "bytes",
    "KV read per step when attention reads only the last W_sp tokens (sliding-window sparse access).",
)
kv_read_bytes_topk = _def(
    "kv_read_bytes_topk",
    sp.Min(
        kv_read_bytes,
        B * kv_bytes_per_token_layer * ((L - L_s) * sp.Min(T, n_blk * b_blk) + L_s * sp.Min(T, W, n_blk * b_blk))
        + B * (L - L_s) * Hkv * d * 2 * sp.ceiling(T / b_blk),
    ),
    "bytes",
    "KV read per step with top-k block selection (MoBA): n_blk blocks of b_blk tokens per layer and KV head, plus "
    "one FP16 mean key per block for the gate; never more than dense (a runtime falls back to dense).",
)
kv_budget_bytes = _def(
    "kv_budget_bytes", M_cap * (1 - phi) - M_ws - weight_bytes_resident, "bytes",
    "Device memory left for the KV cache: usable capacity less weights and workspace.")
kv_overflow_bytes = _def(
    "kv_overflow_bytes", sp.Min(kv_cache_bytes, sp.Max(0, kv_cache_bytes - kv_budget_bytes)), "bytes",
    "KV cache bytes that do not fit in HBM and must live in the next tier (all of it when the weights alone "
    "fill HBM).")
kv_overflow_fraction = _def(
    "kv_overflow_fraction", sp.Min(1, sp.Max(0, 1 - kv_budget_bytes / kv_cache_bytes)), "1",
    "Share of the KV cache that overflows HBM (0 when it fits, 1 when the weights leave no room).")
tier_bytes_per_step = _def(
    "tier_bytes_per_step", f_tier * X_kv, "bytes",
    "KV bytes a tier supplies per step when a fraction f_tier of the cache (tokens or layers) lives there and "
    "access is spread over it evenly: f_tier = 1 is the study's framing (whole cache in the tier), "
    "f_tier = kv_overflow_fraction is 'only what exceeds HBM'.")
tier_bytes_window_overflow = _def(
    "tier_bytes_window_overflow",
    B * kv_bytes_per_token_layer * L * sp.Max(0, sp.Min(T, W_sp) - T * (1 - f_tier)),
    "bytes",
    "Windowed access when the oldest f_tier of each sequence's tokens live in the tier: only window tokens older "
    "than the HBM-resident part cross the link.",
)
tier_step_time_overlapped = _def(
    "tier_step_time_overlapped",
    sp.Max(t_hbm, lat_link + sp.Symbol("X_tier", **_nonneg) / BW_link),
    "s",
    "Step time with the tier transfer prefetched under the HBM work (perfect overlap).",
)
tier_step_time_serial = _def(
    "tier_step_time_serial",
    t_hbm + lat_link + sp.Symbol("X_tier", **_nonneg) / BW_link,
    "s",
    "Step time when the tier transfer is not overlapped.",
)


# ================================================================================================================
# Validation (issue 5): occupancy of fused decode-attention kernels. Added formulas; nothing above is changed.
# ================================================================================================================
n_split = sp.Symbol("n_split", **_pos)  # programs per (sequence, KV head) along the context (split-K); 1: none
P_prog = sp.Symbol("P_prog", **_pos)  # programs (thread blocks) a kernel launches
N_SM = sp.Symbol("N_SM", **_pos)  # streaming multiprocessors
c_res = sp.Symbol("c_res", **_pos)  # programs resident per SM at once (register / shared-memory limit)
r_1 = sp.Symbol("r_1", **_pos)  # bytes/s one program streams when it is alone on its SM (latency-bound loop)
r_c = sp.Symbol("r_c", **_pos)  # bytes/s per program when c_res programs share an SM (r_c <= r_1)
W_prog = sp.Symbol("W_prog", **_nonneg)  # bytes one program loads
t_k0 = sp.Symbol("t_k0", **_nonneg)  # per-call fixed cost (launch, prologue), seconds

fused_programs_nosplit = _def(
    "fused_programs_nosplit", B * Hq, "programs",
    "The study's fused kernel (no split-K): one program per (sequence, query head), each streaming the whole "
    "context of its KV head.")
fused_programs_splitk = _def(
    "fused_programs_splitk", B * Hkv * n_split, "programs",
    "A split-K (flash-decoding) fused kernel: one program per (sequence, KV head, split), serving all G query heads "
    "of its KV head; n_split is chosen so that the programs fill the SMs.")
attn_P5_nosplit_loads = _def(
    "attn_bytes_P5_nosplit_loads", B * T * Hq * kv_bytes_per_token_layer / Hkv + _qo, "bytes",
    "Bytes the study's no-split fused kernel loads: each of the G programs of a KV head loads that head's quantized "
    "tiles itself (L2 may serve the repeats, but each program's latency-bound loop still walks them), plus q and "
    "the output.")
_slots = c_res * N_SM
_waves_full = sp.floor(P_prog / _slots)
_tail = P_prog - _slots * _waves_full  # programs of the last, partial wave
_k_tail = sp.ceiling(_tail / N_SM)  # programs per SM on the busiest SM of the partial wave
fused_waves_full = _def(
    "fused_waves_full", _waves_full, "waves",
    "Full waves of programs: every SM holds c_res programs (P_prog // (c_res * N_SM)).")
fused_wave_time = _def(
    "fused_wave_time",
    t_k0 + W_prog * (_waves_full / r_c + sp.ceiling(_tail / _slots) / sp.Min(r_1, c_res * r_c / _k_tail)),
    "s",
    "Time of a fused decode-attention kernel whose P_prog programs each load W_prog bytes: full waves run c_res "
    "programs per SM at r_c each; the partial wave's busiest SM runs k = ceil(tail / N_SM) programs, each at "
    "min(r_1, c_res*r_c/k) (an SM's throughput c_res*r_c is shared, a lone program is capped at r_1).",
)
n_sat = sp.Symbol("n_sat", **_pos)  # sharpness of an SM's saturation in resident programs (large: a hard knee)
_rate_smooth = lambda k: r_1 * (1 + (k * r_1 / (c_res * r_c)) ** n_sat) ** (-1 / n_sat)  # noqa: E731
fused_wave_time_smooth = _def(
    "fused_wave_time_smooth",
    t_k0 + W_prog * (_waves_full / _rate_smooth(c_res) + sp.ceiling(_tail / _slots) / _rate_smooth(_k_tail)),
    "s",
    "fused_wave_time with the SM's throughput saturating smoothly in its resident programs: with k programs on "
    "an SM each streams (r_1^-n + (c_res*r_c/k)^-n)^(-1/n) (a smooth min of the lone-program rate and the SM's "
    "share; n -> infinity is fused_wave_time's hard min). Latency-bound 1-warp programs keep gaining from more "
    "co-resident programs past the knee (more loads in flight), at a falling rate.",
)
P_pairs = sp.Symbol("P_pairs", **_pos)  # (sequence, KV head) pairs of an SDPA call: B x Hkv
P_half = sp.Symbol("P_half", **_pos)  # pairs at which SDPA reaches 1/sqrt(2) of its plateau bandwidth (fitted)
n_pairs = sp.Symbol("n_pairs", **_pos)  # sharpness of that saturation
sdpa_pair_efficiency = _def(
    "sdpa_pair_efficiency",
    (1 + (P_half / P_pairs) ** n_pairs) ** (-1 / n_pairs),
    "1",
    "Fraction of its plateau bandwidth SDPA (P0, FlashAttention decode) reaches with P_pairs (sequence, KV head) "
    "pairs: it parallelizes over the pairs and splits the context among them, so with few pairs fewer loads are "
    "in flight than DRAM needs (H200, T = 128K: 2 pairs 2.38 TB/s, 32 pairs 4.47 TB/s).",
)
t_stream = sp.Symbol("t_stream", **_nonneg)  # seconds a fused kernel's programs stream (its wave time less t_k0)
W_dram = sp.Symbol("W_dram", **_nonneg)  # bytes of one call that DRAM serves (all programs together)
BW_ceil = sp.Symbol("BW_ceil", **_pos)  # the chip's read ceiling (x a fitted fraction), bytes/s
n_ceil = sp.Symbol("n_ceil", **_pos)  # sharpness of the smooth max of streaming time and ceiling time
fused_ceiling_time = _def(
    "fused_ceiling_time",
    t_k0 + (t_stream ** n_ceil + (W_dram / BW_ceil) ** n_ceil) ** (1 / n_ceil),
    "s",
    "A fused kernel's time with the chip's read ceiling: the programs' streaming time t_stream (fused_wave_time "
    "less t_k0) and the time all of the call's DRAM bytes need at the ceiling, W_dram / BW_ceil, combined by a "
    "smooth max (n_ceil; infinity: the hard max). No launch streams its bytes faster than the chip reads: within "
    "one wave the per-program time is flat in programs, the ceiling time grows with the call's bytes.",
)
fused_occupancy = _def(
    "fused_occupancy",
    P_prog * W_prog / (N_SM * c_res * r_c) / (fused_wave_time - t_k0),
    "1",
    "Achieved over plateau bandwidth (N_SM*c_res*r_c) of a fused kernel. Below one wave of one program per SM "
    "(P_prog <= N_SM) it is P_prog*r_1/(N_SM*c_res*r_c) = P_prog/(c*N_SM) with c = c_res*r_c/r_1: "
    "BW_eff = BW*min(1, programs/(c*SMs)); partial last waves lower it further (tail effect).",
)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

PIPELINE_FORMULAS = {
    "P0": "attn_bytes_P0",
    "P0-expand": "attn_bytes_P0_expand",
    "P1": "attn_bytes_P1",
    "P1-expand": "attn_bytes_P1_expand",
    "P5": "attn_bytes_P5",
}


def formula(name: str) -> Formula:
    try:
        return FORMULAS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(FORMULAS), n=5, cutoff=0.3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise KeyError(f"no formula {name!r}{hint}") from None


def reread_closed_form_matches_sum() -> bool:
    """True when sympy proves the reread closed form equals the explicit summation."""
    return sp.simplify(reread_sum_explicit.doit() - reread_sum) == 0
