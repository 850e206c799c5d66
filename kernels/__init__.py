"""Triton kernels (quantize/append, fused split-K decode attention, small-batch GEMV), pipelines and plain-torch
references.

Importing this package needs torch; the kernels need triton as well (the torch references work without it).
"""

from .quant import (  # noqa: F401
    QuantizedKVCache,
    QuantizedTensor,
    append_kv,
    append_kv_reference,
    dequantize,
    dequantize_fp16,
    dequantize_kv,
    empty_cache,
    quantize,
    quantize_kv,
)
from .decode_attention import choose_num_splits, decode_attention  # noqa: F401
from .gemv import gemv, gemv_ref  # noqa: F401
from .pipelines import PIPELINES, run_pipeline  # noqa: F401
from .reference import attention_reference, decode_attention_reference, run_pipeline_reference  # noqa: F401
