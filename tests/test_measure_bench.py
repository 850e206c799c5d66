"""The decode-attention benchmark's byte counts: its no-kvmodel fallback must equal kvmodel.traffic."""

from __future__ import annotations

import builtins

import pytest

from kvmodel.measure import bench_decode_attention as bench
from kvmodel.traffic import attention_layer_bytes


@pytest.mark.parametrize("pipe", ["P0", "P0-expand", "P1", "P5"])
@pytest.mark.parametrize("kb,vb", [(4, 4), (16, 4), (4, 16), (8, 8), (16, 16)])
def test_fallback_bytes_equal_traffic(monkeypatch, pipe, kb, vb):
    if pipe.startswith("P0") and (kb, vb) != (16, 16):
        pytest.skip("FP16 pipelines")
    args = (pipe, 4, 4096, 32, 8, 128, kb, vb)
    want = float(attention_layer_bytes(pipe, 4, 4096, 32, 8, 128, kb, vb, bench.GROUP))
    got, src = bench.bytes_moved(*args)
    assert src == "traffic" and got == want
    real_import = builtins.__import__

    def no_traffic(name, *a, **k):
        if name == "kvmodel.traffic":
            raise ImportError("simulated: no analytic core")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_traffic)
    got, src = bench.bytes_moved(*args)
    assert src == "fallback" and got == want


def test_every_probe_set_names_known_variants_and_models():
    """Each ``--probe-set`` case names a model of the grid and variants that exist (a misspelt variant would
    only fail on the GPU, after the compile step)."""
    from kvmodel.measure import bench_decode_attention as bench

    for name, cases in bench.PROBE_SETS.items():
        for model, B, T, (kb, vb), variants in cases:
            assert model in bench.MODELS, (name, model)
            assert B >= 1 and T >= 1 and kb in (4, 8, 16) and vb in (4, 8, 16), (name, model)
            for v in variants:
                assert v in bench.PROBE_VARIANTS, (name, model, v)
