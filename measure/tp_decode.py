"""Tensor-parallel decode step (issue 8, measurement half): the end-to-end step of :mod:`kvmodel.measure.e2e_decode`
sharded over N ranks with ``torch.distributed`` (NCCL on GPUs, gloo on CPU), graph-captured on GPUs.

Sharding (Megatron-style, what vLLM/TensorRT-LLM do for dense GQA models):

* q/k/v and gate/up are **column-parallel**: rank r holds the rows of its Hq/N query heads, of its KV heads, and
  of its I/N slice of the gate and of the up projection (biases likewise);
* o and down are **row-parallel**: rank r holds the columns that multiply its heads / its MLP slice; the partial
  products are summed by ``all_reduce`` — **two all-reduces per layer of B × hidden activations**. Rank 0 adds
  the residual into its partial (``addmm``), the others do a plain ``mm``, so the step has the same kernels as the
  single-GPU step and the sum of the all-reduce is the new residual stream;
* KV heads: rank r holds ceil(Hkv/N) of them — its own Hkv/N when Hkv ≥ N (Hkv divisible by N), else the one KV
  head its Hq/N query heads read, **replicated** on N/Hkv ranks (N divisible by Hkv);
* the LM head is **vocab-parallel** (rank r holds ceil(V/N) rows); the argmax is the max over ranks of each
  rank's (max logit, global index) pair, exchanged by one ``all_gather`` of B × 2 floats per step (no full-logit
  gather). The input embedding is replicated (only B rows are read per step); norms are replicated.

``world_size = 1`` is exactly the single-GPU step of :mod:`kvmodel.measure.e2e_decode` (no collective at all).
Building blocks — weights (:class:`~kvmodel.measure.e2e_decode.DecodeModel`), Triton helpers (RMSNorm, RoPE + KV
append, SiLU·mul), attention backends (P0 SDPA, P5/P1/P0-expand kernels), byte arithmetic — are imported from
:mod:`kvmodel.measure.e2e_decode`, not copied.

Rows (``tp_decode.csv``): ``model,tp,B,T,k_bits,v_bits,pipeline,median_s,allreduce_s,...``; ``median_s`` is the
step time (max over ranks of each rank's median), ``allreduce_s`` the time of the step's 2·L all-reduces of
B × hidden alone (graph-captured, per step), ``attn_s`` the step's attention calls alone; bytes are per GPU.

Environment of every spawned process: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1`` (NVLink multicast off), set by :func:`launch` before the processes start.

The multi-GPU session runs (one command, from the repository root, after ``python3 -m pip install --no-deps
--no-build-isolation -e .``; an nvidia-h200-x2 machine gets TP 2, an x4/x8 also TP 4/8, TP = 1 last is the same
code on one GPU, the baseline; docs/tensor_parallel.md has the whole recipe)::

    python3 -m kvmodel.measure.tp_decode --tp 2,4,8,1 \\
        --models Llama-3.1-8B,Mistral-Small-3.1-24B,Qwen2.5-32B \\
        --batches 1,4,16,64,128 --contexts 1k,4k,16k,32k --formats P0:16/16,P5:4/4 \\
        --out validation/data/h200-tp/tp_decode.csv --probe-out validation/data/h200-tp/allreduce.csv \\
        --read-ceiling 4703 --budget-s 500

TP degrees above the number of visible GPUs are skipped (logged, no row), so the same command works on x2, x4 and
x8 machines; ``--budget-s`` stops cleanly and a second identical command resumes (rows already in the CSV are
skipped). ``--probe-out`` first runs :mod:`kvmodel.measure.allreduce_probe` at the same TP degrees (> 1).
Under ``torchrun --nproc-per-node N`` the module runs one TP degree (N) without spawning.

torch/triton are imported lazily: the shard arithmetic works on any machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import astuple, dataclass
from typing import Callable, Optional, Sequence

from kvmodel.measure import e2e_decode as e2e
from kvmodel.measure.results import ResultsFile

from kvmodel.specs import ModelSpec, parse_tokens

TP_FIELDS = [
    "model",
    "tp",
    "B",
    "T",
    "k_bits",
    "v_bits",
    "pipeline",
    "median_s",
    "allreduce_s",
    "p10_s",
    "p90_s",
    "attn_s",
    "n_layers",
    "q_heads_per_gpu",
    "kv_heads_per_gpu",
    "kv_replicated",
    "bytes_weights_per_gpu",
    "bytes_kv_per_gpu",
    "bytes_total_per_gpu",
    "allreduce_calls_per_step",
    "allreduce_bytes_per_call",
    "read_ceiling_GBps",
    "floor_s",
    "pct_of_floor",
    "lm_head",
    "backend",
    "device",
    "graph",
    "dtype",
    "group",
    "status",
    "note",
]
TP_KEYS = ["model", "tp", "B", "T", "k_bits", "v_bits", "pipeline", "dtype"]

#: NVLink multicast (NVLS) off in every process this module starts
DIST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LM_HEAD_MODE = "vocab-parallel"

DEFAULT_MODELS = ("Llama-3.1-8B", "Mistral-Small-3.1-24B", "Qwen2.5-32B")
DEFAULT_TP = (1, 2, 4, 8)
DEFAULT_BATCHES = (1, 4, 16, 64, 128)
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
DEFAULT_FORMATS = (("P0", 16, 16), ("P5", 4, 4))
DEFAULT_TIMEOUT_S = 120.0  # process-group timeout: a rank stuck in a collective fails after this


# ----------------------------------------------------------------------------------------------------------------
# Shard arithmetic (no torch)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """How ``spec`` splits over ``tp`` ranks (per-rank counts; ranges via the methods)."""

    tp: int
    num_heads: int  # model's Hq
    num_kv_heads: int  # model's Hkv
    q_heads: int  # per rank: Hq / N
    kv_heads: int  # per rank: ceil(Hkv / N)
    kv_replicated: bool  # Hkv < N: each KV head lives on N / Hkv ranks
    intermediate: int  # per rank: I / N
    vocab: int  # model's V
    vocab_shard: int  # ceil(V / N) (the last rank may hold fewer rows)

    def q_range(self, rank: int) -> tuple[int, int]:
        return rank * self.q_heads, (rank + 1) * self.q_heads

    def kv_range(self, rank: int) -> tuple[int, int]:
        """KV heads of ``rank``: its own block, or (replicated) the single head its query heads read."""
        if self.kv_replicated:
            h = rank * self.num_kv_heads // self.tp
            return h, h + 1
        return rank * self.kv_heads, (rank + 1) * self.kv_heads

    def inter_range(self, rank: int) -> tuple[int, int]:
        return rank * self.intermediate, (rank + 1) * self.intermediate

    def vocab_range(self, rank: int) -> tuple[int, int]:
        return min(self.vocab, rank * self.vocab_shard), min(self.vocab, (rank + 1) * self.vocab_shard)


def shard_plan(spec: ModelSpec, tp: int) -> ShardPlan:
    """Validate and describe ``tp``-way sharding of a dense GQA model (ValueError when it does not divide)."""
    if tp < 1 or int(tp) != tp:
        raise ValueError(f"tensor-parallel degree must be a positive integer, got {tp!r}")
    if spec.moe or spec.mla:
        raise NotImplementedError(f"{spec.name}: the TP step covers dense GQA models (no MoE/MLA)")
    Hq, Hkv, inter = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    if Hq % tp:
        raise ValueError(f"{spec.name}: {Hq} query heads do not split over tp={tp}")
    if Hkv >= tp and Hkv % tp:
        raise ValueError(f"{spec.name}: {Hkv} KV heads do not split over tp={tp}")
    if Hkv < tp and tp % Hkv:
        raise ValueError(
            f"{spec.name}: tp={tp} is not a multiple of its {Hkv} KV heads (cannot replicate evenly)"
        )
    if inter % tp:
        raise ValueError(f"{spec.name}: intermediate size {inter} does not split over tp={tp}")
    return ShardPlan(
        tp=tp,
        num_heads=Hq,
        num_kv_heads=Hkv,
        q_heads=Hq // tp,
        kv_heads=-(-Hkv // tp),
        kv_replicated=Hkv < tp,
        intermediate=inter // tp,
        vocab=spec.vocab_size,
        vocab_shard=-(-spec.vocab_size // tp),
    )


def local_spec(spec: ModelSpec, plan: ShardPlan) -> ModelSpec:
    """The per-rank architecture (heads, KV heads and MLP width of one shard; vocabulary unchanged)."""
    return spec.model_copy(
        update=dict(num_heads=plan.q_heads, num_kv_heads=plan.kv_heads, intermediate_size=plan.intermediate)
    )


def tp_weight_bytes_per_gpu(spec: ModelSpec, tp: int, B: int, bytes_per_param: float = 2.0) -> float:
    """Weight bytes one rank streams per step: its shard of every layer matrix (+ biases), the replicated norms,
    its LM-head rows (ceil(V/N): rank 0, the largest shard) and the B gathered embedding rows (also when tied,
    as ``weight_bytes_streamed`` of :mod:`kvmodel.symbolic` counts them; at tp = 1 this equals
    :func:`kvmodel.measure.e2e_decode.weight_bytes_per_step`)."""
    p = shard_plan(spec, tp)
    h, d = spec.hidden_size, spec.head_dim
    qkv = (p.q_heads + 2 * p.kv_heads) * d
    mlp = (2 if spec.mlp == "gated" else 1) * p.intermediate * h + p.intermediate * h
    layer = qkv * h + (qkv if spec.qkv_bias else 0) + h * p.q_heads * d + mlp + spec.norms_per_layer * h
    lm = p.vocab_shard * h if tp > 1 else spec.vocab_size * h
    rows = B * h
    return (spec.num_layers * layer + h + lm + rows) * bytes_per_param


def tp_step_bytes(
    spec: ModelSpec,
    tp: int,
    B: int,
    T: int,
    k_bits: int = 16,
    v_bits: int = 16,
    group: int = 32,
    bytes_per_param: float = 2.0,
) -> dict:
    """Per-GPU bytes of one TP step (weights, KV read of T tokens + write of the new one) and the all-reduce
    traffic (2 per layer, each of B × hidden × 2 bytes)."""
    p = shard_plan(spec, tp)
    w = tp_weight_bytes_per_gpu(spec, tp, B, bytes_per_param)
    kv = e2e.step_bytes(local_spec(spec, p), B, T, k_bits, v_bits, "P0", group)["bytes_kv"]
    return {
        "bytes_weights_per_gpu": w,
        "bytes_kv_per_gpu": kv,
        "bytes_total_per_gpu": w + kv,
        "allreduce_calls_per_step": 2 * spec.num_layers if tp > 1 else 0,
        "allreduce_bytes_per_call": B * spec.hidden_size * 2,
        "q_heads_per_gpu": p.q_heads,
        "kv_heads_per_gpu": p.kv_heads,
        "kv_replicated": p.kv_replicated,
    }


# ----------------------------------------------------------------------------------------------------------------
# Process launch (torch.multiprocessing.spawn or torchrun env vars)
# ----------------------------------------------------------------------------------------------------------------


def set_dist_env(env=None) -> dict:
    """Put :data:`DIST_ENV` into ``env`` (default ``os.environ``); returns ``env``."""
    env = os.environ if env is None else env
    for k, v in DIST_ENV.items():
        env[k] = v
    return env


def _cuda_ok():
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def default_backend() -> str:
    return "nccl" if _cuda_ok() else "gloo"


def _gpu_count() -> int:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def init_distributed(
    rank: int,
    world: int,
    backend: Optional[str] = None,
    init_method: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """Set the NVLS-off environment, pick the device (``cuda:<local rank>`` for NCCL, CPU for gloo), create the
    default process group and warm it up with one all-reduce. Returns ``(torch, dist, device, backend)``."""
    set_dist_env()
    backend = backend or default_backend()
    if backend != "nccl":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the e2e Triton helpers run in the interpreter
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    kw = dict(backend=backend, rank=rank, world_size=world, timeout=_dt.timedelta(seconds=timeout_s))
    if init_method:
        kw["init_method"] = init_method
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        kw["device_id"] = torch.device(device)
    else:
        device = "cpu"
        torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group(**kw)
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    if backend == "nccl":
        torch.cuda.synchronize()
    return torch, dist, device, backend


def shutdown_distributed(timeout_s: float = 60.0) -> None:
    """Destroy the process group; NCCL after graph capture can hang there (pytorch#115388), so give up after
    ``timeout_s`` (the caller then exits anyway; rows are already on disk)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return
    th = threading.Thread(target=dist.destroy_process_group, daemon=True)
    th.start()
    th.join(timeout_s)


def _entry(rank, fn, world, init_method, backend, timeout_s, args):
    _, _, _, backend = init_distributed(rank, world, backend, init_method, timeout_s)
    try:
        fn(rank, world, *args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        shutdown_distributed(10.0 if backend == "nccl" else 60.0)
    if backend == "nccl":
        os._exit(0)  # NCCL teardown after graph capture can hang in destructors; the work is done and on disk


def launch(
    fn: Callable,
    world: int,
    args: tuple = (),
    backend: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes (``torch.multiprocessing.spawn``) with the default
    process group initialized (rendezvous through a file in a temp folder) and :data:`DIST_ENV` set. ``fn`` must
    be importable by name (module level). Raises if any rank fails."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    backend = backend or default_backend()
    set_dist_env()  # inherited by the spawned processes (and set again in each by init_distributed)
    tmp = tempfile.mkdtemp(prefix="kvmodel-tp-")
    try:
        mp.spawn(
            _entry,
            args=(fn, world, f"file://{os.path.join(tmp, 'rendezvous')}", backend, timeout_s, args),
            nprocs=world,
            join=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The sharded model and its step
# ----------------------------------------------------------------------------------------------------------------


class TPDecodeModel:
    """Rank ``rank``'s shard of ``spec`` (random weights, or sliced from a full :class:`DecodeModel` ``full``
    so that the sharded step can be checked against the unsharded one)."""

    def __init__(
        self,
        spec: ModelSpec,
        rank: int = 0,
        world: int = 1,
        dtype_name: str = "float16",
        device: str = "cuda",
        seed: int = 0,
        full: Optional[e2e.DecodeModel] = None,
        group=None,
    ):
        import torch  # noqa: PLC0415

        self.torch, self.spec, self.rank, self.world, self.group = torch, spec, rank, world, group
        self.plan = shard_plan(spec, world)
        self.local_spec = local_spec(spec, self.plan)
        self.dtype_name, self.dtype, self.device = dtype_name, getattr(torch, dtype_name), device
        p, d, h = self.plan, spec.head_dim, spec.hidden_size
        v0, v1 = p.vocab_range(rank)
        self.vocab_offset = v0
        if full is None:
            # the shard's layer matrices from DecodeModel itself (same seed on every rank: the replicated
            # embedding is identical everywhere); tie_embeddings=True so it builds no full-size LM head
            base = e2e.DecodeModel(
                self.local_spec.model_copy(update=dict(tie_embeddings=True)),
                dtype_name,
                seed=seed,
                device=device,
            )
            self.embed, self.final_norm, self.layers = base.embed, base.final_norm, base.layers
            if spec.tie_embeddings:
                self.lm_head = self.embed[v0:v1]
            else:
                g = torch.Generator(device=device).manual_seed(seed + 1 + rank)
                self.lm_head = torch.empty(v1 - v0, h, device=device, dtype=self.dtype)
                self.lm_head.normal_(0.0, 1.0 / math.sqrt(h), generator=g)
            return
        # slice a full model
        self.embed, self.final_norm = full.embed, full.final_norm.clone()
        self.lm_head = full.lm_head[v0:v1].clone() if not spec.tie_embeddings else self.embed[v0:v1]
        Hq, Hkv = spec.num_heads, spec.num_kv_heads
        q0, q1 = p.q_range(rank)
        k0, k1 = p.kv_range(rank)
        i0, i1 = p.inter_range(rank)
        I = spec.intermediate_size
        qkv_rows = torch.cat(
            [
                torch.arange(q0 * d, q1 * d),
                Hq * d + torch.arange(k0 * d, k1 * d),
                (Hq + Hkv) * d + torch.arange(k0 * d, k1 * d),
            ]
        )
        gated = spec.mlp == "gated"
        gu_rows = (
            torch.cat([torch.arange(i0, i1), I + torch.arange(i0, i1)]) if gated else torch.arange(i0, i1)
        )
        self.layers = []
        for lay in full.layers:
            if "router" in lay:
                raise NotImplementedError("MoE layers are not sharded here")
            self.layers.append(
                {
                    "in_norm": lay["in_norm"].clone(),
                    "post_norm": lay["post_norm"].clone(),
                    "qkv": lay["qkv"][qkv_rows.to(lay["qkv"].device)].contiguous(),
                    "qkv_b": None
                    if lay["qkv_b"] is None
                    else lay["qkv_b"][qkv_rows.to(lay["qkv"].device)].contiguous(),
                    "o": lay["o"][:, q0 * d : q1 * d].contiguous(),
                    "gu": lay["gu"][gu_rows.to(lay["gu"].device)].contiguous(),
                    "down": lay["down"][:, i0:i1].contiguous(),
                }
            )

    def weight_bytes_streamed(self, B: int) -> int:
        """Bytes of the shard's tensors one step reads (layer matrices and norms, final norm, LM-head rows, the B
        gathered embedding rows); compare :func:`tp_weight_bytes_per_gpu`."""
        t = self.torch
        n = sum(v.numel() for lay in self.layers for v in lay.values() if isinstance(v, t.Tensor))
        n += self.final_norm.numel() + self.lm_head.numel() + B * self.spec.hidden_size
        return n * self.embed.element_size()

    def make_backend(
        self, pipeline: str, B: int, T: int, pool, k_bits: int = 16, v_bits: int = 16, group: int = 32
    ):
        """This rank's KV cache (ceil(Hkv/N) heads) and attention backend, carved from ``pool``."""
        return e2e.make_backend(
            pipeline, self.local_spec, B, T, e2e.Carver(pool), self.dtype, k_bits, v_bits, group
        )

    def _all_reduce(self, t):
        self.torch.distributed.all_reduce(t, group=self.group)

    def _all_gather(self, out, inp):
        dist = self.torch.distributed
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, inp, group=self.group)

    def build_step(self, B: int, T: int, backend, theta: float = 1e6, ids_seed: int = 0):
        """Closures over static buffers (graph-capturable): one TP decode step; the step's attention calls only;
        the step's 2·L all-reduces of B × hidden only. ``step.state``: ids, logits (this rank's vocab shard)."""
        torch, spec = self.torch, self.spec
        F = torch.nn.functional
        dt, dev = self.dtype, self.device
        h, d = spec.hidden_size, spec.head_dim
        Hq, Hkv = self.plan.q_heads, self.plan.kv_heads
        gated = spec.mlp == "gated"
        world, first = self.world, self.rank == 0
        gen = torch.Generator().manual_seed(ids_seed)  # same token ids on every rank
        ids = torch.randint(0, spec.vocab_size, (B,), generator=gen).to(dev)
        x = torch.empty(B, h, device=dev, dtype=dt)
        y = torch.empty(B, h, device=dev, dtype=dt)  # the all-reduce buffer (becomes the residual stream)
        hn = torch.empty(B, h, device=dev, dtype=dt)
        q = torch.empty(B, Hq, d, device=dev, dtype=dt)
        act = torch.empty(B, self.plan.intermediate, device=dev, dtype=dt)
        cos, sin = e2e.rope_tables(d, T, theta, dev)
        out_ids = torch.empty(B, dtype=torch.long, device=dev)
        pairs = torch.empty(world * B, 2, device=dev, dtype=torch.float32)
        ar_buf = torch.zeros(B, h, device=dev, dtype=dt)
        state = {"ids": ids, "x": x}

        def row_parallel(cur, other, a, w):
            """cur + a @ w.T summed over ranks; returns the tensor that now holds the residual stream."""
            if world == 1:
                cur.addmm_(a, w.t())
                return cur, other
            if first:
                torch.addmm(cur, a, w.t(), out=other)
            else:
                torch.mm(a, w.t(), out=other)
            self._all_reduce(other)
            return other, cur

        def step():
            cur, other = x, y
            torch.index_select(self.embed, 0, ids, out=cur)
            for i, lay in enumerate(self.layers):
                e2e.rmsnorm(cur, lay["in_norm"], hn)
                qkv = F.linear(hn, lay["qkv"], lay["qkv_b"])
                k_dst, v_dst = backend.slot(i)
                e2e.rope_qkv(qkv, cos, sin, q, k_dst, v_dst, Hq, Hkv)
                if not backend.writes_cache_directly:
                    backend.append(i, k_dst, v_dst)
                o = backend.attend(i, q)
                cur, other = row_parallel(cur, other, o.reshape(B, Hq * d), lay["o"])
                e2e.rmsnorm(cur, lay["post_norm"], hn)
                gu = F.linear(hn, lay["gu"])
                a = e2e.silu_mul(gu, act) if gated else F.gelu(gu)
                cur, other = row_parallel(cur, other, a, lay["down"])
            e2e.rmsnorm(cur, self.final_norm, hn)
            logits = F.linear(hn, self.lm_head)
            state["logits"] = logits
            if world == 1:
                torch.argmax(logits, dim=-1, out=out_ids)
                return out_ids
            val, idx = logits.max(dim=-1)  # first maximum within the shard
            mine = torch.stack([val.float(), (idx + self.vocab_offset).float()], dim=-1)
            self._all_gather(pairs, mine)
            allp = pairs.view(world, B, 2)
            best = torch.argmax(allp[..., 0], dim=0)  # first maximum over ranks = lowest global index
            out_ids.copy_(allp[..., 1].gather(0, best.unsqueeze(0)).squeeze(0).long())
            return out_ids

        step.state = state

        def attention_only():
            for i in range(len(self.layers)):
                backend.attend(i, q)

        def allreduce_only():
            for _ in range(2 * len(self.layers)):
                self._all_reduce(ar_buf)

        return step, attention_only, allreduce_only

    def gather_logits(self, local_logits):
        """Full ``[B, V]`` logits from every rank's shard (an extra all-gather, for checking; not in the step)."""
        torch = self.torch
        if self.world == 1:
            return local_logits
        B, n = local_logits.shape
        pad = torch.zeros(B, self.plan.vocab_shard, device=local_logits.device, dtype=local_logits.dtype)
        pad[:, :n] = local_logits
        out = torch.empty(self.world, B, self.plan.vocab_shard, device=pad.device, dtype=pad.dtype)
        self._all_gather(out.view(self.world * B, -1), pad)
        return out.permute(1, 0, 2).reshape(B, -1)[:, : self.spec.vocab_size]


def copy_kv_shard(full_backend, local_backend, plan: ShardPlan, rank: int) -> None:
    """Fill rank ``rank``'s FP16 cache (an :class:`~kvmodel.measure.e2e_decode.SDPABackend`) with its KV heads of
    the full model's cache (for checking the sharded step against the unsharded one)."""
    k0, k1 = plan.kv_range(rank)
    for lf, ll in zip(full_backend.layers, local_backend.layers):
        ll.k.copy_(lf.k[:, k0:k1])
        ll.v.copy_(lf.v[:, k0:k1])


# ----------------------------------------------------------------------------------------------------------------
# Timing that is safe with collectives (every rank replays the same number of times)
# ----------------------------------------------------------------------------------------------------------------


def time_collective(
    calls: Sequence[Callable[[], object]], reps: int = 20, warmup: int = 3, use_graph: bool = True, group=None
):
    """Median seconds per replay of ``calls`` run back to back on every rank of the default group (or none).

    CUDA: captured in one CUDA graph when every rank's capture succeeds (agreed by an all-reduce; else eager on
    all ranks, as NCCL requires capture to be uniform), each replay timed with CUDA events. CPU: wall clock, a
    barrier before each replay. The replay count is fixed (the same on every rank). With a process group the
    result is the max over ranks of each rank's median / p10 / p90 (the step ends when the slowest rank does).
    Returns :class:`kvmodel.measure.probes.Timing` (``graph`` says whether a graph was replayed)."""
    import statistics  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from kvmodel.measure.probes import Timing, _quantile  # noqa: PLC0415

    ddp = dist.is_available() and dist.is_initialized()
    cuda = torch.cuda.is_available() and (not ddp or dist.get_backend(group) == "nccl")
    dev = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"

    def run_calls():
        for c in calls:
            c()

    graph = None
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run_calls()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        ok = 0
        if use_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                # thread-local capture: the process group's watchdog thread may query events meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    run_calls()
                torch.cuda.synchronize()
                ok = 1
            except Exception:  # noqa: BLE001 - fall back to eager (on every rank)
                graph = None
                torch.cuda.synchronize()
        if ddp:
            flag = torch.tensor([ok], device=dev, dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            if not int(flag.item()):
                graph = None

        def run_once():
            if graph is not None:
                graph.replay()
            else:
                run_calls()

        run_once()
        torch.cuda.synchronize()
        if ddp:
            dist.barrier(group=group)
        evs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        for a, b in evs:
            a.record()
            run_once()
            b.record()
        torch.cuda.synchronize()
        per = [a.elapsed_time(b) * 1e-3 for a, b in evs]
    else:
        for _ in range(warmup):
            run_calls()
        per = []
        for _ in range(reps):
            if ddp:
                dist.barrier(group=group)
            t0 = time.perf_counter()
            run_calls()
            per.append(time.perf_counter() - t0)
    stats = [statistics.median(per), _quantile(per, 0.1), _quantile(per, 0.9)]
    if ddp:
        t = torch.tensor(stats, device=dev, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        stats = [float(v) for v in t.tolist()]
    replayed = graph is not None
    graph = None  # free the graph's memory pool
    return Timing(stats[0], stats[1], stats[2], reps, replayed)


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPConfig:
    B: int
    T: int
    k_bits: int
    v_bits: int
    pipeline: str


def _spec_of(m) -> ModelSpec:
    if isinstance(m, ModelSpec):
        return m
    if isinstance(m, dict):
        return ModelSpec(**m)
    return e2e.resolve_model(m)


def base_row(
    spec: ModelSpec,
    tp: int,
    c: TPConfig,
    dtype_name: str,
    group: int,
    read_ceiling_GBps: Optional[float],
    backend: str = "",
    device: str = "",
) -> dict:
    row = {k: "" for k in TP_FIELDS}
    row.update(
        model=spec.name,
        tp=tp,
        B=c.B,
        T=c.T,
        k_bits=c.k_bits,
        v_bits=c.v_bits,
        pipeline=c.pipeline,
        n_layers=spec.num_layers,
        lm_head=LM_HEAD_MODE if tp > 1 else "whole",
        backend=backend,
        device=device,
        dtype=dtype_name,
        group=group,
    )
    try:
        row.update(tp_step_bytes(spec, tp, c.B, c.T, c.k_bits, c.v_bits, group))
    except (ValueError, NotImplementedError) as e:
        row.update(status="unsupported", note=str(e)[:200])
        return row
    if read_ceiling_GBps:
        row["read_ceiling_GBps"] = read_ceiling_GBps
        row["floor_s"] = row["bytes_total_per_gpu"] / (read_ceiling_GBps * 1e9)
    return row


def plan_tp(
    rf: ResultsFile,
    specs: Sequence[ModelSpec],
    tp: int,
    batches,
    contexts,
    formats,
    dtype_name: str,
    group: int,
    resume: bool = True,
) -> list[tuple[ModelSpec, list[TPConfig]]]:
    """Configs of degree ``tp`` not yet in ``rf`` (all of them without ``resume``)."""
    done = rf.done_keys() if resume else set()
    out = []
    for spec in specs:
        cfgs = [TPConfig(B, T, kb, vb, p) for (p, kb, vb) in formats for B in batches for T in contexts]
        cfgs = [c for c in cfgs if rf.key_of(base_row(spec, tp, c, dtype_name, group, None)) not in done]
        if cfgs:
            out.append((spec, cfgs))
    return out


def _topology() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        r = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=20, check=False)
        return r.stdout[:4000]
    except (OSError, subprocess.SubprocessError):
        return ""


def dist_provenance(torch, backend: str, world: int) -> dict:
    """What the provenance file records beside :func:`collect_provenance`: backend, world size, NCCL version,
    the NVLS-off variables, GPU count and ``nvidia-smi topo -m``."""
    nccl = ""
    if backend == "nccl":
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            nccl = ""
    return {
        "dist_backend": backend,
        "world_size": world,
        "nccl": nccl,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "env": {k: os.environ.get(k, "") for k in DIST_ENV},
        "topology": _topology(),
        "lm_head": LM_HEAD_MODE,
    }


def _tp_worker(rank: int, world: int, job: dict) -> None:
    """Runs on every rank: builds the shard of each model, times each config, rank 0 appends the rows."""
    import gc  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    backend = dist.get_backend()
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    cuda = device != "cpu"
    dtype_name, group, ceiling = job["dtype"], job["group"], job.get("read_ceiling_GBps")
    reps = job.get("reps") or (20 if cuda else 3)
    rf = ResultsFile(job["out_csv"], TP_KEYS, fieldnames=TP_FIELDS)
    lead = rank == 0

    def log(s):
        if lead:
            print(s, flush=True)

    def agree(ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], device=device, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(int(t.item()))

    def stop_now() -> bool:
        dl = job.get("deadline_s")
        return not agree(not (dl and time.time() > dl))

    if lead:
        rf.write_provenance(
            extra={
                "read_ceiling_GBps": ceiling,
                "dtype": dtype_name,
                "tp": world,
                **dist_provenance(torch, backend, world),
            },
            command=job.get("command"),
        )
    plan = [(_spec_of(s), [TPConfig(*c) for c in cfgs]) for s, cfgs in job["plan"]]
    if cuda:
        total = torch.tensor([torch.cuda.get_device_properties(device).total_memory], device=device)
        dist.all_reduce(total, op=dist.ReduceOp.MIN)
        total_mem = int(total.item())
    for spec, cfgs in plan:
        if stop_now():
            log("# deadline reached; the rest is left for --resume")
            break
        p = shard_plan(spec, world)
        lspec = local_spec(spec, p)
        wbytes = (
            tp_weight_bytes_per_gpu(spec, world, 0) + spec.vocab_size * spec.hidden_size * 2
        )  # + embedding
        fit = []
        for c in cfgs:
            kv = e2e.kv_cache_alloc_bytes(lspec, c.B, c.T, c.k_bits, c.v_bits, group, c.pipeline)
            need = wbytes + kv + c.B * p.vocab_shard * 4 + job["margin_bytes"]
            if cuda and need > total_mem:
                row = base_row(spec, world, c, dtype_name, group, ceiling, backend, device)
                row.update(
                    status="skipped", note=f"needs {need / 1e9:.1f} GB per GPU > {total_mem / 1e9:.1f} GB"
                )
                if lead:
                    rf.append(row)
                continue
            fit.append((c, kv))
        if not fit:
            continue
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        err = ""
        try:
            model = TPDecodeModel(spec, rank, world, dtype_name, device, seed=job.get("seed", 0))
            pool_bytes = int(max(kv for _, kv in fit) * 1.02) + 64 * 1024**2
            pool = torch.empty(pool_bytes // 2, device=device, dtype=model.dtype)
            pool.normal_(0.0, 1.0)
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:180]}"
            model = pool = None
        if not agree(not err):
            for c, _ in fit:
                row = base_row(spec, world, c, dtype_name, group, ceiling, backend, device)
                row.update(status="unavailable", note=err or "failed on another rank")
                if lead:
                    rf.append(row)
            model = pool = None
            continue
        log(
            f"# {spec.name} tp={world}: {p.q_heads} q / {p.kv_heads} KV heads per GPU"
            f"{' (replicated)' if p.kv_replicated else ''}, {len(fit)} configs"
        )
        fit.sort(key=lambda x: (x[0].pipeline, x[0].k_bits, x[0].B, x[0].T))
        for c, _ in fit:
            if stop_now():
                log("# deadline reached; the rest is left for --resume")
                break
            t_start = time.time()
            row = base_row(spec, world, c, dtype_name, group, ceiling, backend, device)
            err, status = "", "ok"
            step = attn = ar = be = None
            try:
                be = model.make_backend(c.pipeline, c.B, c.T, pool, c.k_bits, c.v_bits, group)
                step, attn, ar = model.build_step(c.B, c.T, be)
            except MemoryError as e:
                err, status = f"KV pool: {str(e)[:160]}", "skipped"
            except (ImportError, NotImplementedError, ValueError, AttributeError, TypeError) as e:
                err, status = f"{type(e).__name__}: {str(e)[:160]}", "unavailable"
            except Exception as e:  # noqa: BLE001
                err, status = f"{type(e).__name__}: {str(e)[:160]}", "error"
            if not agree(not err):
                row.update(status=status if err else "unavailable", note=err or "failed on another rank")
                if lead:
                    rf.append(row)
                continue
            try:
                t = time_collective([step], reps=reps, use_graph=cuda)
                row.update(
                    median_s=t.median_s,
                    p10_s=t.p10_s,
                    p90_s=t.p90_s,
                    graph=t.graph,
                    status="ok" if (t.graph or not cuda) else "ok-eager",
                )
                ta = time_collective([attn], reps=max(3, reps // 2), use_graph=cuda)
                row["attn_s"] = ta.median_s
                if world > 1:
                    tr = time_collective([ar], reps=max(3, reps // 2), use_graph=cuda)
                    row["allreduce_s"] = tr.median_s
                else:
                    row["allreduce_s"] = 0.0
                if row.get("floor_s") not in ("", None):
                    row["pct_of_floor"] = 100.0 * float(row["floor_s"]) / t.median_s
            except Exception as e:  # noqa: BLE001 - a rank failing inside a collective hangs the others until
                # the process-group timeout; a failure before any collective is recorded and the sweep goes on
                row.update(status="error", note=f"{type(e).__name__}: {str(e)[:160]}")
                if lead:
                    traceback.print_exc(limit=3)
            if lead:
                rf.append(row)
                ms = (
                    f"{row['median_s'] * 1e3:8.3f} ms"
                    if row.get("median_s") not in ("", None)
                    else row["status"]
                )
                ar_ms = (
                    f"{float(row['allreduce_s']) * 1e3:7.3f}"
                    if row.get("allreduce_s") not in ("", None)
                    else "-"
                )
                log(
                    f"  {spec.name:22s} tp={world} B={c.B:<4d} T={c.T:<6d} {c.pipeline:4s} {c.k_bits}/{c.v_bits}  "
                    f"{ms}  all-reduce {ar_ms} ms  ({time.time() - t_start:.1f} s)"
                )
            step = attn = ar = be = None  # noqa: F841
        model = pool = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()


def run_tp(
    out_csv,
    models: Sequence = DEFAULT_MODELS,
    tp_degrees: Sequence[int] = DEFAULT_TP,
    batches: Sequence[int] = DEFAULT_BATCHES,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    formats: Sequence[tuple[str, int, int]] = DEFAULT_FORMATS,
    resume: bool = True,
    dtype_name: Optional[str] = None,
    group: int = 32,
    read_ceiling_GBps: Optional[float] = None,
    backend: Optional[str] = None,
    reps: Optional[int] = None,
    margin_bytes: float = e2e.DEFAULT_MARGIN_BYTES,
    seed: int = 0,
    deadline_s: Optional[float] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> ResultsFile:
    """Measure the TP step for every model × TP degree × (pipeline, k_bits, v_bits) × batch × context and append
    rows to ``out_csv`` (resumable: rows already there are skipped). One group of ``tp`` processes per degree
    (:func:`launch`); NCCL on GPUs (a degree above the visible GPU count is skipped, no row), gloo on CPU.
    ``models``: catalog names or :class:`ModelSpec` objects. Configs that do not fit per GPU get
    ``status=skipped``; a model that does not split over ``tp`` gets ``status=unsupported``."""
    backend = backend or default_backend()
    dtype_name = dtype_name or ("float16" if backend == "nccl" else "float32")
    rf = ResultsFile(out_csv, TP_KEYS, fieldnames=TP_FIELDS)
    specs = [_spec_of(m) for m in models]
    n_gpu = _gpu_count() if backend == "nccl" else None
    for tp in tp_degrees:
        if deadline_s and time.time() > deadline_s:
            log("# deadline reached; the rest is left for --resume")
            break
        if n_gpu is not None and tp > n_gpu:
            log(f"# tp={tp}: skipped, {n_gpu} GPU(s) visible")
            continue
        todo = plan_tp(rf, specs, tp, batches, contexts, formats, dtype_name, group, resume)
        runnable = []
        for spec, cfgs in todo:
            try:
                shard_plan(spec, tp)
                runnable.append((spec, cfgs))
            except (ValueError, NotImplementedError) as e:
                if rf.read_provenance() is None:
                    rf.write_provenance(
                        extra={"dtype": dtype_name, "dist_backend": backend, "lm_head": LM_HEAD_MODE}
                    )
                rf.append_many(
                    base_row(spec, tp, c, dtype_name, group, read_ceiling_GBps, backend) for c in cfgs
                )
                log(f"# {spec.name} tp={tp}: unsupported ({e})")
        if not runnable:
            log(f"# tp={tp}: nothing to do")
            continue
        job = dict(
            out_csv=str(out_csv),
            dtype=dtype_name,
            group=group,
            read_ceiling_GBps=read_ceiling_GBps,
            reps=reps,
            margin_bytes=margin_bytes,
            seed=seed,
            deadline_s=deadline_s,
            command=sys.argv,
            plan=[(s.model_dump(), [astuple(c) for c in cfgs]) for s, cfgs in runnable],
        )
        log(f"# tp={tp}: {sum(len(c) for _, c in runnable)} configs over {len(runnable)} model(s), {backend}")
        try:
            launch(_tp_worker, tp, (job,), backend=backend, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - one degree failing must not lose the others
            log(f"# tp={tp}: failed ({type(e).__name__}: {str(e)[:300]}); rows so far are kept")
    return rf


def _torchrun_env() -> Optional[tuple[int, int]]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Tensor-parallel decode step sweep (torch.distributed; NCCL / gloo)"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--tp", default="1,2", help="comma list of TP degrees (degrees > visible GPUs are skipped)"
    )
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--contexts", default="1k,4k,16k,32k")
    ap.add_argument("--formats", default="P0:16/16,P5:4/4", help="pipeline:kbits/vbits list")
    ap.add_argument("--read-ceiling", type=float, default=None, help="GB/s per GPU (for floor_s)")
    ap.add_argument("--dtype", default=None, help="default float16 (NCCL) / float32 (gloo)")
    ap.add_argument("--backend", default=None, choices=["nccl", "gloo"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="process-group timeout")
    ap.add_argument("--probe-out", default=None, help="first run the all-reduce probe into this CSV")
    a = ap.parse_args(argv)
    deadline = (time.time() + a.budget_s) if a.budget_s else None
    tps = [int(t) for t in a.tp.split(",") if t]
    models = [m for m in a.models.split(",") if m]
    batches = [int(b) for b in a.batches.split(",") if b]
    contexts = [parse_tokens(t) for t in a.contexts.split(",") if t]
    formats = e2e.parse_formats(a.formats)
    tr = _torchrun_env()
    if tr is not None:  # launched by torchrun: one degree, this process is one rank
        rank, world = tr
        backend = a.backend or default_backend()
        dtype_name = a.dtype or ("float16" if backend == "nccl" else "float32")
        init_distributed(rank, world, backend, None, a.timeout_s)
        rf = ResultsFile(a.out, TP_KEYS, fieldnames=TP_FIELDS)
        import torch.distributed as dist  # noqa: PLC0415

        obj = [None]
        if rank == 0:
            todo = plan_tp(
                rf,
                [_spec_of(m) for m in models],
                world,
                batches,
                contexts,
                formats,
                dtype_name,
                32,
                not a.no_resume,
            )
            obj = [[(s.model_dump(), [astuple(c) for c in cfgs]) for s, cfgs in todo]]
        dist.broadcast_object_list(obj, src=0)
        job = dict(
            out_csv=a.out,
            dtype=dtype_name,
            group=32,
            read_ceiling_GBps=a.read_ceiling,
            reps=a.reps,
            margin_bytes=e2e.DEFAULT_MARGIN_BYTES,
            seed=0,
            deadline_s=deadline,
            command=sys.argv,
            plan=obj[0],
        )
        try:
            _tp_worker(rank, world, job)
        finally:
            shutdown_distributed()
        return 0
    if a.probe_out:
        from kvmodel.measure.allreduce_probe import run_probe  # noqa: PLC0415

        run_probe(
            a.probe_out,
            tp_degrees=[t for t in tps if t > 1],
            backend=a.backend,
            resume=not a.no_resume,
            deadline_s=deadline,
            timeout_s=a.timeout_s,
            log=lambda s: print(s, flush=True),
        )
    run_tp(
        a.out,
        models=models,
        tp_degrees=tps,
        batches=batches,
        contexts=contexts,
        formats=formats,
        resume=not a.no_resume,
        dtype_name=a.dtype,
        read_ceiling_GBps=a.read_ceiling,
        backend=a.backend,
        reps=a.reps,
        deadline_s=deadline,
        timeout_s=a.timeout_s,
        log=lambda s: print(s, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
