"""`pip install .` (not only editable) must give a working kvmodel: the wheel carries every catalog file."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_catalogs_and_subpackages(tmp_path):
    pytest.importorskip("setuptools")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("kvmodel-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("kvmodel/hardware", ".yaml"), ("kvmodel/models", ".yaml")):
        shipped = {p.name for p in (ROOT / folder.replace("kvmodel/hardware", "hardware")).glob(f"*{pattern}")}
        assert shipped, folder
        for name in shipped:
            assert f"{folder}/{name}" in names, f"{folder}/{name} missing from the wheel"
    for mod in ("kvmodel/kernels/__init__.py", "kvmodel/measure/__init__.py", "kvmodel/validation/__init__.py",
                "kvmodel/cli.py", "kvmodel/symbolic.py"):
        assert mod in names
    top = {n.split("/")[0] for n in names if not n.startswith("kvmodel-")}
    assert top == {"kvmodel"}, f"only 'kvmodel' may be a top-level import name, got {sorted(top)}"
    cal_dir = ROOT / "hardware" / "calibrations"
    for p in cal_dir.glob("*.yaml"):
        assert f"kvmodel/hardware/calibrations/{p.name}" in names


@pytest.mark.slow
def test_readme_outputs_are_current():
    """Every command-output block in README.md equals what its command prints now (no hand-typed numbers)."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme.py"), "--check"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
