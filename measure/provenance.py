"""Provenance of a measurement: which GPU, driver, CUDA, library versions, clocks, date and command.

Collected once per results file and written beside it as ``<stem>.provenance.json``. Works without torch
(the GPU fields are then empty) and never records the host name. Everything that can fail (nvidia-smi missing,
torch without CUDA) fails soft: the field is left empty and the reason goes to ``notes``.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import platform
import shlex
import shutil
import subprocess
import sys
from typing import Any, Optional

_NVSMI_FIELDS = (
    "name",
    "driver_version",
    "memory.total",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "power.limit",
    "temperature.gpu",
    "pstate",
)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent or broken: not our problem here
        return ""
    return str(getattr(mod, "__version__", ""))


def nvidia_smi_query(fields=_NVSMI_FIELDS, timeout_s: float = 10.0) -> dict[str, str]:
    """``nvidia-smi --query-gpu`` for the first GPU, as a dict; empty if nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return {f: v for f, v in zip(fields, values)}


def torch_info() -> dict[str, Any]:
    """torch/CUDA facts; torch is imported here, lazily, and its absence is reported, not raised."""
    info: dict[str, Any] = {"torch": "", "cuda": "", "cuda_available": False}
    try:
        import torch  # noqa: PLC0415 - lazy on purpose
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = str(torch.__version__)
    info["cuda"] = str(getattr(torch.version, "cuda", "") or "")
    try:
        ok = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        ok = False
    info["cuda_available"] = ok
    if ok:
        try:
            p = torch.cuda.get_device_properties(0)
            info["device_name"] = p.name
            info["sm_count"] = int(p.multi_processor_count)
            info["memory_bytes"] = int(p.total_memory)
            info["compute_capability"] = f"{p.major}.{p.minor}"
            l2 = getattr(p, "L2_cache_size", None)
            if l2:
                info["l2_bytes"] = int(l2)
        except Exception as e:  # noqa: BLE001
            info["device_error"] = f"{type(e).__name__}: {e}"
    return info


def git_commit(cwd: Optional[str] = None, timeout_s: float = 10.0) -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout this package runs from (or ``cwd``); None when that is not a git
    checkout (an installed wheel), git is missing, or it fails."""
    from pathlib import Path  # noqa: PLC0415

    exe = shutil.which("git")
    if not exe:
        return None
    where = cwd or str(Path(__file__).resolve().parent)
    try:
        out = subprocess.run([exe, "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or len(sha) != 40:
        return None
    return sha


def git_dirty(cwd: Optional[str] = None, timeout_s: float = 10.0) -> Optional[bool]:
    """True when tracked files differ from HEAD (the measured code is not exactly ``git_commit``); None when
    unknown."""
    from pathlib import Path  # noqa: PLC0415

    exe = shutil.which("git")
    if not exe:
        return None
    where = cwd or str(Path(__file__).resolve().parent)
    try:
        out = subprocess.run([exe, "status", "--porcelain", "--untracked-files=no"], cwd=where,
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return bool(out.stdout.strip())


def kernel_version() -> str:
    """``KERNEL_VERSION`` of :mod:`kvmodel.kernels.decode_attention` (imports torch and triton); "" when the kernels
    cannot be imported."""
    mod = sys.modules.get("kvmodel.kernels.decode_attention")
    if mod is None:
        try:
            mod = importlib.import_module("kvmodel.kernels.decode_attention")
        except Exception:  # noqa: BLE001 - no torch/triton: nothing to record
            return ""
    return str(getattr(mod, "KERNEL_VERSION", ""))


def source_digest(root: Optional[str] = None) -> str:
    """sha256 over the measured code (``kernels/*.py`` and ``measure/*.py`` of this checkout, by relative path
    and content): identifies the code even where the git metadata does not (a copied working tree whose .git is
    stale). ``git hash-object``-free, so it can be recomputed on any checkout: ``python -c "from
    kvmodel.measure.provenance import source_digest; print(source_digest())"``."""
    import hashlib
    import os

    if root is None:
        root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    h = hashlib.sha256()
    for sub in ("kernels", "measure"):
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if name.endswith(".py"):
                with open(os.path.join(d, name), "rb") as f:
                    data = f.read()
                h.update(f"{sub}/{name}\0{len(data)}\0".encode())
                h.update(data)
    return h.hexdigest()


def collect_provenance(command: Optional[list[str] | str] = None, extra: Optional[dict] = None,
                       with_torch: bool = True, with_kernels: Optional[bool] = None) -> dict[str, Any]:
    """Everything worth recording about where and how a measurement ran (no host name): versions, GPU, clocks,
    date, command, ``git_commit`` (None outside a git checkout) and ``git_dirty``, and — with ``with_kernels``
    (default: ``with_torch``) — ``kernel_version``, the fused decode-attention kernel's version."""
    if command is None:
        command = sys.argv
    cmd = command if isinstance(command, str) else shlex.join(str(c) for c in command)
    prov: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if with_torch:
        prov.update(torch_info())
    else:
        prov.update({"torch": "", "cuda": "", "cuda_available": False})
    prov["triton"] = _version("triton") if with_torch else ""
    prov["transformers"] = _version("transformers") if with_torch else ""
    prov["numpy"] = _version("numpy")
    prov["kvmodel"] = _version("kvmodel")
    prov["git_commit"] = git_commit()
    prov["git_dirty"] = git_dirty() if prov["git_commit"] else None
    try:
        prov["source_sha256"] = source_digest()
    except OSError as e:  # pragma: no cover - unreadable checkout: recorded, not raised
        prov["source_sha256"] = f"unavailable: {e}"
    if with_torch if with_kernels is None else with_kernels:
        prov["kernel_version"] = kernel_version()
    smi = nvidia_smi_query()
    prov["gpu_name"] = smi.get("name") or prov.get("device_name", "")
    prov["driver"] = smi.get("driver_version", "")
    prov["nvidia_smi"] = smi
    if extra:
        prov.update(extra)
    return prov
