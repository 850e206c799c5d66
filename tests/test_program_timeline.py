"""The program-timeline probe: its per-call summary of %globaltimer stamps (CPU, synthetic stamps) and the kernel's
``stamps=`` option (rejected off the GPU; on a GPU it records every program without changing the output)."""

from __future__ import annotations

import pytest

from kvmodel.measure.program_timeline import call_summary, max_resident, summarise_calls


def test_max_resident_counts_overlapping_programs_only():
    assert max_resident([0, 10, 20], [10, 20, 30]) == 1  # back to back: one at a time
    assert max_resident([0, 0, 5], [10, 10, 8]) == 3
    assert max_resident([], []) == 0


def test_call_summary_of_two_sms_with_a_tail():
    # SM 0: two programs at once, 0-10 µs and 0-12 µs; SM 1: one program 1-30 µs (the tail)
    us = 1000
    stamps = [(0, 10 * us, 0), (0, 12 * us, 0), (1 * us, 30 * us, 1)]
    s = call_summary(stamps)
    assert s["programs"] == 3 and s["sms"] == 2
    assert s["span_us"] == pytest.approx(30.0)
    assert s["resident_max"] == 2 and s["resident_min"] == 1
    assert s["start_max_us"] == pytest.approx(1.0)
    assert s["dur_max_us"] == pytest.approx(29.0) and s["dur_p50_us"] == pytest.approx(12.0)
    # SM 0 idles 30 - 12 = 18 µs at the end, SM 1 none: mean 9
    assert s["sm_idle_end_mean_us"] == pytest.approx(9.0)


def test_call_summary_rejects_inconsistent_stamps():
    with pytest.raises(ValueError):
        call_summary([(10, 5, 0)])
    with pytest.raises(ValueError):
        call_summary([])


def test_summarise_calls_gap_and_bandwidth():
    us = 1000
    a = [(0, 100 * us, 0)]
    b = [(110 * us, 210 * us, 0)]  # starts 10 µs after a's last program ends
    m = summarise_calls([a, b], bytes_per_call=300e6)
    assert m["gap_to_next_us"] == pytest.approx(10.0)
    assert m["span_us"] == pytest.approx(100.0)
    assert m["split_GBps"] == pytest.approx(3000.0)
    assert m["calls"] == 2


def test_stamps_option_is_refused_off_the_gpu():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU / interpreter runs")
    from kvmodel.kernels import decode_attention, quantize_kv

    k = torch.randn(1, 1, 40, 64).half()
    cache = quantize_kv(k, k.clone(), 4, 4)
    q = torch.randn(1, 2, 64).half()
    with pytest.raises(ValueError, match="stamps needs a CUDA GPU"):
        decode_attention(q, cache, stamps=torch.zeros(64, dtype=torch.int64))


@pytest.mark.gpu
def test_stamps_record_every_program_and_leave_the_output_unchanged_gpu():
    torch = pytest.importorskip("torch")
    from kvmodel.kernels import decode_attention, quantize_kv

    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 4, 5000, 128, generator=g).half().cuda()
    v = torch.randn(2, 4, 5000, 128, generator=g).half().cuda()
    cache = quantize_kv(k, v, 4, 4)
    q = torch.randn(2, 16, 128, generator=g).half().cuda()
    ref = decode_attention(q, cache, num_splits=8)
    stamps = torch.full((4 * 8 * 4 * 2 + 4,), -1, dtype=torch.int64, device="cuda")
    out = decode_attention(q, cache, num_splits=8, stamps=stamps)
    assert torch.equal(out, ref)
    rows = stamps[:-4].view(-1, 4).cpu()
    assert (rows[:, 0] > 0).all() and (rows[:, 1] >= rows[:, 0]).all()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ((rows[:, 2] >= 0) & (rows[:, 2] < sms)).all()
    assert (stamps[-4:] == -1).all()  # nothing written past the programs
    with pytest.raises(ValueError, match="stamps must be"):
        decode_attention(q, cache, num_splits=8, stamps=stamps[:8])


def test_program_timeline_without_a_gpu_exits_with_a_message(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the message is for machines without a GPU")
    from kvmodel.measure.program_timeline import main

    assert main(["--out", str(tmp_path / "t.jsonl")]) == 2
    assert "program_timeline: " in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
