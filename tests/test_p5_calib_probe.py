"""The P5 calibration probe's case list (kvmodel.measure.p5_calib_probe): training contexts and models only, few
cases, pairs of launches with the same split-kernel work, rows in the grid's format. CPU only."""

from __future__ import annotations

from collections import defaultdict

import pytest

from kvmodel.measure import bench_decode_attention as bench
from kvmodel.measure import p5_calib_probe as probe
from kvmodel.traffic import attention_layer_bytes


@pytest.fixture(scope="module")
def rows():
    return probe.case_rows(probe.CALIB6)


def test_case_count_and_unique_grid_keys(rows):
    assert 0 < len(rows) <= 60
    keys = {tuple(r[k] for k in bench.KEY) for r in rows}
    assert len(keys) == len(rows)
    assert set(bench.KEY + ["num_splits"]) <= set(rows[0]) and set(bench.KEY) <= set(bench.FIELDS)


def test_training_contexts_and_models_only(rows):
    for r in rows:
        assert r["T"] in probe.TRAIN_CONTEXTS and r["model"] in probe.TRAIN_MODELS, r
        assert r["pipeline"] == "P5" and r["variant"] == f"sp{r['num_splits']}"  # the split count is launched as is
        assert (r["Hq"], r["Hkv"], r["d"]) == bench.MODELS[r["model"]]


def test_probe_split_matches_the_validation_split():
    from kvmodel.validation import heldout

    d = heldout.load_attention()
    if d is None:
        pytest.skip("no committed grid")
    _, _, split = heldout.split_roles(d)
    assert sorted(split["train_contexts"]) == sorted(probe.TRAIN_CONTEXTS)
    assert split["heldout_model"] not in probe.TRAIN_MODELS
    assert set(probe.TRAIN_MODELS) | {split["heldout_model"]} == set(d.model)


def test_pairs_have_the_same_split_kernel_work_and_different_merges(rows):
    """Every (format, block shape, programs, tiles per program) of the merge pairs is measured at >= 2 split
    counts: the difference between them is the merge launch alone."""
    groups = defaultdict(set)
    for r in rows:
        groups[(r["model"], r["k_bits"], r["v_bits"], r["shape"], r["programs"], r["tiles_per_program"])].add(
            r["num_splits"])
    paired = [g for g in groups.values() if len(g) >= 2]
    assert len(paired) >= 20
    assert any(max(g) == 128 for g in paired)  # 128-split merges are covered
    # the few-programs-per-SM rate at head dim 128: 256 and 512 one-warp programs (2 and 4 per SM)
    assert {256, 512} <= {r["programs"] for r in rows if r["d"] == 128 and r["shape"] == "n32w1"}


def test_launched_splits_are_exact(rows):
    for r in rows:
        bn = int(r["shape"][1:].split("w")[0])
        assert probe.launched_splits(r["T"], bn, r["num_splits"]) == r["num_splits"]
        assert r["T"] % (r["num_splits"] * bn) == 0  # equal token ranges: no short last split


def test_gpu_time_estimate_under_two_minutes(rows):
    """Pessimistic: every call at 1 TB/s, 40 calls timed or warmed per row, 0.3 s per row for inputs and graph
    capture, 30 s for ceilings and compilation."""
    est = 30.0
    for r in rows:
        b = attention_layer_bytes("P5", r["B"], r["T"], r["Hq"], r["Hkv"], r["d"], r["k_bits"], r["v_bits"])
        est += 0.3 + 40 * b / 1e12
    assert est < 120.0
