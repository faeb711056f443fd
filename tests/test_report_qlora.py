"""The report model over a quantized LM (int8 / int4 / nf4 converted directories): `vision.train --lm <dir>` trains
(QLoRA, peft or fused adapter layout), the projector trains over a frozen quantized LM, the quantized tensors never
change, full fine-tuning of a quantized LM is refused; the loss equals the full-logits loss."""
import pytest
import torch
import torch.nn.functional as F

import stablelm.checkpoint as ckpt
from stablelm.config import preset
from stablelm.model import StableLM
from stablelm.quantize import NF4Linear, QuantLinear, quantize_state_dict
from vision import synthetic
from vision import train as train_script
from vision.data import ReportDataset, collate_reports, load_annotation
from vision.pipeline import build_model, load_run_checkpoint
from vision.report_model import ReportConfig, report_generation

FORMATS = {"int8": (8, 128, "int"), "int4": (4, 32, "int"), "nf4": (4, 32, "nf4")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.main([str(root), "--studies", "16", "--views", "2", "--size", "224", "--seed", "5"])
    return root


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """A tiny random StableLM written as converted int8 / int4 / nf4 directories (what `convert --quant` writes)."""
    cfg = preset("tiny")
    state = StableLM.random(cfg, seed=2).state_dict()
    dirs = {}
    for name, (bits, group, fmt) in FORMATS.items():
        out = tmp_path_factory.mktemp(name)
        meta = {"bits": bits, "group_size": group, **({"format": "nf4"} if fmt == "nf4" else {})}
        ckpt.write_project_dir(out, cfg, quantize_state_dict(state, bits, group, fmt=fmt), meta)
        dirs[name] = out
    return dirs


def _spec(lm_dir, tokenizer_dir, **report):
    config = ReportConfig(max_length=16, generation=report_generation().replace(num_beams=1, min_new_tokens=0,
                                                                                max_new_tokens=4))
    return {"lm": str(lm_dir), "lm_preset": None, "encoder": None, "encoder_preset": "tiny",
            "tokenizer": tokenizer_dir, "seed": 0, "report": {**config.to_dict(), **report}, "dataset": "iu_xray",
            "precision": "fp32"}


def _batch(synth, n=3):
    data = ReportDataset(load_annotation(synth / "annotation.json"), synth / "images", "train")
    return collate_reports([data[i] for i in range(n)])


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_train_cli_over_quantized_lm(fmt_name, synth, tokenizer_dir, lm_dirs, tmp_path):
    out = tmp_path / "run"
    results = train_script.main([
        "--annotation", str(synth / "annotation.json"), "--image-dir", str(synth / "images"),
        "--lm", str(lm_dirs[fmt_name]), "--tokenizer", tokenizer_dir, "--lm-mode", "lora", "--lora-layout", "peft",
        "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--num-beams", "1", "--min-new-tokens", "0",
        "--max-new-tokens", "4", "--val-limit", "4", "--out", str(out)])
    assert torch.isfinite(torch.tensor(results["epochs"][0]["train_loss"]))
    trained = load_run_checkpoint(out / "last").trained
    assert trained and all(("lora_" in n) or n.startswith("proj") for n in trained), sorted(trained)[:5]
    assert any("attn.qkv.lora_A" in n for n in trained)


@pytest.mark.parametrize("layout", ["fused", "peft"])
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_qlora_step_keeps_quantized_lm_bit_identical(fmt_name, layout, synth, tokenizer_dir, lm_dirs):
    model = build_model(_spec(lm_dirs[fmt_name], tokenizer_dir, lm_mode="lora", lora_layout=layout,
                              lora_dropout=0.0), "cpu", "fp32")
    base = model.lm.layers[0].attn.qkv.base
    assert isinstance(base, NF4Linear if fmt_name == "nf4" else QuantLinear)
    frozen = {n: t.clone() for n, t in model.lm.state_dict().items() if "lora_" not in n}
    b = _batch(synth)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(b["images"], b["reports"], b["image_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, t in model.lm.state_dict().items():
        if "lora_" not in n:
            assert torch.equal(t, frozen[n]), n
    n_adapters = sum(1 for n, _ in model.lm.named_parameters() if n.endswith("lora_A"))
    assert n_adapters == 4 * model.lm.config.num_hidden_layers
    qkv_A = model.lm.layers[0].attn.qkv.lora_A
    assert qkv_A.shape[0] == (3 if layout == "peft" else 1) * model.config.lora_r


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_frozen_quantized_lm_trains_the_projector_and_refuses_full(fmt_name, synth, tokenizer_dir, lm_dirs):
    model = build_model(_spec(lm_dirs[fmt_name], tokenizer_dir), "cpu", "fp32")
    b = _batch(synth)
    embeds, labels, mask = model.training_inputs(b["images"], b["reports"], b["image_mask"])
    loss = model(b["images"], b["reports"], b["image_mask"])
    loss.backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().max() > 0
    with torch.no_grad():
        logits = model.lm(input_embeds=embeds, attention_mask=mask)
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a float LM"):
        build_model(_spec(lm_dirs[fmt_name], tokenizer_dir, lm_mode="full"), "cpu", "fp32")
