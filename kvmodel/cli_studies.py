"""The what-if commands: ``kvmodel sweep``, ``kvmodel spec``, ``kvmodel tier``, ``kvmodel plan``.

Registered in :mod:`kvmodel.cli` through its ``_OPTIONAL`` list. Heavy modules (pandas, matplotlib, scipy) are
imported inside the commands. Bad input exits with status 2 and one message (click usage errors); no traceback.
"""

from __future__ import annotations

import json
import math
import sys

import click

from kvmodel.specs import LookupFailed, SpecError, get_gpu, get_model, parse_kv_format, parse_tokens

WEIGHT_CHOICES = click.Choice(["fp32", "fp16", "bf16", "fp8", "int8", "int4"])
_W = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


def _calibrations(gpus) -> dict:
    """The shipped (or installed) calibration of each GPU, where one exists: studies use measured curves."""
    from kvmodel.calibration import find_calibration

    found = {}
    for g in gpus:
        cal = find_calibration(g.name)
        if cal is not None:
            found[g.name] = cal
    return found


def _usage(msg: str):
    raise click.UsageError(msg)


def _values(text, tokens: bool, what: str):
    from kvmodel.studies import parse_values

    try:
        return parse_values(text, tokens=tokens)
    except ValueError as e:
        _usage(f"{what}: {e}")


def _single_tokens(text: str, what: str = "--ctx") -> int:
    try:
        return parse_tokens(text)
    except ValueError as e:
        _usage(f"{what}: {e}")


def _kv(text: str, group: int = 32, asym: bool = False):
    try:
        return parse_kv_format(text, group_size=group, asymmetric=asym)
    except ValueError as e:
        _usage(str(e).splitlines()[0])


def _formats(items, group=32, asym=False):
    from kvmodel.studies import parse_formats

    try:
        return parse_formats(list(items), group_size=group, asymmetric=asym)
    except SpecError:
        raise
    except ValueError as e:
        _usage(str(e).splitlines()[0])


def _split(items) -> list[str]:
    out = []
    for it in items:
        out += [p.strip() for p in str(it).split(",") if p.strip()]
    return out


def _dump(obj) -> str:
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    return json.dumps(fix(obj), indent=2)


# ----------------------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--study", "study_file", type=click.Path(dir_okay=False), default=None,
              help="YAML study file (gpus, models, contexts, batches, kv, tp, pipeline, weights, plots); command-line "
                   "options given as well override its keys.")
@click.option("--gpu", "gpus", multiple=True, help="GPU names (repeat or comma-separate); 'all' for the catalog.")
@click.option("--model", "models", multiple=True, help="model names (repeat or comma-separate); 'all' for the catalog.")
@click.option("--ctx", default=None, help="contexts: 1k,4k,32k or 1k:128k:x2 (k = 1024) or 1024:8192:+1024.")
@click.option("--batch", default=None, help="batches: 1,8,64 or 1:128:x2.")
@click.option("--kv", "kvs", multiple=True, help="KV formats (fp16, fp8, int8, int4, kNvM) or policy YAML files.")
@click.option("--tp", default=None, help="tensor-parallel degrees: 1,2,4,8.")
@click.option("--pipeline", default=None, type=click.Choice(["P5", "P1", "P0", "P0-expand", "P1-expand"]),
              help="attention pipeline of the quantized formats [P5: fused].")
@click.option("--weights", "weights_dtype", default=None, type=WEIGHT_CHOICES, help="weight dtype [bf16].")
@click.option("--group", default=32, show_default=True, type=click.Choice(["32", "64", "128"]))
@click.option("--asym", is_flag=True, help="asymmetric quantization (scale + zero).")
@click.option("--out", "out_dir", default="sweep-out", show_default=True, type=click.Path(file_okay=False),
              help="folder for the CSV, Parquet and plots (written atomically).")
