"""The `kvmodel` command line. Each command's docstring is its help text.

Errors in user input (unknown names, bad numbers, malformed files) exit with status 2 and one readable message;
nothing prints a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from kvmodel import __version__
from kvmodel.specs import (
    KVFormat,
    LookupFailed,
    SpecError,
    Workload,
    catalog,
    get_gpu,
    get_model,
    parse_kv_format,
    parse_tokens,
)

WEIGHT_DTYPES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


class _Tokens(click.ParamType):
    """A positive token count: 4096, 32k, 128k (k = 1024), 1m."""

    name = "tokens"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and value > 0:
            return value
        try:
            return parse_tokens(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


TOKENS = _Tokens()
POSITIVE_INT = click.IntRange(min=1, max=1 << 20)


def _fail_lookup(e: Exception) -> None:
    raise click.UsageError(str(e))


def _gpu(name: str):
    try:
        return get_gpu(name)
    except LookupFailed as e:
        _fail_lookup(e)


def _model(name: str):
    try:
        return get_model(name)
    except LookupFailed as e:
        _fail_lookup(e)


def _kv_format(kv: str, k_bits, v_bits, group: int, asym: bool, sensitivity) -> KVFormat:
    if kv == "recommended":
        if not sensitivity:
            raise click.UsageError("--kv recommended needs --sensitivity FILE (the JSON written by `kvmodel classify`)")
        try:
            data = json.loads(Path(sensitivity).read_text())
            kv = str(data["recommended_kv"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.UsageError(f"cannot read recommended_kv from {sensitivity}: {e}") from None
    try:
        fmt = parse_kv_format(kv, group_size=group, asymmetric=asym)
        if k_bits is not None or v_bits is not None:
            fmt = KVFormat(
                k_bits=k_bits if k_bits is not None else fmt.k_bits,
                v_bits=v_bits if v_bits is not None else fmt.v_bits,
                group_size=group,
                asymmetric=asym,
            )
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise click.UsageError(str(e).splitlines()[0]) from None
    return fmt


def _calibration_for(gpu, calibration_file, runtime):
    from kvmodel.calibration import find_calibration, load_calibration

    if calibration_file:
        return load_calibration(calibration_file)
    return find_calibration(gpu.name, runtime=runtime)


class _Group(click.Group):
    """A click group that turns spec/catalog errors into exit status 2 with one message (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LookupFailed as e:
            raise click.UsageError(str(e), ctx) from None
        except SpecError as e:
            err = click.ClickException(str(e))
            err.exit_code = 2
            raise err from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmodel")
def cli():
    """kvmodel: how fast does LLM decode run on a GPU, and why?

    An analytic model of the bytes every decode step moves (weights, KV cache at any K/V precision, metadata,
    tier transfers), turned into time with bandwidth curves calibrated on real GPUs.
    """


# ----------------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------------


def _fmt_bytes(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def render_prediction(p) -> str:
    """A readable plain-text report of a Prediction."""
    out = io.StringIO()
    w = out.write
    w(f"kvmodel {__version__} - {p.model} on {p.gpu}\n")
    w(f"  batch {p.batch}, context {p.context_tokens} tokens, generate {p.gen_tokens}, KV {p.kv_format}, "
      f"weights {p.weight_bytes_per_param:g} B/param\n")
    w(f"  timing: {p.timing}\n\n")
    b = p.bytes
    w("Bytes per decode step\n")
    rows = [
        ("weights streamed", b.weights_streamed),
        ("  (params x bytes, study convention)", b.weights_paper_convention),
        ("KV read", b.kv_read),
        ("  of which scale/zero metadata", b.kv_metadata_read),
        ("KV write (new token)", b.kv_write),
        ("activations", b.activations),
        ("total", b.total),
    ]
    for k, v in rows:
        w(f"  {k:<38}{_fmt_bytes(v):>12}\n")
    cross = f"{p.crossover_context_tokens:,.0f} tokens" if p.crossover_context_tokens else "n/a"
    w(f"  KV fraction {p.kv_fraction:.1%} -> {p.regime} (KV = weights at context {cross})\n\n")
    w(f"Step time and throughput (KV {p.kv_format}: compression {p.compression_ratio:.2f}x, "
      f"ideal step speedup {p.ideal_speedup:.2f}x)\n")
    w(f"  {'pipeline':<34}{'step':>12}{'tok/s':>12}{'tok/s/seq':>11}{'vs FP16':>9}\n")
    for r, label in ((p.fp16, "FP16 KV (P0, GQA-aware)"), (p.fused, f"{r_label(p.fused)} fused (P5)"),
                     (p.non_fused, f"{r_label(p.non_fused)} non-fused (P1)")):
        w(f"  {label:<34}{_fmt_time(r.step_time_s):>12}{r.tokens_per_s:>12,.0f}"
          f"{r.tokens_per_s_per_sequence:>11,.1f}{r.speedup_vs_fp16:>8.2f}x\n")
    m = p.memory
    w("\nMemory\n")
    w(f"  footprint {_fmt_bytes(m.footprint_bytes)} = weights {_fmt_bytes(m.weights_bytes)} + KV "
      f"{_fmt_bytes(m.kv_cache_bytes)} + workspace {_fmt_bytes(m.workspace_bytes)}; usable "
      f"{_fmt_bytes(m.usable_bytes)} -> {'fits' if m.fits else 'DOES NOT FIT'}\n")
    mc = "unbounded" if m.max_context_tokens is None else f"{max(m.max_context_tokens, 0):,.0f} tokens"
    w(f"  max context at batch {p.batch}: {mc}; max batch at this context: {m.max_batch:,.0f}\n")
    w(f"\nArithmetic intensity {p.arithmetic_intensity_flop_per_byte:.1f} FLOP/B vs ridge "
      f"{p.ridge_point_flop_per_byte:.0f} FLOP/B -> memory-bound"
      if p.arithmetic_intensity_flop_per_byte < p.ridge_point_flop_per_byte
      else f"\nArithmetic intensity {p.arithmetic_intensity_flop_per_byte:.1f} FLOP/B >= ridge -> compute-bound")
    w("\n")
    if p.gen_tokens > 1:
        w(f"Over {p.gen_tokens} generated tokens: {p.reread_token_reads:,.0f} cached-token reads per layer and "
          f"KV head, {_fmt_bytes(p.kv_bytes_over_generation)} of KV read\n")
    tpr = getattr(p, "tensor_parallel", None)
    if tpr is not None:
        w(f"Tensor parallel x{tpr.degree} over {tpr.link} ({tpr.link_bandwidth_GBps:g} GB/s per direction): per GPU "
          f"{_fmt_bytes(tpr.weights_streamed_per_gpu)} weights + {_fmt_bytes(tpr.kv_read_per_gpu)} KV "
          f"({tpr.kv_heads_per_gpu} KV heads) per step; all-reduces {_fmt_time(tpr.allreduce_time_s)} per step\n")
    for n in p.notes:
        w(f"note: {n}\n")
    return out.getvalue()


def r_label(r) -> str:
    return r.kv_format


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            flat[key] = "; ".join(map(str, v))
        else:
            flat[key] = v
    return flat


@cli.command()
@click.option("--gpu", required=True, help="GPU name or alias (see `kvmodel gpus`), e.g. h200, b200.")
@click.option("--model", "model_name", required=True,
              help="catalog name, alias, unique size ('24b') or path to a Hugging Face config.json.")
@click.option("--ctx", required=True, type=TOKENS, help="tokens already in the cache: 4096, 32k, 128k, 1m.")
@click.option("--batch", default=1, show_default=True, type=POSITIVE_INT, help="sequences decoded together.")
@click.option("--kv", default="int4", show_default=True,
              help="KV format: fp16, fp8, int8, int4, kNvM (k8v4, k16v4, ...) or 'recommended' (with --sensitivity).")
@click.option("--k-bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "16"]), default=None,
              help="override key bits.")
@click.option("--v-bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "16"]), default=None,
              help="override value bits.")
@click.option("--group", default=32, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="channels per quantization scale.")
@click.option("--asym", is_flag=True, help="asymmetric quantization (scale + zero per group).")
@click.option("--weights", "weights_dtype", default="bf16", show_default=True,
              type=click.Choice(sorted(WEIGHT_DTYPES)), help="weight storage dtype.")
@click.option("--gen", default=1, show_default=True, type=POSITIVE_INT,
              help="tokens generated (for the reread sum over a generation).")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="calibration YAML to use instead of the shipped one for this GPU.")
@click.option("--runtime", default="kvmodel-graph", show_default=True,
              type=click.Choice(["kvmodel-graph", "hf-eager", "hf-static-graph"]),
              help="which runtime's calibration to use: our graph-captured step, or Hugging Face transformers' "
                   "eager / static-cache CUDA-graph decode.")
@click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
              help="JSON from `kvmodel classify --out` (for --kv recommended).")
