"""The CLI: happy paths, JSON/CSV outputs, and every kind of bad input -> exit 2 with a message, no traceback."""

import json

import pytest
from click.testing import CliRunner

from kvmodel.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def _run(*args):
        res = runner.invoke(cli, list(args), catch_exceptions=True)
        assert "Traceback" not in res.output
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise AssertionError(f"unhandled {type(res.exception).__name__}: {res.exception}")
        return res

    return _run


def test_predict_readme_example(run):
    res = run("predict", "--gpu", "b200", "--model", "24b", "--ctx", "128k")
    assert res.exit_code == 0, res.output
    assert "Mistral-Small-3.1-24B on B200" in res.output
    assert "context 131072 tokens" in res.output
    for part in ("weights streamed", "KV read", "fused (P5)", "non-fused (P1)", "max context", "uncalibrated"):
        assert part in res.output


def test_predict_json_has_full_report(run):
    res = run("predict", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "32k", "--batch", "16", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["context_tokens"] == 32768 and d["batch"] == 16
    for key in ("bytes", "kv_fraction", "regime", "fp16", "fused", "non_fused", "memory", "ideal_speedup",
                "arithmetic_intensity_flop_per_byte", "ridge_point_flop_per_byte", "timing"):
        assert key in d
    assert d["fused"]["speedup_vs_fp16"] > 1


def test_predict_csv_is_one_row_with_header(run):
    res = run("predict", "--gpu", "h200", "--model", "qwen2.5-7b", "--ctx", "4096", "--csv")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and "fused.step_time_s" in lines[0]


def test_predict_kv_bit_overrides_and_asym(run):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "8k", "--kv", "int4",
              "--k-bits", "8", "--group", "64", "--asym", "--json")
    d = json.loads(res.output)
    assert d["kv_format"] == "k8v4-g64-asym"


@pytest.mark.parametrize("kv", ["fp16", "fp8", "int8", "int4", "k8v4", "k16v4", "k4v8"])
def test_predict_every_named_format(run, kv):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--kv", kv)
    assert res.exit_code == 0, res.output


def test_predict_from_hf_config_json(run, tmp_path):
    cfg = dict(model_type="llama", vocab_size=32000, hidden_size=2048, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, intermediate_size=5632, tie_word_embeddings=False)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    res = run("predict", "--gpu", "h200", "--model", str(p), "--ctx", "2k", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"]


def test_recommended_kv_from_sensitivity_file(run, tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"recommended_kv": "k8v4", "verdict": "needs higher-precision keys"}))
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--kv", "recommended",
              "--sensitivity", str(f), "--json")
    assert json.loads(res.output)["kv_format"].startswith("k8v4")
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--kv", "recommended")
    assert res.exit_code == 2 and "--sensitivity" in res.output


def test_unknown_gpu_lists_closest(run):
    res = run("predict", "--gpu", "h2000", "--model", "llama-3.1-8b", "--ctx", "1k")
    assert res.exit_code == 2
    assert "unknown GPU 'h2000'" in res.output and "H200" in res.output


def test_unknown_model_lists_closest(run):
    res = run("predict", "--gpu", "h200", "--model", "lama-3.1-8b", "--ctx", "1k")
    assert res.exit_code == 2 and "Llama-3.1-8B" in res.output


def test_ambiguous_size_shorthand_lists_candidates(run):
    res = run("predict", "--gpu", "h200", "--model", "7b", "--ctx", "1k")
    assert res.exit_code == 2
    assert "ambiguous" in res.output and "Qwen2.5-7B" in res.output and "Mistral-7B" in res.output


@pytest.mark.parametrize("ctx", ["0", "-5", "abc", "1.5", "12q", ""])
def test_bad_context_is_a_usage_error(run, ctx):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", ctx)
    assert res.exit_code == 2 and "ctx" in res.output


@pytest.mark.parametrize("batch", ["0", "-1", "x"])
def test_bad_batch_is_a_usage_error(run, batch):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--batch", batch)
    assert res.exit_code == 2 and "batch" in res.output


def test_bad_kv_format_is_a_usage_error(run):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--kv", "int7x")
    assert res.exit_code == 2 and "KV format" in res.output


def test_malformed_config_json_names_the_file(run, tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    res = run("predict", "--gpu", "h200", "--model", str(p), "--ctx", "1k")
    assert res.exit_code == 2 and "config.json" in res.output and "malformed JSON" in res.output


def test_config_json_missing_fields_names_them(run, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"vocab_size": 10}))
    res = run("predict", "--gpu", "h200", "--model", str(p), "--ctx", "1k")
    assert res.exit_code == 2 and "hidden_size" in res.output


def test_config_that_does_not_fit_is_said_plainly(run):
    res = run("predict", "--gpu", "rtx4090", "--model", "llama-3.1-70b", "--ctx", "128k", "--batch", "8")
    assert res.exit_code == 0
    assert "DOES NOT FIT" in res.output and "does not fit: needs" in res.output and "GiB" in res.output


def test_gpus_and_models_list_and_json(run):
    res = run("gpus")
    assert res.exit_code == 0 and "H200" in res.output
    gp = json.loads(run("gpus", "--json").output)
    assert {g["name"] for g in gp} >= {"H200-SXM"}
    ms = json.loads(run("models", "--json").output)
    llama = next(m for m in ms if m["name"] == "Llama-3.1-8B")
    assert llama["params"]["total"] == 8_030_261_248


def test_explain_one_term_text_and_latex(run):
    res = run("explain", "kv_bytes_per_token_layer")
    assert res.exit_code == 0 and "H_kv" in res.output
    res = run("explain", "reread_sum", "--latex")
    assert "\\frac" in res.output or "G_{en}" in res.output
    allf = json.loads(run("explain", "--json").output)
    assert len(allf) > 20 and all("latex" in f for f in allf)


def test_explain_unknown_term_suggests(run):
    res = run("explain", "kv_byte_per_token")
    assert res.exit_code == 2 and "kv_bytes_per_token" in res.output


@pytest.mark.parametrize("patch, field", [({"num_attention_heads": 0}, "num_attention_heads"),
                                          ({"hidden_size": "x"}, "hidden_size"),
                                          ({"num_attention_heads": 4096}, "head_dim"),
                                          ({"sliding_window": 512, "use_sliding_window": True,
                                            "sliding_window_pattern": "x"}, "sliding_window_pattern")])
def test_bad_config_json_values_name_the_field(run, tmp_path, patch, field):
    cfg = {**dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                  intermediate_size=5632), **patch}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    res = run("predict", "--gpu", "h200", "--model", str(p), "--ctx", "1k")
    assert res.exit_code == 2 and f"field '{field}'" in res.output


def test_runtime_typo_and_huge_context_are_usage_errors(run):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "1k", "--runtime", "hf-eagr")
    assert res.exit_code == 2 and "hf-eager" in res.output
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "99999999m")
    assert res.exit_code == 2 and "supported maximum" in res.output


def test_calibrated_runtime_is_named_in_the_output(run):
    res = run("predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "4k", "--runtime", "hf-eager")
    assert res.exit_code == 0 and "calibrated: H200-SXM / hf-eager" in res.output
    res = run("predict", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "4k")
    assert res.exit_code == 0 and "calibrated: H100-SXM / kvmodel-graph" in res.output
    res = run("predict", "--gpu", "b200", "--model", "llama-3.1-8b", "--ctx", "4k")  # no shipped calibration
    assert "uncalibrated" in res.output
