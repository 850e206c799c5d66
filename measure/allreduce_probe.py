"""All-reduce probe (issue 8): median time of one ``torch.distributed.all_reduce`` at the message sizes a TP decode
step sends — B × hidden × 2 bytes (FP16 activations) for B in 1..128 and the hidden sizes of the model catalog.

Each point times ``calls`` all-reduces back to back, rotating over a few buffers, on every rank of a ``tp``-process
group (NCCL on GPUs, captured in one CUDA graph as the decode step is, with ``--modes graph,eager`` also launched
eagerly; gloo on CPU), replayed ``reps`` times; ``median_s`` is per all-reduce (max over ranks of each rank's
median). ``algbw_GBps`` = bytes / time, ``busbw_GBps`` = algbw × 2(N−1)/N (the nccl-tests convention, what
a ring moves per GPU). :func:`kvmodel.tp_fit.fit_link_terms` turns the rows into the link terms of
``allreduce_time`` (per-call latency λ and bandwidth).

    python -m kvmodel.measure.allreduce_probe --tp 2,4,8 --out validation/data/h200-tp/allreduce.csv

Degrees above the visible GPU count are skipped (no row); resumable; provenance beside the CSV (NCCL version,
``nvidia-smi topo -m``, the NVLS-off variables ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1`` that every spawned process gets).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional, Sequence

from kvmodel.measure.results import ResultsFile
from kvmodel.measure.tp_decode import (
    DEFAULT_TIMEOUT_S,
    _gpu_count,
    default_backend,
    dist_provenance,
    launch,
    time_collective,
)

PROBE_FIELDS = [
    "tp",
    "backend",
    "mode",
    "B",
    "hidden",
    "dtype",
    "bytes",
    "calls",
    "n_buffers",
    "median_s",
    "p10_s",
    "p90_s",
    "algbw_GBps",
    "busbw_GBps",
    "status",
    "note",
]
PROBE_KEYS = ["tp", "backend", "mode", "B", "hidden", "dtype"]

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def catalog_hidden_sizes() -> list[int]:
    """Distinct ``hidden_size`` of the model catalog (dense and MoE alike: the residual stream is what is reduced)."""
    from kvmodel.specs import catalog  # noqa: PLC0415

    return sorted({m.hidden_size for m in catalog().models.values()})


def message_points(batches: Sequence[int], hiddens: Sequence[int]) -> list[tuple[int, int]]:
    return [(B, h) for h in hiddens for B in batches]


def _row(tp, backend, mode, B, h, dtype_name, elem) -> dict:
    row = {k: "" for k in PROBE_FIELDS}
    row.update(tp=tp, backend=backend, mode=mode, B=B, hidden=h, dtype=dtype_name, bytes=B * h * elem)
    return row


def _probe_worker(rank: int, world: int, job: dict) -> None:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    backend = dist.get_backend()
    cuda = backend == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dtype = getattr(torch, job["dtype"])
    elem = torch.empty((), dtype=dtype).element_size()
    rf = ResultsFile(job["out_csv"], PROBE_KEYS, fieldnames=PROBE_FIELDS)
    if rank == 0:
        rf.write_provenance(
            extra={"tp": world, "dtype": job["dtype"], **dist_provenance(torch, backend, world)},
            command=job.get("command"),
        )
    calls, nbuf, reps = job["calls"], job["n_buffers"], job["reps"]
    for mode, B, h in job["points"]:
        flag = torch.tensor(
            [0 if (job.get("deadline_s") and time.time() > job["deadline_s"]) else 1],
            device=device,
            dtype=torch.int32,
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag.item()):
            if rank == 0:
                print("# deadline reached; the rest is left for --resume", flush=True)
            break
        row = _row(world, backend, mode, B, h, job["dtype"], elem)
        bufs = [torch.zeros(B * h, device=device, dtype=dtype) for _ in range(nbuf)]  # sums stay finite
        fns = [(lambda t=bufs[i % nbuf]: dist.all_reduce(t)) for i in range(calls)]
        try:
            t = time_collective(fns, reps=reps, use_graph=cuda and mode == "graph")
            per, p10, p90 = t.median_s / calls, t.p10_s / calls, t.p90_s / calls
            nbytes = B * h * elem
            row.update(
                calls=calls,
                n_buffers=nbuf,
                median_s=per,
                p10_s=p10,
                p90_s=p90,
                algbw_GBps=nbytes / per / 1e9,
                busbw_GBps=nbytes / per / 1e9 * 2 * (world - 1) / world,
                status="ok" if (t.graph or mode != "graph" or not cuda) else "ok-eager",
            )
        except Exception as e:  # noqa: BLE001
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:160]}")
        if rank == 0:
            rf.append(row)
            if row.get("median_s") not in ("", None):
                print(
                    f"  tp={world} {mode:5s} B={B:<4d} h={h:<6d} {row['bytes']:>9d} B  "
                    f"{row['median_s'] * 1e6:8.2f} us  busbw {row['busbw_GBps']:7.2f} GB/s",
                    flush=True,
                )
        del bufs, fns
    dist.barrier()


def run_probe(
    out_csv,
    tp_degrees: Sequence[int] = (2,),
    batches: Sequence[int] = DEFAULT_BATCHES,
    hiddens: Optional[Sequence[int]] = None,
    modes: Sequence[str] = ("graph",),
    dtype_name: str = "float16",
    calls: Optional[int] = None,
    n_buffers: int = 4,
    reps: Optional[int] = None,
    backend: Optional[str] = None,
    resume: bool = True,
    deadline_s: Optional[float] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> ResultsFile:
    """Time all-reduces of B × hidden elements for every TP degree, batch and hidden size (default: the catalog's);
    append rows to ``out_csv`` (resumable). ``mode``: ``graph`` (CUDA-graph replay, as in the decode step) or
    ``eager``; on gloo both are plain calls (recorded as asked)."""
    backend = backend or default_backend()
    hiddens = list(hiddens) if hiddens else catalog_hidden_sizes()
    cuda = backend == "nccl"
    calls = calls or (64 if cuda else 4)
    reps = reps or (20 if cuda else 5)
    rf = ResultsFile(out_csv, PROBE_KEYS, fieldnames=PROBE_FIELDS)
    n_gpu = _gpu_count() if cuda else None
    for tp in tp_degrees:
        if deadline_s and time.time() > deadline_s:
            break
        if n_gpu is not None and tp > n_gpu:
            log(f"# all-reduce probe tp={tp}: skipped, {n_gpu} GPU(s) visible")
            continue
        done = rf.done_keys() if resume else set()
        points = [
            (m, B, h)
            for m in modes
            for B, h in message_points(batches, hiddens)
            if rf.key_of(_row(tp, backend, m, B, h, dtype_name, 2)) not in done
        ]
        if not points:
            log(f"# all-reduce probe tp={tp}: nothing to do")
            continue
        log(f"# all-reduce probe tp={tp}: {len(points)} points, {backend}")
        job = dict(
            out_csv=str(out_csv),
            dtype=dtype_name,
            points=points,
            calls=calls,
            n_buffers=n_buffers,
            reps=reps,
            deadline_s=deadline_s,
            command=sys.argv,
        )
        try:
            launch(_probe_worker, tp, (job,), backend=backend, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001
            log(
                f"# all-reduce probe tp={tp}: failed ({type(e).__name__}: {str(e)[:300]}); rows so far are kept"
            )
    return rf


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="All-reduce probe at decode-activation message sizes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", default="2", help="comma list of TP degrees (degrees > visible GPUs are skipped)")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--hidden", default="", help="comma list of hidden sizes (default: the catalog's)")
    ap.add_argument("--modes", default="graph", help="graph,eager")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--calls", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend", default=None, choices=["nccl", "gloo"])
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    a = ap.parse_args(argv)
    run_probe(
        a.out,
        tp_degrees=[int(t) for t in a.tp.split(",") if t],
        batches=[int(b) for b in a.batches.split(",") if b],
        hiddens=[int(h) for h in a.hidden.split(",") if h] or None,
        modes=[m for m in a.modes.split(",") if m],
        dtype_name=a.dtype,
        calls=a.calls,
        reps=a.reps,
        backend=a.backend,
        resume=not a.no_resume,
        deadline_s=(time.time() + a.budget_s) if a.budget_s else None,
        timeout_s=a.timeout_s,
        log=lambda s: print(s, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
