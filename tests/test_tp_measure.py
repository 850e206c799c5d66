"""Measurement half of issue 8 on CPU: the tensor-parallel decode step (torch.distributed, gloo), the all-reduce
probe, the link fit. The sharded step must give the unsharded step's output: world size 1 exactly the e2e step,
world size 2 (two gloo processes) the same logits to float32 rounding, with KV heads replicated when Hkv < N.
GPU/NCCL paths are marked ``gpu`` (skipped without CUDA; the two-GPU one also without a second GPU)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from kvmodel.measure import allreduce_probe as arp
from kvmodel.measure import e2e_decode as e2e
from kvmodel.measure import tp_decode as tpd
from kvmodel.measure.results import ResultsFile

from kvmodel import tp_fit
from kvmodel.specs import ModelSpec, get_gpu, get_interconnect, get_model

try:
    import torch
except ImportError:  # the shard arithmetic and the link fit need no torch
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

# vocab 97: the vocab-parallel LM head splits unevenly (49 + 48 rows)
TINY = ModelSpec(
    name="tiny-tp",
    vocab_size=97,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=96,
    qkv_bias=True,
    published_params=1,
    published_params_source="test",
)
TINY_REP = TINY.model_copy(update=dict(name="tiny-tp-rep", num_kv_heads=1))  # Hkv = 1 < N = 2: replicated
TINY64 = TINY.model_copy(update=dict(name="tiny-tp64", head_dim=64, hidden_size=128))  # the kernels' head dim
B, T = 3, 7


# ----------------------------------------------------------------------------------------------------------------
# Shard arithmetic (no processes)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_shard_plan_catalog_targets(N):
    for name in ("Llama-3.1-8B", "Mistral-Small-3.1-24B", "Qwen2.5-32B"):
        spec = get_model(name)
        p = tpd.shard_plan(spec, N)
        assert p.q_heads * N == spec.num_heads
        assert p.kv_heads == math.ceil(spec.num_kv_heads / N) and not p.kv_replicated
        assert p.intermediate * N == spec.intermediate_size
        covered = sorted(h for r in range(N) for h in range(*p.kv_range(r)))
        assert covered == list(range(spec.num_kv_heads))


def test_kv_heads_replicated_when_fewer_than_ranks():
    spec = TINY.model_copy(update=dict(num_heads=32, num_kv_heads=2))
    p = tpd.shard_plan(spec, 8)
    assert p.kv_replicated and p.kv_heads == 1
    G = spec.num_heads // spec.num_kv_heads
    for r in range(8):
        k0, k1 = p.kv_range(r)
        assert k1 - k0 == 1
        # every query head of the rank reads the KV head the rank holds
        assert {j // G for j in range(*p.q_range(r))} == {k0}
    assert [p.kv_range(r)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        tpd.shard_plan(spec.model_copy(update=dict(num_kv_heads=4, num_heads=12)), 8)  # 12 q heads over 8
    with pytest.raises(NotImplementedError):
        tpd.shard_plan(get_model("mixtral-8x7b"), 2)


def test_step_bytes_per_gpu():
    for name in ("Llama-3.1-8B", "Qwen2.5-0.5B"):  # untied; tied with qkv bias
        spec = e2e.resolve_model(name)
        assert tpd.tp_weight_bytes_per_gpu(spec, 1, 4) == e2e.weight_bytes_per_step(spec, 4)
        one = tpd.tp_step_bytes(spec, 1, 4, 4096)
        assert one["bytes_kv_per_gpu"] == e2e.step_bytes(spec, 4, 4096)["bytes_kv"]
        two = tpd.tp_step_bytes(spec, 2, 4, 4096, 4, 4)
        assert two["bytes_kv_per_gpu"] == pytest.approx(e2e.step_bytes(spec, 4, 4096, 4, 4)["bytes_kv"] / 2)
        assert two["allreduce_calls_per_step"] == 2 * spec.num_layers
        assert two["allreduce_bytes_per_call"] == 4 * spec.hidden_size * 2
    spec = get_model("Llama-3.1-8B")
    w1, w8 = tpd.tp_weight_bytes_per_gpu(spec, 1, 1), tpd.tp_weight_bytes_per_gpu(spec, 8, 1)
    assert w8 == pytest.approx(w1 / 8, rel=2e-3)  # replicated norms and embedding rows only


@needs_torch
def test_random_shard_matches_byte_count():
    m0 = tpd.TPDecodeModel(TINY, rank=0, world=2, dtype_name="float32", device="cpu")
    assert m0.weight_bytes_streamed(B) == tpd.tp_weight_bytes_per_gpu(TINY, 2, B, bytes_per_param=4)
    m = tpd.TPDecodeModel(TINY, rank=1, world=2, dtype_name="float32", device="cpu")
    assert m.lm_head.shape == (48, TINY.hidden_size)  # the last rank's short vocab shard (rank 0: 49 rows)
    assert m.weight_bytes_streamed(B) == m0.weight_bytes_streamed(B) - TINY.hidden_size * 4
    assert m.layers[0]["qkv"].shape == ((2 + 2 * 1) * 16, 64)


def test_dist_env_names():
    env = tpd.set_dist_env({})
    assert env == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


def test_cli_help(capsys):
    for mod in (tpd, arp, tp_fit):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
    assert "--tp" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Sharded step against the unsharded one (two gloo processes)
# ----------------------------------------------------------------------------------------------------------------


def _full(spec):
    """The same full model and FP16-layout cache on every rank (seeded)."""
    full = e2e.DecodeModel(spec, "float32", device="cpu", seed=0)
    g = torch.Generator().manual_seed(5)
    for lay in full.layers:  # non-trivial norms and biases
        lay["in_norm"].uniform_(0.5, 1.5, generator=g)
        lay["post_norm"].uniform_(0.5, 1.5, generator=g)
        lay["qkv_b"].normal_(0, 0.1, generator=g)
    full.final_norm.uniform_(0.5, 1.5, generator=g)
    need = e2e.kv_cache_alloc_bytes(spec, B, T, 16, 16) * 2
    pool = torch.randn(int(need) // 4 + 4096, generator=torch.Generator().manual_seed(1))
    return full, e2e.SDPABackend(spec, B, T, e2e.Carver(pool), torch.float32)


def _shard_step(spec, full, full_backend, rank, world):
    m = tpd.TPDecodeModel(spec, rank, world, "float32", "cpu", full=full)
    pool = torch.empty(int(e2e.kv_cache_alloc_bytes(m.local_spec, B, T, 16, 16) * 2) // 4 + 4096)
    be = m.make_backend("P0", B, T, pool)
    tpd.copy_kv_shard(full_backend, be, m.plan, rank)
    step, attn, ar = m.build_step(B, T, be)
    ids = step().clone()
    return m, step, be, ids, m.gather_logits(step.state["logits"]), (attn, ar)


def _check_worker(rank, world, out_dir, probe_job):
    res = {"env": {k: os.environ.get(k) for k in tpd.DIST_ENV}}
    for tag, spec in (("gqa", TINY), ("rep", TINY_REP)):
        full, fb = _full(spec)
        if rank == 0:  # world size 1 (no collective) and the unsharded e2e step, same weights and cache
            _, s1, _, ids1, lg1, _ = _shard_step(spec, full, fb, 0, 1)
        m, step, be, ids, lg, (attn, ar) = _shard_step(spec, full, fb, rank, world)
        qh, kh, d = m.plan.q_heads, m.plan.kv_heads, spec.head_dim
        res[tag] = {
            "ids": ids,
            "logits": lg,
            "kv_range": m.plan.kv_range(rank),
            "local_kv_heads": be.layers[0].k.shape[1],
            "k_rows": m.layers[0]["qkv"][qh * d : (qh + kh) * d].clone(),
            "full_k_rows": full.layers[0]["qkv"][
                spec.num_heads * d : (spec.num_heads + spec.num_kv_heads) * d
            ],
        }
        t = tpd.time_collective([step], reps=2)
        res[tag]["timing"] = (t.median_s, t.samples)
        attn()
        ar()
        if rank == 0:
            # e2e reference: its own step over the full cache (run last: it writes slot T of that cache)
            ref_step, _, _ = full.build_step(B, T, fb)
            ref_step.state["ids"].copy_(s1.state["ids"])
            ref_step()
            res[tag].update(
                ids1=ids1,
                logits1=lg1,
                ref_logits=ref_step.state["logits"].clone(),
                step_ids=s1.state["ids"].clone(),
            )
    arp._probe_worker(rank, world, probe_job)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp2")
    probe_csv = d / "allreduce.csv"
    points = [("graph", b, h) for h in (64, 256) for b in (1, 4, 16)]
    job = dict(
        out_csv=str(probe_csv),
        dtype="float16",
        points=points,
        calls=3,
        n_buffers=2,
        reps=3,
        deadline_s=None,
        command="pytest",
    )
    tpd.launch(_check_worker, 2, (str(d), job), backend="gloo", timeout_s=120)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(2)], probe_csv


@needs_torch
def test_world1_matches_unsharded_e2e_step(tp2):
    res, _ = tp2
    for tag in ("gqa", "rep"):
        r = res[0][tag]
        err = float((r["logits1"] - r["ref_logits"]).norm() / r["ref_logits"].norm())
        assert err < 1e-6, (tag, err)
        assert torch.equal(r["ids1"], r["ref_logits"].argmax(-1))


@needs_torch
def test_world2_matches_world1(tp2):
    res, _ = tp2
    for tag in ("gqa", "rep"):
        ref = res[0][tag]["logits1"]
        for rank in (0, 1):
            r = res[rank][tag]
            err = float((r["logits"] - ref).norm() / ref.norm())
            assert err < 1e-5, (tag, rank, err)
            assert r["logits"].shape == (B, TINY.vocab_size)
            # argmax through the all-gather of (max, index) pairs = argmax of the full logits
            assert torch.equal(r["ids"], res[0][tag]["ids1"])
            assert r["timing"][1] == 2


@needs_torch
def test_kv_heads_sharded_or_replicated(tp2):
    res, _ = tp2
    # Hkv = 2 over 2 ranks: one head each, different heads
    assert [res[r]["gqa"]["kv_range"] for r in (0, 1)] == [(0, 1), (1, 2)]
    # Hkv = 1 over 2 ranks: the one head on both ranks, same k-projection rows as the full model
    for r in (0, 1):
        rep = res[r]["rep"]
        assert rep["kv_range"] == (0, 1) and rep["local_kv_heads"] == 1
        assert torch.equal(rep["k_rows"], rep["full_k_rows"])


@needs_torch
def test_spawned_processes_have_nvls_off(tp2):
    res, _ = tp2
    for r in (0, 1):
        assert res[r]["env"] == tpd.DIST_ENV


@needs_torch
def test_probe_writes_rows_under_gloo(tp2):
    _, csv = tp2
    rows = ResultsFile(csv, arp.PROBE_KEYS).rows()
    assert len(rows) == 6
    for r in rows:
        assert r["tp"] == "2" and r["backend"] == "gloo" and r["status"] == "ok"
        assert int(r["bytes"]) == int(r["B"]) * int(r["hidden"]) * 2
        assert float(r["median_s"]) > 0
        assert float(r["busbw_GBps"]) == pytest.approx(float(r["algbw_GBps"]) * 1.0)  # 2(N-1)/N = 1 at N = 2
    prov = ResultsFile(csv, arp.PROBE_KEYS).read_provenance()
    assert prov["dist_backend"] == "gloo" and prov["world_size"] == 2 and prov["env"] == tpd.DIST_ENV
    # resume: everything is done, so no process group is started
    import kvmodel.measure.allreduce_probe as mod

    orig = mod.launch
    mod.launch = lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched although all rows are done"))
    try:
        arp.run_probe(
            csv, tp_degrees=[2], batches=[1, 4, 16], hiddens=[64, 256], backend="gloo", log=lambda s: None
        )
    finally:
        mod.launch = orig
    assert len(ResultsFile(csv, arp.PROBE_KEYS).rows()) == 6


# ----------------------------------------------------------------------------------------------------------------
# The runner: rows with provenance, resume
# ----------------------------------------------------------------------------------------------------------------


@needs_torch
def test_run_tp_rows_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "tp_decode.csv"
    odd = TINY64.model_copy(update=dict(name="tiny-odd", num_heads=6, num_kv_heads=3))
    kw = dict(
        models=[TINY64, odd],
        batches=[2],
        contexts=[40],
        formats=[("P0", 16, 16), ("P5", 4, 4)],
        backend="gloo",
        dtype_name="float16",
        reps=2,
        log=lambda s: None,
    )
    tpd.run_tp(out, tp_degrees=[1, 2], **kw)
    rf = ResultsFile(out, tpd.TP_KEYS)
    rows = rf.rows()
    by = {(r["model"], r["tp"], r["pipeline"]): r for r in rows}
    assert set(by) == {
        (m, tp, p) for m in ("tiny-tp64", "tiny-odd") for tp in ("1", "2") for p in ("P0", "P5")
    }
    for tp in ("1", "2"):
        for p in ("P0", "P5"):  # FP16 KV through SDPA, INT4 KV through the fused split-K kernel
            r = by[("tiny-tp64", tp, p)]
            assert r["status"] == "ok" and float(r["median_s"]) > 0 and float(r["attn_s"]) > 0, r
            assert (
                r["backend"] == "gloo" and r["device"] == "cpu" and r["kv_heads_per_gpu"] == str(2 // int(tp))
            )
    r1, r2 = by[("tiny-tp64", "1", "P0")], by[("tiny-tp64", "2", "P0")]
    assert float(r1["allreduce_s"]) == 0.0 and float(r2["allreduce_s"]) > 0
    assert r2["lm_head"] == "vocab-parallel" and r2["allreduce_calls_per_step"] == "4"
    assert float(r2["bytes_kv_per_gpu"]) == pytest.approx(float(r1["bytes_kv_per_gpu"]) / 2)
    assert by[("tiny-odd", "2", "P0")]["status"] == "unsupported"  # 3 KV heads do not split over 2
    assert by[("tiny-odd", "1", "P0")]["status"] == "ok"
    prov = rf.read_provenance()
    assert prov["env"] == tpd.DIST_ENV and prov["lm_head"] == "vocab-parallel" and prov["world_size"] == 2
    # resume: nothing left, no process group started, no row added
    monkeypatch.setattr(tpd, "launch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched")))
    tpd.run_tp(out, tp_degrees=[1, 2], **kw)
    assert len(rf.rows()) == len(rows)
    # a new batch is planned, the done ones are not
    todo = tpd.plan_tp(rf, [TINY64], 2, [2, 4], [40], [("P0", 16, 16)], "float16", 32)
    assert [(s.name, [c.B for c in cfgs]) for s, cfgs in todo] == [("tiny-tp64", [4])]


# ----------------------------------------------------------------------------------------------------------------
# Link fit (no torch in kvmodel.tp_fit)
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_rows(lam_of_n, bw_GBps, tps=(2,), noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in tps:
        for h in (896, 4096, 5120, 8192):
            for b in (1, 2, 4, 8, 16, 32, 64, 128):
                x = b * h * 2
                t = (lam_of_n(n) + tp_fit.ring_factor(n) * x / (bw_GBps * 1e9)) * (
                    1 + noise * rng.standard_normal()
                )
                rows.append(
                    {
                        "tp": str(n),
                        "backend": "nccl",
                        "mode": "graph",
                        "B": str(b),
                        "hidden": str(h),
                        "bytes": str(x),
                        "median_s": repr(t),
                        "status": "ok",
                    }
                )
    rows.append(
        {
            "tp": "2",
            "backend": "nccl",
            "mode": "eager",
            "B": "1",
            "hidden": "896",
            "bytes": "1792",
            "median_s": "1.0",
            "status": "ok",
        }
    )  # another mode: filtered out
    rows.append(
        {
            "tp": "2",
            "backend": "nccl",
            "mode": "graph",
            "B": "1",
            "hidden": "896",
            "bytes": "1792",
            "median_s": "",
            "status": "error",
        }
    )
    return rows


def test_link_fit_recovers_latency_and_bandwidth():
    rows = _synthetic_rows(lambda n: 9e-6, 150.0)
    terms = tp_fit.fit_link_terms(rows)
    f = terms.per_tp[2]
    assert f.latency_s == pytest.approx(9e-6, rel=0.03)
    assert f.bw_GBps == pytest.approx(150.0, rel=0.05)
    assert f.n_points == 32 and f.median_abs_pct_error < 2.0
    assert terms.bw_GBps == f.bw_GBps and terms.launch_s is None


def test_joint_link_fit_over_degrees():
    launch, hop = 4e-6, 0.8e-6
    rows = _synthetic_rows(lambda n: launch + 2 * (n - 1) * hop, 220.0, tps=(2, 4, 8), noise=0.005)
    terms = tp_fit.fit_link_terms(rows)
    assert sorted(terms.per_tp) == [2, 4, 8]
    assert terms.launch_s == pytest.approx(launch, rel=0.05)
    assert terms.hop_latency_s == pytest.approx(hop, rel=0.05)
    assert terms.bw_GBps == pytest.approx(220.0, rel=0.05)
    assert terms.latency_s(8) == pytest.approx(launch + 14 * hop, rel=0.03)
    assert terms.latency_s(16) == pytest.approx(launch + 30 * hop, rel=0.05)  # unmeasured degree: joint
    entry = terms.calibration_entry()
    assert set(entry["per_tp"]) == {2, 4, 8} and entry["bw_GBps"] > 0


def test_link_terms_feed_predict():
    from kvmodel.predict import allreduce_time_s, predict
    from kvmodel.specs import Workload, parse_kv_format

    terms = tp_fit.fit_link_terms(_synthetic_rows(lambda n: 9e-6, 150.0, noise=0.0))
    model, gpu = get_model("Llama-3.1-8B"), get_gpu("h200")
    link = terms.interconnect(get_interconnect(gpu.gpu_link))
    assert link.bandwidth_per_direction_GBps == pytest.approx(150.0, rel=1e-3)
    t = allreduce_time_s(model, np.array([1, 16, 128]), 2, link, terms.latency_s(2))
    x = np.array([1, 16, 128]) * model.hidden_size * 2
    assert t == pytest.approx(2 * model.num_layers * terms.time_s(x, 2), rel=1e-9)
    p = predict(
        gpu,
        model,
        Workload(batch=16, context_tokens=4096, kv=parse_kv_format("int4")),
        **terms.predict_kwargs(2),
    )
    assert p.tensor_parallel.allreduce_latency_s == pytest.approx(terms.latency_s(2))


def test_link_fit_from_tp_rows_and_flat_times():
    rows = [
        {
            "tp": "2",
            "allreduce_s": repr(64 * (10e-6 + b * 4096 * 2 / 100e9)),
            "allreduce_calls_per_step": "64",
            "allreduce_bytes_per_call": str(b * 4096 * 2),
            "status": "ok",
        }
        for b in (1, 4, 16, 64, 128)
    ]
    rows.append(
        {
            "tp": "1",
            "allreduce_s": "0.0",
            "allreduce_calls_per_step": "0",
            "allreduce_bytes_per_call": "8192",
            "status": "ok",
        }
    )
    terms = tp_fit.fit_link_terms(tp_fit.points_from_tp_rows(rows))
    assert terms.per_tp[2].latency_s == pytest.approx(10e-6, rel=1e-3)
    assert terms.per_tp[2].bw_GBps == pytest.approx(100.0, rel=1e-3)
    flat = tp_fit.fit_link(np.array([1e3, 1e4, 1e5]), np.array([7e-6, 7e-6, 7e-6]), 2)
    assert flat.latency_s == pytest.approx(7e-6, rel=1e-3) and "unresolved" in flat.note
    with pytest.raises(ValueError):
        tp_fit.fit_link_terms([])


def test_tp_fit_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, kvmodel.tp_fit; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# GPU / NCCL (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------


def _gpu_world_worker(rank, world, out_dir):
    spec = e2e.resolve_model("Qwen2.5-0.5B")
    m = tpd.TPDecodeModel(spec, rank, world, "float16", f"cuda:{rank}")
    Bg, Tg = 4, 1024
    pool = torch.randn(
        int(e2e.kv_cache_alloc_bytes(m.local_spec, Bg, Tg, 16, 16)) // 2 + 4096,
        device=f"cuda:{rank}",
        dtype=torch.float16,
    )
    step, _, ar = m.build_step(Bg, Tg, m.make_backend("P0", Bg, Tg, pool))
    t = tpd.time_collective([step], reps=5)
    ta = tpd.time_collective([ar], reps=5)
    if rank == 0:
        torch.save(
            {"graph": t.graph, "median_s": t.median_s, "ar_s": ta.median_s}, os.path.join(out_dir, "gpu.pt")
        )


@pytest.mark.gpu
def test_nccl_world1_step_graph_captured(tmp_path):
    tpd.launch(_gpu_world_worker, 1, (str(tmp_path),), backend="nccl")
    r = torch.load(tmp_path / "gpu.pt")
    assert r["graph"] and r["median_s"] > 0


@pytest.mark.gpu
def test_nccl_world2_step_graph_captured(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    tpd.launch(_gpu_world_worker, 2, (str(tmp_path),), backend="nccl")
    r = torch.load(tmp_path / "gpu.pt")
    assert r["graph"] and r["median_s"] > 0 and r["ar_s"] > 0


def test_predict_tp_rows_uses_fitted_link():
    from kvmodel.predict import allreduce_time_s, step_time_s, tp_link
    from kvmodel.specs import KVFormat
    from kvmodel.timing import TimeModel

    gpu, model = get_gpu("h200"), get_model("Llama-3.1-8B")
    terms = tp_fit.fit_link_terms(_synthetic_rows(lambda n: 9e-6, 150.0, noise=0.0))
    rows = [
        {
            "model": "Llama-3.1-8B",
            "tp": "2",
            "B": "16",
            "T": "4096",
            "k_bits": "4",
            "v_bits": "4",
            "group": "32",
            "pipeline": "P5",
            "median_s": "0.004",
            "allreduce_s": "0.0012",
            "status": "ok",
        },
        {
            "model": "Llama-3.1-8B",
            "tp": "2",
            "B": "16",
            "T": "4096",
            "k_bits": "4",
            "v_bits": "4",
            "pipeline": "P5",
            "median_s": "",
            "status": "skipped",
        },
    ]
    (p,) = tp_fit.predict_tp_rows(rows, gpu, terms=terms)
    kv = KVFormat(k_bits=4, v_bits=4)
    base = float(step_time_s(TimeModel(gpu), model, kv, 16, 4096, "P5", tp=2, allreduce_latency_s=9e-6))
    link = tp_link(gpu, 2)
    swap = float(allreduce_time_s(model, 16, 2, terms.interconnect(link), terms.latency_s(2))) - float(
        allreduce_time_s(model, 16, 2, link, terms.latency_s(2))
    )
    assert p["predicted_s"] == pytest.approx(base + swap, rel=1e-6)
    assert p["predicted_allreduce_s"] == pytest.approx(
        2 * 32 * float(terms.time_s(16 * 4096 * 2, 2)), rel=1e-9
    )
    assert p["pct_error"] == pytest.approx(100 * (p["predicted_s"] / 0.004 - 1))
    summ = tp_fit.error_summary([p])
    assert summ["tp2"]["n"] == 1 and summ["all"]["median_abs_pct"] == pytest.approx(abs(p["pct_error"]))


def test_ring_factor_is_the_symbolic_allreduce_factor():
    """tp_fit's ring factor is the one allreduce_time charges (kvmodel.symbolic), not a copy."""

    from kvmodel import symbolic as S

    for n in (2, 4, 8):
        # allreduce_time = 2 L (lambda + f(N) B h b_a / BW): recover f(N) numerically
        vals = {"L": 1, "lambda_ar": 0, "N": n, "B": 1, "h": 1, "b_a": 1, "BW_link": 1}
        t = float(S.allreduce_time.subs({s: vals[s.name] for s in S.allreduce_time.free_symbols}))
        assert tp_fit.ring_factor(n) == pytest.approx(t / 2) == pytest.approx(2 * (n - 1) / n)
    arr = tp_fit.ring_factor(np.array([2, 4]))
    assert arr.shape == (2,)


