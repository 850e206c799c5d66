"""The FlashInfer peer benchmark: CLI, case order and fit, byte counts, no pydantic on the GPU side, the kernel
table's peer columns; and (GPU + flashinfer only) one small shape end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from kvmodel.measure import bench_decode_attention as grid
from kvmodel.measure import bench_flashinfer as fi
from kvmodel.measure.results import ResultsFile

ROOT = Path(__file__).resolve().parents[1]


def _kernel_table():
    spec = importlib.util.spec_from_file_location("kernel_table", ROOT / "scripts" / "kernel_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ CLI, cases
def test_defaults_are_the_grid():
    a = fi.parse_args([])
    assert a.models == list(grid.MODELS) and a.batches == list(grid.BATCHES) and a.contexts == list(grid.CONTEXTS)
    assert a.pipelines == ["P0", "FI-FP16", "FI-FP8"] and a.out == "validation/data/h200/decode_attention_peer.csv"
    assert not a.resume and not a.fill_bytes and a.max_seconds <= 480


def test_subsets_and_bad_values():
    a = fi.parse_args(["--models", "qwen2.5-7b", "--batches", "1", "8", "--contexts", "4096", "--resume",
                       "--pipelines", "FI-FP8", "--max-seconds", "60"])
    assert a.models == ["qwen2.5-7b"] and a.batches == [1, 8] and a.contexts == [4096] and a.resume
    assert a.pipelines == ["FI-FP8"] and a.max_seconds == 60
    for bad in (["--models", "gpt-5"], ["--batches", "0"], ["--pipelines", "P5"], ["--contexts", "x"]):
        with pytest.raises(SystemExit):
            fi.parse_args(bad)


def test_case_order_table_points_first_then_the_grid():
    cases = fi.enumerate_cases(list(grid.MODELS), list(grid.BATCHES), list(grid.CONTEXTS))
    assert len(cases) == len(set(cases)) == len(grid.MODELS) * len(grid.BATCHES) * len(grid.CONTEXTS)
    n_first = len(fi.PRIORITY) * len(grid.MODELS)
    assert [(B, T) for _, B, T in cases[:n_first]] == [bt for bt in fi.PRIORITY for _ in grid.MODELS]
    rest = cases[n_first:]
    assert [T for _, _, T in rest] == sorted((T for _, _, T in rest), key=list(grid.CONTEXTS).index)
    # a subset keeps only the priority points inside it
    sub = fi.enumerate_cases(["llama-3.1-8b"], [1, 4], [4096, 1024])
    assert sub == [("llama-3.1-8b", 1, 4096), ("llama-3.1-8b", 4, 4096), ("llama-3.1-8b", 1, 1024),
                   ("llama-3.1-8b", 4, 1024)]


def test_working_sets_and_fit():
    Hq, Hkv, d = grid.MODELS["llama-3.1-8b"]
    assert fi.kv_bytes("FI-FP16", 4, 4096, Hkv, d) == fi.kv_bytes("P0", 4, 4096, Hkv, d) == 2 * 4 * 4096 * 8 * 128 * 2
    assert fi.kv_bytes("FI-FP8", 4, 4096, Hkv, d) * 2 == fi.kv_bytes("P0", 4, 4096, Hkv, d)
    small = fi.kv_bytes("P0", 1, 1024, 2, 64)
    assert fi.n_sets_for(small, 1024) * small >= 4 * grid.L2_BYTES and fi.n_sets_for(small, 8) == 8
    assert fi.n_sets_for(10**11, 1024) == 1
    budget = 0.8 * 141e9
    args = fi.parse_args([])
    todo, skipped = fi.plan_rows(args, set(), ResultsFile("x.csv", key_fields=grid.KEY).key_of, budget)
    skipped_cases = {(m, B, T) for m, B, T, _ in skipped}
    assert ("gemma-3-12b", 128, 131072) in skipped_cases  # 137 GB of FP16 K/V
    assert ("llama-3.1-8b", 128, 131072) not in skipped_cases  # 69 GB
    for m, B, T, pipes in todo:
        Hq, Hkv, d = grid.MODELS[m]
        assert all(fi.case_peak_bytes(p, B, T, Hq, Hkv, d, 1024) <= budget for p in pipes)
    # --resume: rows already there are not planned again
    key_of = ResultsFile("x.csv", key_fields=grid.KEY).key_of
    done = {key_of(fi.row_base(p, "qwen2.5-0.5b", 1, 4096)) for p in fi.PIPES}
    todo2, _ = fi.plan_rows(args, done, key_of, budget)
    assert ("qwen2.5-0.5b", 1, 4096) not in {(m, B, T) for m, B, T, _ in todo2}
    assert len(todo2) == len(todo) - 1


def test_row_keys():
    r = fi.row_base("FI-FP8", "gemma-3-12b", 8, 32768)
    assert (r["k_bits"], r["v_bits"], r["group"], r["variant"]) == (8, 8, 0, "tc")
    assert fi.row_base("FI-FP16", "gemma-3-12b", 8, 32768)["group"] == 0
    assert fi.row_base("P0", "gemma-3-12b", 8, 32768)["group"] == grid.GROUP  # the grid's P0 key
    assert set(grid.FIELDS) <= set(fi.PEER_FIELDS) and set(grid.KEY) <= set(r)


# ------------------------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize("model", list(grid.MODELS))
def test_bytes_traffic_and_fallback_agree(model):
    from kvmodel.traffic import attention_layer_bytes

    Hq, Hkv, d = grid.MODELS[model]
    B, T = 8, 32768
    p0 = float(attention_layer_bytes("P0", B, T, Hq, Hkv, d))
    got = {p: fi.peer_bytes(p, B, T, Hq, Hkv, d) for p in fi.PIPES}
    assert got["P0"] == (p0, "traffic") and got["FI-FP16"] == (p0, "traffic:P0")
    kv16 = 2 * B * T * Hkv * d * 2
    assert got["FI-FP8"][0] == p0 - kv16 / 2 and got["FI-FP8"][1] == "traffic:P5-fp8"
    # P5 at 8/8 with group scales moves more than FP8 with one per-tensor scale
    assert float(attention_layer_bytes("P5", B, T, Hq, Hkv, d, 8, 8, 32)) > got["FI-FP8"][0]
    for p in fi.PIPES:
        assert fi.fallback_bytes(p, B, T, Hq, Hkv, d) == got[p][0]
    with pytest.raises(ValueError):
        fi.peer_bytes("P5", B, T, Hq, Hkv, d)


def _peer_rows(path, rows):
    rf = ResultsFile(path, key_fields=grid.KEY, fieldnames=fi.PEER_FIELDS)
    for r in rows:
        rf.append(r)
    return rf


def _row(pipe, model, B, T, med, src="fallback", ceil=4500.0):
    Hq, Hkv, d = grid.MODELS[model]
    b = fi.fallback_bytes(pipe, B, T, Hq, Hkv, d)
    return dict(fi.row_base(pipe, model, B, T), median_s=med, p10_s=med, p90_s=med, n_samples=5, calls_per_sample=4,
                bytes_moved=int(b), bytes_source=src, achieved_GBps=round(b / med / 1e9, 1), read_ceiling_GBps=ceil,
                copy_ceiling_GBps=4200.0, pct_read_ceiling=round(100 * b / med / 1e9 / ceil, 1), working_sets=2,
                check_max_abs_err="1e-4", check_rel_err="2e-3", backend="fa2" if pipe != "P0" else "sdpa")


def test_fill_bytes(tmp_path):
    path = tmp_path / "peer.csv"
    _peer_rows(path, [_row(p, "qwen2.5-7b", 8, 32768, 1e-4 * (i + 1)) for i, p in enumerate(fi.PIPES)])
    assert fi.fill_bytes(path) == 3
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["bytes_source"] for r in rows] == ["traffic", "traffic:P0", "traffic:P5-fp8"]
    Hq, Hkv, d = grid.MODELS["qwen2.5-7b"]
    for r in rows:
        b = fi.traffic_bytes(r["pipeline"], 8, 32768, Hq, Hkv, d)[0]
        assert int(r["bytes_moved"]) == int(b)
        assert float(r["achieved_GBps"]) == pytest.approx(b / float(r["median_s"]) / 1e9, abs=0.06)
    assert list(rows[0]) == fi.PEER_FIELDS
    assert fi.main(["--fill-bytes", "--out", str(path)]) == 0


def test_gpu_side_imports_need_no_pydantic(tmp_path):
    """What the GPU machine runs (arguments, bytes, results file, provenance) works with pydantic and sympy
    absent: the bytes fall back, and the analytic core is never imported."""
    code = f"""