@click.option("--tp", default=1, show_default=True, type=POSITIVE_INT,
              help="tensor-parallel degree N (GPUs joined by the GPU's catalog gpu_link; memory then per GPU).")
@click.option("--json", "as_json", is_flag=True, help="print the full prediction as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="print one flattened CSV row with a header.")
def predict(gpu, model_name, ctx, batch, kv, k_bits, v_bits, group, asym, weights_dtype, gen,
            calibration_file, runtime, sensitivity, tp, as_json, as_csv):
    """Predict decode throughput, traffic and memory for one GPU x model x context x batch x KV format.

    Example: kvmodel predict --gpu b200 --model 24b --ctx 128k --batch 8 --kv int4
    """
    from kvmodel.predict import predict as run_predict

    g = _gpu(gpu)
    m = _model(model_name)
    fmt = _kv_format(kv, None if k_bits is None else int(k_bits), None if v_bits is None else int(v_bits),
                     int(group), asym, sensitivity)
    wl = Workload(batch=batch, context_tokens=ctx, kv=fmt, weight_bytes_per_param=WEIGHT_DTYPES[weights_dtype],
                  gen_tokens=gen)
    cal = _calibration_for(g, calibration_file, runtime)
    try:
        p = run_predict(g, m, wl, calibration=cal) if tp == 1 else run_predict(g, m, wl, calibration=cal, tp=tp)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        click.echo(json.dumps(p.model_dump(), indent=2))
    elif as_csv:
        flat = _flatten(p.model_dump())
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=list(flat))
        wr.writeheader()
        wr.writerow(flat)
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(render_prediction(p), nl=False)


