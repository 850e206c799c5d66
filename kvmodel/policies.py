"""Per-layer K/V precision policies: which layers keep 8- or 16-bit keys (or values) while the rest use a default.

A policy is a YAML file (read with ``yaml.safe_load``, validated with ``extra="forbid"``)::

    name: qwen-keys-k8-edges
    default: int4            # format of every layer not listed (fp16, fp8, int8, int4, kNvM)
    group_size: 32
    layers:
      - layers: "0-1,26-27"  # indices, ranges, or first:N / last:N
        kv: k8v4             # a whole format ...
      - layers: "last:1"
        k_bits: 16           # ... or override key/value bits of the default

Bytes come from the symbolic model only: each group of layers sharing a format is the formula
``kv_read_bytes`` / ``kv_bytes_per_token`` evaluated with L = the group's layer count (two-class policies equal the
formula ``kv_bytes_per_token_mixed``, which the tests check). Sliding-window layers are spread over the groups in
proportion (the catalog gives how many layers are windowed, not which).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvmodel import traffic
from kvmodel.specs import KVFormat, ModelSpec, load_yaml_spec, parse_kv_format


class LayerRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: str | list[int] = Field(description="'0-3,27', 'first:2', 'last:2', or a list of indices")
    kv: str | None = Field(default=None, description="format of these layers (fp16, int8, k8v4, ...)")
    k_bits: int | None = Field(default=None, description="override key bits of the default format")
    v_bits: int | None = Field(default=None, description="override value bits of the default format")

    @field_validator("kv")
    @classmethod
    def _kv_parses(cls, v):
        if v is not None:
            parse_kv_format(v)
        return v


class KVPolicy(BaseModel):
    """A per-layer K/V precision policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "policy"
    default: str = Field(default="int4", description="format of the layers no rule lists")
    group_size: int = Field(default=32, gt=0)
    asymmetric: bool = False
    layers: list[LayerRule] = Field(default_factory=list)

    @field_validator("default")
    @classmethod
    def _default_parses(cls, v):
        parse_kv_format(v)
        return v

    @property
    def label(self) -> str:
        return f"policy:{self.name}"

    @classmethod
    def uniform(cls, kv: KVFormat) -> KVPolicy:
        """The policy of one format for every layer (how plain formats enter policy-aware code)."""
        return _UniformPolicy(kv)


class _UniformPolicy:
    """A plain KV format seen as a policy (every layer the same)."""

    def __init__(self, kv: KVFormat):
        self.kv = kv
        self.name = kv.label
        self.label = kv.label

    def groups(self, model: ModelSpec):
        return [(self.kv, model.num_layers)]


def _parse_layers(spec, n_layers: int) -> list[int]:
    if isinstance(spec, list):
        idx = list(spec)
    else:
        idx = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            m_first = re.fullmatch(r"first:(\d+)", part)
            m_last = re.fullmatch(r"last:(\d+)", part)
            m_range = re.fullmatch(r"(\d+)-(\d+)", part)
            if m_first:
                idx += list(range(int(m_first.group(1))))
            elif m_last:
                k = int(m_last.group(1))
                idx += list(range(n_layers - k, n_layers))
            elif m_range:
                a, b = int(m_range.group(1)), int(m_range.group(2))
                if b < a:
                    raise ValueError(f"layer range {part!r} runs backwards")
                idx += list(range(a, b + 1))
            elif part.isdigit():
                idx.append(int(part))
            else:
                raise ValueError(f"cannot read layer spec {part!r} (use 0-3, 5, first:2, last:2)")
    bad = [i for i in idx if i < 0 or i >= n_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted(set(idx))


def layer_formats(policy: KVPolicy, model: ModelSpec) -> list[KVFormat]:
    """The KV format of every layer of ``model`` under ``policy`` (later rules override earlier ones)."""
    if isinstance(policy, _UniformPolicy):
        return [policy.kv] * model.num_layers
    base = parse_kv_format(policy.default, group_size=policy.group_size, asymmetric=policy.asymmetric)
    fmts = [base] * model.num_layers
    for rule in policy.layers:
        for i in _parse_layers(rule.layers, model.num_layers):
            f = fmts[i] if rule.kv is None else parse_kv_format(rule.kv, policy.group_size, policy.asymmetric)
            kw = {}
            if rule.k_bits is not None:
                kw["k_bits"] = rule.k_bits
            if rule.v_bits is not None:
                kw["v_bits"] = rule.v_bits
            if kw:
                f = KVFormat(**{**f.model_dump(), **kw, "float8": False})
            fmts[i] = f
    return fmts


def policy_groups(policy, model: ModelSpec) -> list[tuple[KVFormat, int]]:
    """(format, number of layers) for each distinct format of the policy, in first-layer order."""
    if isinstance(policy, _UniformPolicy):
        return policy.groups(model)
    counts: dict[KVFormat, int] = {}
    for f in layer_formats(policy, model):
        counts[f] = counts.get(f, 0) + 1
    return list(counts.items())


def _group_values(model: ModelSpec, kv: KVFormat, n: int) -> dict:
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(kv))
    L = v["L"]
    v["L_s"] = v["L_s"] * n / L  # windowed layers spread over the groups in proportion
    v["L"] = n
    return v


