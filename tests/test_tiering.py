"""KV tiering: tier bytes (whole cache, overflow, layers), sparse access, required bandwidth and shortfall,
overlapped vs serial prefetch, golden numbers for the study's 128K case, and `kvmodel tier`."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmodel import traffic
from kvmodel.cli import cli
from kvmodel.specs import catalog, get_gpu, get_interconnect, get_model, parse_kv_format
from kvmodel.tiering import Access, interconnects, parse_access, tier_report

H100 = get_gpu("h100")
LLAMA = get_model("llama-3.1-8b")
FP16 = parse_kv_format("fp16")
INT4 = parse_kv_format("int4")
NV4, PCIE5, CXL2 = (get_interconnect(n) for n in ("NVLink-4", "PCIe-5-x16", "CXL-2.0-x16"))


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _scen(r, name):
    return next(s for s in r.scenarios if s.placement.startswith(name))


def _vals(B=1, T=4096, kv=INT4, m=LLAMA):
    v = traffic.model_symbols(m)
    v.update(traffic.kv_symbols(kv), B=B, T=T)
    return v


# ----------------------------------------------------------------------------------------------------------------
# golden: the study's 128K case (10 ms/step)
# ----------------------------------------------------------------------------------------------------------------


def test_golden_llama_128k_batch1_fp16_whole_cache():
    r = tier_report(H100, LLAMA, FP16, 131072, 1, 0.010, links=[NV4, PCIE5, CXL2])
    s = _scen(r, "whole-cache")
    # 131072 tokens x 131072 B/token (32 layers x 8 heads x 128 x K+V x 2 B) = 17.18 GB per step
    assert s.tier_bytes_per_step == 131072 * 131072
    assert s.required_GBps == pytest.approx(1717.986918, rel=1e-9)
    short = {lk.name: lk.shortfall for lk in s.links}
    assert short["NVLink-4"] == pytest.approx(1717.986918 / 450, rel=1e-9)  # 3.8x
    assert short["PCIe-5-x16"] == pytest.approx(1717.986918 / 63, rel=1e-9)  # 27.3x
    assert short["CXL-2.0-x16"] == pytest.approx(27.27, abs=0.01)
    # on an 80 GB H100 the 17 GB cache fits beside the weights: nothing overflows
    assert r.overflow_bytes == 0 and _scen(r, "overflow").tier_bytes_per_step == 0


def test_golden_llama_128k_batch32_int4():
    r = tier_report(H100, LLAMA, INT4, 131072, 32, 0.010, links=[NV4, PCIE5, CXL2])
    whole = _scen(r, "whole-cache")
    assert whole.tier_bytes_per_step == pytest.approx(32 * 131072 * 32 * 1152, rel=1e-12)  # 154.6 GB
    short = {lk.name: lk.shortfall for lk in whole.links}
    assert short["NVLink-4"] == pytest.approx(34.36, abs=0.01)
    assert short["PCIe-5-x16"] == pytest.approx(245.4, abs=0.1)
    over = _scen(r, "overflow")
    assert 0.5 < r.overflow_fraction < 0.65
    assert over.tier_bytes_per_step == pytest.approx(r.overflow_fraction * whole.tier_bytes_per_step, rel=1e-12)
    assert over.tier_bytes_per_step == pytest.approx(r.overflow_bytes, rel=1e-9)
    assert all(not lk.meets_target for s in r.scenarios for lk in s.links)


def test_json_has_required_GBps_for_every_scenario():
    r = run("tier", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "128k", "--batch", "32", "--kv", "int4",
            "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert {s["placement"].split(":")[0] for s in d["scenarios"]} >= {"whole-cache", "overflow", "layers"}
    for s in d["scenarios"]:
        assert "required_GBps" in s and s["required_GBps"] > 0
        assert len(s["links"]) == len(catalog().interconnects)
    assert d["scenarios"][0]["required_GBps"] == pytest.approx(15461.88, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 64), T=st.integers(1024, 1 << 18), c=st.integers(2, 4))
def test_shortfall_proportional_to_context_and_batch(B, T, c):
    f = lambda B, T: _scen(tier_report(H100, LLAMA, INT4, T, B, 0.010, links=[PCIE5]), "whole-cache").links[0].shortfall
    s = f(B, T)
    assert f(c * B, T) == pytest.approx(c * s, rel=1e-9)
    assert f(B, c * T) == pytest.approx(c * s, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 64), T=st.integers(1, 1 << 19), W=st.integers(1, 1 << 16), n=st.integers(1, 64),
       b=st.sampled_from([16, 32, 64, 128, 256]), m=st.sampled_from(["llama-3.1-8b", "gemma-3-12b", "qwen2.5-7b"]),
       kv=st.sampled_from(["fp16", "int4", "k8v4"]))
def test_sparse_access_never_reads_more_than_dense(B, T, W, n, b, m, kv):
    v = _vals(B, T, parse_kv_format(kv), get_model(m))
    dense = traffic.evaluate("kv_read_bytes", v)
    win = traffic.evaluate("kv_read_bytes_window", {**v, "W_sp": W})
    topk = traffic.evaluate("kv_read_bytes_topk", {**v, "n_blk": n, "b_blk": b})
    assert win <= dense * (1 + 1e-12)
    assert topk <= dense * (1 + 1e-12)
    if T > W and v["L_s"] == 0:
        assert win < dense


def test_window_and_topk_cut_reads_at_long_context():
    v = _vals(8, 131072)
    dense = traffic.evaluate("kv_read_bytes", v)
    assert traffic.evaluate("kv_read_bytes_window", {**v, "W_sp": 4096}) == pytest.approx(dense / 32, rel=1e-12)
    topk = traffic.evaluate("kv_read_bytes_topk", {**v, "n_blk": 8, "b_blk": 64})
    gate = 8 * 32 * 8 * 128 * 2 * (131072 // 64)
    assert topk == pytest.approx(dense * 512 / 131072 + gate, rel=1e-12)


def test_tier_bytes_monotone_in_fraction_and_overlap_helps():
    r = tier_report(H100, LLAMA, INT4, 131072, 32, 0.010, layers_in_tier=0.25, links=[NV4])
    lay = _scen(r, "layers")
    whole = _scen(r, "whole-cache")
    assert lay.tier_bytes_per_step == pytest.approx(0.25 * whole.tier_bytes_per_step, rel=1e-12)
    for s in r.scenarios:
        for lk in s.links:
            assert lk.step_time_overlapped_s <= lk.step_time_serial_s
            assert lk.step_time_overlapped_s >= s.hbm_time_s
            if math.isfinite(s.required_GBps_serial):
                assert s.required_GBps_serial >= s.required_GBps


def test_window_overflow_reads_tier_only_past_hbm_tokens():
    v = _vals(1, 100_000)
    # oldest 30% of tokens in the tier; a 4096-token window never reaches them
    assert traffic.evaluate("tier_bytes_window_overflow", {**v, "W_sp": 4096, "f_tier": 0.3}) == 0
    # a window of 80k reaches 10k tokens into the tier
    got = traffic.evaluate("tier_bytes_window_overflow", {**v, "W_sp": 80_000, "f_tier": 0.3})
    assert got == pytest.approx(traffic.evaluate("kv_bytes_per_token", v) * 10_000, rel=1e-9)


def test_sparse_access_lowers_shortfall_in_report():
    dense = tier_report(H100, LLAMA, INT4, 131072, 32, 0.010, links=[PCIE5])
    topk = tier_report(H100, LLAMA, INT4, 131072, 32, 0.010, access=parse_access("topk:8x64"), links=[PCIE5])
    win = tier_report(H100, LLAMA, INT4, 131072, 32, 0.010, access=parse_access("window:4k"), links=[PCIE5])
    d = _scen(dense, "whole-cache").links[0].shortfall
    assert _scen(topk, "whole-cache").links[0].shortfall == pytest.approx(d * 512 / 131072, rel=1e-9)
    assert _scen(win, "whole-cache").links[0].shortfall == pytest.approx(d / 32, rel=1e-9)
    assert _scen(win, "overflow").tier_bytes_per_step == 0  # the window lives in HBM


def test_parse_access():
    assert parse_access("dense") == Access(kind="dense")
    assert parse_access("window:4k").window_tokens == 4096
    a = parse_access("topk:8x64")
    assert (a.blocks, a.block_tokens, a.label) == (8, 64, "topk:8x64")
    for bad in ("sparse", "window:", "topk:8", "topk:0x64", "window:-3"):
        with pytest.raises(ValueError):
            parse_access(bad)


def test_every_catalog_link_reported_by_default():
    r = tier_report(H100, LLAMA, INT4, 32768, 4, 0.010)
    assert [lk.name for lk in r.scenarios[0].links] == [i.name for i in interconnects()]


@pytest.mark.parametrize("args,msg", [
    (["--ctx", "128k", "--access", "sparse"], "unknown access"),
    (["--ctx", "128k", "--target-ms", "0"], "--target-ms"),
    (["--ctx", "128k", "--layers-in-tier", "1.5"], "--layers-in-tier"),
    (["--ctx", "128k", "--link", "warp-drive"], "unknown interconnect"),
    (["--ctx", "zero"], "--ctx"),
    (["--ctx", "128k", "--batch", "0"], "--batch"),
    (["--ctx", "128k", "--kv", "int4x"], "KV format"),
])
def test_tier_bad_inputs_exit_2(args, msg):
    r = run("tier", "--gpu", "h100", "--model", "llama-3.1-8b", *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output


def test_tier_text_report():
    r = run("tier", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "128k", "--link", "nvlink4,pcie5")
    assert r.exit_code == 0
    assert "whole-cache" in r.output and "NVLink-4" in r.output and "1,718.0 GB/s" in r.output
    assert np.isfinite(1.0)


def test_overflow_clipped_when_weights_fill_hbm():
    m = get_model("llama-3.1-70b")  # 141 GB of BF16 weights on an 80 GB H100
    r = tier_report(H100, m, INT4, 131072, 32, 0.010, links=[NV4])
    assert r.kv_budget_bytes < 0
    assert r.overflow_fraction == 1.0 and r.overflow_bytes == pytest.approx(r.kv_cache_bytes)
    assert _scen(r, "overflow").tier_bytes_per_step == pytest.approx(_scen(r, "whole-cache").tier_bytes_per_step)
    assert any("does not run on one GPU" in n for n in r.notes)


def test_summary_table_for_several_models():
    r = run("tier", "--gpu", "h100", "--model", "qwen2.5-7b,llama-3.1-8b", "--ctx", "128k", "--batch", "32", "--kv",
            "int4", "--link", "nvlink4,pcie5", "--summary")
    assert r.exit_code == 0
    assert "| Llama-3.1-8B | whole-cache | 154.62 | 15,462 | 34.4x | 245.4x |" in r.output


def test_tier_report_names_the_timing_behind_its_hbm_work():
    """The HBM work (and so every serial column) depends on the timing: the report says which one it used."""
    args = ("tier", "--model", "llama-3.1-8b", "--ctx", "128k", "--batch", "32", "--kv", "int4")
    calibrated = run(*args, "--gpu", "h100")
    assert calibrated.exit_code == 0, calibrated.output
    assert "note: HBM timing calibrated: H100-SXM" in calibrated.output
    assert "uncalibrated" not in calibrated.output
    uncalibrated = run(*args, "--gpu", "b200")
    assert uncalibrated.exit_code == 0, uncalibrated.output
    assert "note: uncalibrated HBM timing" in uncalibrated.output
