"""``kvmodel calibrate``: measure this GPU (probes, attention grid, end-to-end steps), then fit and write YAML.

    from kvmodel.measure.calibrate_run import run_calibration
    result = run_calibration("out/h200", quick=True, resume=False, models=None, progress_cb=None)

Stages (each appends rows to a CSV in ``out_dir`` as it measures; ``resume=True`` measures only what is missing):

1. ``probes.csv``            streaming read/copy ceilings, GEMV/GEMM of the models' projection shapes;
2. ``decode_attention.csv``  the decode-attention grid (:mod:`kvmodel.measure.bench_decode_attention`), small in
                             quick mode; skipped with a note if that module is absent;
3. ``e2e_decode.csv``        our graph-captured decode step (P0, P5 4/4, P5 16/16, P1 on a subset) and, in full
                             mode, Hugging Face's eager and static-graph runtimes on a subset;
4. the fit (:func:`kvmodel.calibration.fit_all`): one YAML per runtime measured, written atomically to
   ``calibrations_dir`` (default: ``out_dir/calibrations``; the CLI may pass the package's folder).

Quick mode takes a few minutes (1-2 models, a few points each); full mode the 4 reference models over
B ∈ {1,4,16,64,128} × T ∈ {1K,4K,16K,32K}. Progress with an ETA goes to stderr (or ``progress_cb``).
Without a usable GPU the run stops before measuring anything with :class:`NoGPUError` (torch missing, no CUDA)
or :class:`UnsupportedGPUError` (a GPU the catalog does not know; pass ``gpu=`` to name its catalog entry).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

QUICK_MODELS = ("Qwen2.5-0.5B", "Llama-3.1-8B")
FULL_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3.1-8B", "Mistral-Small-3.1-24B")
RAW_FILES = ("probes.csv", "decode_attention.csv", "e2e_decode.csv")


class CalibrationError(RuntimeError):
    """A calibration run cannot proceed; the message says why (the CLI prints it and exits non-zero)."""

    exit_code = 3


class NoGPUError(CalibrationError):
    """torch is missing or sees no CUDA GPU."""

    exit_code = 4


class UnsupportedGPUError(CalibrationError):
    """The GPU is not in kvmodel's catalog (calibrations are stored against catalog entries)."""

    exit_code = 5


@dataclass
class CalibrationResult:
    out_dir: Path
    gpu: str
    written: list[Path] = field(default_factory=list)
    raw_files: list[Path] = field(default_factory=list)
    skipped_stages: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StagePlan:
    name: str
    units: int
    run: Callable[[Callable[[str], None]], None]


