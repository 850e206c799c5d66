"""CPU tests of the calibration fit: parameter recovery on synthetic curves, whole-calibration fits from synthetic
measurement files, YAML round trips, find/load, the orchestrator's resume and error paths."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from kvmodel import calibration as cal
from kvmodel.measure import e2e_decode as e2e
from kvmodel.measure import probes
from kvmodel.measure.results import ResultsFile
from kvmodel.specs import BandwidthCurve, Calibration, SpecError, get_gpu
from kvmodel.timing import curve_time_s

TRUE = dict(t0_s=3.5e-6, bw_GBps=4100.0, knee_bytes=4e6, sharpness=2.0)


def _synthetic(n=40, noise=0.02, seed=0, params=TRUE, lo=1e4, hi=4e9):
    rng = np.random.default_rng(seed)
    x = np.geomspace(lo, hi, n)
    t = curve_time_s(x, **params) * np.exp(rng.normal(0, noise, n))
    return x, t


def test_fit_recovers_known_parameters_with_noise():
    x, t = _synthetic()
    c = cal.fit_curve(x, t)
    assert c.bw_GBps == pytest.approx(TRUE["bw_GBps"], rel=0.05)
    # the small-size floor t0 + knee/BW is what the data pins down
    floor_true = TRUE["t0_s"] + TRUE["knee_bytes"] / (TRUE["bw_GBps"] * 1e9)
    assert c.t0_s + c.knee_bytes / (c.bw_GBps * 1e9) == pytest.approx(floor_true, rel=0.1)
    assert c.r2 > 0.99 and c.n_points == 40 and c.median_abs_pct_error < 3


def test_fit_recovers_t0_with_fixed_shape():
    x, t = _synthetic(noise=0.01, seed=3)
    c = cal.fit_curve(x, t, fixed={"knee_bytes": TRUE["knee_bytes"], "sharpness": 2.0})
    assert c.t0_s == pytest.approx(TRUE["t0_s"], rel=0.15)
    assert c.bw_GBps == pytest.approx(TRUE["bw_GBps"], rel=0.03)
    assert c.knee_bytes == TRUE["knee_bytes"]


def test_fit_is_robust_to_an_outlier():
    x, t = _synthetic(noise=0.01, seed=1)
    t[5] *= 3.0
    c = cal.fit_curve(x, t)
    assert c.bw_GBps == pytest.approx(TRUE["bw_GBps"], rel=0.05)


def test_fit_needs_two_points():
    with pytest.raises(cal.CalibrationDataError):
        cal.fit_curve([1e6], [1e-5])


def test_fit_overheads_recovers_step_and_layer():
    rng = np.random.default_rng(0)
    L = rng.choice([24, 28, 32, 40], 50).astype(float)
    comp = rng.uniform(1e-3, 20e-3, 50)
    m = comp + 30e-6 + L * 12e-6
    step, layer, q = cal.fit_overheads(m, comp, L)
    assert step == pytest.approx(30e-6, rel=1e-3, abs=1e-7)
    assert layer == pytest.approx(12e-6, rel=1e-3)
    assert q["median_abs_pct_error"] < 1e-3


# ---------------------------------------------------------------------------------------------- synthetic files

GT = {
    "read": BandwidthCurve(t0_s=2e-6, bw_GBps=4580, knee_bytes=6e6, sharpness=2.0),
    "copy": BandwidthCurve(t0_s=2e-6, bw_GBps=4200, knee_bytes=8e6, sharpness=2.0),
    "weights": BandwidthCurve(t0_s=3.5e-6, bw_GBps=4050, knee_bytes=2e6, sharpness=1.5),
    "lm_head": BandwidthCurve(t0_s=3e-6, bw_GBps=4150, knee_bytes=2e6, sharpness=1.5),
    "attention:P0": BandwidthCurve(t0_s=7e-6, bw_GBps=4450, knee_bytes=1e6, sharpness=2.0),
    "attention:P5": BandwidthCurve(t0_s=8e-6, bw_GBps=4000, knee_bytes=2e6, sharpness=2.0),
}
STEP_S, LAYER_S = 25e-6, 6e-6


def _t(op, nbytes, rng, noise=0.01):
    c = GT[op]
    return float(curve_time_s(nbytes, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness) * np.exp(rng.normal(0, noise)))


def write_synthetic_data(d, with_grid=False, hf=True, seed=0):
    """probes.csv / e2e_decode.csv (and decode_attention.csv) generated from GT through kvmodel.predict."""
    from kvmodel.predict import attention_time_s, weights_time_s
    from kvmodel.timing import TimeModel

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    rf = ResultsFile(d / "probes.csv", probes.PROBE_KEYS, fieldnames=probes.PROBE_FIELDS)
    rows = []
    for nbytes in probes.stream_sizes(False):
        rows.append(dict(op="read", impl="triton", model="", name="", B=0, K=nbytes, N=0, bytes_moved=nbytes,
                         median_s=_t("read", nbytes, rng)))
        rows.append(dict(op="copy", impl="torch", model="", name="", B=0, K=nbytes, N=0, bytes_moved=2 * nbytes,
                         median_s=_t("copy", 2 * nbytes, rng)))
    models = [e2e.resolve_model(m) for m in ("Qwen2.5-0.5B", "Llama-3.1-8B")]
    for spec in models:
        for op, name, k, n in probes.projection_shapes(spec):
            for b in (1, 8, 64):
                nb = 2 * (k * n + b * (k + n))
                rows.append(dict(op=op, impl="cublas", model=spec.name, name=name, B=b, K=k, N=n, bytes_moved=nb,
                                 weight_bytes=2 * k * n, flops=2 * b * k * n, median_s=_t(op, nb, rng)))
    rf.append_many(rows)
    prov = {"gpu_name": "NVIDIA H200", "device_name": "NVIDIA H200", "driver": "580", "torch": "2.11",
            "triton": "3.6", "date": "2026-11-29", "command": "synthetic"}
    rf.write_provenance(prov)

    gpu = get_gpu("h200")
    truth = Calibration(gpu=gpu.name, read_bw_GBps=4580, ops=dict(GT), step_overhead_s=STEP_S,
                        layer_overhead_s=LAYER_S)
    tm = TimeModel(gpu, truth)
    ef = ResultsFile(d / "e2e_decode.csv", e2e.E2E_KEYS, fieldnames=e2e.E2E_FIELDS)
    from kvmodel.specs import KVFormat

    erows = []
    for spec in models:
        for pipe, kb in (("P0", 16), ("P5", 4)):
            kv = KVFormat(k_bits=kb, v_bits=kb)
            for B in (1, 4, 16, 64):
                for T in (1024, 4096, 16384):
                    sb = e2e.step_bytes(spec, B, T, kb, kb, pipe)
                    w = float(weights_time_s(tm, spec, B))
                    a = float(attention_time_s(tm, spec, kv, B, T, pipe))
                    m = (w + a + STEP_S + spec.num_layers * LAYER_S) * float(np.exp(rng.normal(0, 0.005)))
                    a_meas = a * float(np.exp(rng.normal(0, 0.005)))
                    erows.append(dict(model=spec.name, B=B, T=T, k_bits=kb, v_bits=kb, pipeline=pipe,
                                      runtime="kvmodel-graph", median_s=m, attn_s=a_meas,
                                      n_layers=spec.num_layers, status="ok", group=32, **sb))
        if hf:
            for B, T in ((1, 1024), (1, 16384), (16, 1024), (16, 4096), (64, 1024)):
                sb = e2e.step_bytes(spec, B, T)
                m = 0.02 + spec.num_layers * 1e-4 + sb["bytes_kv"] / 700e9
                erows.append(dict(model=spec.name, B=B, T=T, k_bits=16, v_bits=16, pipeline="hf-sdpa",
                                  runtime="hf-eager", median_s=m, n_layers=spec.num_layers, status="ok", **sb))
    ef.append_many(erows)
    ef.write_provenance(prov)
    if with_grid:
        grf = ResultsFile(d / "decode_attention.csv", ["pipeline", "variant", "B", "T", "k_bits"])
        grows = []
        for pipe, kb in (("P0", 16), ("P5", 4), ("P5", 16)):
            for B in (1, 4, 16, 64):
                for T in (1024, 4096, 16384, 32768):
                    nb = B * T * 8 * 128 * (2 * kb / 8 + (0 if kb == 16 else 2 * 4 / 32 * 1))
                    op = "attention:P0" if pipe == "P0" else "attention:P5"
                    t = _t(op, nb, rng) * (1.2 if (pipe, kb) == ("P5", 16) else 1.0)
                    grows.append(dict(pipeline=pipe, variant="default", model="llama-3.1-8b", B=B, T=T, Hq=32,
                                      Hkv=8, d=128, k_bits=kb, v_bits=kb, group=32, median_s=t, bytes_moved=nb))
                    grows.append(dict(pipeline=pipe, variant="nosplit", model="llama-3.1-8b", B=B, T=T, Hq=32,
                                      Hkv=8, d=128, k_bits=kb, v_bits=kb, group=32, median_s=t * 5,
                                      bytes_moved=nb))
        grf.append_many(grows)
    return truth


def test_fit_calibration_from_synthetic_files(tmp_path):
    write_synthetic_data(tmp_path)
    c = cal.fit_calibration(tmp_path)
    assert c.gpu == "H200-SXM" and c.runtime == "kvmodel-graph"
    assert c.read_bw_GBps == pytest.approx(4580 * (2**32) / (2**32 + 6e6 * 0), rel=0.03)
    for op in ("read", "copy", "weights", "lm_head", "attention:P0", "attention:P5"):
        assert op in c.ops, op
        assert c.ops[op].bw_GBps == pytest.approx(GT[op].bw_GBps, rel=0.06), op
        assert c.ops[op].r2 > 0.95
    # overheads recovered through predict's own decomposition
    total = c.step_overhead_s + 32 * c.layer_overhead_s
    assert total == pytest.approx(STEP_S + 32 * LAYER_S, rel=0.35, abs=20e-6)
    assert "e2e attention-only" in c.notes


def test_attention_grid_preferred_and_ablations_ignored(tmp_path):
    write_synthetic_data(tmp_path, with_grid=True)
    c = cal.fit_calibration(tmp_path)
    assert "decode-attention grid" in c.notes
    assert c.ops["attention:P0"].bw_GBps == pytest.approx(GT["attention:P0"].bw_GBps, rel=0.05)
    assert c.ops["attention:P5"].bw_GBps == pytest.approx(GT["attention:P5"].bw_GBps, rel=0.05)
    assert "attention:P5-fp16" in c.ops  # 16/16 on the fused kernel is its own op class
    assert c.ops["attention:P5"].median_abs_pct_error < 3  # the 5x 'nosplit' rows were left out


def test_fused_occupancy_curves_fitted_from_the_grid(tmp_path):
    """The grid's default P5 rows give occupancy curves keyed like the attention ops; predict then uses them."""
    from kvmodel.predict import attention_call_time_s
    from kvmodel.timing import TimeModel, fused_curve_key

    write_synthetic_data(tmp_path, with_grid=True)
    c = cal.fit_calibration(tmp_path)
    assert {"attention:P5:k4v4:d128", "attention:P5-fp16:d128"} <= set(c.fused)
    assert fused_curve_key(4, 4, 128) == "attention:P5:k4v4:d128"
    assert fused_curve_key(16, 16, 128, "n128w4") == "attention:P5-fp16:d128:n128w4"
    for k, f in c.fused.items():
        assert k.startswith(("attention:P5:k4v4:d128", "attention:P5-fp16:d128")), k
        assert f.n_points >= 6 and f.median_abs_pct_error < 10
    assert "attention:P5" in c.ops  # the bandwidth curves stay, the fallback
    assert "occupancy curves" in c.notes
    # the grid was generated from the attention:P5 bandwidth curve: the occupancy curves reproduce it
    tm = TimeModel(get_gpu("h200"), c)
    from kvmodel.specs import KVFormat

    B, T = np.array([1.0, 4, 16, 64]), np.array([4096.0, 16384, 1024, 32768])
    nb = B * T * 8 * 128 * (2 * 4 / 8 + 2 * 4 / 32)
    want = curve_time_s(nb, GT["attention:P5"].t0_s, GT["attention:P5"].bw_GBps, GT["attention:P5"].knee_bytes,
                        GT["attention:P5"].sharpness)
    got = attention_call_time_s(tm, "P5", KVFormat(k_bits=4, v_bits=4), B, T, 32, 8, 128)
    assert np.allclose(got, want, rtol=0.15)


