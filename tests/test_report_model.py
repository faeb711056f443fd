"""Report model: prompt wrap and label masking, training modes, checkpoint resume, learning a synthetic set."""
import json

import pytest
import torch

from stablelm.convert import CheckpointError
from stablelm.lora import make_optimizer
from stablelm.optim import MasterAdamW
from vision import evaluate as evaluate_script
from vision import synthetic
from vision import train as train_script
from vision.data import ReportDataset, collate_reports, load_annotation
from stablelm.lora import LoRALinear
from vision.pipeline import (build_model, evaluate, load_run_checkpoint, restore_training,
                             save_run_checkpoint)
from vision.report_model import ReportConfig, report_generation

GEN = dict(num_beams=1, min_new_tokens=0, max_new_tokens=40)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.main([str(root), "--studies", "120", "--views", "2", "--size", "224", "--seed", "3"])
    return root


def spec(tokenizer_dir, **report):
    config = ReportConfig(max_length=40, generation=report_generation().replace(**GEN))
    return {"lm": None, "lm_preset": "tiny", "encoder": None, "encoder_preset": "tiny", "tokenizer": tokenizer_dir,
            "seed": 0, "report": {**config.to_dict(), **report}, "dataset": "iu_xray", "precision": "fp32"}


def batch(synth, n=4, split="train"):
    data = ReportDataset(load_annotation(synth / "annotation.json"), synth / "images", split)
    return collate_reports([data[i] for i in range(n)])