import sys
sys.modules['pydantic'] = None
sys.modules['sympy'] = None
from kvmodel.measure import bench_flashinfer as fi
from kvmodel.measure import bench_decode_attention, results, provenance
a = fi.parse_args(['--out', {str(tmp_path / 'p.csv')!r}])
assert fi.peer_bytes('FI-FP8', 4, 4096, 32, 8, 128) == (fi.fallback_bytes('FI-FP8', 4, 4096, 32, 8, 128), 'fallback')
assert fi.enumerate_cases(a.models, a.batches, a.contexts)
rf = results.ResultsFile(a.out, key_fields=bench_decode_attention.KEY, fieldnames=fi.PEER_FIELDS)
rf.write_provenance(extra={{'flashinfer': ''}}, command=['x'])
bad = [m for m in sys.modules if m.split('.')[0] in ('pydantic', 'sympy') and sys.modules[m] is not None]
bad += [m for m in ('kvmodel.traffic', 'kvmodel.specs', 'kvmodel.symbolic') if m in sys.modules]
assert not bad, bad
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


# ------------------------------------------------------------------------------------------------ table
def _synthetic(tmp_path, with_peer=True):
    main_rows = []
    for model in ("llama-3.1-8b", "qwen2.5-0.5b"):
        for B, T in ((1, 4096), (8, 32768)):
            Hq, Hkv, d = grid.MODELS[model]
            base = {"variant": "default", "model": model, "B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "d": d,
                    "read_ceiling_GBps": 4500.0, "pct_read_ceiling": 50.0}
            main_rows.append(dict(base, pipeline="P0", k_bits=16, v_bits=16, median_s=100e-6))
            main_rows.append(dict(base, pipeline="P5", k_bits=4, v_bits=4, median_s=50e-6))
    data = tmp_path / "decode_attention.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(main_rows[0]))
        w.writeheader()
        w.writerows(main_rows)
    prov = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "2026-11-29T00:00:00"}
    data.with_suffix(".provenance.json").write_text(json.dumps(prov))
    peer = tmp_path / "decode_attention_peer.csv"
    if with_peer:
        _peer_rows(peer, [_row("P0", "llama-3.1-8b", 8, 32768, 110e-6),
                          _row("FI-FP16", "llama-3.1-8b", 8, 32768, 80e-6),
                          _row("FI-FP8", "llama-3.1-8b", 8, 32768, 55e-6)])
        prov = {"flashinfer": "0.7.2.post1", "torch": "2.11", "date": "2026-11-30T00:00:00"}
        peer.with_suffix(".provenance.json").write_text(json.dumps(prov))
    return data, peer


