"""Parameter counts of a ModelSpec, split into the classes that decode streams differently.

The split is what the traffic model needs: the embedding table (only B rows gathered per step), the LM head
(streamed once; the embedding table itself when tied), always-streamed decoder weights (attention, dense MLPs,
shared experts, routers, norms) and routed experts (streamed only when some token in the batch picks them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvmodel.specs import ModelSpec


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts (not bytes) by class."""

    embedding: int  # V x h input table
    lm_head: int  # separate output projection; 0 when tied to the embedding
    attention: int  # all layers: q/k/v/o (or MLA projections), biases, q/k norms
    dense_mlp: int  # all layers: dense MLPs, shared experts, routers
    norms: int  # per-layer norms + final norm
    expert_each: int  # one routed expert's parameters (per MoE layer)
    num_experts: int  # routed experts per MoE layer (0 for dense models)
    num_moe_layers: int
    extra: int  # outside the text decoder (vision tower, audio, ...); never streamed in decode
    # Gemma-3n per-layer embedding table (V_pl x L*d_pl); like `embedding`, only B rows gathered per step
    per_layer_embedding: int = 0

    @property
    def routed_experts(self) -> int:
        return self.expert_each * self.num_experts * self.num_moe_layers

    @property
    def total(self) -> int:
        return (
            self.embedding + self.lm_head + self.attention + self.dense_mlp + self.norms
            + self.routed_experts + self.extra + self.per_layer_embedding
        )

    @property
    def decoder_streamed_always(self) -> int:
        """Parameters read every decode step whatever the batch (excludes embedding rows and routed experts)."""
        return self.attention + self.dense_mlp + self.norms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["routed_experts"] = self.routed_experts
        d["total"] = self.total
        return d


def _mlp_params(hidden: int, inter: int, gated: bool, bias: bool) -> int:
    mats = 3 if gated else 2
    b = (inter * (2 if gated else 1) + hidden) if bias else 0
    return mats * hidden * inter + b


def param_breakdown(m: ModelSpec) -> ParamBreakdown:
    """Count parameters from the architecture alone (head_dim as given)."""
    h, L = m.hidden_size, m.num_layers
    gated = m.mlp == "gated"
    norm_w = 2 if m.norm == "layernorm" else 1  # weight (+ bias)

    # Attention, per layer
    if m.mla:
        a = m.mla
        qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * m.num_heads * qk_head  # incl. q_a_layernorm
        else:
            q = h * m.num_heads * qk_head
        kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # kv_a_proj_with_mqa + kv_a_layernorm
        kv += a.kv_lora_rank * m.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        o = m.num_heads * a.v_head_dim * h
        attn_layer = q + kv + o
        attention = L * attn_layer
    else:
        # q/o in every layer; k/v (and their bias and norm) only in layers with their own KV cache
        # (Gemma-3n's KV-shared layers reuse an earlier layer's K/V)
        qd, kvd = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        q_o = h * qd + qd * h + (qd if m.qkv_bias else 0) + (h if m.o_bias else 0)
        q_o += m.head_dim * norm_w if m.qk_norm else 0
        k_v = 2 * h * kvd + (2 * kvd if m.qkv_bias else 0) + (m.head_dim * norm_w if m.qk_norm else 0)
        attention = L * q_o + m.kv_cache_layers * k_v

    # MLPs
    expert_each = num_experts = moe_layers = 0
    if m.moe:
        e = m.moe
        moe_layers = L - e.first_dense_layers
        dense = e.first_dense_layers * _mlp_params(h, m.intermediate_size, gated, m.mlp_bias)
        shared_w = e.shared_intermediate_size or e.expert_intermediate_size
        per_moe_layer_dense = e.num_shared_experts * _mlp_params(h, shared_w, gated, m.mlp_bias)
        per_moe_layer_dense += h * e.num_experts + (e.num_experts if e.router_bias else 0)  # router
        dense += moe_layers * per_moe_layer_dense
        expert_each = _mlp_params(h, e.expert_intermediate_size, gated, m.mlp_bias)
        num_experts = e.num_experts
    else:
        dense = L * _mlp_params(h, m.intermediate_size, gated, m.mlp_bias)

    norms = (L * m.norms_per_layer + 1) * h * norm_w

    # Gemma-3n: per-layer embeddings (PLE), AltUp, LAuReL -- always-streamed matrices go to dense_mlp, vectors
    # to norms, the PLE table (gathered, never streamed) to per_layer_embedding
    per_layer_embedding = 0
    if m.per_layer_input_dim:
        d = m.per_layer_input_dim
        per_layer_embedding = (m.per_layer_vocab_size or m.vocab_size) * L * d
        dense += h * L * d  # per_layer_model_projection
        dense += L * 2 * h * d  # per_layer_input_gate + per_layer_projection
        norms += d + L * h  # per_layer_projection_norm + post_per_layer_input_norm
    if m.laurel_rank:
        dense += L * 2 * h * m.laurel_rank  # linear_left + linear_right
        norms += L * h  # post_laurel_norm
    if m.altup_num_inputs > 1:
        n = m.altup_num_inputs
        dense += 2 * (n - 1) * h * h  # altup_projections + altup_unembed_projections
        dense += L * (n * n + n * n * n + h * n)  # correction_coefs, prediction_coefs, modality_router
        norms += L * 2 * h  # router_norm + correct_output_scale
    embedding = m.vocab_size * h
    lm_head = 0 if m.tie_embeddings else m.vocab_size * h
    return ParamBreakdown(
        embedding=embedding,
        lm_head=lm_head,
        attention=attention,
        dense_mlp=dense,
        norms=norms,
        expert_each=expert_each,
        num_experts=num_experts,
        num_moe_layers=moe_layers,
        extra=m.extra_params,
        per_layer_embedding=per_layer_embedding,
    )


