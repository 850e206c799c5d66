"""Shared pytest setup: tests marked ``gpu`` are skipped unless torch sees a CUDA device."""

from __future__ import annotations

import os

import pytest

from kvmodel.checkout_path import drop_checkout_root_from_path

# transformers >= 5.25 imports PyPI's `kernels`; with the repository root on sys.path (python -m pytest) this
# checkout's kernels/ folder would shadow it. The tests import the installed package, which needs no root entry.
drop_checkout_root_from_path()


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false or torch is absent)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# Triton kernels (tests/test_kernels*.py) run under the Triton interpreter on machines without a CUDA GPU. The
# variable must be set before any @triton.jit function is defined, i.e. before the kernels are imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