def test_fused_curves_yaml_round_trip_and_old_files_load(tmp_path):
    from kvmodel.specs import FusedKernelCurve

    f = FusedKernelCurve(t0_s=4e-6, r1_GBps=7.1, rc_GBps=1.7, c_res=11, program_overhead_bytes=512.0,
                         merge_s=1e-6, merge_per_split_s=4e-8, one_split_rate_scale=0.95, r2=0.99, n_points=53,
                         median_abs_pct_error=4.9)
    c = Calibration(gpu="H200-SXM", read_bw_GBps=4584.0, ops={"weights": GT["weights"]},
                    fused={"attention:P5:k4v4:d128": f, "attention:P5:k4v4:d128:n32w1": f})
    p = cal.write_calibration(c, root=tmp_path)
    back = cal.load_calibration(p)
    assert back == c and back.fused["attention:P5:k4v4:d128:n32w1"] == f
    occ = back.fused["attention:P5:k4v4:d128"].occupancy_curve()
    assert (occ.c_res, occ.rc_GBps, occ.merge_round_splits) == (11, 1.7, 16)
    # a calibration written before the field existed still loads, with no fused curves
    import yaml

    data = yaml.safe_load(p.read_text())
    del data["fused"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(data))
    assert cal.load_calibration(old).fused == {}
    # strict: unknown fields are refused
    data = yaml.safe_load(p.read_text())
    data["fused"]["attention:P5:k4v4:d128"]["rate"] = 1.0
    old.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError):
        cal.load_calibration(old)