@dataclass(frozen=True)
class WeightCall:
    """One weight matrix product per layer in decode (a GEMV/GEMM launch): its parameters and how many layers."""

    name: str
    params: int
    layers: int


def weight_calls(m: ModelSpec) -> list[WeightCall]:
    """The always-active matrix products of one decode step, per layer type (routed experts excluded).

    Used by the timing model to charge one saturating-bandwidth call per matrix; bytes = params x bytes/param.
    """
    h, L = m.hidden_size, m.num_layers
    calls: list[WeightCall] = []
    if m.mla:
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            calls += [WeightCall("q_a", h * a.q_lora_rank, L), WeightCall("q_b", a.q_lora_rank * m.num_heads * qk, L)]
        else:
            calls.append(WeightCall("q", h * m.num_heads * qk, L))
        calls += [
            WeightCall("kv_a", h * (a.kv_lora_rank + a.qk_rope_head_dim), L),
            WeightCall("kv_b", a.kv_lora_rank * m.num_heads * (a.qk_nope_head_dim + a.v_head_dim), L),
            WeightCall("o", m.num_heads * a.v_head_dim * h, L),
        ]
    else:
        qd, kvd = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        Lkv = m.kv_cache_layers
        calls += [WeightCall("q", h * qd, L), WeightCall("k", h * kvd, Lkv), WeightCall("v", h * kvd, Lkv),
                  WeightCall("o", qd * h, L)]
    gated = m.mlp == "gated"
    mlp_names = ("gate", "up", "down") if gated else ("up", "down")
    if m.moe:
        e = m.moe
        if e.first_dense_layers:
            calls += [WeightCall(f"dense_{n}", h * m.intermediate_size, e.first_dense_layers) for n in mlp_names]
        moe_layers = L - e.first_dense_layers
        calls.append(WeightCall("router", h * e.num_experts, moe_layers))
        if e.num_shared_experts:
            sw = (e.shared_intermediate_size or e.expert_intermediate_size) * e.num_shared_experts
            calls += [WeightCall(f"shared_{n}", h * sw, moe_layers) for n in mlp_names]
    else:
        calls += [WeightCall(n, h * m.intermediate_size, L) for n in mlp_names]
    if m.per_layer_input_dim:  # Gemma-3n
        d = m.per_layer_input_dim
        calls += [WeightCall("ple_model_projection", h * L * d, 1), WeightCall("ple_gate", h * d, L),
                  WeightCall("ple_projection", d * h, L)]
    if m.laurel_rank:
        r = m.laurel_rank
        calls += [WeightCall("laurel_left", h * r, L), WeightCall("laurel_right", r * h, L)]
    if m.altup_num_inputs > 1:
        n = m.altup_num_inputs
        calls += [WeightCall("altup_router", h * n, L), WeightCall("altup_projections", 2 * (n - 1) * h * h, 1)]
    return calls