def test_table_without_peer_is_unchanged(tmp_path):
    kt = _kernel_table()
    data, peer = _synthetic(tmp_path, with_peer=False)
    text = kt.render(data, peer)
    assert "FlashInfer" not in text and text == kt.render(data, None)
    assert "| B x T | P0 FP16 (SDPA) | P5 16/16 | P5 8/8 | P5 8/4 | P5 4/4 | P1 4/4 | P0-expand |" in text


def test_table_peer_columns(tmp_path):
    kt = _kernel_table()
    data, peer = _synthetic(tmp_path)
    text = kt.render(data, peer)
    assert "| FlashInfer FP16 | FlashInfer FP8 | P5 4/4 vs FlashInfer FP16 |" in text
    assert "FlashInfer 0.7.2.post1" in text and "within 10 % of the P0 column" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| 8 x 32K") and "80 us" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-3].startswith("80 us (1.38x,")  # vs the peer run's own P0 (110 us)
    assert cells[-2].startswith("55 us (2.00x,")
    assert cells[-1] == "1.60x"  # 80 us / 50 us
    # a point the peer did not measure gets dashes, and every row has the same number of cells
    for ln in text.splitlines():
        if ln.startswith("| 1 x 4K"):
            assert ln.rstrip(" |").endswith("- | - | -")
    widths = {ln.count("|") for ln in text.splitlines() if ln.startswith("|")}
    assert len(widths) == 1


def test_committed_table_matches_render():
    """With no committed peer CSV, the README block is exactly the table without peer columns."""
    kt = _kernel_table()
    if kt.PEER.exists():
        pytest.skip("a peer CSV is committed: the README check in test_packaging covers it")
    readme = (ROOT / "README.md").read_text()
    assert kt.render(kt.DATA, kt.PEER).rstrip("\n") in readme


# ------------------------------------------------------------------------------------------------ paged layout (CPU)
def _paged_attention(q, k_pages, v_pages, indptr, indices, last, sm_scale):
    """What a paged decode computes, written from FlashInfer's documented NHD layout [pages, page, Hkv, d]."""
    import torch

    outs = []
    for b in range(q.shape[0]):
        pages = indices[indptr[b]:indptr[b + 1]].long()
        T = (len(pages) - 1) * fi.PAGE_SIZE + int(last[b])
        k = k_pages[pages].float().reshape(-1, *k_pages.shape[2:])[:T]  # [T, Hkv, d]
        v = v_pages[pages].float().reshape(-1, *v_pages.shape[2:])[:T]
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[b].float(), k) * sm_scale, -1)
        outs.append(torch.einsum("ht,thd->hd", p, v))
    return torch.stack(outs)