# ----------------------------------------------------------------------------------------------------------------
# catalogs and formulas
# ----------------------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the catalog as JSON.")
def gpus(as_json):
    """List the GPU catalog (datasheet values; calibrations where measured)."""
    from kvmodel.calibration import find_calibration

    rows = []
    for g in catalog().gpus.values():
        d = g.model_dump()
        d["calibrated"] = find_calibration(g.name) is not None
        rows.append(d)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    w = max(len(d["name"]) for d in rows) + 2
    aw = max(len(", ".join(d["aliases"][:3])) for d in rows) + 2
    click.echo(f"{'name':<{w}}{'aliases':<{aw}}{'mem GiB':>8}{'GB/s':>8}{'FP16 TF':>9}{'SMs':>5}  calibrated")
    for d in rows:
        click.echo(f"{d['name']:<{w}}{', '.join(d['aliases'][:3]):<{aw}}{d['memory_capacity_GiB']:>8g}"
                   f"{d['memory_bandwidth_GBps']:>8g}{d['fp16_dense_TFLOPS']:>9g}{d['sm_count']:>5}  "
                   f"{'yes' if d['calibrated'] else 'no'}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the catalog as JSON (with parameter breakdowns).")
def models(as_json):
    """List the model catalog (architectures; parameter counts computed from them)."""
    from kvmodel.architecture import param_breakdown

    rows = []
    for m in catalog().models.values():
        d = m.model_dump()
        d["params"] = param_breakdown(m).as_dict()
        rows.append(d)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<30}{'params':>9}{'L':>4}{'Hq':>5}{'Hkv':>5}{'d':>5}  notes")
    for d in rows:
        tag = []
        if d["moe"]:
            tag.append(f"MoE {d['moe']['num_experts']}x top-{d['moe']['top_k']}")
        if d["mla"]:
            tag.append("MLA")
        if d["sliding_window"]:
            tag.append(f"window {d['sliding_window']['window_tokens']}")
        if d["synthetic"]:
            tag.append("synthetic")
        click.echo(f"{d['name']:<30}{d['params']['total'] / 1e9:>8.2f}B{d['num_layers']:>4}{d['num_heads']:>5}"
                   f"{d['num_kv_heads']:>5}{d['head_dim']:>5}  {', '.join(tag)}")


@cli.command()
@click.argument("term", required=False)
@click.option("--latex", is_flag=True, help="print LaTeX instead of plain text.")
@click.option("--json", "as_json", is_flag=True, help="print name, unit, doc, text and LaTeX as JSON.")
def explain(term, latex, as_json):
    """Print the model's formulas (all, or the one named TERM), as text or LaTeX."""
    import sympy as sp

    from kvmodel import symbolic as S

    if term:
        try:
            forms = [S.formula(term)]
        except KeyError as e:
            raise click.UsageError(str(e.args[0])) from None
    else:
        forms = list(S.FORMULAS.values())
    if as_json:
        click.echo(json.dumps([{"name": f.name, "unit": f.unit, "doc": f.doc, "text": sp.sstr(f.expr),
                                "latex": sp.latex(f.expr)} for f in forms], indent=2))
        return
    for f in forms:
        body = sp.latex(f.expr) if latex else sp.sstr(f.expr)
        click.echo(f"{f.name} [{f.unit}]\n  {f.doc}\n  = {body}\n")


def main(argv=None):
    """Console entry point."""
    return cli.main(args=argv, prog_name="kvmodel")


# Commands defined in their own modules (each imports heavy dependencies lazily, inside the command).
from kvmodel import cli_calibrate, cli_sensitivity, cli_studies, validation_cli  # noqa: E402

for _module in (cli_calibrate, cli_sensitivity, cli_studies, validation_cli):
    for _cmd in _module.COMMANDS:
        cli.add_command(_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