def test_hf_runtime_calibration(tmp_path):
    write_synthetic_data(tmp_path)
    written = cal.fit_all(tmp_path, tmp_path / "cal", log=lambda s: None)
    names = sorted(p.name for p in written)
    assert names == ["h200-hf-eager.yaml", "h200-kvmodel-graph.yaml"]
    hf = cal.load_calibration(tmp_path / "cal" / "h200-hf-eager.yaml")
    assert hf.runtime == "hf-eager"
    assert hf.step_overhead_s == pytest.approx(0.02, rel=0.25)
    assert hf.ops["attention:P0"].bw_GBps < 2000  # HF's attention path, not ours


def test_yaml_round_trip_and_find(tmp_path):
    c = Calibration(gpu="H200-SXM", runtime="hf-static-graph", read_bw_GBps=4584.0, copy_bw_GBps=4221.0,
                    step_overhead_s=1e-5, layer_overhead_s=2e-6, ops={"weights": GT["weights"]}, notes="x: y")
    p = cal.write_calibration(c, root=tmp_path)
    assert p.name == "h200-hf-static-graph.yaml"
    back = cal.load_calibration(p)
    assert back == c
    assert cal.find_calibration("h200", "hf-static-graph", root=tmp_path) == c
    assert cal.find_calibration("NVIDIA H200", "hf-static-graph", root=tmp_path) == c
    assert cal.find_calibration("h200", "kvmodel-graph", root=tmp_path) is None
    assert cal.find_calibration("h100", "hf-static-graph", root=tmp_path) is None
    assert cal.find_calibration("h200", root=tmp_path / "absent") is None
    # a file with another name is still found by its content
    p.rename(tmp_path / "my-run.yaml")
    assert cal.find_calibration("h200-sxm", "hf-static-graph", root=tmp_path) == c
    (tmp_path / "bad.yaml").write_text("gpu: [\n")
    assert cal.find_calibration("h200-sxm", "hf-static-graph", root=tmp_path) == c
    with pytest.raises(SpecError):
        cal.load_calibration(tmp_path / "bad.yaml")