def test_prompt_wrap_and_label_masking(synth, tokenizer_dir):
    model = build_model(spec(tokenizer_dir), "cpu", "fp32")
    b = batch(synth)
    b["image_mask"][1, 1] = False  # a study with one image
    embeds, labels, mask = model.training_inputs(b["images"], b["reports"], b["image_mask"])
    tok = model.tokenizer
    prompt_len = len(model.before_ids) + 49 + len(model.after_ids)
    assert model.before_ids[0].item() == tok.bos_id
    assert embeds.shape == (4, prompt_len + 40, model.lm.config.hidden_size)
    assert (labels[:, :prompt_len] == -100).all()
    for i, report in enumerate(b["reports"]):
        ids = (tok.encode(report, add_special_tokens=False) + [tok.eos_id])[:40]
        got = labels[i, prompt_len:]
        assert got[:len(ids)].tolist() == ids          # the end token is a target even though pad == end
        assert (got[len(ids):] == -100).all() and mask[i, prompt_len + len(ids):].sum() == 0
    # The visual tokens sit between the two prompt halves and follow the projector's LayerNorm.
    visual = model.encode_images(b["images"], b["image_mask"])
    start = len(model.before_ids)
    assert torch.allclose(embeds[:, start:start + 49], visual)
    # One-image study: its features are that image's alone (mean over real images only).
    alone = model.encode_images(b["images"][1:2, :1])
    assert torch.allclose(visual[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("lm_mode", ["lora", "full"])
def test_loss_is_the_labelled_positions_cross_entropy(synth, tokenizer_dir, lm_mode):
    """forward's loss (lm_loss: no attention mask, logits at every report slot, padding labelled -100) equals the
    explicit formula over training_inputs: full logits of the masked LM, cross-entropy at the labelled positions;
    the gradients of every trained tensor too. Reports both shorter than max_length and cut by it."""
    model = build_model(spec(tokenizer_dir, lm_mode=lm_mode, lora_dropout=0.0), "cpu", "fp32")
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):  # non-zero, so the adapters take part
            p.data.normal_(0, 0.02)
    b = batch(synth)
    b["reports"][0] = " ".join([b["reports"][0]] * 8)  # longer than max_length: truncated
    b["image_mask"][1, 1] = False

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    got = model(b["images"], b["reports"], b["image_mask"])
    got_grads = grads(got)
    embeds, labels, mask = model.training_inputs(b["images"], b["reports"], b["image_mask"])
    logits = model.lm(input_embeds=embeds, attention_mask=mask)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    want_grads = grads(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_global_only_uses_one_token(synth, tokenizer_dir):
    model = build_model(spec(tokenizer_dir, global_only=True), "cpu", "fp32")
    assert model.encode_images(batch(synth)["images"]).shape[1] == 1


def _train_steps(model, b, steps, lr=3e-3):
    opt, sched = make_optimizer(model, lr, 0.0, 100)
    losses = []
    for _ in range(steps):
        loss = model(b["images"], b["reports"], b["image_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, opt, sched


def test_training_step_reduces_loss(synth, tokenizer_dir):
    torch.manual_seed(0)
    model = build_model(spec(tokenizer_dir, lm_mode="lora", lora_dropout=0.0), "cpu", "fp32")
    losses, _, _ = _train_steps(model, batch(synth), 4)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("encoder_mode", ["frozen", "lora"])
def test_lora_leaves_frozen_weights_unchanged(synth, tokenizer_dir, encoder_mode):
    model = build_model(spec(tokenizer_dir, lm_mode="lora", encoder_mode=encoder_mode), "cpu", "fp32")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".base." in n for n in frozen) and all("lora_" in n or n.startswith("proj") for n in trained)
    assert any(n.startswith("encoder.") for n in trained) == (encoder_mode == "lora")
    _train_steps(model, batch(synth), 2)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert not torch.equal(model.proj.weight, trained["proj.weight"])
    n_lm = sum(isinstance(m, LoRALinear) for m in model.lm.modules())
    assert n_lm == 4 * model.lm.config.num_hidden_layers


def test_save_resume_gives_identical_next_step_loss(synth, tokenizer_dir, tmp_path):
    s = spec(tokenizer_dir, lm_mode="lora")  # dropout on: the RNG state must be restored too
    b = batch(synth)
    torch.manual_seed(1)
    model = build_model(s, "cpu", "fp32")
    _, opt, sched = _train_steps(model, b, 2)
    save_run_checkpoint(tmp_path / "last", model, s, epoch=0, step=2, optimizer=opt, scheduler=sched)
    next_loss, _, _ = _continue(model, opt, sched, b)

    run = load_run_checkpoint(tmp_path / "last")
    assert set(run.trained) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = build_model(run.spec, "cpu", "fp32")
    opt2, sched2 = make_optimizer(fresh, 3e-3, 0.0, 100)
    restore_training(run, fresh, opt2, sched2)
    resumed, _, _ = _continue(fresh, opt2, sched2, b)
    assert resumed == next_loss


def test_resume_keeps_this_machines_adamw_implementation(synth, tokenizer_dir, tmp_path):
    """A run saved with one AdamW implementation (the CPU's default) resumes under another (fused on a GPU; here
    foreach, which the CPU also runs): the implementation is the resuming optimizer's, the state the saved one."""
    s = spec(tokenizer_dir, lm_mode="lora", lora_dropout=0.0)
    b = batch(synth)
    torch.manual_seed(1)
    model = build_model(s, "cpu", "fp32")
    _, opt, sched = _train_steps(model, b, 2)
    assert opt.param_groups[0]["foreach"] is None
    save_run_checkpoint(tmp_path / "last", model, s, epoch=0, step=2, optimizer=opt, scheduler=sched)
    next_loss, _, _ = _continue(model, opt, sched, b)

    run = load_run_checkpoint(tmp_path / "last")
    fresh = build_model(run.spec, "cpu", "fp32")
    opt2, sched2 = make_optimizer(fresh, 3e-3, 0.0, 100)
    for group in opt2.param_groups:
        group["foreach"] = True
    restore_training(run, fresh, opt2, sched2)
    assert all(g["foreach"] is True for g in opt2.param_groups)
    assert opt2.state_dict()["state"][0]["step"] == 2
    resumed, _, _ = _continue(fresh, opt2, sched2, b)
    assert resumed == pytest.approx(next_loss, rel=1e-5)


def test_bf16_mixed_full_fine_tuning_trains_and_resumes_with_its_master_weights(synth, tokenizer_dir, tmp_path):
    """precision bf16-mixed: the whole LM trains in bf16 with float32 master weights in the optimizer
    (MasterAdamW); the loss falls, the masters go into the run checkpoint, and the resumed run takes the same next
    step. Resuming it as a bf16 run (float32 trained weights, no masters) is refused with the reason."""
    s = {**spec(tokenizer_dir, lm_mode="full", lora_dropout=0.0), "precision": "bf16-mixed"}
    b = batch(synth)
    torch.manual_seed(1)
    model = build_model(s, "cpu", "bf16-mixed")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    assert sum(p.numel() for p in trained) > sum(p.numel() for p in model.lm.parameters()) * 0.99
    losses, opt, sched = _train_steps(model, b, 4, lr=1e-3)
    assert isinstance(opt, MasterAdamW) and losses[-1] < losses[0] - 0.1, losses
    save_run_checkpoint(tmp_path / "last", model, s, epoch=0, step=4, optimizer=opt, scheduler=sched)
    next_loss, _, _ = _continue(model, opt, sched, b)

    run = load_run_checkpoint(tmp_path / "last")
    assert all(run.optimizer["state"][n]["master"].dtype == torch.float32 for n in run.optimizer["state"])
    fresh = build_model(run.spec, "cpu", "bf16-mixed")
    opt2, sched2 = make_optimizer(fresh, 1e-3, 0.0, 100)
    restore_training(run, fresh, opt2, sched2)
    resumed, _, _ = _continue(fresh, opt2, sched2, b)
    assert resumed == next_loss

    as_bf16 = build_model(run.spec, "cpu", "bf16")
    opt3, sched3 = make_optimizer(as_bf16, 1e-3, 0.0, 100)
    with pytest.raises(CheckpointError, match="master weight, which only a bf16-mixed run keeps"):
        restore_training(run, as_bf16, opt3, sched3)


@pytest.mark.gpu
def test_gpu_adamw_is_fused_and_steps_as_foreach_does():
    """On CUDA make_optimizer returns torch's fused AdamW; one step of it lands where the foreach AdamW's does."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).cuda()
    twin = torch.nn.Linear(64, 48).cuda()
    twin.load_state_dict(layer.state_dict())
    fused, _ = make_optimizer(layer, 1e-2, 0.05, 10)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, foreach=True)
    assert fused.param_groups[0]["fused"] is True
    x = torch.randn(16, 64, device="cuda")
    for module, opt in ((layer, fused), (twin, plain)):
        for _ in range(3):
            module(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _continue(model, opt, sched, b):
    loss = model(b["images"], b["reports"], b["image_mask"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return model(b["images"], b["reports"], b["image_mask"]).item(), opt, sched


def test_generate_goes_through_stablelm_generate(synth, tokenizer_dir):
    model = build_model(spec(tokenizer_dir), "cpu", "fp32").eval()
    b = batch(synth, 2)
    texts = model.generate(b["images"], b["image_mask"], max_new_tokens=6)
    beams = model.generate(b["images"], b["image_mask"], max_new_tokens=6, num_beams=3)
    assert len(texts) == len(beams) == 2 and all(isinstance(t, str) for t in texts + beams)


def test_bad_inputs(synth, tokenizer_dir):
    model = build_model(spec(tokenizer_dir), "cpu", "fp32")
    b = batch(synth, 2)
    with pytest.raises(ValueError, match="reports for"):
        model(b["images"], b["reports"][:1])
    with pytest.raises(ValueError, match="n_images"):
        model.encode_images(b["images"][:, 0])
    with pytest.raises(ValueError, match="at least one image"):
        model.encode_images(b["images"], torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="lm_mode"):
        ReportConfig(lm_mode="half")


def test_tiny_model_learns_the_synthetic_set(synth, tmp_path):
    """A short run on the CPU: the trained model's validation metrics must be far above the untrained one's
    (measured: untrained BLEU-4 ~0.02, CIDEr ~0.01; trained for 15 epochs BLEU-4 ~0.3, CIDEr ~1)."""
    out = tmp_path / "run"
    args = ["--annotation", str(synth / "annotation.json"), "--image-dir", str(synth / "images"),
            "--lm-mode", "full", "--epochs", "15", "--batch-size", "8", "--lr", "2e-3", "--max-length", "48",
            "--num-beams", "1", "--min-new-tokens", "0", "--max-new-tokens", "48", "--out", str(out)]
    results = train_script.main(args)
    best = results["best"]["val"]
    untrained = build_model(load_run_checkpoint(out / "best").spec, "cpu", "fp32")
    val = ReportDataset(load_annotation(synth / "annotation.json"), synth / "images", "val")
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate_reports)
    before = evaluate(untrained, loader, "cpu", num_beams=1, min_new_tokens=0, max_new_tokens=48)["scores"]
    assert best["BLEU_4"] > 0.15 and best["BLEU_4"] > before["BLEU_4"] + 0.1, (before, best)
    assert best["CIDEr"] > 0.5 and best["CIDEr"] > before["CIDEr"] + 0.4, (before, best)
    assert json.loads((out / "results.json").read_text())["best"]["epoch"] == results["best"]["epoch"]
    # train_log.jsonl: one line per step, in order (each read one step late), averaging to each epoch's loss
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and log[-1]["step"] == results["epochs"][-1]["step"]
    for record in results["epochs"]:
        epoch_losses = [r["loss"] for r in log if r["epoch"] == record["epoch"]]
        assert record["train_loss"] == pytest.approx(sum(epoch_losses) / len(epoch_losses))
    # evaluate.py reloads best (trained tensors only) and reproduces the validation scores
    again = evaluate_script.main(["--checkpoint", str(out / "best"), "--annotation",
                                  str(synth / "annotation.json"), "--image-dir", str(synth / "images"),
                                  "--split", "val", "--out", str(tmp_path / "val.json")])
    assert again["scores"] == pytest.approx(best)