def policy_kv_bytes_per_token(policy, model: ModelSpec) -> float:
    """KV bytes one token adds, all layers, under ``policy`` (sum of kv_bytes_per_token over layer groups)."""
    return float(sum(traffic.evaluate("kv_bytes_per_token", _group_values(model, f, n))
                     for f, n in policy_groups(policy, model)))


def policy_kv_read_bytes(policy, model: ModelSpec, B, T):
    """KV bytes read per step under ``policy`` (vectorized over B and T)."""
    out = 0.0
    for f, n in policy_groups(policy, model):
        out = out + traffic.evaluate("kv_read_bytes", {**_group_values(model, f, n), "B": B, "T": T})
    return out


def policy_kv_cache_bytes(policy, model: ModelSpec, B, T):
    out = 0.0
    for f, n in policy_groups(policy, model):
        out = out + traffic.evaluate("kv_cache_bytes", {**_group_values(model, f, n), "B": B, "T": T})
    return out


def policy_attention_time_s(tm, model: ModelSpec, policy, B, T, pipeline: str = "P5", tp: int = 1):
    """Attention seconds per step under ``policy``: each layer group costs its share of the all-layer time of its
    format (attention time is linear in the layer count). A uniform policy is exactly attention_time_s."""
    from kvmodel.predict import attention_time_s

    groups = policy_groups(policy, model)
    if len(groups) == 1:
        return attention_time_s(tm, model, groups[0][0], B, T, pipeline, tp=tp)
    L = model.num_layers
    return sum((n / L) * attention_time_s(tm, model, f, B, T, pipeline, tp=tp) for f, n in groups)


def load_policy(path: str | Path) -> KVPolicy:
    """Read a policy YAML; any problem becomes a SpecError naming the file and the field."""
    return load_yaml_spec(path, KVPolicy)


def check_policy(policy: KVPolicy, model: ModelSpec) -> None:
    """Raise ValueError when a rule names a layer the model lacks or a group size does not divide head_dim."""
    for f in layer_formats(policy, model):
        for bits, dim in ((f.k_bits, model.k_dim_cached), (f.v_bits, model.v_dim_cached)):
            if bits < 16 and dim % f.group_size:
                raise ValueError(f"group size {f.group_size} does not divide head_dim {dim} of {model.name}")


def as_policy(kv) -> KVPolicy | _UniformPolicy:
    """A KVFormat or a KVPolicy, as a policy."""
    if isinstance(kv, (KVPolicy, _UniformPolicy)):
        return kv
    if isinstance(kv, KVFormat):
        return _UniformPolicy(kv)
    raise TypeError(f"not a KV format or policy: {kv!r}")


def is_uniform(policy) -> bool:
    return isinstance(policy, _UniformPolicy)


__all__ = [
    "KVPolicy",
    "LayerRule",
    "as_policy",
    "check_policy",
    "is_uniform",
    "layer_formats",
    "load_policy",
    "policy_attention_time_s",
    "policy_groups",
    "policy_kv_bytes_per_token",
    "policy_kv_cache_bytes",
    "policy_kv_read_bytes",
]
