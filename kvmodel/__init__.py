"""kvmodel: an analytic performance model of LLM autoregressive decode, checked against real kernels."""

__version__ = "0.1.0"