class Progress:
    """Counts work units across stages and reports ``done/total``, elapsed and an ETA."""

    def __init__(self, total: int, cb: Optional[Callable] = None, stream=None, min_interval_s: float = 2.0):
        self.total = max(1, total)
        self.done = 0
        self.t0 = time.time()
        self.cb = cb
        self.stream = stream if stream is not None else sys.stderr
        self.last = 0.0
        self.min_interval_s = min_interval_s

    def eta_s(self) -> Optional[float]:
        if self.done <= 0:
            return None
        el = time.time() - self.t0
        return el / self.done * max(0, self.total - self.done)

    def step(self, stage: str, msg: str = "", units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        eta = self.eta_s()
        if self.cb is not None:
            self.cb(self.done, self.total, f"{stage}: {msg}", eta)
            return
        now = time.time()
        if now - self.last < self.min_interval_s and self.done < self.total:
            return
        self.last = now
        el = now - self.t0
        eta_txt = _fmt_s(eta) if eta is not None else "?"
        print(f"[calibrate] {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) {stage}: {msg} "
              f"- elapsed {_fmt_s(el)}, ETA {eta_txt}", file=self.stream, flush=True)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def check_environment(gpu: Optional[str] = None):
    """(torch, GPUSpec) for the visible GPU; raises NoGPUError / UnsupportedGPUError with the reason."""
    from kvmodel.measure.probes import GPUUnavailable, require_cuda
    from kvmodel.specs import gpu_for_device_name

    try:
        torch = require_cuda()
    except GPUUnavailable as e:
        raise NoGPUError(f"cannot calibrate: {e}") from None
    name = torch.cuda.get_device_properties(0).name
    query = gpu or name
    try:
        spec = gpu_for_device_name(query)
    except KeyError as e:
        raise UnsupportedGPUError(
            f"cannot calibrate: {name!r} is not in kvmodel's GPU catalog ({e}); add a hardware/*.yaml entry "
            f"or name the closest catalog GPU with --gpu") from None
    return torch, spec


def _archive_previous(out_dir: Path) -> list[Path]:
    """Without --resume, earlier raw files are renamed aside (never deleted)."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in RAW_FILES:
        for p in (out_dir / name, out_dir / name.replace(".csv", ".provenance.json")):
            if p.exists():
                q = p.with_name(f"{p.name}.{stamp}.bak")
                os.replace(p, q)
                moved.append(q)
    return moved


def plan_stages(out_dir: Path, quick: bool, resume: bool, models: Sequence[str], include_hf: Optional[bool] = None,
                attention: bool = True, budget_s: Optional[float] = None, log=print) -> list[StagePlan]:
    from kvmodel.measure import e2e_decode as e2e
    from kvmodel.measure import probes

    specs = [e2e.resolve_model(m) for m in models]
    stages: list[StagePlan] = []
    deadline = (time.time() + budget_s) if budget_s else None

    probe_batches = probes.QUICK_BATCHES if quick else probes.DEFAULT_BATCHES
    n_probe = probes.count_probe_rows(specs, quick, probe_batches)

    def run_probe_stage(tick):
        probes.run_probes(out_dir / "probes.csv", specs, quick=quick, resume=resume, batches=probe_batches,
                          log=log, on_row=tick)

    stages.append(StagePlan("probes", n_probe, run_probe_stage))

    if attention:
        def run_attention_stage(tick):
            try:
                from kvmodel.measure import bench_decode_attention as bench
            except ImportError as e:
                log(f"# attention grid skipped: {e}")
                return
            argv = ["--out", str(out_dir / "decode_attention.csv")]
            if resume:
                argv.append("--resume")
            if quick:
                argv += ["--models", "llama-3.1-8b", "--batches", "1", "16", "--contexts", "1024", "16384",
                         "--formats", "16/16", "4/4", "--max-seconds", "60"]
            else:
                argv += ["--max-seconds", "900"]
            rc = bench.main(argv)
            if rc:
                log(f"# attention grid returned {rc}")
            tick("attention grid")

        stages.append(StagePlan("attention", 20 if quick else 200, run_attention_stage))

    batches = (1, 16) if quick else e2e.DEFAULT_BATCHES
    contexts = (1024, 16384) if quick else e2e.DEFAULT_CONTEXTS
    formats = [("P0", 16, 16), ("P5", 4, 4)] + ([] if quick else [("P5", 16, 16)])
    n_e2e = len(specs) * len(batches) * len(contexts) * len(formats)

    def run_e2e_stage(tick):
        def prog(done, total, msg):
            tick(msg)

        e2e.run_e2e(out_dir / "e2e_decode.csv", models=[s.name for s in specs], batches=batches,
                    contexts=contexts, formats=formats, resume=resume, log=log, progress=prog,
                    read_ceiling_GBps=_read_ceiling(out_dir), deadline_s=deadline)
        if not quick:  # the non-fused pipeline on a subset (it is slow by design)
            e2e.run_e2e(out_dir / "e2e_decode.csv", models=[s.name for s in specs], batches=(1, 16),
                        contexts=(1024, 16384), formats=[("P1", 4, 4)], resume=True, log=log,
                        progress=prog, read_ceiling_GBps=_read_ceiling(out_dir), deadline_s=deadline)

    stages.append(StagePlan("e2e", n_e2e + (0 if quick else len(specs) * 4), run_e2e_stage))

    hf = (not quick) if include_hf is None else include_hf
    if hf:
        pts = [(1, 1024), (1, 16384), (16, 4096), (64, 1024)]

        def run_hf_stage(tick):
            def prog(done, total, msg):
                tick(msg)

            e2e.run_e2e(out_dir / "e2e_decode.csv", models=[s.name for s in specs], batches=(), contexts=(),
                        formats=(), hf_runtimes=("hf-eager", "hf-static-graph"), hf_points=pts, resume=True,
                        log=log, progress=prog, read_ceiling_GBps=_read_ceiling(out_dir), deadline_s=deadline)

        stages.append(StagePlan("hf", len(specs) * len(pts) * 2, run_hf_stage))
    return stages


def _read_ceiling(out_dir: Path) -> Optional[float]:
    from kvmodel.measure.probes import read_ceiling_GBps
    from kvmodel.measure.results import ResultsFile

    return read_ceiling_GBps(ResultsFile(out_dir / "probes.csv", ["op"]).rows())


def run_calibration(out_dir, quick: bool = False, resume: bool = False, models: Optional[Sequence[str]] = None,
                    progress_cb: Optional[Callable[[int, int, str, Optional[float]], None]] = None,
                    calibrations_dir=None, gpu: Optional[str] = None, include_hf: Optional[bool] = None,
                    attention: bool = True, budget_s: Optional[float] = None,
                    log: Optional[Callable[[str], None]] = None) -> CalibrationResult:
    """Measure, then fit and write ``<gpu>-<runtime>.yaml`` for each runtime measured.

    ``progress_cb(done, total, message, eta_s)`` replaces the stderr progress lines. ``calibrations_dir``:
    where the YAMLs go (default ``out_dir/calibrations``). ``budget_s``: stop measuring cleanly after this
    many seconds (what was measured is kept and fitted; ``resume=True`` later completes it).
    """
    from kvmodel import calibration as cal

    t_start = time.time()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    torch, gspec = check_environment(gpu)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        moved = _archive_previous(out_dir)
        if moved:
            log(f"# earlier results moved aside: {', '.join(p.name for p in moved)}")
    models = list(models) if models else list(QUICK_MODELS if quick else FULL_MODELS)
    stages = plan_stages(out_dir, quick, resume, models, include_hf=include_hf, attention=attention,
                         budget_s=budget_s, log=log)
    prog = Progress(sum(s.units for s in stages), progress_cb)
    result = CalibrationResult(out_dir=out_dir, gpu=gspec.name)
    for st in stages:
        before = prog.done
        st.run(lambda msg, _n=st.name: prog.step(_n, msg))
        # a stage that wrote fewer rows than planned (resume, skips) still completes its share
        prog.done = min(prog.total, before + st.units)
        prog.step(st.name, "done", units=0)
    result.raw_files = [out_dir / f for f in RAW_FILES if (out_dir / f).exists()]
    target = Path(calibrations_dir) if calibrations_dir is not None else out_dir / "calibrations"
    cmd = f"kvmodel calibrate {'--quick ' if quick else ''}{'--resume ' if resume else ''}--out {out_dir}"
    result.written = cal.fit_all(out_dir, target, gpu=gspec.name, command=cmd, log=log)
    result.seconds = time.time() - t_start
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Measure this GPU and fit kvmodel calibrations")
    ap.add_argument("--out", required=True, help="folder for the raw CSVs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--models", default=None, help="comma list (default: 2 quick / 4 full reference models)")
    ap.add_argument("--calibrations", default=None, help="folder for the YAMLs (default: <out>/calibrations)")
    ap.add_argument("--gpu", default=None, help="catalog GPU name if the device name is not in the catalog")
    ap.add_argument("--no-attention", action="store_true", help="skip the decode-attention grid")
    ap.add_argument("--hf", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--budget-s", type=float, default=None)
    a = ap.parse_args(argv)
    try:
        r = run_calibration(a.out, quick=a.quick, resume=a.resume,
                            models=a.models.split(",") if a.models else None, calibrations_dir=a.calibrations,
                            gpu=a.gpu, include_hf={"auto": None, "yes": True, "no": False}[a.hf],
                            attention=not a.no_attention, budget_s=a.budget_s)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {', '.join(str(p) for p in r.written)} in {r.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
