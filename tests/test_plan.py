"""Capacity planning: options that meet an SLO, ranking by cost per million tokens, the reason every other option
fails (memory, bandwidth, compute, no GPU link), tensor parallelism in plans, and `kvmodel plan`."""

import json

import pytest
from click.testing import CliRunner

from kvmodel.cli import cli
from kvmodel.predict import predict
from kvmodel.specs import Workload, get_gpu, get_model, parse_kv_format
from kvmodel.studies import SLO, parse_formats, parse_prices, plan

H100 = get_gpu("h100")
H200 = get_gpu("h200")
L40S = get_gpu("l40s")
LLAMA = get_model("llama-3.1-8b")
LLAMA70 = get_model("llama-3.1-70b")
FMTS = parse_formats(["fp16,int4"])
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_meeting_options_really_meet_and_are_the_largest_batch():
    slo = SLO(step_time_s=0.020)
    meet, fail = plan(LLAMA, 8192, slo, [H100, H200], FMTS, BATCHES)
    assert meet
    for o in meet:
        assert o.meets and o.step_time_s <= 0.020
        p = predict(get_gpu(o.gpu), LLAMA, Workload(batch=o.batch, context_tokens=8192,
                                                    kv=parse_kv_format(o.kv.split("-")[0])))
        assert o.step_time_s == pytest.approx(p.fused.step_time_s, rel=1e-9)
        nxt = [b for b in BATCHES if b > o.batch]
        if nxt:  # the next batch breaks the SLO or memory
            more, _ = plan(LLAMA, 8192, slo, [get_gpu(o.gpu)], parse_formats([o.kv.split("-")[0]]), [nxt[0]])
            assert not more


def test_ranked_by_cost_per_million_tokens():
    prices = parse_prices(["h100=2.5", "h200=3.5"])
    meet, _ = plan(LLAMA, 8192, SLO(tokens_per_s_per_user=30), [H100, H200], FMTS, BATCHES, prices=prices)
    costs = [o.cost_per_million_tokens for o in meet]
    assert costs == sorted(costs) and all(c > 0 for c in costs)
    o = meet[0]
    assert o.cost_per_million_tokens == pytest.approx(o.price_per_gpu_hour * o.tp / 3600 / o.tokens_per_s * 1e6)


def test_failure_reasons_memory_bandwidth_and_no_link():
    # 70B at 128K: FP16 weights alone (141 GB) exceed one H100; an SLO of 5 ms cannot be met by streaming
    meet, fail = plan(LLAMA70, 131072, SLO(step_time_s=0.005), [H100, L40S], FMTS, [1, 8], tps=(1, 2))
    assert not meet
    reasons = {(o.gpu, o.tp, o.kv): o.reason for o in fail}
    assert reasons[("H100-SXM", 1, "fp16")].startswith("memory:")
    assert "GiB per GPU" in reasons[("H100-SXM", 1, "fp16")]
    assert "no GPU-GPU link" in reasons[("L40S", 2, "int4-g32")]
    assert any(r.startswith("bandwidth:") or "bandwidth:" in r for r in reasons.values())


def test_compute_bound_reason_at_huge_batch():
    slo = SLO(step_time_s=0.001)
    _, fail = plan(get_model("qwen2.5-0.5b"), 256, slo, [H100], parse_formats(["int4"]), [4096])
    assert fail[0].bound == "compute" and fail[0].reason.startswith("compute:")


def test_tp_lets_a_big_model_meet_a_latency_slo():
    slo = SLO(tokens_per_s_per_user=25)
    meet1, _ = plan(LLAMA70, 32768, slo, [H100], FMTS, BATCHES, tps=(1,))
    meet4, _ = plan(LLAMA70, 32768, slo, [H100], FMTS, BATCHES, tps=(1, 4))
    assert not meet1 and any(o.tp == 4 for o in meet4)


def test_aggregate_throughput_slo():
    meet, fail = plan(LLAMA, 4096, SLO(aggregate_tokens_per_s=2000), [H100], FMTS, BATCHES)
    assert all(o.tokens_per_s >= 2000 for o in meet)
    small, _ = plan(LLAMA, 4096, SLO(aggregate_tokens_per_s=2000), [H100], FMTS, [1])
    assert not small


def test_plan_command_text_and_json():
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32k", "--user-tps", "40", "--gpu", "h100,h200,l40s",
            "--kv", "fp16,int4", "--tp", "1,2", "--price", "h100=2.5", "--price", "h200=3.5")
    assert r.exit_code == 0, r.output
    assert "meet it" in r.output and "$/Mtok" in r.output and "no GPU-GPU link" in r.output
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32k", "--step-ms", "15", "--gpu", "h100", "--kv", "int4",
            "--tp", "1", "--json")
    d = json.loads(r.output)
    assert d["slo"]["step_time_s"] == 0.015 and d["meets"] and all(o["meets"] for o in d["meets"])


@pytest.mark.parametrize("args,msg", [
    (["--price", "h100"], "GPU=DOLLARS"),
    (["--price", "h100=cheap"], "not a number"),
    (["--price", "h100=-1"], "positive"),
    (["--price", "warp9=2"], "unknown GPU"),
    (["--step-ms", "0"], "--step-ms"),
    (["--batch", "0"], "--batch"),
    (["--tp", "1,x"], "--tp"),
    (["--kv", "int3x"], "KV format"),
    (["--gpu", "nope"], "unknown GPU"),
])
def test_plan_bad_inputs_exit_2(args, msg):
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32k", "--user-tps", "20", *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output


def test_plan_missing_model_and_ctx():
    r = run("plan", "--ctx", "32k")
    assert r.exit_code == 2 and "--model" in r.output
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32q")
    assert r.exit_code == 2 and "--ctx" in r.output