def test_find_calibration_in_package_returns_calibration_or_none():
    got = cal.find_calibration("h200")
    assert got is None or isinstance(got, Calibration)
    assert cal.find_calibration("h200", runtime="no-such-runtime") is None


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(cal.CalibrationDataError, match="probes.csv"):
        cal.fit_calibration(tmp_path)


def test_calibration_module_imports_no_torch():
    import subprocess

    code = ("import sys, kvmodel.calibration, kvmodel.measure.e2e_decode, kvmodel.measure.probes, "
            "kvmodel.measure.calibrate_run; sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------- orchestrator


def test_run_calibration_without_gpu_raises_specific_error(tmp_path, monkeypatch):
    from kvmodel.measure import calibrate_run as cr

    def no_gpu():
        raise probes.GPUUnavailable("no CUDA GPU visible to torch (test)")

    monkeypatch.setattr(probes, "require_cuda", no_gpu)
    with pytest.raises(cr.NoGPUError, match="no CUDA GPU"):
        cr.run_calibration(tmp_path, quick=True)
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


class _FakeProps:
    name = "NVIDIA Imaginary X1"


class _FakeCuda:
    @staticmethod
    def get_device_properties(i):
        return _FakeProps()


class _FakeTorch:
    cuda = _FakeCuda()


def test_unsupported_gpu_raises_specific_error(tmp_path, monkeypatch):
    from kvmodel.measure import calibrate_run as cr

    monkeypatch.setattr(probes, "require_cuda", lambda: _FakeTorch())
    with pytest.raises(cr.UnsupportedGPUError, match="Imaginary"):
        cr.run_calibration(tmp_path, quick=True)
    # naming a catalog GPU explicitly is accepted
    torch, spec = cr.check_environment(gpu="h200")
    assert spec.name == "H200-SXM"


def test_orchestrator_resume_runs_only_missing_stages(tmp_path, monkeypatch):
    """Simulated interruption: the e2e stage dies after some rows; resume re-runs nothing already measured."""
    from kvmodel.measure import calibrate_run as cr

    write_synthetic_data(tmp_path)
    calls = {"probe_rows": 0, "e2e": 0}
    probe_done = ResultsFile(tmp_path / "probes.csv", probes.PROBE_KEYS).done_keys()

    def fake_run_probes(out_csv, models, quick, resume, batches, log, on_row):
        rf = ResultsFile(out_csv, probes.PROBE_KEYS, fieldnames=probes.PROBE_FIELDS)
        done = rf.done_keys() if resume else set()
        for key in [("read", "triton", "", "", "0", "999", "0")]:
            if key not in done:
                calls["probe_rows"] += 1
                rf.append(dict(op="read", impl="triton", model="", name="", B=0, K=999, N=0, bytes_moved=999,
                               median_s=3e-6))
        assert probe_done <= done or not resume

    state = {"interrupt": True}

    def fake_run_e2e(out_csv, models, batches, contexts, formats, resume, log, progress, read_ceiling_GBps,
                     deadline_s, hf_runtimes=(), hf_points=None):
        calls["e2e"] += 1
        if state["interrupt"]:
            state["interrupt"] = False
            raise KeyboardInterrupt
        rf = ResultsFile(out_csv, e2e.E2E_KEYS)
        assert resume and len(rf.done_keys()) >= 48  # the rows measured before stay

    monkeypatch.setattr(probes, "require_cuda", lambda: type("T", (), {"cuda": _FakeCuda()})())
    monkeypatch.setattr(cr, "check_environment", lambda gpu=None: (None, get_gpu("h200")))
    monkeypatch.setattr(probes, "run_probes", fake_run_probes)
    monkeypatch.setattr(e2e, "run_e2e", fake_run_e2e)
    with pytest.raises(KeyboardInterrupt):
        cr.run_calibration(tmp_path, quick=True, resume=True, attention=False, log=lambda s: None)
    n_before = len(ResultsFile(tmp_path / "e2e_decode.csv", e2e.E2E_KEYS).rows())
    seen = []
    r = cr.run_calibration(tmp_path, quick=True, resume=True, attention=False, log=lambda s: None,
                           progress_cb=lambda d, t, m, eta: seen.append((d, t)))
    assert calls["probe_rows"] == 1  # the one missing probe row, measured once across both runs
    assert len(ResultsFile(tmp_path / "e2e_decode.csv", e2e.E2E_KEYS).rows()) == n_before
    assert {p.name for p in r.written} >= {"h200-kvmodel-graph.yaml"}
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached 100 %
    # without resume, earlier raw files are moved aside, not deleted
    moved = cr._archive_previous(tmp_path)
    assert any(p.name.startswith("probes.csv.") for p in moved)
    assert not (tmp_path / "probes.csv").exists()


def test_progress_eta():
    from kvmodel.measure.calibrate_run import Progress

    lines = []
    p = Progress(10, cb=lambda d, t, m, eta: lines.append((d, t, m, eta)))
    p.step("probes", "a")
    p.step("probes", "b", units=4)
    assert lines[-1][0] == 5 and lines[-1][1] == 10 and lines[-1][3] is not None
    assert json.dumps(lines)  # plain data


def test_grid_kernel_version_reads_the_grids_provenance(tmp_path):
    """The fit charges e2e rows' P5 calls by the launch rules of the kernel that measured the grid: its
    provenance's ``kernel_version`` when ported, else None (the current kernel's rules)."""
    import json

    from kvmodel.calibration import grid_kernel_version

    grid = tmp_path / "decode_attention.csv"
    grid.write_text("model\n")
    assert grid_kernel_version(grid) is None  # no provenance
    for v, want in (("v9", "v9"), ("v10", "v10"), ("v3 (candidates)", None), (None, None)):
        (tmp_path / "decode_attention.provenance.json").write_text(json.dumps({"kernel_version": v}))
        assert grid_kernel_version(grid) == want, v


def test_fit_only_cli_takes_a_grid_from_another_folder_and_the_driver_device_name(tmp_path):
    """`kvmodel calibrate --fit-only DIR --attention-csv GRID`: the grid of a separate run is fitted beside DIR's
    probes and steps, and a driver device name in the provenance ('NVIDIA H100 80GB HBM3') files it under H100."""
    from click.testing import CliRunner

    from kvmodel.cli import cli

    run, grid = tmp_path / "run", tmp_path / "grid"
    write_synthetic_data(run)
    write_synthetic_data(grid, with_grid=True)
    for p in run.glob("*.provenance.json"):
        prov = json.loads(p.read_text())
        prov["gpu_name"] = prov["device_name"] = "NVIDIA H100 80GB HBM3"
        p.write_text(json.dumps(prov))
    out = tmp_path / "cal"
    r = CliRunner().invoke(cli, ["calibrate", "--fit-only", str(run), "--attention-csv",
                                  str(grid / "decode_attention.csv"), "--calibrations", str(out)])
    assert r.exit_code == 0, r.output
    c = cal.load_calibration(out / "h100-kvmodel-graph.yaml")
    assert c.gpu == "H100-SXM" and "decode-attention grid" in c.notes
    assert c.ops["attention:P0"].bw_GBps == pytest.approx(GT["attention:P0"].bw_GBps, rel=0.05)
    assert "--attention-csv" in c.command


def test_attention_csv_without_fit_only_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from kvmodel.cli import cli

    f = tmp_path / "g.csv"
    f.write_text("pipeline\n")
    r = CliRunner().invoke(cli, ["calibrate", "--attention-csv", str(f)])
    assert r.exit_code == 2 and "--fit-only" in r.output and "Traceback" not in r.output
