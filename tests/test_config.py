"""StableLMConfig: HF spellings, validation errors that name the field, presets."""
import pytest
from transformers import StableLmConfig

from stablelm.config import PRESETS, StableLMConfig, preset


def test_reads_new_and_old_spellings():
    new = StableLmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                         partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0}).to_dict()
    cfg = StableLMConfig.from_hf(new)
    assert (cfg.rope_theta, cfg.partial_rotary_factor, cfg.rope_type, cfg.rope_factor) == (500.0, 0.5, "linear", 2.0)
    old = {"model_type": "stablelm", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
           "rope_theta": 1000.0, "partial_rotary_factor": 0.25, "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    cfg = StableLMConfig.from_hf(old)
    assert (cfg.rope_theta, cfg.rotary_dim, cfg.rope_type, cfg.rope_factor) == (1000.0, 4, "dynamic", 4.0)
    epoch = {"model_type": "stablelm_epoch", "hidden_size": 64, "num_heads": 4, "num_key_value_heads": 4,
             "rope_pct": 0.25, "norm_eps": 1e-6}
    cfg = StableLMConfig.from_hf(epoch)
    assert cfg.layer_norm_eps == 1e-6 and cfg.num_attention_heads == 4


def test_hf_round_trip():
    cfg = preset("stablelm-2-12b")
    again = StableLMConfig.from_hf(StableLmConfig(**cfg.to_hf()).to_dict())
    assert again == cfg


@pytest.mark.parametrize("change,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_knob": 3}, "some_new_knob"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 66}, "hidden_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_dropout": 0.1}, "hidden_dropout"),
])
def test_unsupported_values_name_the_field(change, field):
    base = {"model_type": "stablelm", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    with pytest.raises(ValueError, match=field):
        StableLMConfig.from_hf({**base, **change})


def test_presets_have_published_shapes():
    assert set(PRESETS) >= {"stablelm-3b-4e1t", "stablelm-zephyr-3b", "stablelm-2-1_6b", "stablelm-2-12b",
                            "stable-code-3b"}
    c = preset("stablelm-3b-4e1t")
    assert (c.head_dim, c.rotary_dim) == (80, 20)
    assert preset("stablelm-2-12b").num_key_value_heads == 8
    with pytest.raises(KeyError):
        preset("nope")
