"""CPU tests of the results-file helper and provenance (no GPU, no torch needed)."""

from __future__ import annotations

import json
import os

import pytest

from kvmodel.measure.provenance import collect_provenance
from kvmodel.measure.results import ResultsFile, atomic_write_text, canonical, provenance_path


def test_append_header_once_and_rows(tmp_path):
    rf = ResultsFile(tmp_path / "r.csv", key_fields=["model", "B", "T"])
    rf.append({"model": "m", "B": 1, "T": 1024, "median_s": 0.001})
    rf.append({"model": "m", "B": 4, "T": 1024, "median_s": 0.002})
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "model,B,T,median_s"
    assert len(lines) == 3
    rows = rf.rows()
    assert rows[1]["B"] == "4" and float(rows[1]["median_s"]) == 0.002


def test_done_keys_canonical(tmp_path):
    rf = ResultsFile(tmp_path / "r.csv", key_fields=["B", "T", "pipeline"])
    rf.append({"B": 1, "T": 4096, "pipeline": "P0", "median_s": 1e-4})
    done = rf.done_keys()
    assert rf.key_of({"B": 1.0, "T": "4096", "pipeline": "P0"}) in done
    assert rf.key_of({"B": 2, "T": 4096, "pipeline": "P0"}) not in done
    assert canonical(4096.0) == canonical("4096") == canonical(4096) == "4096"
    assert canonical(0.5) == canonical("0.5")


def test_resume_skips_done_rows(tmp_path):
    path = tmp_path / "grid.csv"
    grid = [{"B": b, "T": t} for b in (1, 4, 16) for t in (1024, 4096)]
    measured = []

    def run(stop_after=None):
        rf = ResultsFile(path, key_fields=["B", "T"])
        done = rf.done_keys()
        n = 0
        for p in grid:
            if rf.key_of(p) in done:
                continue
            if stop_after is not None and n >= stop_after:
                raise KeyboardInterrupt  # simulated interruption
            measured.append((p["B"], p["T"]))
            rf.append({**p, "median_s": 1e-3 * p["B"]})
            n += 1

    with pytest.raises(KeyboardInterrupt):
        run(stop_after=2)
    assert len(measured) == 2
    run()
    assert len(measured) == len(grid)  # nothing measured twice
    assert len(set(measured)) == len(grid)
    assert len(ResultsFile(path, ["B", "T"]).rows()) == len(grid)


def test_torn_last_line_is_dropped_and_remeasured(tmp_path):
    path = tmp_path / "r.csv"
    rf = ResultsFile(path, key_fields=["B"])
    rf.append({"B": 1, "median_s": 0.1})
    with path.open("a") as f:
        f.write("2,0.0")  # a crash mid-row: no newline
    assert [r["B"] for r in rf.rows()] == ["1"]
    assert rf.key_of({"B": 2}) not in rf.done_keys()
    rf2 = ResultsFile(path, key_fields=["B"])
    rf2.append({"B": 2, "median_s": 0.25})
    rows = rf2.rows()
    assert [(r["B"], r["median_s"]) for r in rows] == [("1", "0.1"), ("2", "0.25")]


def test_unknown_column_rejected_missing_left_empty(tmp_path):
    rf = ResultsFile(tmp_path / "r.csv", key_fields=["B"])
    rf.append({"B": 1, "x": 2, "note": "a,b"})
    rf.append({"B": 2, "x": 3})
    assert rf.rows()[1]["note"] == ""
    assert rf.rows()[0]["note"] == "a,b"
    with pytest.raises(ValueError):
        rf.append({"B": 3, "y": 1})


def test_atomic_write_text(tmp_path):
    p = tmp_path / "sub" / "out.yaml"
    atomic_write_text(p, "a: 1\n")
    atomic_write_text(p, "a: 2\n")
    assert p.read_text() == "a: 2\n"
    assert [x.name for x in p.parent.iterdir()] == ["out.yaml"]  # no temp left behind


def test_provenance_written_beside_and_history_kept(tmp_path):
    rf = ResultsFile(tmp_path / "e2e_decode.csv", key_fields=["B"])
    prov = collect_provenance(command=["python", "-m", "x", "--quick"], with_torch=False)
    assert prov["command"] == "python -m x --quick"
    assert "hostname" not in json.dumps(prov).lower()
    assert os.uname().nodename not in [str(v) for v in prov.values()]
    rf.write_provenance(prov)
    assert provenance_path(rf.path).name == "e2e_decode.provenance.json"
    rf.write_provenance({**prov, "command": "second"})
    data = rf.read_provenance()
    assert data["command"] == "second"
    assert data["previous_runs"][0]["command"] == "python -m x --quick"
    for key in ("date", "gpu_name", "driver", "triton", "transformers", "torch"):
        assert key in data


def test_provenance_with_torch_does_not_raise():
    prov = collect_provenance(command="x")
    assert "cuda_available" in prov


def test_provenance_records_git_commit_and_kernel_version(tmp_path):
    import subprocess

    from kvmodel.measure import provenance as P

    prov = collect_provenance(command="x", with_torch=False)
    assert "git_commit" in prov and "kernel_version" not in prov  # no torch: no kernel import
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(P.__file__), capture_output=True,
                          text=True).stdout.strip()
    if head:  # running from a git checkout
        assert prov["git_commit"] == head and isinstance(prov["git_dirty"], bool)
    assert P.git_commit(cwd=str(tmp_path)) is None  # not a git checkout
    assert P.git_dirty(cwd=str(tmp_path)) is None
    prov = collect_provenance(command="x", with_torch=False, with_kernels=True)
    try:
        import importlib

        want = importlib.import_module("kvmodel.kernels.decode_attention").KERNEL_VERSION
    except ImportError:
        want = ""
    assert prov["kernel_version"] == want


def test_source_digest_identifies_the_measured_code(tmp_path):
    """Provenance carries a digest of kernels/ and measure/ that changes with any byte of that code (the device's
    copied working tree can carry a stale .git, so git_commit alone is not enough)."""
    from kvmodel.measure.provenance import source_digest

    for sub in ("kernels", "measure"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.py").write_text("x = 1\n")
    (tmp_path / "kernels" / "NOTES.md").write_text("not code")
    first = source_digest(str(tmp_path))
    assert first == source_digest(str(tmp_path)) and len(first) == 64
    (tmp_path / "kernels" / "NOTES.md").write_text("changed, still not code")
    assert source_digest(str(tmp_path)) == first
    (tmp_path / "measure" / "a.py").write_text("x = 2\n")
    assert source_digest(str(tmp_path)) != first