@pytest.mark.parametrize("T", [64, 100])
@pytest.mark.parametrize("fp8", [False, True])
def test_pages_reference_and_check(T, fp8):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    B, Hq, Hkv, d = 3, 8, 2, 32
    dt = torch.float8_e4m3fn if fp8 else torch.float16
    indptr, indices, last = fi.page_table(B, T, "cpu")
    P = -(-T // fi.PAGE_SIZE)
    assert indptr.tolist() == [0, P, 2 * P, 3 * P] and len(indices) == B * P
    assert last.tolist() == [T - (P - 1) * fi.PAGE_SIZE] * B and 1 <= int(last[0]) <= fi.PAGE_SIZE
    k = fi.rand_pages(B, T, Hkv, d, dt, "cpu", chunk_elems=1000)
    v = fi.rand_pages(B, T, Hkv, d, dt, "cpu", chunk_elems=1000)
    assert k.shape == (B * P, fi.PAGE_SIZE, Hkv, d) and k.dtype == dt
    assert 0.8 < float(k.float().std()) < 1.2
    q = torch.randn(B, Hq, d, dtype=torch.float16)
    want = _paged_attention(q, k, v, indptr, indices, last, d ** -0.5)
    kb, vb = fi.pages_to_bhtd(k, 2, T), fi.pages_to_bhtd(v, 2, T)
    assert kb.shape == (2, Hkv, T, d) and kb.dtype == torch.float32
    err, rel = fi.check_output(want.half(), q, kb, vb)
    assert rel < 2e-3 and err < 2e-3
    _, rel = fi.check_output((want * 1.1).half(), q, kb, vb)  # a wrong output is caught
    assert rel > 2e-2


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_flashinfer_small_shape_end_to_end(tmp_path):
    pytest.importorskip("flashinfer")
    out = tmp_path / "peer.csv"
    rc = fi.main(["--out", str(out), "--models", "llama-3.1-8b", "--batches", "2", "--contexts", "1024",
                  "--no-precompile", "--max-sets", "4", "--target-s", "0.005"])
    assert rc == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["pipeline"] for r in rows} == set(fi.PIPES)
    for r in rows:
        assert float(r["check_rel_err"]) <= 2e-2 and float(r["median_s"]) > 0
    assert json.loads(out.with_name("peer.provenance.json").read_text())["flashinfer"]


def test_main_without_gpu_says_so(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert fi.main(["--out", str(tmp_path / "p.csv")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "p.csv").exists()


def test_table_target_lines_count_only_large_calls(tmp_path):
    """The issue-3 summary under the table: P5 4/4 rows at B x T >= 128K tokens that move >= 250 MB, their % of
    the read ceiling and speedup over P0 (median and range); smaller calls and other formats are left out."""
    import pandas as pd

    kt = _kernel_table()
    rows = []
    for B, T, nbytes, t5, pct in ((16, 131072, 2.4e9, 800e-6, 93.0), (32, 131072, 4.8e9, 1600e-6, 95.0),
                                  (1, 131072, 0.15e9, 60e-6, 40.0), (4, 4096, 0.3e9, 100e-6, 70.0)):
        rows.append(dict(pipeline="P5", model="m", B=B, T=T, k_bits=4, v_bits=4, median_s=t5, bytes_moved=nbytes,
                         pct_read_ceiling=pct))
        rows.append(dict(pipeline="P5", model="m", B=B, T=T, k_bits=8, v_bits=8, median_s=t5, bytes_moved=nbytes,
                         pct_read_ceiling=10.0))
        rows.append(dict(pipeline="P0", model="m", B=B, T=T, k_bits=16, v_bits=16, median_s=3 * t5,
                         bytes_moved=3.5 * nbytes, pct_read_ceiling=99.0))
    lines = kt.target_lines(pd.DataFrame(rows))
    assert len(lines) == 2 and "target" in lines[0]
    assert lines[1].strip() == "m: 2 rows, 94 % (93-95); 3.00x (3.00-3.00)"
    assert kt.target_lines(pd.DataFrame(rows[6:])) == []
    assert kt.main(["--data", str(tmp_path / "missing.csv")]) == 2