@click.option("--name", default=None, help="base name of the table files [the study's name, or 'sweep'].")
@click.option("--plots/--no-plots", default=None, help="write heatmaps, regime map and roofline [on].")
@click.option("--progress/--no-progress", default=None, help="progress bar on stderr [on for large sweeps].")
def sweep(study_file, gpus, models, ctx, batch, kvs, tp, pipeline, weights_dtype, group, asym, out_dir, name, plots,
          progress):
    """Sweep GPUs x models x contexts x batches x KV formats (x TP degrees) -> CSV, Parquet and plots.

    Example: kvmodel sweep --gpu h100,h200 --model llama-3.1-8b --ctx 1k:128k:x2 --batch 1:128:x2 --kv fp16,int4
    """
    from kvmodel.specs import catalog
    from kvmodel.studies import load_study, plot_sweep, resolve_gpus, resolve_models, run_sweep, write_tables

    spec = load_study(study_file) if study_file else None
    g_names = _split(gpus) or (spec.gpus if spec else [])
    m_names = _split(models) or (spec.models if spec else [])
    if not g_names:
        _usage("give --gpu (or a --study file listing gpus)")
    if not m_names:
        _usage("give --model (or a --study file listing models)")
    if ctx is None and not spec:
        _usage("give --ctx (e.g. 1k:128k:x2) or a --study file")
    g_list = list(catalog().gpus.values()) if g_names == ["all"] else resolve_gpus(g_names)
    m_list = list(catalog().models.values()) if m_names == ["all"] else resolve_models(m_names)
    contexts = _values(ctx if ctx is not None else spec.contexts, True, "--ctx")
    batches = _values(batch if batch is not None else (spec.batches if spec else "1"), False, "--batch")
    tps = _values(tp if tp is not None else (spec.tp if spec else "1"), False, "--tp")
    kv_items = list(kvs) or (spec.kv if spec else ["fp16", "int4"])
    g = int(group) if not spec or group != "32" else spec.group_size
    formats = _formats(kv_items, g, asym or (spec.asymmetric if spec else False))
    pipe = pipeline or (spec.pipeline if spec else "P5")
    wd = weights_dtype or (spec.weights if spec else "bf16")
    want_plots = plots if plots is not None else (spec.plots if spec else True)
    base = name or (spec.name if spec else "sweep")
    n = len(g_list) * len(m_list) * len(formats) * len(tps) * len(batches) * len(contexts)
    warnings = []
    df = run_sweep(g_list, m_list, formats, batches, contexts, tps=tps, pipeline=pipe,
                   weight_bytes_per_param=_W[wd], progress=progress, warn=warnings.append,
                   calibrations=_calibrations(g_list))
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    if df.empty:
        raise click.ClickException("no configuration could be evaluated (see the warnings above)")
    files = write_tables(df, out_dir, base)
    if want_plots:
        files += plot_sweep(df, out_dir)
    best = df[df["fits"]].sort_values("tokens_per_s", ascending=False).head(1)
    click.echo(f"{len(df):,} configurations ({n:,} requested) -> {out_dir}")
    for f in files:
        click.echo(f"  {f}")
    if not best.empty:
        r = best.iloc[0]
        click.echo(f"highest aggregate throughput that fits: {r['tokens_per_s']:,.0f} tok/s - {r['model']} on "
                   f"{r['gpu']} (tp {r['tp']}), KV {r['kv']}, batch {r['batch']}, context {r['context']:,}")


# ----------------------------------------------------------------------------------------------------------------
# spec
# ----------------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--gpu", default=None, help="GPU name [a100-80gb with --study].")
@click.option("--model", "model_name", default=None, help="model name.")
@click.option("--ctx", default=None, help="context tokens (4096, 32k).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--kv", default="int4", show_default=True, help="quantized KV format of the combined arm.")
@click.option("--k", "k", default=5, show_default=True, type=click.IntRange(1, 64), help="draft length (tree depth).")
@click.option("--alpha", default=0.8, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="per-token acceptance (FP16 arm).")
@click.option("--alpha-quant", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="acceptance in the quantized-KV arm [= --alpha].")
@click.option("--alpha-table", type=click.Path(dir_okay=False), default=None,
              help="CSV with columns batch,context,alpha[,alpha_quant]: alpha(B, T), interpolated in log B, log T.")
