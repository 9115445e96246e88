import json

import pytest

from llada2uni.config import BackboneConfig, ConfigError

# The published LLaDA2.0-Uni config.json (spec 2.2), including keys this package does not use.
UNI_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "vocab_size": 173568, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu", "use_qkv_bias": False,
    "use_qk_norm": True, "use_bias": False, "rms_norm_eps": 1e-06, "attention_dropout": 0.0,
    "initializer_range": 0.02, "max_position_embeddings": 8192, "rope_theta": 600000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 600000, "partial_rotary_factor": 0.5},
    "partial_rotary_factor": 0.5, "use_cache": False, "sliding_window": None, "pad_token_id": 156892,
    "num_experts": 256, "num_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
    "topk_group": 4, "routed_scaling_factor": 2.5, "moe_intermediate_size": 512,
    "first_k_dense_replace": 1, "output_router_logits": False, "image_token_offset": 157184,
    "auto_map": {"AutoConfig": "configuration_llada2uni_moe.LLaDA2MoeConfig"},
}


def test_uni_config_parses_drops_unknown_and_derives():
    c = BackboneConfig.from_dict(UNI_CONFIG)
    assert not hasattr(c, "auto_map") and not hasattr(c, "initializer_range")
    assert c.rotary_dim == 64
    assert c.qkv_size == 3072
    assert c.num_kv_groups == 4
    assert c.experts_per_group == 32
    assert c.image_vocab_size == 16384
    assert c.rope_theta == 600000.0


def test_family_defaults_for_keys_the_uni_config_omits():
    c = BackboneConfig.from_dict(UNI_CONFIG)
    assert c.score_function == "sigmoid"
    assert c.norm_topk_prob is True
    assert c.moe_router_enable_expert_bias is True
    assert c.router_dtype == "fp32"
    assert c.tie_word_embeddings is False
    assert c.mask_token_id == 156895


def test_nested_rope_parameters_win():
    raw = dict(UNI_CONFIG, rope_parameters={"rope_theta": 10000, "partial_rotary_factor": 0.25})
    c = BackboneConfig.from_dict(raw)
    assert c.rope_theta == 10000.0 and c.rotary_dim == 32


def test_to_dict_writes_every_key_explicitly():
    d = BackboneConfig().to_dict()
    for key in ("use_bias", "rms_norm_eps", "num_shared_experts", "first_k_dense_replace",
                "partial_rotary_factor", "use_qk_norm", "tie_word_embeddings", "score_function",
                "norm_topk_prob", "moe_router_enable_expert_bias"):
        assert key in d
    assert BackboneConfig.from_dict(d) == BackboneConfig()


@pytest.mark.parametrize("bad, message", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"n_group": 3}, "n_group"),
    ({"score_function": "softmax"}, "score_function"),
    ({"tie_word_embeddings": True}, "tied"),
    ({"image_token_offset": 10**6}, "image_token_offset"),
])
def test_invalid_configs_name_the_problem(bad, message):
    with pytest.raises(ConfigError, match=message):
        BackboneConfig.from_dict(dict(UNI_CONFIG, **bad))


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        BackboneConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BackboneConfig.from_file(tmp_path / "config.json")


def test_tiny_checkpoint_declares_its_ids(tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    c = BackboneConfig.from_dict(raw)
    assert c.mask_token_id != 156895 and c.image_token_offset != 157184  # not the real ids on purpose
    assert raw["first_k_dense_replace"] == 1 and raw["num_shared_experts"] == 1
