"""`kvmodel calibrate`: measure this GPU and fit the bandwidth curves `kvmodel predict` uses.

torch and the measurement code are imported inside the command, so the CLI works without them; no GPU, no
torch, or a GPU the catalog does not know ends with a clear message and a non-zero exit code.
"""

from __future__ import annotations

from pathlib import Path

import click


def _default_calibrations_dir() -> Path:
    from kvmodel.calibration import _package_calibrations_dir

    return _package_calibrations_dir()


@click.command("calibrate")
@click.option("--quick", "mode", flag_value="quick", help="a few minutes: probes, a small attention grid, 2 models.")
@click.option("--full", "mode", flag_value="full", default=True,
              help="[default] probes, the attention grid, 4 reference models over batch x context, HF runtimes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="calibration-run", show_default=True,
              help="folder for the raw measurement CSVs (rows are appended as they are measured).")
@click.option("--resume", is_flag=True, help="measure only what is missing from --out (after an interruption).")
@click.option("--calibrations", "cal_dir", type=click.Path(file_okay=False), default=None,
              help="where to write <gpu>-<runtime>.yaml (default: the installed package's hardware/calibrations).")
@click.option("--gpu", default=None, help="catalog GPU to file the calibration under, if the device name is unknown.")
@click.option("--models", default=None, help="comma-separated catalog models for the end-to-end steps.")
@click.option("--hf/--no-hf", "hf", default=None, help="also measure Hugging Face transformers' decode runtimes.")
@click.option("--budget-s", type=click.FloatRange(min=1), default=None,
              help="stop measuring cleanly after this many seconds; --resume completes it later.")
@click.option("--fit-only", "fit_only", type=click.Path(exists=True, file_okay=False), default=None,
              help="no measurement: fit calibrations from the CSVs in this folder (works without a GPU).")
@click.option("--attention-csv", "attention_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --fit-only: the decode-attention grid to fit (default: FOLDER/decode_attention.csv), "
                   "e.g. a grid measured in a separate run on the same GPU.")
def calibrate(mode, out_dir, resume, cal_dir, gpu, models, hf, budget_s, fit_only, attention_csv):
    """Measure this GPU (bandwidth probes, decode attention, end-to-end decode steps) and fit a calibration.

    Writes the raw CSVs (with provenance) under --out and one calibration YAML per runtime measured, which
    `kvmodel predict --gpu ...` then uses automatically (it names the calibration in its output).
    """
    from kvmodel import calibration as cal

    target = Path(cal_dir) if cal_dir else _default_calibrations_dir()
    if attention_csv and not fit_only:
        raise click.UsageError("--attention-csv goes with --fit-only (a measuring run writes its own grid)")
    if fit_only:
        command = f"kvmodel calibrate --fit-only {fit_only}" + (f" --attention-csv {attention_csv}"
                                                                 if attention_csv else "")
        try:
            written = cal.fit_all(fit_only, target, gpu=gpu, attention_csv=attention_csv, command=command,
                                  log=lambda s: click.echo(s, err=True))
        except (cal.CalibrationDataError, KeyError, ValueError) as e:
            raise click.ClickException(f"cannot fit calibrations from {fit_only}: {e}") from None
        for p in written:
            click.echo(f"wrote {p}")
        return
    try:
        from kvmodel.measure.calibrate_run import CalibrationError, run_calibration
    except ImportError as e:  # torch-free install: the measurement layer needs the `gpu` extra
        err = click.ClickException(f"cannot calibrate: {e}; install the GPU extra: pip install 'kvmodel[gpu]'")
        err.exit_code = 4
        raise err from None
    try:
        result = run_calibration(out_dir, quick=(mode == "quick"), resume=resume,
                                 models=models.split(",") if models else None, calibrations_dir=target, gpu=gpu,
                                 include_hf=hf, budget_s=budget_s)
    except CalibrationError as e:
        err = click.ClickException(str(e))
        err.exit_code = e.exit_code
        raise err from None
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; the rows measured so far are in {out_dir}: rerun with --resume to finish") from None
    for p in result.written:
        click.echo(f"wrote {p}")
    click.echo(f"raw data in {result.out_dir} ({result.seconds:.0f} s)")


COMMANDS = [calibrate]