@click.option("--tree-branching", default=1, show_default=True, type=click.IntRange(1, 8),
              help="tree verification: branches per node (1 = linear).")
@click.option("--reread", "eta", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="KV re-read per extra verification query (0: tiles shared by all queries, 1: per query).")
@click.option("--verify-pipeline", default="fused", show_default=True, type=click.Choice(["fused", "buffer"]),
              help="quantized verification: fused, or dequantize to an FP16 buffer first (P1).")
@click.option("--dequant-ops", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="scalar ops per KV element dequantized in verification (CUDA cores).")
@click.option("--draft-cost", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="draft time per drafted token as a fraction of a target step (0: n-gram / prompt lookup).")
@click.option("--weights", "weights_dtype", default="bf16", show_default=True, type=WEIGHT_CHOICES)
@click.option("--study", type=click.Choice(["spev06"]), default=None,
              help="compare the mechanisms with the study's measured composition table (markdown).")
@click.option("--json", "as_json", is_flag=True)
def spec(gpu, model_name, ctx, batch, kv, k, alpha, alpha_quant, alpha_table, tree_branching, eta, verify_pipeline,
         dequant_ops, draft_cost, weights_dtype, study, as_json):
    """Speculative decoding with a quantized KV cache: S_quant, S_spec, S_combined and rho = S_c/(S_q S_s).

    Example: kvmodel spec --gpu a100-80gb --model llama-3.1-8b --ctx 32k --kv fp8 --k 5 --alpha 0.8 --reread 1
    """
    from kvmodel.speculation import (
        AcceptanceTable,
        SpecConfig,
        render_spec,
        render_study,
        speculate,
        study_comparison,
    )

    if study:
        from kvmodel.speculation import render_trend, study_trend

        g = get_gpu(gpu or "a100-80gb")
        rows = study_comparison(g, k=k)
        trend = study_trend(g, batch=batch, k=k)
        if as_json:
            click.echo(_dump({"composition": [r.model_dump() for r in rows],
                              "trend": [r.model_dump() for r in trend]}))
        else:
            click.echo(render_study(rows, g.name), nl=False)
            click.echo(f"\nContext trend at batch {batch}: acceptance fitted at each model's shortest context, then "
                       "held fixed (plain: eta 0; reread: eta 1)\n")
            click.echo(render_trend(trend), nl=False)
        return
    if not gpu or not model_name or not ctx:
        _usage("give --gpu, --model and --ctx (or --study spev06)")
    g = get_gpu(gpu)
    m = get_model(model_name)
    T = _single_tokens(ctx)
    fmt = _kv(kv)
    table = AcceptanceTable.from_csv(alpha_table) if alpha_table else None
    try:
        cfg = SpecConfig(k=k, branching=tree_branching, alpha=alpha, alpha_quant=alpha_quant, eta=eta,
                         verify_pipeline_quant="P1" if verify_pipeline == "buffer" else "P5", dequant_ops=dequant_ops,
                         draft_cost=draft_cost, weight_bytes_per_param=_W[weights_dtype])
        res = speculate(g, m, fmt, batch, T, cfg, acceptance=table, calibration=_calibrations([g]).get(g.name))
    except ValueError as e:
        _usage(str(e).splitlines()[0])
    click.echo(_dump(res.model_dump()) if as_json else render_spec(res), nl=not as_json)


# ----------------------------------------------------------------------------------------------------------------
# tier
# ----------------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--gpu", required=True, help="GPU name.")
@click.option("--model", "model_names", required=True, multiple=True,
              help="model name(s) (repeat or comma-separate; several give one report each, or --summary).")
