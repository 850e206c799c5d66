"""The checkout's kernels/ folder must not shadow PyPI's ``kernels`` (transformers >= 5.25 imports it)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from kvmodel.checkout_path import drop_checkout_root_from_path

ROOT = str(Path(__file__).resolve().parents[1])


def test_checkout_root_and_its_kernels_module_are_dropped(monkeypatch):
    fake = types.ModuleType("kernels")
    fake.__file__ = os.path.join(ROOT, "kernels", "__init__.py")
    monkeypatch.setattr(sys, "path", ["", ROOT, "/somewhere/else"] if os.getcwd() == ROOT else [ROOT, "/x"])
    monkeypatch.setitem(sys.modules, "kernels", fake)
    removed = drop_checkout_root_from_path()
    assert ROOT in [os.path.abspath(p or os.curdir) for p in removed]
    assert all(os.path.abspath(p or os.curdir) != ROOT for p in sys.path)
    assert "kernels" not in sys.modules


def test_other_entries_and_a_foreign_kernels_module_are_kept(monkeypatch, tmp_path):
    other = types.ModuleType("kernels")
    other.__file__ = str(tmp_path / "site-packages" / "kernels" / "__init__.py")
    monkeypatch.setattr(sys, "path", [str(tmp_path), "/x"])
    monkeypatch.setitem(sys.modules, "kernels", other)
    assert drop_checkout_root_from_path() == []
    assert sys.path == [str(tmp_path), "/x"] and sys.modules["kernels"] is other
