"""The analytic core imports no torch or triton: every kvmodel/ module loads in a fresh interpreter without them."""

import pkgutil
import subprocess
import sys

import kvmodel

CORE = sorted(m.name for m in pkgutil.iter_modules(kvmodel.__path__) if not m.ispkg)


def test_core_modules_do_not_import_torch_or_triton():
    assert "symbolic" in CORE and "cli" in CORE
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('kvmodel.' + name)\n"
        "bad = sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"the analytic core imported {res.stdout.strip()}"