@click.option("--ctx", required=True, help="context tokens (128k).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--kv", default="fp16", show_default=True, help="KV format.")
@click.option("--target-ms", default=10.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="target step time, milliseconds.")
@click.option("--access", default="dense", show_default=True,
              help="dense | window:W (e.g. window:4k) | topk:NxB (MoBA: N blocks of B tokens).")
@click.option("--layers-in-tier", default=None, type=click.FloatRange(0, 1),
              help="fraction of layers whose KV lives in the tier [fewest whole layers that fit HBM].")
@click.option("--link", "links", multiple=True, help="interconnects to report [every one in the catalog].")
@click.option("--weights", "weights_dtype", default="bf16", show_default=True, type=WEIGHT_CHOICES)
@click.option("--summary", is_flag=True, help="one table row per model x placement: bytes, GB/s, shortfall per link.")
@click.option("--json", "as_json", is_flag=True, help="full report as JSON (key required_GBps per scenario).")
def tier(gpu, model_names, ctx, batch, kv, target_ms, access, layers_in_tier, links, weights_dtype, summary,
         as_json):
    """KV bytes a second memory tier must supply per step, the bandwidth needed, and every link's shortfall.

    Example: kvmodel tier --gpu h100 --model llama-3.1-8b --ctx 128k --batch 1 --kv fp16 --target-ms 10
    """
    from kvmodel.tiering import interconnects, parse_access, render_tier, tier_report

    g = get_gpu(gpu)
    ms = [get_model(n) for n in _split(model_names)]
    T = _single_tokens(ctx)
    fmt = _kv(kv)
    try:
        acc = parse_access(access)
    except ValueError as e:
        _usage(str(e))
    lks = interconnects(_split(links)) if links else None
    reports = []
    for m in ms:
        try:
            reports.append(tier_report(g, m, fmt, T, batch, target_ms / 1e3, access=acc, layers_in_tier=layers_in_tier,
                                       links=lks, weight_bytes_per_param=_W[weights_dtype],
                                       calibration=_calibrations([g]).get(g.name)))
        except ValueError as e:
            _usage(str(e).splitlines()[0])
    if as_json:
        out = [r.model_dump() for r in reports]
        click.echo(_dump(out[0] if len(out) == 1 else out))
    elif summary:
        r0 = reports[0]
        names = [lk.name for lk in r0.scenarios[0].links]
        click.echo(f"KV tiering on {r0.gpu}: context {T:,}, batch {batch}, KV {r0.kv_format}, access {r0.access}, "
                   f"target {target_ms:g} ms; shortfall = required / link bandwidth (overlapped prefetch)")
        click.echo("| model | placement | tier GB/step | required GB/s | " + " | ".join(names) + " |")
        click.echo("|---|---|---:|---:|" + "---:|" * len(names))
        for r in reports:
            for sc in r.scenarios:
                cells = " | ".join(f"{lk.shortfall:,.1f}x" for lk in sc.links)
                click.echo(f"| {r.model} | {sc.placement} | {sc.tier_bytes_per_step / 1e9:,.2f} | "
                           f"{sc.required_GBps:,.0f} | {cells} |")
    else:
        click.echo("\n".join(render_tier(r) for r in reports), nl=False)


# ----------------------------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--model", "model_name", required=True, help="model name.")
@click.option("--ctx", required=True, help="context tokens per sequence (32k).")
@click.option("--step-ms", default=None, type=click.FloatRange(0, min_open=True), help="SLO: max ms per step.")
@click.option("--user-tps", default=None, type=click.FloatRange(0, min_open=True),
              help="SLO: min tokens/s per user (sequence).")
@click.option("--aggregate-tps", default=None, type=click.FloatRange(0, min_open=True),
              help="SLO: min aggregate tokens/s per replica (one GPU or TP group).")
