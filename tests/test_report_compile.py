"""The report model's compiled training step (ReportModel.compile_loss, TrainConfig.compile, `--compile`) on the
CPU: the LM part of the loss traces as one graph, the compiled loss and the gradients of every trained tensor equal
eager's (float32, relative 1e-5), a compiled step trains, `python -m vision.train --compile` compiles and trains,
and bad settings are clear errors; a memory budget saves fewer activations and keeps the gradients. Backends
aot_eager (the graphs dynamo and AOT autograd capture, forward and backward, without inductor's code generation)
and aot_eager_decomp_partition (the same through the min-cut partitioner, which reads the budget) keep each test to
seconds."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stablelm.ops as ops
from stablelm.lora import make_optimizer
from vision import synthetic
from vision import train as train_script
from vision.pipeline import TrainConfig, build_model, build_tokenizer
from vision.report_model import COMPILED_OPS, ReportConfig, ReportModel, report_generation

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["heart size is normal. lungs are clear. no pleural effusion or pneumothorax.",
           "mild cardiomegaly."]  # the second pads most of its max_length report slots


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(build_tokenizer(REPORTS * 8 + [ReportConfig().instruction], tmp_path_factory.mktemp("tok"), 512))


def tiny_model(tokenizer_dir, **report):
    config = ReportConfig(lm_mode="lora", lora_layout="peft", lora_dropout=0.0, max_length=24,
                          generation=report_generation().replace(num_beams=1, min_new_tokens=0, max_new_tokens=4))
    spec = {"lm": None, "lm_preset": "tiny", "encoder": None, "encoder_preset": "tiny", "tokenizer": tokenizer_dir,
            "seed": 0, "report": {**config.to_dict(), **report}, "dataset": "iu_xray", "precision": "fp32"}
    model = build_model(spec, "cpu", "fp32")
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):  # non-zero, so every adapter's A gets a gradient too
            p.data.normal_(0, 0.02)
    return model


def images(batch=2):
    return torch.randn(batch, 2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, pixels, reports):
    model.zero_grad(set_to_none=True)
    loss = model(pixels, reports)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lm_loss_traces_as_one_graph(tokenizer_dir, checkpointing):
    model = tiny_model(tokenizer_dir, gradient_checkpointing=checkpointing)
    model.train()
    features = model.encoder_features(images())
    ids, mask = model.tokenize_reports(REPORTS, "cpu")
    with ops.using(**COMPILED_OPS):
        explained = torch._dynamo.explain(model.lm_loss)(features, ids, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_loss_and_gradients_equal_eager(tokenizer_dir):
    model = tiny_model(tokenizer_dir)
    model.train()
    pixels = images()
    eager_loss, eager_grads = loss_and_grads(model, pixels, REPORTS)
    model.compile_loss("default", "aot_eager")
    for _ in range(2):  # the call that compiles and a call of the compiled graph
        loss, grads = loss_and_grads(model, pixels, REPORTS)
        # float32, the same math in another order (COMPILED_OPS: the reference ops, SDPA attention, fused by
        # inductor): relative 1e-5 on the loss and on each gradient (to its largest entry).
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        assert set(grads) == set(eager_grads) and len(grads) > 2  # projector, LayerNorm, every adapter
        for name, g in grads.items():
            scale = eager_grads[name].abs().max()
            assert scale > 0, name
            assert ((g - eager_grads[name]).abs().max() / scale).item() < 1e-5, name
    model.compile_loss(None)
    assert loss_and_grads(model, pixels, REPORTS)[0] == eager_loss  # eager again: the original path


def test_one_compiled_step_reduces_the_loss(tokenizer_dir):
    model = tiny_model(tokenizer_dir)
    model.compile_loss("default", "aot_eager")
    model.train()
    optimizer, _ = make_optimizer(model, 1e-2, 0.0, 10)
    pixels = images()
    before = model(pixels, REPORTS)
    before.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = model(pixels, REPORTS)
    assert math.isfinite(before.item()) and after.item() < before.item() - 1e-3


def test_bad_compile_settings_are_clear_errors(tokenizer_dir):
    with pytest.raises(ValueError, match=r"TrainConfig: compile='fast': choose one of \('default'.*reduce-overhead"):
        TrainConfig(compile="fast")
    with pytest.raises(ValueError, match="compile_backend='nope': not a dynamo backend"):
        TrainConfig(compile="default", compile_backend="nope")
    with pytest.raises(ValueError, match="'reduce-overhead' is an inductor mode; compile_backend='aot_eager'"):
        TrainConfig(compile="reduce-overhead", compile_backend="aot_eager")
    assert TrainConfig().compile is None and TrainConfig().compile_backend == "inductor"
    with pytest.raises(ValueError, match="compile='fast'"):
        tiny_model(tokenizer_dir).compile_loss("fast")
    with pytest.raises(ValueError, match=r"compile_memory_budget=0.5 needs compile set"):
        TrainConfig(compile_memory_budget=0.5)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"compile_memory_budget=.*: must be a fraction in \(0, 1\]"):
            TrainConfig(compile="default", compile_memory_budget=bad)
    with pytest.raises(ValueError, match="compile_backend='aot_eager' does not read it"):
        TrainConfig(compile="default", compile_backend="aot_eager", compile_memory_budget=0.5)
    assert TrainConfig(compile="default", compile_memory_budget=1).compile_memory_budget == 1


def test_a_memory_budget_saves_fewer_activations_and_keeps_the_gradients(tokenizer_dir):
    """compile_loss(memory_budget=): the compiled step saves fewer bytes for its backward (counted by a
    saved-tensors hook around the compiled call) and recomputes the rest, so loss and gradients stay eager's."""
    model = tiny_model(tokenizer_dir)
    model.train()
    pixels = images()
    eager_loss, eager_grads = loss_and_grads(model, pixels, REPORTS)
    saved = {}
    for budget in (None, 0.1):
        torch._dynamo.reset()
        model.compile_loss("default", "aot_eager_decomp_partition", memory_budget=budget)
        loss_and_grads(model, pixels, REPORTS)  # the call that compiles
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = loss_and_grads(model, pixels, REPORTS)
        saved[budget] = total[0]
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        for name, g in grads.items():
            assert ((g - eager_grads[name]).abs().max() / eager_grads[name].abs().max()).item() < 1e-5, name
    assert 0 < saved[0.1] < 0.7 * saved[None], saved
    torch._dynamo.reset()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vision.train", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_shows_the_compile_flags_and_refuses_a_bad_backend(tmp_path):
    help_text = " ".join(run_cli("--help").stdout.split())
    assert "--compile {default,lite,reduce-overhead,max-autotune-no-cudagraphs,max-autotune}" in help_text
    assert "--compile-backend COMPILE_BACKEND" in help_text and "(default: inductor)" in help_text
    assert "--compile-memory-budget COMPILE_MEMORY_BUDGET" in help_text
    proc = run_cli("--annotation", tmp_path / "a.json", "--image-dir", tmp_path, "--out", tmp_path / "run",
                   "--compile", "default", "--compile-backend", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: TrainConfig: compile_backend='nope'" in proc.stderr
    proc = run_cli("--annotation", tmp_path / "a.json", "--image-dir", tmp_path, "--out", tmp_path / "run",
                   "--compile-memory-budget", "0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: TrainConfig: compile_memory_budget=0.5 needs compile set" in proc.stderr


def test_a_run_trains_through_the_compile_flags(tmp_path, monkeypatch):
    data = tmp_path / "data"
    synthetic.main([str(data), "--studies", "8", "--views", "2", "--size", "64", "--seed", "2"])
    calls = []
    compile_loss = ReportModel.compile_loss
    monkeypatch.setattr(ReportModel, "compile_loss", lambda self, *a: calls.append(a) or compile_loss(self, *a))
    # Backend aot_eager_decomp_partition: AOT autograd's graphs and partitioner (which reads the memory budget)
    # without code generation, enough for the wiring (the equality to eager is checked above).
    results = train_script.main(list(map(str, [
        "--annotation", data / "annotation.json", "--image-dir", data / "images", "--out", tmp_path / "run",
        "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--lm-mode", "lora", "--num-beams", "1",
        "--min-new-tokens", "0", "--max-new-tokens", "4", "--val-limit", "2", "--device", "cpu", "--compile",
        "default", "--compile-backend", "aot_eager_decomp_partition", "--compile-memory-budget", "0.5"])))
    assert calls == [("default", "aot_eager_decomp_partition", 0.5)]
    assert results["train"]["compile"] == "default"
    assert results["train"]["compile_backend"] == "aot_eager_decomp_partition"
    assert results["train"]["compile_memory_budget"] == 0.5
    assert math.isfinite(results["epochs"][0]["train_loss"]) and results["epochs"][0]["step"] == 2
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_gpu_training_step_never_waits_for_the_gpu(tokenizer_dir, compile_mode):
    """After warm-up a LoRA step (data to the GPU as the training loop moves it, forward, backward, AdamW) makes
    no host-device synchronisation: under torch.cuda.set_sync_debug_mode("error") one would raise. A launch-bound
    step's host must run ahead of the GPU; every wait leaves the GPU idle while the host catches up."""
    config = ReportConfig(lm_mode="lora", lora_layout="peft", lora_dropout=0.1, max_length=24)
    spec = {"lm": None, "lm_preset": "tiny", "encoder": None, "encoder_preset": "tiny", "tokenizer": tokenizer_dir,
            "seed": 0, "report": config.to_dict(), "dataset": "iu_xray", "precision": "bf16"}
    model = build_model(spec, "cuda", "bf16")
    if compile_mode:
        model.compile_loss(compile_mode)
    model.train()
    optimizer, _ = make_optimizer(model, 1e-4, 0.0, 10)
    pixels = images().pin_memory()
    image_mask = torch.ones(2, 2, dtype=torch.bool)
    image_mask[1, 1] = False  # a one-image study: the masked path

    def step():
        loss = model(pixels.to("cuda", non_blocking=True).to(torch.bfloat16), REPORTS, image_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    for _ in range(3):  # compile, record the CUDA graphs, first optimizer state
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
