"""The spec catalogs: every shipped YAML loads, parameter counts equal the published figures, lookups behave.

Expected values here are written out independently of the YAML files (datasheet figures, publishers' parameter
counts), so a wrong entry in a catalog file fails a test rather than confirming itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvmodel import specs
from kvmodel.architecture import param_breakdown, weight_calls
from kvmodel.specs import (
    GPUSpec,
    Interconnect,
    LookupFailed,
    ModelSpec,
    SpecError,
    catalog,
    get_gpu,
    get_interconnect,
    get_model,
    load_yaml_spec,
    model_from_hf_config,
)

REPO = Path(__file__).resolve().parents[1]
HW_DIR = REPO / "hardware"
MODEL_DIR = REPO / "kvmodel" / "models"
INTERCONNECT_FILE = HW_DIR / "interconnects.yaml"
GPU_FILES = sorted(p for p in HW_DIR.glob("*.yaml") if p.name != "interconnects.yaml")
MODEL_FILES = sorted(MODEL_DIR.glob("*.yaml"))


def _ids(paths):
    return [p.name for p in paths]


def _norm(name: str) -> str:
    return specs._normalize(name)


# ----------------------------------------------------------------------------------------------------------------
# Every shipped file loads
# ----------------------------------------------------------------------------------------------------------------


def test_catalog_is_not_empty_and_matches_the_files():
    assert len(GPU_FILES) >= 10 and len(MODEL_FILES) >= 21
    cat = catalog()
    # one catalog entry per file: a duplicated name in two files would collapse here
    assert sorted(cat.gpus) == sorted(load_yaml_spec(p, GPUSpec).name for p in GPU_FILES)
    assert sorted(cat.models) == sorted(load_yaml_spec(p, ModelSpec).name for p in MODEL_FILES)


@pytest.mark.parametrize("path", GPU_FILES, ids=_ids(GPU_FILES))
def test_gpu_yaml_loads_with_a_source_for_every_value(path):
    g = load_yaml_spec(path, GPUSpec)
    given = [
        f
        for f in ("memory_capacity_GiB", "memory_bandwidth_GBps", "fp16_dense_TFLOPS", "int8_dense_TOPS",
                  "fp8_dense_TFLOPS", "sm_count", "l2_cache_MiB", "host_link", "gpu_link", "tdp_W")
        if getattr(g, f) is not None
    ]
    missing = [f for f in given if not g.sources.get(f, "").strip()]
    assert not missing, f"{path.name}: no source for {missing}"
    # plausibility: an FP16 ridge point between 50 and 1000 FLOP/byte (a sparse figure or a unit slip breaks it)
    assert 50 < g.ridge_flop_per_byte < 1000, g.ridge_flop_per_byte
    if g.fp8_dense_TFLOPS is not None:
        assert g.fp8_dense_TFLOPS >= g.fp16_dense_TFLOPS


# Datasheet figures, typed in from the vendors' documents: (capacity GB, bandwidth GB/s, dense FP16 TFLOPS,
# SMs/CUs, TDP W, has FP8).
DATASHEET = {
    "h100": (80, 3350, 989.5, 132, 700, True),
    "h100-pcie": (80, 2000, 756.5, 114, 350, True),
    "h200": (141, 4800, 989.5, 132, 700, True),
    "a100": (80, 2039, 312, 108, 400, False),
    "a100-40gb": (40, 1555, 312, 108, 400, False),
    "b200": (180, 8000, 2250, 148, 1000, True),
    "l40s": (48, 864, 362.05, 142, 350, True),
    "4090": (24, 1008, 165.2, 128, 450, True),
    "mi300x": (192, 5300, 1307.4, 304, 750, True),
    "w7900": (48, 864, 122.64, 96, 295, False),
}


@pytest.mark.parametrize("alias", sorted(DATASHEET))
def test_gpu_values_match_datasheets(alias):
    cap, bw, fp16, sms, tdp, fp8 = DATASHEET[alias]
    g = get_gpu(alias)
    assert g.memory_capacity_GiB == cap
    assert g.memory_bandwidth_GBps == bw
    assert g.fp16_dense_TFLOPS == pytest.approx(fp16)
    assert g.sm_count == sms
    assert g.tdp_W == tdp
    assert (g.fp8_dense_TFLOPS is not None) == fp8


def test_gpu_aliases_resolve_to_the_intended_part():
    assert get_gpu("h100").name == get_gpu("h100-sxm").name == "H100-SXM"
    assert get_gpu("h100-pcie").name == "H100-PCIe"
    assert get_gpu("a100").name == get_gpu("a100-80gb").name == "A100-SXM4-80GB"
    assert get_gpu("a100-40gb").name == "A100-SXM4-40GB"
    assert get_gpu("rtx4090").name == get_gpu("4090").name
    assert get_gpu("MI300X").vendor == "AMD" and get_gpu("w7900").vendor == "AMD"
    # AMD cache field is the Infinity Cache (last level), not the small L2
    assert get_gpu("mi300x").l2_cache_MiB == 256 and get_gpu("w7900").l2_cache_MiB == 96


def test_interconnect_file_loads():
    raw = yaml.safe_load(INTERCONNECT_FILE.read_text())
    links = [Interconnect.model_validate(item) for item in raw["interconnects"]]
    names = [link.name for link in links]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(catalog().interconnects)
    for link in links:
        assert link.source.strip(), link.name


# Per-direction bandwidth (GB/s), kind, and a latency range (s), written from the specifications.
LINKS = {
    "nvlink3": (300, "gpu-gpu", (1e-7, 1e-5)),
    "nvlink4": (450, "gpu-gpu", (1e-7, 1e-5)),
    "nvlink5": (900, "gpu-gpu", (1e-7, 1e-5)),
    "pcie4": (31.5, "host", (1e-7, 1e-5)),
    "pcie5": (63.0, "host", (1e-7, 1e-5)),
    "pcie6": (121.0, "host", (1e-7, 1e-5)),
    "cxl2": (63.0, "memory", (5e-8, 2e-6)),
    "cxl3": (121.0, "memory", (5e-8, 2e-6)),
    "ib-ndr": (50.0, "fabric", (1e-7, 1e-5)),
    "nvme": (14.0, "storage", (1e-5, 1e-3)),
    "ddr5": (307.2, "memory", (3e-8, 3e-7)),
    "xgmi": (448, "gpu-gpu", (1e-7, 1e-5)),
}


@pytest.mark.parametrize("alias", sorted(LINKS))
def test_interconnect_values(alias):
    bw, kind, (lo, hi) = LINKS[alias]
    link = get_interconnect(alias)
    assert link.bandwidth_per_direction_GBps == pytest.approx(bw, rel=0.01)
    assert link.kind == kind
    assert lo <= link.latency_s <= hi


def test_every_gpu_link_exists_in_the_interconnect_catalog():
    inter = catalog().interconnects
    for g in catalog().gpus.values():
        assert g.host_link in inter, (g.name, g.host_link)
        assert inter[g.host_link].kind == "host"
        if g.gpu_link is not None:
            assert g.gpu_link in inter, (g.name, g.gpu_link)
            assert inter[g.gpu_link].kind == "gpu-gpu"
    assert get_gpu("4090").gpu_link is None and get_gpu("l40s").gpu_link is None
    assert get_gpu("a100").gpu_link == "NVLink-3" and get_gpu("b200").gpu_link == "NVLink-5"


@pytest.mark.parametrize("path", MODEL_FILES, ids=_ids(MODEL_FILES))
def test_model_yaml_loads(path):
    m = load_yaml_spec(path, ModelSpec)
    assert m.published_params_source.strip()
    if m.synthetic:
        assert "NOT a published figure" in m.published_params_source
        assert len(m.notes) > 200, "a synthetic stand-in must explain its approximation"
    if m.extra_params:
        assert len(m.extra_params_note) > 40, "extra_params needs a note saying what they are"


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_FILES, ids=_ids(MODEL_FILES))
def test_param_count_equals_published(path):
    m = load_yaml_spec(path, ModelSpec)
    assert param_breakdown(m).total == m.published_params


# Publishers' counts (safetensors totals), typed in independently of the YAML files.
PUBLISHED = {
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-32B": 32_763_876_352,
    "Qwen2.5-72B": 72_706_203_648,
    "DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,
    "Qwen3-8B": 8_190_735_360,
    "Mistral-7B-v0.3": 7_248_023_552,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Mixtral-8x7B": 46_702_792_704,
    "Phi-4-14B": 14_659_507_200,
    "Gemma-2-27B": 27_227_128_320,
    "Gemma-3-4B": 4_300_079_472,
    "Gemma-3-12B": 12_187_325_040,
    "Gemma-3n-E4B": 7_849_978_192,
    "Mistral-Small-3.1-24B": 24_011_361_280,
    "Yi-1.5-34B": 34_388_917_248,
    "DeepSeek-V3-671B": 684_531_386_000,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_famous_counts_match_the_publishers(name):
    m = get_model(name)
    assert m.published_params == PUBLISHED[name]
    assert param_breakdown(m).total == PUBLISHED[name]


def test_every_real_model_has_an_independent_literal():
    real = {n for n, m in catalog().models.items() if not m.synthetic}
    assert real <= set(PUBLISHED), real - set(PUBLISHED)


def test_text_decoder_counts_of_multimodal_checkpoints():
    # the vision/audio towers sit in extra_params; the text decoder alone has these many parameters
    text = {
        "Gemma-3-4B": 3_880_263_168,
        "Gemma-3-12B": 11_766_034_176,
        "Mistral-Small-3.1-24B": 23_572_403_200,
        "Gemma-3n-E4B": 6_835_235_568,
    }
    for name, n in text.items():
        b = param_breakdown(get_model(name))
        assert b.total - b.extra == n, name


def test_deepseek_v3_main_model_is_671b_and_37b_active():
    m = get_model("deepseek-v3")
    b = param_breakdown(m)
    assert b.total - b.extra == 671_026_419_200  # the paper's "671B"; extra = MTP module + FP8 block scales
    assert m.extra_params == 13_463_426_304 + 41_540_496
    assert (b.num_experts, b.num_moe_layers, b.expert_each) == (256, 58, 3 * 7168 * 2048)
    active = b.decoder_streamed_always + b.embedding + b.lm_head + 8 * b.expert_each * b.num_moe_layers
    assert active == pytest.approx(37e9, rel=0.03)  # "37B activated for each token"
    assert m.kv_heads_cached == 1 and m.k_dim_cached == 512 + 64 and m.v_dim_cached == 0


def test_mixtral_active_params():
    m = get_model("mixtral")
    b = param_breakdown(m)
    active = b.decoder_streamed_always + b.embedding + b.lm_head + 2 * b.expert_each * b.num_moe_layers
    assert active == pytest.approx(12.9e9, rel=0.01)  # Mistral AI: "12.9B active parameters per token"
    assert b.routed_experts == 8 * 32 * 3 * 4096 * 14336


def test_gemma3n_extensions():
    m = get_model("gemma3n_e4b")
    b = param_breakdown(m)
    assert b.per_layer_embedding == 262_144 * 35 * 256
    assert m.kv_cache_layers == 20
    # PLE rows are gathered, not streamed: the always-streamed weights exclude the table
    assert b.decoder_streamed_always < 4.5e9 < b.decoder_streamed_always + b.per_layer_embedding
    # weight_calls covers the same matrices as attention + dense_mlp (they differ only by small norm/coef vectors)
    wc = sum(c.params * c.layers for c in weight_calls(m))
    assert wc == pytest.approx(b.attention + b.dense_mlp, rel=1e-4)
    # no KV-shared layers: k/v counted in every layer (a plain model is unchanged by the extension)
    llama = get_model("llama-3.1-8b")
    assert llama.kv_cache_layers == llama.num_layers
    lb = param_breakdown(llama)
    assert sum(c.params * c.layers for c in weight_calls(llama)) == lb.attention + lb.dense_mlp


def test_synthetic_stand_ins_follow_the_study():
    # the study's attention shapes, committed with their provenance (validation/data/knlp-v40-h100/PROVENANCE.md)
    study = json.loads((REPO / "validation" / "data" / "knlp-v40-h100" / "model_configs.json").read_text())
    nem, mla = get_model("nemotron3_nano"), get_model("deepseek_mla")
    assert nem.synthetic and mla.synthetic
    assert (nem.num_heads, nem.num_kv_heads, nem.head_dim, nem.num_layers) == (32, 2, 128, 32)
    assert 29e9 < nem.published_params < 31e9  # "30B"
    assert (mla.num_heads, mla.num_kv_heads, mla.head_dim) == (16, 1, 128) and mla.mla is None
    for key, m in (("nemotron3_nano", nem), ("deepseek_mla", mla)):
        s = study[key]
        assert (s["n_heads"], s["n_kv_heads"], s["head_dim"]) == (m.num_heads, m.num_kv_heads, m.head_dim)


def test_sliding_windows():
    g2 = get_model("gemma-2-27b").sliding_window
    assert (g2.window_tokens, g2.num_sliding_layers) == (4096, 46 // 2)
    for name, layers in (("gemma-3-4b", 34), ("gemma-3-12b", 48)):
        sw = get_model(name).sliding_window
        assert sw.window_tokens == 1024
        assert sw.num_sliding_layers == layers - layers // 6  # 5 local : 1 global
    assert get_model("mistral-7b").sliding_window is None
    assert get_model("qwen2.5-7b").sliding_window is None


# ----------------------------------------------------------------------------------------------------------------
# Names and lookups
# ----------------------------------------------------------------------------------------------------------------


def test_aliases_unique_across_the_catalog():
    cat = catalog()
    owner: dict[str, str] = {}
    clashes = []
    for kind, items in (("gpu", cat.gpus), ("model", cat.models), ("interconnect", cat.interconnects)):
        for name, spec in items.items():
            for key in {_norm(name), *(_norm(a) for a in spec.aliases)}:
                who = f"{kind}:{name}"
                if key in owner and owner[key] != who:
                    clashes.append((key, owner[key], who))
                owner.setdefault(key, who)
    assert not clashes, clashes


def test_study_config_keys_resolve():
    keys = {
        "qwen25_05b": "Qwen2.5-0.5B", "qwen25_1.8b": "Qwen2.5-1.5B", "qwen25_7b": "Qwen2.5-7B",
        "mistral_7b": "Mistral-7B-v0.3", "llama31_8b": "Llama-3.1-8B", "gemma3_4b": "Gemma-3-4B",
        "gemma3_12b": "Gemma-3-12B", "gemma3n_e4b": "Gemma-3n-E4B", "deepseek_r1_7b": "DeepSeek-R1-Distill-Qwen-7B",
        "phi4_14b": "Phi-4-14B", "qwen3_8b": "Qwen3-8B", "mistral_small_24b": "Mistral-Small-3.1-24B",
        "nemotron3_nano": "Nemotron-3-Nano-30B-dense-approx", "deepseek_mla": "DeepSeek-MLA-standin",
    }
    for key, name in keys.items():
        assert get_model(key).name == name, key
    for alias, name in (("qwen2.5-7b", "Qwen2.5-7B"), ("llama-3.1-70b", "Llama-3.1-70B"),
                        ("mixtral", "Mixtral-8x7B"), ("deepseek-v3", "DeepSeek-V3-671B")):
        assert get_model(alias).name == name


def test_size_shorthand_unique():
    assert get_model("24b").name == "Mistral-Small-3.1-24B"
    assert get_model("24B").name == "Mistral-Small-3.1-24B"
    assert get_model("72b").name == "Qwen2.5-72B"
    assert get_model("0.5b").name == "Qwen2.5-0.5B"


def test_size_shorthand_ambiguous():
    with pytest.raises(LookupFailed) as exc:
        get_model("7b")
    e = exc.value
    assert e.ambiguous is True
    # Mixtral-8x7B is not a 7B model and must not be listed
    assert set(e.candidates) == {"Qwen2.5-7B", "Mistral-7B-v0.3", "DeepSeek-R1-Distill-Qwen-7B"}
    assert "ambiguous" in str(e)
    with pytest.raises(LookupFailed) as exc:
        get_model("8b")
    assert exc.value.ambiguous and set(exc.value.candidates) == {"Llama-3.1-8B", "Qwen3-8B"}


def test_unknown_names_give_close_suggestions():
    with pytest.raises(LookupFailed) as exc:
        get_model("qwen2.5-7c")
    assert not exc.value.ambiguous
    assert "Qwen2.5-7B" in exc.value.candidates
    assert "closest" in str(exc.value)
    with pytest.raises(LookupFailed) as exc:
        get_gpu("h1000")
    assert "H100-SXM" in exc.value.candidates
    with pytest.raises(LookupFailed) as exc:
        get_interconnect("nvlnk5")
    assert "NVLink-5" in exc.value.candidates
    with pytest.raises(LookupFailed) as exc:
        get_model("llama-3.1-80b")
    assert {"Llama-3.1-8B", "Llama-3.1-70B"} & set(exc.value.candidates)


# ----------------------------------------------------------------------------------------------------------------
# Errors name the file and the field
# ----------------------------------------------------------------------------------------------------------------


def _gpu_dict():
    return yaml.safe_load((HW_DIR / "h100-sxm.yaml").read_text())


def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken-gpu.yaml"
    p.write_text("name: [unclosed\nvendor: NVIDIA\n")
    with pytest.raises(SpecError) as exc:
        load_yaml_spec(p, GPUSpec)
    assert "broken-gpu.yaml" in str(exc.value) and "malformed YAML" in str(exc.value)


def test_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="list.yaml.*mapping"):
        load_yaml_spec(p, GPUSpec)


def test_invalid_value_names_file_and_field(tmp_path):
    d = _gpu_dict()
    d["memory_bandwidth_GBps"] = -5
    p = tmp_path / "bad-bw.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as exc:
        load_yaml_spec(p, GPUSpec)
    msg = str(exc.value)
    assert "bad-bw.yaml" in msg and "memory_bandwidth_GBps" in msg


def test_misspelled_field_is_rejected(tmp_path):
    d = _gpu_dict()
    d["memory_bandwith_GBps"] = d.pop("memory_bandwidth_GBps")
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as exc:
        load_yaml_spec(p, GPUSpec)
    assert "typo.yaml" in str(exc.value) and "memory_bandwith_GBps" in str(exc.value)


def test_model_missing_field_and_bad_shape(tmp_path):
    d = yaml.safe_load((MODEL_DIR / "qwen2.5-7b.yaml").read_text())
    del d["published_params"]
    p = tmp_path / "no-count.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as exc:
        load_yaml_spec(p, ModelSpec)
    assert "no-count.yaml" in str(exc.value) and "published_params" in str(exc.value)

    d = yaml.safe_load((MODEL_DIR / "qwen2.5-7b.yaml").read_text())
    d["num_kv_heads"] = 5  # 28 query heads are not a multiple of 5
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match="num_kv_heads"):
        load_yaml_spec(p, ModelSpec)


# ----------------------------------------------------------------------------------------------------------------
# Import from a Hugging Face config.json
# ----------------------------------------------------------------------------------------------------------------

QWEN2_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_model_from_hf_config_qwen2(tmp_path):
    p = tmp_path / "qwen" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(QWEN2_05B_CONFIG))
    m = model_from_hf_config(p)
    assert (m.num_heads, m.num_kv_heads, m.head_dim, m.num_layers) == (14, 2, 64, 24)
    assert m.qkv_bias and m.tie_embeddings and m.sliding_window is None
    assert m.published_params == param_breakdown(m).total == 494_032_768
    # the same file through get_model (path lookup)
    assert get_model(str(p)).published_params == 494_032_768

    cfg7 = dict(QWEN2_05B_CONFIG, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                num_hidden_layers=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064)
    p7 = tmp_path / "config7.json"
    p7.write_text(json.dumps(cfg7))
    assert model_from_hf_config(p7).published_params == 7_615_616_512


def test_model_from_hf_config_mixtral(tmp_path):
    cfg = {
        "model_type": "mixtral", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False, "sliding_window": None,
        "max_position_embeddings": 32768,
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    m = model_from_hf_config(p)
    assert m.moe is not None and (m.moe.num_experts, m.moe.top_k) == (8, 2)
    assert m.published_params == 46_702_792_704


def test_model_from_hf_config_errors(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="config.json.*malformed JSON"):
        model_from_hf_config(p)
    p.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 896}))
    with pytest.raises(SpecError, match="num_hidden_layers"):
        model_from_hf_config(p)
