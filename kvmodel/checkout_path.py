"""Keep this checkout's top-level ``kernels/`` folder from shadowing PyPI's ``kernels`` package.

transformers >= 5.25 imports the Hugging Face ``kernels`` distribution at import time. Run from the repository
root (``python -m pytest``, ``python -m kvmodel...``), the root is on ``sys.path`` and ``import kernels`` would find
this checkout's Triton folder instead (installed, it is ``kvmodel.kernels``), so transformers fails to import.
"""

from __future__ import annotations

import os
import sys


def _is_checkout_root(path: str) -> bool:
    p = os.path.abspath(path or os.curdir)
    return os.path.isfile(os.path.join(p, "kernels", "decode_attention.py")) and os.path.isdir(
        os.path.join(p, "kvmodel"))


def drop_checkout_root_from_path() -> list[str]:
    """Remove every ``sys.path`` entry that is a kvmodel checkout's root (and a ``kernels`` module imported from
    one); returns the removed entries. The installed package (``kvmodel.kernels``) does not need them."""
    removed = [p for p in sys.path if _is_checkout_root(p)]
    if removed:
        sys.path[:] = [p for p in sys.path if p not in removed]
    mod = sys.modules.get("kernels")
    origin = getattr(mod, "__file__", None) or ""
    if mod is not None and os.path.basename(os.path.dirname(origin)) == "kernels" and _is_checkout_root(
            os.path.dirname(os.path.dirname(origin))):
        del sys.modules["kernels"]
    return removed