@click.option("--gpu", "gpus", multiple=True, help="GPUs to consider [the whole catalog].")
@click.option("--kv", "kvs", multiple=True, help="KV formats or policy YAMLs [fp16,fp8,int8,k8v4,int4].")
@click.option("--batch", default="1:512:x2", show_default=True, help="batches to consider.")
@click.option("--tp", default="1,2,4,8", show_default=True, help="tensor-parallel degrees to consider.")
@click.option("--price", "prices", multiple=True, help="dollars per GPU-hour, e.g. --price h100=2.5 --price b200=6.")
@click.option("--weights", "weights_dtype", default="bf16", show_default=True, type=WEIGHT_CHOICES)
@click.option("--all", "show_all", is_flag=True, help="list every failing option with its reason.")
@click.option("--json", "as_json", is_flag=True)
def plan(model_name, ctx, step_ms, user_tps, aggregate_tps, gpus, kvs, batch, tp, prices, weights_dtype, show_all,
         as_json):
    """Capacity planning: GPU x TP x batch x KV format options that meet an SLO, cheapest first when priced.

    Example: kvmodel plan --model llama-3.1-70b --ctx 32k --user-tps 20 --price h100=2.5 --price h200=3.5
    """
    from kvmodel.specs import catalog
    from kvmodel.studies import SLO, parse_prices, resolve_gpus
    from kvmodel.studies import plan as run_plan

    m = get_model(model_name)
    T = _single_tokens(ctx)
    slo = SLO(step_time_s=step_ms / 1e3 if step_ms else None, tokens_per_s_per_user=user_tps,
              aggregate_tokens_per_s=aggregate_tps)
    g_list = resolve_gpus(_split(gpus)) if gpus else list(catalog().gpus.values())
    formats = _formats(list(kvs) or ["fp16,fp8,int8,k8v4,int4"])
    batches = _values(batch, False, "--batch")
    tps = _values(tp, False, "--tp")
    try:
        price_map = parse_prices(list(prices))
    except ValueError as e:
        _usage(str(e))
    meet, fail = run_plan(m, T, slo, g_list, formats, batches, tps, price_map, _W[weights_dtype],
                          calibrations=_calibrations(g_list))
    if as_json:
        click.echo(_dump({"model": m.name, "context_tokens": T, "slo": slo.model_dump(),
                          "meets": [o.model_dump() for o in meet], "fails": [o.model_dump() for o in fail]}))
        return
    click.echo(f"Plan for {m.name} at context {T:,}; SLO: {slo.describe()}")
    if meet:
        priced = any(o.cost_per_million_tokens is not None for o in meet)
        click.echo(f"{len(meet)} option(s) meet it (largest batch per GPU x TP x KV; "
                   f"{'cheapest per token first' if priced else 'most tokens/s per GPU first'}):")
        click.echo(f"  {'gpu':<14}{'tp':>3} {'kv':<16}{'batch':>6}{'step ms':>9}{'tok/s':>10}{'tok/s/user':>11}"
                   f"{'GiB/GPU':>9}  {'$/Mtok':>8}")
        for o in meet:
            cost = f"{o.cost_per_million_tokens:8.3f}" if o.cost_per_million_tokens is not None else "       -"
            click.echo(f"  {o.gpu:<14}{o.tp:>3} {o.kv:<16}{o.batch:>6}{o.step_time_s * 1e3:>9.2f}{o.tokens_per_s:>10,.0f}"
                       f"{o.tokens_per_s_per_user:>11.1f}{o.footprint_per_gpu_GiB:>9.1f}  {cost}")
    else:
        click.echo("no option meets it.")
    shown = fail if show_all else fail[:25]
    if shown:
        click.echo(f"{len(fail)} option(s) fail{'' if show_all or len(fail) <= 25 else ' (first 25; --all for every one)'}:")
        for o in shown:
            b = f"batch {o.batch}" if o.batch else "-"
            click.echo(f"  {o.gpu:<14} tp {o.tp:<2} {o.kv:<16} {b:<10} {o.reason}")


COMMANDS = [sweep, spec, tier, plan]

__all__ = ["COMMANDS", "LookupFailed", "plan", "spec", "sweep", "sys", "tier"]
