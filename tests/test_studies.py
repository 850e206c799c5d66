"""Sweeps (value lists, study files, vectorized grid vs predict, atomic CSV/Parquet, plots), the `sweep` command
and its bad inputs, and the traffic policies the studies rely on: per-layer K/V precision, MoE experts vs batch,
MLA latent KV, sliding-window layers."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmodel import traffic
from kvmodel.cli import cli
from kvmodel.policies import (
    KVPolicy,
    LayerRule,
    as_policy,
    layer_formats,
    load_policy,
    policy_attention_time_s,
    policy_groups,
    policy_kv_bytes_per_token,
    policy_kv_read_bytes,
)
from kvmodel.predict import FP16, attention_time_s, predict
from kvmodel.specs import SpecError, Workload, get_gpu, get_model, parse_kv_format
from kvmodel.studies import (
    COLUMNS,
    atomic_write,
    load_study,
    parse_formats,
    parse_values,
    plot_sweep,
    run_sweep,
    sweep_combo,
    write_tables,
)
from kvmodel.timing import TimeModel

H100 = get_gpu("h100")
H200 = get_gpu("h200")
LLAMA = get_model("llama-3.1-8b")
QWEN = get_model("qwen2.5-7b")
INT4 = parse_kv_format("int4")


@pytest.fixture
def run():
    def _run(*args):
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return _run


# ----------------------------------------------------------------------------------------------------------------
# value lists
# ----------------------------------------------------------------------------------------------------------------


def test_value_lists_and_ranges():
    assert parse_values("1k,4k,32k", tokens=True) == [1024, 4096, 32768]
    assert parse_values("1k:128k:x2", tokens=True) == [1024 << i for i in range(8)]
    assert parse_values("1:128:x2") == [1, 2, 4, 8, 16, 32, 64, 128]
    assert parse_values("1024:4096:+1024", tokens=True) == [1024, 2048, 3072, 4096]
    assert parse_values("4:16") == [4, 8, 16]
    assert parse_values(["1k", "2k:4k:x2", 512], tokens=True) == [512, 1024, 2048, 4096]
    assert parse_values("8,1,8") == [1, 8]


@pytest.mark.parametrize("bad", ["", "0", "-4", "a", "8:1:x2", "1:8:x1", "1:8:y2", "1:2:3:4", "1.5", "1,,2",
                                 "1:10000000:+1"])
def test_bad_value_lists_raise(bad):
    with pytest.raises(ValueError):
        parse_values(bad)


# ----------------------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------------------


def test_sweep_matches_predict_pointwise():
    fmts = [FP16, INT4, parse_kv_format("k8v4")]
    Bs, Ts = [1, 16], [1024, 65536]
    df = run_sweep([H100, H200], [LLAMA, QWEN], fmts, Bs, Ts)
    assert list(df.columns) == COLUMNS
    assert len(df) == 2 * 2 * 3 * 2 * 2
    for _, r in df.sample(12, random_state=0).iterrows():
        g = get_gpu(r["gpu"])
        m = get_model(r["model"])
        kv = {f.label: f for f in fmts}[r["kv"]]
        p = predict(g, m, Workload(batch=int(r["batch"]), context_tokens=int(r["context"]), kv=kv))
        assert r["step_time_s"] == pytest.approx(p.fused.step_time_s, rel=1e-12)
        assert r["fp16_step_time_s"] == pytest.approx(p.fp16.step_time_s, rel=1e-12)
        assert r["kv_read_bytes"] == pytest.approx(p.bytes.kv_read, rel=1e-12)
        assert r["weights_bytes"] == pytest.approx(p.bytes.weights_streamed, rel=1e-12)
        assert r["footprint_per_gpu_bytes"] == pytest.approx(p.memory.footprint_bytes - (
            p.memory.kv_cache_bytes - p.bytes.kv_read), rel=1e-9)  # predict counts T + gen tokens (gen = 1)
        assert bool(r["fits"]) == (r["footprint_per_gpu_bytes"] <= p.memory.usable_bytes)
        assert r["regime"] == ("KV-bound" if p.bytes.kv_read > p.bytes.weights_streamed else "weight-bound")
        assert r["crossover_context"] == pytest.approx(p.crossover_context_tokens, rel=1e-9)


def test_sweep_with_tp_matches_predict_tp():
    m = get_model("llama-3.1-70b")
    df = run_sweep([H100], [m], [INT4], [8], [32768], tps=(1, 4))
    t4 = df[df["tp"] == 4].iloc[0]
    p = predict(H100, m, Workload(batch=8, context_tokens=32768, kv=INT4), tp=4)
    assert t4["step_time_s"] == pytest.approx(p.fused.step_time_s, rel=1e-12)
    assert t4["allreduce_time_s"] == pytest.approx(p.tensor_parallel.allreduce_time_s, rel=1e-12)
    assert df[df["tp"] == 1].iloc[0]["allreduce_time_s"] == 0.0


def test_sweep_skips_tp_without_link_and_warns():
    warnings = []
    df = run_sweep([get_gpu("rtx4090")], [QWEN], [INT4], [1], [4096], tps=(1, 2), warn=warnings.append)
    assert set(df["tp"]) == {1}
    assert warnings and "no GPU-GPU link" in warnings[0]


def test_sweep_is_vectorized_and_fast():
    import time

    Bs = parse_values("1:512:x2")
    Ts = parse_values("256:1m:x2", tokens=True)
    t0 = time.perf_counter()
    df = run_sweep([H100, H200], [LLAMA, QWEN, get_model("mixtral-8x7b")], [FP16, INT4, parse_kv_format("k8v4")],
                   Bs, Ts)
    dt = time.perf_counter() - t0
    assert len(df) == 2 * 3 * 3 * len(Bs) * len(Ts)
    assert np.isfinite(df["step_time_s"]).all()
    assert dt < 20


def test_tables_written_atomically(tmp_path):
    df = run_sweep([H100], [QWEN], [FP16, INT4], [1, 8], [1024, 8192])
    files = write_tables(df, tmp_path / "out", "s")
    assert [f.name for f in files] == ["s.csv", "s.parquet"]
    back = pd.read_parquet(files[1])
    assert len(back) == len(df) and list(back.columns) == COLUMNS
    assert len(pd.read_csv(files[0])) == len(df)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("old")

    def boom(path):
        open(path, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.csv"]


def test_plots_are_written(tmp_path):
    df = run_sweep([H100], [LLAMA, QWEN], [FP16, INT4], [1, 4, 16], [1024, 8192, 65536])
    paths = plot_sweep(df, tmp_path)
    names = {p.name for p in paths}
    assert "regime_map.png" in names and "roofline_h100-sxm.png" in names
    assert any(n.startswith("heatmap_tokens_per_s_") for n in names)
    assert any(n.startswith("heatmap_speedup_") for n in names)
    for p in paths:
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------------------
# the command and study files
# ----------------------------------------------------------------------------------------------------------------


def test_sweep_command_writes_csv_parquet_plots(run, tmp_path):
    out = tmp_path / "o"
    r = run("sweep", "--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "1k:8k:x2", "--batch", "1,8", "--kv",
            "fp16,int4", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert (out / "sweep.csv").exists() and (out / "sweep.parquet").exists() and (out / "regime_map.png").exists()
    assert "16 configurations" in r.output
    df = pd.read_csv(out / "sweep.csv")
    assert set(df["kv"]) == {"fp16", "int4-g32"} and set(df["context"]) == {1024, 2048, 4096, 8192}


def test_sweep_progress_bar_goes_to_stderr(tmp_path):
    r = CliRunner().invoke(cli, ["sweep", "--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "1k,2k",
                                                 "--out", str(tmp_path), "--no-plots", "--progress"])
    assert r.exit_code == 0
    assert "sweep (" in r.stderr and "sweep (" not in r.stdout


def test_study_file(run, tmp_path):
    pol = tmp_path / "pol.yaml"
    pol.write_text("name: edges\ndefault: int4\nlayers:\n  - {layers: 'first:2', kv: k8v4}\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: mystudy\ngpus: [h100]\nmodels: [qwen2.5-7b]\ncontexts: ['1k:4k:x2']\nbatches: [1, 4]\n"
                     "kv: [fp16, int4, pol.yaml]\ntp: [1]\nplots: false\n")
    spec = load_study(study)
    assert spec.kv[2] == str(tmp_path / "pol.yaml")
    r = run("sweep", "--study", str(study), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "o" / "mystudy.csv")
    assert set(df["kv"]) == {"fp16", "int4-g32", "policy:edges"}
    assert not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize("body,msg", [
    ("gpus: [h100]\nmodels: [qwen2.5-7b]\ncontexts: [1k]\nbogus: 1\n", "bogus"),
    ("gpus: [h100]\nmodels: [qwen2.5-7b]\n", "contexts"),
    ("gpus: [h100]\nmodels: [qwen2.5-7b]\ncontexts: [1k]\npipeline: P9\n", "pipeline"),
    ("[1, 2", "malformed YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_study_files_exit_2_with_message(run, tmp_path, body, msg):
    f = tmp_path / "s.yaml"
    f.write_text(body)
    r = run("sweep", "--study", str(f), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args,msg", [
    (["--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "8k:1k:x2"], "backwards"),
    (["--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "1k", "--batch", "0"], "--batch"),
    (["--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "lots"], "--ctx"),
    (["--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "1k", "--kv", "int5x"], "unknown KV format"),
    (["--gpu", "nosuchgpu", "--model", "qwen2.5-7b", "--ctx", "1k"], "unknown GPU"),
    (["--gpu", "h100", "--model", "nosuchmodel", "--ctx", "1k"], "unknown model"),
    (["--gpu", "h100", "--ctx", "1k"], "--model"),
    (["--gpu", "h100", "--model", "qwen2.5-7b"], "--ctx"),
    (["--gpu", "h100", "--model", "qwen2.5-7b", "--ctx", "1k", "--kv", "missing.yaml"], "cannot read"),
])
def test_sweep_bad_inputs_exit_2(run, tmp_path, args, msg):
    r = run("sweep", *args, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------------------------------------------
# per-layer K/V precision policies
# ----------------------------------------------------------------------------------------------------------------


def test_two_class_policy_equals_symbolic_mixed_formula():
    pol = KVPolicy(name="k8-edges", default="int4", layers=[LayerRule(layers="0-1,26-27", kv="k8v4")])
    v = traffic.model_symbols(QWEN)
    v.update(traffic.kv_symbols(INT4))
    hp = traffic.kv_symbols(parse_kv_format("k8v4"))
    v.update({f"{k}_hp": val for k, val in hp.items() if k != "g"}, L_hp=4, B=3, T=5000)
    assert policy_kv_bytes_per_token(pol, QWEN) == pytest.approx(traffic.evaluate("kv_bytes_per_token_mixed", v))
    assert float(policy_kv_read_bytes(pol, QWEN, 3, 5000)) == pytest.approx(
        float(traffic.evaluate("kv_read_bytes_mixed", v)))
    assert traffic.evaluate("kv_bytes_per_token_mixed", {**v, "L_hp": 0}) == traffic.evaluate("kv_bytes_per_token", v)


@settings(max_examples=40, deadline=None)
@given(n_hp=st.integers(0, 28), kb=st.sampled_from([8, 16]))
def test_more_high_precision_layers_never_fewer_bytes(n_hp, kb):
    base = KVPolicy(default="int4")
    pol = KVPolicy(default="int4", layers=[LayerRule(layers=f"first:{n_hp}", k_bits=kb)] if n_hp else [])
    assert policy_kv_bytes_per_token(pol, QWEN) >= policy_kv_bytes_per_token(base, QWEN)
    fp16 = policy_kv_bytes_per_token(as_policy(FP16), QWEN)
    assert policy_kv_bytes_per_token(pol, QWEN) <= fp16


def test_uniform_policy_is_exactly_the_format():
    tm = TimeModel(H100)
    B, T = np.array([[1], [8]]), np.array([[1024, 65536]])
    a = policy_attention_time_s(tm, QWEN, as_policy(INT4), B, T)
    assert np.array_equal(a, attention_time_s(tm, QWEN, INT4, B, T, "P5"))
    pol = KVPolicy(default="int4")
    assert np.allclose(policy_attention_time_s(tm, QWEN, pol, B, T), a, rtol=1e-12)


def test_policy_layers_and_overrides():
    pol = KVPolicy(default="int4", layers=[LayerRule(layers="first:2", kv="int8"), LayerRule(layers="1", k_bits=16)])
    f = layer_formats(pol, QWEN)
    assert (f[0].k_bits, f[0].v_bits) == (8, 8) and (f[1].k_bits, f[1].v_bits) == (16, 8)
    assert all((x.k_bits, x.v_bits) == (4, 4) for x in f[2:])
    assert sum(n for _, n in policy_groups(pol, QWEN)) == QWEN.num_layers
    with pytest.raises(ValueError, match="out of range"):
        layer_formats(KVPolicy(layers=[LayerRule(layers="40")]), QWEN)


def test_policy_yaml_is_strict(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\ndefault: int4\nlayers:\n  - {layers: '0-3', kv: k16v4}\n")
    assert load_policy(f).layers[0].kv == "k16v4"
    f.write_text("name: x\ndefault: int4\nextra_key: 1\n")
    with pytest.raises(SpecError, match="extra_key"):
        load_policy(f)
    f.write_text("default: int7x\n")
    with pytest.raises(SpecError, match="default"):
        load_policy(f)


def test_policy_in_sweep_lies_between_its_formats(tmp_path):
    pol = KVPolicy(name="half", default="int4", layers=[LayerRule(layers="first:14", k_bits=16)])
    fmts = [INT4, pol, parse_kv_format("k16v4")]
    df = run_sweep([H100], [QWEN], fmts, [16], [32768])
    t = dict(zip(df["kv"], df["step_time_s"]))
    assert t["int4-g32"] < t["policy:half"] < t["k16v4-g32"]
    kv = dict(zip(df["kv"], df["kv_read_bytes"]))
    assert kv["policy:half"] == pytest.approx((kv["int4-g32"] + kv["k16v4-g32"]) / 2, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# MoE experts vs batch, MLA latent KV, sliding windows
# ----------------------------------------------------------------------------------------------------------------


def test_moe_expert_traffic_grows_with_batch_and_saturates():
    mix = get_model("mixtral-8x7b")
    v = traffic.model_symbols(mix)
    v.update(b_w=2.0)
    Bs = np.array([1, 2, 4, 8, 16, 64, 256])
    touched = traffic.evaluate("experts_touched", {**v, "B": Bs})
    assert touched[0] == pytest.approx(mix.moe.top_k)
    assert (np.diff(touched) > 0).all() and touched[-1] == pytest.approx(mix.moe.num_experts, rel=1e-6)
    eb = traffic.evaluate("moe_expert_bytes", {**v, "B": Bs})
    assert eb[-1] / eb[0] == pytest.approx(mix.moe.num_experts / mix.moe.top_k, rel=1e-6)
    wb = traffic.evaluate("weight_bytes_streamed", {**v, "B": Bs})
    assert (np.diff(wb) > 0).all()


def test_mla_caches_the_latent_only():
    ds = get_model("deepseek-v3")
    v = traffic.model_symbols(ds)
    v.update(traffic.kv_symbols(FP16))
    per_tok = traffic.evaluate("kv_bytes_per_token", v)
    assert per_tok == ds.num_layers * (ds.mla.kv_lora_rank + ds.mla.qk_rope_head_dim) * 2
    # a GQA model of the same head count would cache far more
    assert per_tok < ds.num_layers * 2 * ds.num_heads * 128 * 2 / 10


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 1 << 19))
def test_sliding_window_layers_stop_growing_at_the_window(T):
    gem = get_model("gemma-3-12b")
    sw = gem.sliding_window
    v = traffic.model_symbols(gem)
    v.update(traffic.kv_symbols(INT4), B=1, T=T)
    got = traffic.evaluate("kv_read_bytes", v)
    per_layer_tok = traffic.evaluate("kv_bytes_per_token_layer", v)
    expect = per_layer_tok * ((gem.num_layers - sw.num_sliding_layers) * T + sw.num_sliding_layers * min(T, sw.window_tokens))
    assert got == pytest.approx(expect, rel=1e-12)
    dense = traffic.evaluate("kv_read_bytes", {**v, "L_s": 0})
    assert got <= dense * (1 + 1e-12)
    if T > sw.window_tokens:
        assert got < dense


def test_parse_formats_mixes_formats_and_policies(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: p\ndefault: int8\n")
    out = parse_formats(["fp16,int4", str(f)])
    assert [x.label for x in out] == ["fp16", "int4-g32", "policy:p"]
    assert math.isclose(policy_kv_bytes_per_token(out[2], LLAMA),
                        policy_kv_bytes_per_token(as_policy(parse_kv_format("int8")), LLAMA))
    with pytest.raises(ValueError):
        parse_formats([""])


def test_sweep_combo_refuses_group_that_does_not_divide_head_dim():
    small = get_model("qwen2.5-0.5b")  # head_dim 64
    with pytest.raises(ValueError, match="group size 128"):
        sweep_combo(H100, small, parse_kv_format("int4", group_size=128), [1], [1024])
