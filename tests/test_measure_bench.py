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
            for v in variants:  # READ...: the streaming-read kernel over the P5 call's bytes (no kernel options)
                assert v in bench.PROBE_VARIANTS or v in ("READ", "READcold", "READg8"), (name, model, v)
    for v in bench.PROBE_TIMING:
        assert v in bench.PROBE_VARIANTS or v.startswith("READ"), v


def test_timing_warm_up_covers_the_slow_first_replays():
    """The untimed warm-up of time_graph: at least WARM_REPLAYS replays (the slow phase was 13-24 one-call replays
    on the H100), at least WARM_S seconds for short replays, bounded by MAX_WARM_S for long ones (never fewer than
    one), and none when both minimums are 0 (the probes' cold variants)."""
    n = bench.warm_replay_count
    assert n(1e-3) == bench.WARM_REPLAYS >= 25
    assert n(1e-4) * 1e-4 >= bench.WARM_S
    assert n(2e-4, warm_s=10.0) * 2e-4 <= bench.MAX_WARM_S + 2e-4
    assert n(0.02) * 0.02 <= bench.MAX_WARM_S + 0.02 and n(0.02) < bench.WARM_REPLAYS
    assert n(5.0) == 1
    assert n(1e-3, warm_replays=0, warm_s=0.0) == 0


def test_kernel_timeline_stats_from_trace_events(tmp_path):
    """Span per call is a replay's first start to last end / R (median over replays); busy is the kernels' summed
    duration per call; the per-kernel means are over every event of that name."""
    import json

    from kvmodel.measure import kernel_timeline as tl

    ev, t = [], 0.0
    for rep in range(3):  # 3 replays of R = 2 calls, each call a 4 us split kernel + 2 us merge, 1 us apart
        for _ in range(2):
            ev.append(dict(cat="kernel", name="_attn_split_kernel", ts=t, dur=4.0))
            ev.append(dict(cat="kernel", name="_merge_kernel", ts=t + 5.0, dur=2.0))
            t += 8.0
        t += 100.0  # host gap between replays: not part of any span
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": ev + [dict(cat="cpu_op", name="x", ts=0.0, dur=1.0)]}))
    events = tl._kernel_events(str(trace))
    assert len(events) == 12
    st = tl.timeline_stats(events, replays=3, R=2)
    assert st["busy_us"] == pytest.approx(6.0)
    assert st["span_us"] == pytest.approx((8.0 + 7.0) / 2)
    assert st["kernels_per_call"] == 2
    assert st["kernels"]["_merge_kernel"] == dict(per_call=1.0, mean_us=2.0)
    assert tl.timeline_stats([], 3, 2)["kernels"] == {}


def test_kernel_timeline_cases_name_known_variants_and_models():
    from kvmodel.measure import kernel_timeline as tl

    for cases in tl.CASES.values():
        for model, B, T, fmt, names in cases:
            assert model in bench.MODELS and fmt in bench.FORMATS
            assert all(n in ("P0", "P1") or n in bench.PROBE_VARIANTS for n in names)


def test_kernel_timeline_without_a_gpu_says_so(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from kvmodel.measure import kernel_timeline as tl

    assert tl.main(["--out", str(tmp_path / "t.jsonl")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
