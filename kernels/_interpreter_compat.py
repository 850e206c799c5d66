"""Work around a Triton 3.6 interpreter bug under NumPy >= 2.4 (TRITON_INTERPRET=1 only).

The interpreter holds every scalar as a 1-element array and converts it for ``range()`` with
``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so any
loop with a run-time bound fails. We re-register ``tensor.__index__`` to read the element explicitly.
Does nothing when not interpreting or when the interpreter layout differs.
"""

from __future__ import annotations

import os

_done = False


def apply() -> None:
    global _done
    if _done or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_kvmodel_patched", False):
        _done = True
        return

    def _patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patched._kvmodel_patched = True
    _interp._patch_lang_tensor = _patched
    _done = True