def test_calibration_out_fills_tp_link_and_predict_uses_it(tmp_path):
    """`python -m kvmodel.tp_fit ... --calibration-out` writes a calibration whose tp_link is the fit, and
    predict's all-reduce terms then come from it."""
    from kvmodel.calibration import find_calibration, load_calibration
    from kvmodel.measure.results import ResultsFile as RF
    from kvmodel.predict import allreduce_terms
    from kvmodel.timing import TimeModel

    rows = _synthetic_rows(lambda n: 4e-6 + 2 * (n - 1) * 1e-6, 120.0, tps=(2, 4), noise=0.0)
    csv_path = tmp_path / "allreduce.csv"
    rf = RF(csv_path, ["tp", "backend", "mode", "B", "hidden"], fieldnames=list(rows[0]))
    for r in rows:
        rf.append(r)
    out = tmp_path / "h200-kvmodel-graph.yaml"
    assert tp_fit.main([str(csv_path), "--gpu", "h200", "--calibration-out", str(out)]) == 0
    cal = load_calibration(out)
    base = find_calibration("h200")
    assert cal.tp_link is not None and sorted(cal.tp_link.per_tp) == [2, 4]
    lat2, bw2 = cal.tp_link.terms(2)
    assert lat2 == pytest.approx(6e-6, rel=1e-3) and bw2 == pytest.approx(120.0, rel=1e-3)
    assert cal.ops == base.ops and cal.read_bw_GBps == base.read_bw_GBps  # the rest of the calibration kept
    tm = TimeModel(get_gpu("h200"), cal)
    link, lat = allreduce_terms(tm, 4)
    assert lat == pytest.approx(cal.tp_link.terms(4)[0]) and link.bandwidth_per_direction_GBps == pytest.approx(
        cal.tp_link.terms(4)[1])
    # no base calibration for an unknown GPU: a clean error
    assert tp_fit.main([str(csv_path), "--gpu", "no-such-gpu", "--calibration-out", str(tmp_path / "x.yaml")]) == 2
