"""convert_weights.py, the weight map (stablelm.convert) and stablelm.checkpoint: round trip, validation errors,
atomic writes, dtype."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_weights
import stablelm
import stablelm.checkpoint as ckpt
from hf_utils import hf_model
from stablelm.config import StableLMConfig
from stablelm.convert import hf_shapes, hf_to_project, project_to_hf


@pytest.fixture
def hf_dir(tmp_path):
    model = hf_model(use_qkv_bias=True, qk_layernorm=True, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    return tmp_path / "hf"


def test_round_trip_is_exact(hf_dir, tmp_path):
    convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    convert_weights.main([str(tmp_path / "conv"), str(tmp_path / "back"), "--to-hf"])
    original = load_file(hf_dir / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(back)
    for name, t in original.items():
        assert t.dtype == back[name].dtype and torch.equal(t, back[name]), name
    assert (tmp_path / "conv" / "tokenizer.json").exists() and (tmp_path / "back" / "tokenizer.json").exists()
    # The HF config written back loads in transformers and gives the same model.
    from transformers import StableLmForCausalLM
    reloaded = StableLmForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref = StableLmForCausalLM.from_pretrained(hf_dir).eval()(ids).logits
        assert torch.allclose(reloaded(ids).logits, ref, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(use_qkv_bias=True, qk_layernorm=True, num_key_value_heads=2),
    dict(use_parallel_residual=True, tie_word_embeddings=True),
], ids=["plain", "bias-qknorm-gqa", "parallel-tied"])
def test_weight_map_covers_transformers_state_dict(overrides):
    """The map's HF side is exactly transformers' state dict, and both directions are inverse."""
    model = hf_model(**overrides)
    cfg = StableLMConfig.from_hf(model.config.to_dict())
    hf = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert hf_shapes(cfg) == {k: tuple(v.shape) for k, v in hf.items()}
    back = project_to_hf(hf_to_project(hf, cfg), cfg)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def _break(hf_dir, fn):
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("kind,name", [
    ("missing", "model.layers.1.self_attn.k_proj.weight"),
    ("extra", "model.layers.0.self_attn.rotary_emb.inv_freq"),
    ("shape", "model.layers.0.mlp.up_proj.weight"),
])
def test_bad_checkpoint_names_the_tensor(hf_dir, tmp_path, kind, name):
    def edit(t):
        if kind == "missing":
            del t[name]
        elif kind == "extra":
            t[name] = torch.randn(4)
        else:
            t[name] = torch.randn(t[name].shape[0] + 1, t[name].shape[1])
    _break(hf_dir, edit)
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    assert not (tmp_path / "conv").exists()


def test_interrupted_write_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_existing_destination_needs_overwrite(hf_dir, tmp_path):
    dst = tmp_path / "conv"
    convert_weights.main([str(hf_dir), str(dst)])
    with pytest.raises(FileExistsError):
        convert_weights.main([str(hf_dir), str(dst)])
    convert_weights.main([str(hf_dir), str(dst), "--overwrite", "--dtype", "bf16"])
    assert stablelm.load(dst).embed.weight.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "hf"]


def test_load_dtype_and_hf_dir_directly(hf_dir, tmp_path):
    convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    a = stablelm.load(tmp_path / "conv", dtype="fp16")
    assert all(p.dtype == torch.float16 for p in a.parameters())
    b = stablelm.load(hf_dir)  # converted in memory through the same mapping
    c = stablelm.load(tmp_path / "conv")
    for (n, p), (_, q) in zip(b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="dtype"):
        stablelm.load(tmp_path / "conv", dtype="int3")


def test_converted_dir_with_tampered_tensors_fails_on_load(hf_dir, tmp_path):
    convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    path = tmp_path / "conv" / "model.safetensors"
    t = load_file(path)
    del t["layers.0.attn.qkv.bias"]
    save_file(t, path)
    with pytest.raises(ckpt.CheckpointError, match=r"layers\.0\.attn\.qkv\.bias"):
        stablelm.load(tmp_path / "conv")


def test_converted_config_is_tagged(hf_dir, tmp_path):
    convert_weights.main([str(hf_dir), str(tmp_path / "conv")])
    meta = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert meta["format"] == "stablelm" and meta["config"]["qk_layernorm"] is True


def test_vision_mode_converts_a_swin_checkpoint(tmp_path):
    from transformers import SwinConfig, SwinModel

    from vision.swin_checkpoint import load_converted
    torch.manual_seed(0)
    hf = SwinModel(SwinConfig(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                              window_size=7)).eval()
    hf.save_pretrained(tmp_path / "swin")
    convert_weights.main([str(tmp_path / "swin"), str(tmp_path / "enc"), "--vision"])
    encoder = load_converted(tmp_path / "enc").eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixels)
        tokens, pooled = encoder(pixels)
    assert (tokens - ref.last_hidden_state).abs().max() < 1e-4
    assert (pooled - ref.pooler_output).abs().max() < 1e-4
