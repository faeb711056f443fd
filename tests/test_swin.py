"""vision/swin.py + swin_checkpoint.py: parity with transformers' SwinModel (fp32, eval and seeded train mode),
checkpoint conversion and its errors, the converted format, gradient checkpointing, the window-shrink rule, LoRA
targets, presets."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SwinConfig as HFSwinConfig
from transformers import SwinForImageClassification, SwinModel

from stablelm.checkpoint import MANIFEST
from stablelm.convert import CheckpointError
from vision import swin, swin_checkpoint
from stablelm.lora import apply_lora
from vision.swin import SwinConfig, SwinEncoder, swin_base_224, swin_tiny_test
from vision.swin_checkpoint import convert_hf_state_dict, load_converted, load_hf_swin, save_converted

FP32_ATOL = 1e-4

# (transformers SwinConfig kwargs, input [B, C, H, W]): what each one exercises is in its id.
CONFIGS = {
    # 14x14 then 7x7 maps: shifted windows with the mask, then a map equal to the window (shift switched off).
    "window7": (dict(image_size=56, embed_dim=16, depths=[2, 2], num_heads=[2, 4]), (2, 3, 56, 56)),
    # 18, 9, 5 maps with window 4: padding to whole windows in every stage (with the shift mask), odd merges.
    "padded": (dict(image_size=72, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4),
               (2, 3, 72, 72)),
    # Non-square input whose sides are not multiples of the patch (padded) nor of the window.
    "non_square": (dict(image_size=56, embed_dim=16, depths=[2, 2], num_heads=[2, 4]), (2, 3, 58, 75)),
    "absolute_no_qkv_bias": (dict(image_size=56, embed_dim=32, depths=[2, 2], num_heads=[2, 4], qkv_bias=False,
                                  mlp_ratio=2.0, use_absolute_embeddings=True), (2, 3, 56, 56)),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its init: LayerNorms around 1 / 0, offset tables and position embeddings
    of unit size, weights of gain ~1 so that attention is far from uniform yet not saturated at any width."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif any(part in name for part in ("bias_table", "position_embeddings", "pos_embed")):
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))
            else:
                p.copy_(0.2 * noise)
    return model


def hf_swin(cls=SwinModel, seed=0, **kw):
    return randomize(cls(HFSwinConfig(**kw)), seed).eval()


def hf_outputs(model, x):
    with torch.no_grad():
        out = model(x) if isinstance(model, SwinModel) else model.swin(x)
    return out.last_hidden_state, out.pooler_output


def assert_close(ours, ref, atol=FP32_ATOL):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_transformers(name, tmp_path):
    kw, shape = CONFIGS[name]
    hf = hf_swin(**kw)
    hf.save_pretrained(tmp_path)
    encoder = load_hf_swin(tmp_path)
    x = torch.randn(shape)
    ref_tokens, ref_pooled = hf_outputs(hf, x)
    with torch.no_grad():
        tokens, pooled = encoder(x)
    assert ref_tokens.abs().mean() > 0.1  # the comparison is over outputs of a useful size
    assert_close(tokens, ref_tokens)
    assert_close(pooled, ref_pooled)
    # The in-memory transformers names convert to the same tensors as the saved ones.
    in_memory = convert_hf_state_dict(hf.state_dict(), encoder.config)
    assert set(in_memory) == set(encoder.state_dict())
    assert all(torch.equal(t, encoder.state_dict()[k]) for k, t in in_memory.items())


def test_image_classification_checkpoint(tmp_path):
    """The "swin." prefix is stripped and the classifier head ignored."""
    kw, shape = CONFIGS["window7"]
    hf = hf_swin(SwinForImageClassification, num_labels=5, **kw)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith("swin.") for k in load_file(tmp_path / "model.safetensors"))
    x = torch.randn(shape)
    ref_tokens, ref_pooled = hf_outputs(hf, x)
    with torch.no_grad():
        tokens, pooled = load_hf_swin(tmp_path)(x)
    assert_close(tokens, ref_tokens)
    assert_close(pooled, ref_pooled)


def test_sharded_and_bin_checkpoints(tmp_path):
    kw, shape = CONFIGS["window7"]
    hf = hf_swin(**kw)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(load_file(tmp_path / "single" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    x = torch.randn(shape)
    ref_tokens, _ = hf_outputs(hf, x)
    for d in ("sharded", "bin"):
        with torch.no_grad():
            assert_close(load_hf_swin(tmp_path / d)(x)[0], ref_tokens)


def test_train_mode_drop_path_matches_transformers():
    """Seeded train-mode forward with stochastic depth: same random draws and the same branch as transformers."""
    kw, shape = CONFIGS["padded"]
    hf = hf_swin(drop_path_rate=0.5, **kw).train()
    encoder = SwinEncoder(SwinConfig.from_hf(hf.config.to_dict()))
    encoder.load_state_dict(convert_hf_state_dict(hf.state_dict(), encoder.config))
    encoder.train()
    x = torch.randn((4,) + shape[1:])
    with torch.no_grad():
        torch.manual_seed(1)
        ref = hf(x).last_hidden_state
        torch.manual_seed(1)
        ours = encoder(x)[0]
        torch.manual_seed(1)
        eval_out = encoder.eval()(x)[0]
    assert_close(ours, ref)
    assert (ours - eval_out).abs().max() > 1e-2  # some branch really was dropped


def test_converted_round_trip_is_exact(tmp_path):
    kw, shape = CONFIGS["absolute_no_qkv_bias"]
    encoder = load_hf_swin(_saved(tmp_path / "hf", **kw))
    save_converted(encoder, tmp_path / "conv")
    # Besides the format's two files only atomic_dir's record of what it wrote (stablelm.checkpoint.MANIFEST).
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == sorted(
        ["config.json", "encoder.safetensors", MANIFEST])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left over
    loaded = load_converted(tmp_path / "conv")
    assert loaded.config == encoder.config
    for k, t in encoder.state_dict().items():
        assert t.dtype == loaded.state_dict()[k].dtype and torch.equal(t, loaded.state_dict()[k]), k
    x = torch.randn(shape)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(encoder(x), loaded(x)))
    with pytest.raises(FileExistsError):
        save_converted(encoder, tmp_path / "conv")
    save_converted(encoder.to(torch.bfloat16), tmp_path / "conv", overwrite=True)
    assert load_converted(tmp_path / "conv").norm.weight.dtype == torch.bfloat16


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(swin_checkpoint, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        save_converted(SwinEncoder(swin_tiny_test()), tmp_path / "conv")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_lora_wrapped_encoder(tmp_path):
    encoder = SwinEncoder(swin_tiny_test())
    apply_lora(encoder, encoder.lora_targets(), r=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.attn\.qkv\.lora_A"):
        save_converted(encoder, tmp_path / "conv")


def _saved(path, cls=SwinModel, **kw):
    hf_swin(cls, **kw).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,name", [
    ("missing", "encoder.layers.1.blocks.0.attention.self.key.weight"),
    ("missing", "embeddings.position_embeddings"),
    ("extra", "encoder.layers.0.blocks.1.attention.self.extra_table"),
    ("extra", "embeddings.mask_token"),
    ("shape", "encoder.layers.0.blocks.1.attention.self.relative_position_bias_table"),
    ("shape", "encoder.layers.0.downsample.reduction.weight"),
    ("index", "encoder.layers.0.blocks.0.attention.self.relative_position_index"),
])
def test_bad_checkpoint_names_the_tensor(tmp_path, kind, name):
    path = _saved(tmp_path / "hf", cls=SwinForImageClassification, **CONFIGS["absolute_no_qkv_bias"][0])
    tensors = load_file(path / "model.safetensors")
    key = "swin." + name
    if kind == "missing":
        del tensors[key]
    elif kind == "extra":
        tensors[key] = torch.randn(3)
    elif kind == "shape":
        tensors[key] = torch.randn(tensors[key].shape[0] + 1, tensors[key].shape[1])
    else:  # older checkpoints carry this buffer; it must fit the window size
        tensors[key] = torch.randint(0, 169, (49, 49))
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hf_swin(path)


def test_correct_relative_position_index_is_accepted(tmp_path):
    kw, shape = CONFIGS["window7"]
    path = _saved(tmp_path / "hf", **kw)
    tensors = load_file(path / "model.safetensors")
    index = swin.relative_position_index(7, 7)
    tensors["encoder.layers.1.blocks.1.attention.self.relative_position_index"] = index  # 2-d, as transformers 4
    save_file(tensors, path / "model.safetensors")
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(load_hf_swin(path)(x)[0], hf_outputs(SwinModel.from_pretrained(path).eval(), x)[0])


def test_gradient_checkpointing_same_gradients():
    cfg = SwinConfig(image_size=72, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4,
                     drop_path_rate=0.3)
    encoder = randomize(SwinEncoder(cfg)).train()
    x = torch.randn(3, 3, 72, 72)
    results = []
    for flag in (False, True):
        encoder.gradient_checkpointing = flag
        encoder.zero_grad()
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        tokens, pooled = encoder(xg)
        (tokens.square().mean() + pooled.sum()).backward()
        results.append((tokens.detach(), xg.grad, {n: p.grad.clone() for n, p in encoder.named_parameters()}))
    (t0, gx0, g0), (t1, gx1, g1) = results
    assert torch.equal(t0, t1)
    assert torch.allclose(gx0, gx1, atol=1e-6, rtol=1e-5)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


def test_window_shrinks_to_a_smaller_map():
    """A 4x4 map with window_size 7 is one 4x4 window reading the centre of the 13x13 offset table: the same as
    window_size 4 holding that centre (transformers raises on this input)."""
    big = randomize(SwinEncoder(SwinConfig(image_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=7)))
    small = SwinEncoder(SwinConfig(image_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4))
    state = big.state_dict()
    for k, t in state.items():
        if k.endswith("bias_table"):
            state[k] = t.view(13, 13, -1)[3:10, 3:10].reshape(49, -1)
    small.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = big.eval()(x)[0], small.eval()(x)[0]
    assert_close(a, b, 1e-5)
    state_wrong = dict(state)
    for k in state_wrong:
        if k.endswith("bias_table"):
            state_wrong[k] = big.state_dict()[k][:49]  # the table's corner, not its centre
    small.load_state_dict(state_wrong)
    with torch.no_grad():
        assert (small(x)[0] - a).abs().max() > 1e-3


def test_lora_targets_query_and_value():
    encoder = randomize(SwinEncoder(swin_tiny_test())).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = encoder(x)[0]
    wrapped = apply_lora(encoder, encoder.lora_targets(), r=2, alpha=4)
    assert len(wrapped) == sum(encoder.config.depths)
    qkv = encoder.stages[1].blocks[1].attn.qkv
    assert qkv.out_ranges == [(0, 64), (128, 192)]
    with torch.no_grad():
        assert torch.equal(encoder(x)[0], before)  # B starts at zero
        qkv.lora_B.normal_()
        assert (encoder(x)[0] - before).abs().max() > 1e-3


def test_config_from_hf_and_errors():
    published = {  # microsoft/swin-base-patch4-window7-224 config.json (labels left out)
        "architectures": ["SwinForImageClassification"], "attention_probs_dropout_prob": 0.0,
        "depths": [2, 2, 18, 2], "drop_path_rate": 0.1, "embed_dim": 128, "encoder_stride": 32,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 1024, "image_size": 224,
        "initializer_range": 0.02, "layer_norm_eps": 1e-05, "mlp_ratio": 4.0, "model_type": "swin",
        "num_channels": 3, "num_heads": [4, 8, 16, 32], "num_layers": 4, "out_features": ["stage4"],
        "out_indices": [4], "patch_size": 4, "path_norm": True, "qkv_bias": True,
        "stage_names": ["stem", "stage1", "stage2", "stage3", "stage4"], "torch_dtype": "float32",
        "transformers_version": "4.31.0.dev0", "use_absolute_embeddings": False, "window_size": 7}
    assert SwinConfig.from_hf(published) == swin_base_224()
    assert SwinConfig.from_hf({**published, "image_size": [224, 224]}) == swin_base_224()
    assert SwinConfig.from_dict(json.loads(json.dumps(swin_base_224().to_dict()))) == swin_base_224()
    for change, field in [({"hidden_act": "relu"}, "hidden_act"), ({"model_type": "swinv2"}, "model_type"),
                          ({"hidden_dropout_prob": 0.1}, "hidden_dropout_prob"), ({"image_size": [224, 192]}, "image_size"),
                          ({"hidden_size": 768}, "hidden_size"), ({"pretrained_window_sizes": [0] * 4}, "pretrained_window_sizes"),
                          ({"num_heads": [4, 8, 16]}, "num_heads"), ({"num_heads": [3, 8, 16, 32]}, "num_heads")]:
        with pytest.raises(ValueError, match=field):
            SwinConfig.from_hf({**published, **change})
    with pytest.raises(ValueError, match="bogus"):
        SwinConfig.from_dict({**swin_base_224().to_dict(), "bogus": 1})


def test_bad_inputs():
    encoder = SwinEncoder(SwinConfig(**CONFIGS["absolute_no_qkv_bias"][0]))
    with pytest.raises(ValueError, match="pixel_values"):
        encoder(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match="pixel_values"):
        encoder(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="floating point"):
        encoder(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absolute position embeddings"):
        encoder(torch.randn(1, 3, 64, 64))


def test_swin_base_preset():
    torch.manual_seed(0)
    encoder = SwinEncoder(swin_base_224()).eval()
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 86e6 < n_params < 89e6, n_params
    with torch.no_grad():
        tokens, pooled = encoder(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 1024) and pooled.shape == (1, 1024)
    assert torch.isfinite(tokens).all()
    assert_close(pooled, tokens.mean(1), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_swin_base_half_precision(dtype):
    """Random swin-base weights on the GPU: our half-precision error against transformers in fp32 is no worse
    than twice transformers' own half-precision error (plus a small margin)."""
    torch.manual_seed(0)
    hf = randomize(SwinModel(HFSwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])))
    hf = hf.cuda().eval()
    cfg = SwinConfig.from_hf(hf.config.to_dict())
    ours = SwinEncoder(cfg)
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict(), cfg))
    ours = ours.cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert_close(ours(x)[0], ref, 1e-3)
        hf_err = (hf.to(dtype)(x.to(dtype)).last_hidden_state.float() - ref).abs().max().item()
        our_err = (ours.to(dtype)(x.to(dtype))[0].float() - ref).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-2, (our_err, hf_err)
