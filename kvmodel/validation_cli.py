"""`kvmodel validate` and `kvmodel fit-hill`: predictions held to measurements (imports heavy modules lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("fit-hill")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--min-batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="drop configurations with batch below this.")
@click.option("--baseline", default="P0", show_default=True, help="pipeline in the numerator (its time).")
@click.option("--candidate", default="P5", show_default=True, help="pipeline in the denominator.")
@click.option("--mode", default="decode", show_default=True,
              help="decode or prefill (files with a 'mode' column, e.g. the study's).")
@click.option("--kv", default=None, help="candidate K/V format in files with k_bits/v_bits columns (default int4).")
@click.option("--filter", "filters", multiple=True, metavar="COLUMN=VALUE",
              help="keep only candidate rows with COLUMN=VALUE (repeatable), e.g. num_splits=1.")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(min=0),
              help="confidence intervals from N bootstrap resamples instead of the covariance.")
@click.option("--json", "as_json", is_flag=True, help="print the fit as JSON.")
def fit_hill_cmd(file, min_batch, baseline, candidate, mode, kv, filters, bootstrap, as_json):
    """Fit S(B) = Smax*B^gamma/(B_half^gamma + B^gamma) to speedups in a results FILE.

    S = baseline median time / candidate median time for every configuration present in both. FILE is the
    study's summary CSV (config, mode, T_kv, B, pipeline, median_ms) or a kvmodel results file
    (pipeline, B, T, Hq, Hkv, d, k_bits, v_bits, ..., median_s).

    Example: kvmodel fit-hill validation/data/knlp-v40-h100/bench_results_summary.csv --min-batch 4
    """
    from kvmodel.hill import fit_file

    try:
        fit, sp = fit_file(file, baseline=baseline, candidate=candidate, mode=mode, min_batch=min_batch, kv=kv,
                           filters=filters, bootstrap=bootstrap)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        d = fit.to_dict()
        d.update(baseline=baseline, candidate=candidate, mode=mode, min_batch=min_batch, file=str(file))
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"Hill fit of {baseline}/{candidate} speedup ({mode}, B >= {min_batch}) on {file}")
    click.echo(f"  n = {fit.n} configurations, R2 = {fit.R2:.3f}, RMSE = {fit.rmse:.3f}")
    for p in ("Smax", "B_half", "gamma"):
        lo, hi = fit.ci95[p]
        click.echo(f"  {p:<7}= {getattr(fit, p):8.3f}   95% CI [{lo:.3f}, {hi:.3f}]")
    click.echo(f"  (CIs: {fit.ci_method})")


@click.command("validate")
@click.option("--out", "out_dir", default="validation/report", show_default=True, type=click.Path(file_okay=False),
              help="folder for REPORT.md, summary.json and the plots.")
@click.option("--rerun-peers", is_flag=True,
              help="re-run the peer tools (llm-analysis, GenZ) in an isolated venv (needs PyPI) and rewrite "
                   "their committed predictions.")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots (faster).")
@click.option("--quiet", is_flag=True, help="print only the summary path.")
def validate_cmd(out_dir, rerun_peers, no_plots, quiet):
    """Hold predictions to measurements: H100 study sweep, Hill law, published tables, peers, H200 held-out.

    Runs from committed data only (no GPU, no network unless --rerun-peers); writes REPORT.md, summary.json and
    PNG plots into --out, each file atomically.
    """
    from kvmodel.validation.report import run_validation

    summary = run_validation(Path(out_dir), rerun_peers=rerun_peers, plots=not no_plots,
                             log=(lambda m: None) if quiet else click.echo)
    if quiet:
        click.echo(str(Path(out_dir) / "summary.json"))
    else:
        keys = ("attention_median_abs_pct_error", "attention_max_abs_pct_error", "e2e_median_abs_pct_error")
        for k in keys:
            click.echo(f"{k}: {summary.get(k)}")
        click.echo(f"wrote {Path(out_dir) / 'REPORT.md'}")


COMMANDS = [fit_hill_cmd, validate_cmd]
