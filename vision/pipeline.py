"""The report model's pipeline under the CLIs: building the model from a spec, run checkpoints, the training loop
and the evaluation loop (generation + metrics).

    model = build_model(spec, "cpu", "fp32")      # spec: LM / encoder / tokenizer locations + ReportConfig dict
    results = train(spec, TrainConfig(epochs=5), annotation, "DATA/images", Path("runs/x"), "cuda")
    scores = evaluate(model, loader, "cuda")["scores"]

A spec is a JSON-ready dict ({"lm", "lm_preset", "encoder", "encoder_preset", "tokenizer", "seed", "report",
"dataset", "precision"}); every run checkpoint stores it, so evaluation rebuilds the model from the checkpoint
alone and loads only the trained tensors on top.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import stablelm
from stablelm.lora import make_optimizer
from stablelm.tokenizer import Tokenizer

from .data import ReportDataset, collate_reports
from .metrics import compute_scores, meteor_backend, weighted_score
from .report_model import ReportConfig, ReportModel
from .swin import SwinEncoder, swin_base_224, swin_tiny_test
from .swin_checkpoint import load_converted, load_hf_swin

ENCODER_PRESETS = {"swin-base": swin_base_224, "tiny": swin_tiny_test}
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """How a run trains and picks its best checkpoint. `help` metadata is what `python -m vision.train` shows."""
    epochs: int = field(default=5, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "studies per step (and per validation batch)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (cosine decay to 1%%)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    val_limit: int | None = field(default=None, metadata={"help": "validate on at most this many studies"})
    score_weights: dict[str, float] = field(default_factory=lambda: {"BLEU_4": 0.5, "CIDEr": 0.5}, metadata={
        "help": "weighted sum of validation metrics that picks the best checkpoint"})
    augment: bool = field(default=False, metadata={
        "help": "R2Gen-style random crop for training images (R2GenGPT trains without augmentation)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the shuffles"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})


# ---------------------------------------------------------------------------- building
def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on `texts` (for random-weight LMs, which have no tokenizer of their own)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return out_dir


def build_model(spec: dict, device, precision: str) -> ReportModel:
    """Rebuild a ReportModel from a spec (also stored in every checkpoint)."""
    if spec.get("lm"):
        lm = stablelm.load(spec["lm"], device=device)
    else:
        lm = stablelm.StableLM.random(stablelm.preset(spec["lm_preset"]), seed=spec.get("seed", 0), device=device)
    enc_path = spec.get("encoder")
    if enc_path:
        encoder = load_converted(enc_path) if (Path(enc_path) / "encoder.safetensors").exists() else \
            load_hf_swin(enc_path)
    else:
        torch.manual_seed(spec.get("seed", 0))
        encoder = SwinEncoder(ENCODER_PRESETS[spec["encoder_preset"]]())
    encoder = encoder.to(device)
    if precision == "bf16":
        # Frozen weights in bf16; whatever trains (projector, adapters) keeps float32 master weights.
        lm.to(torch.bfloat16)
        encoder.to(torch.bfloat16)
    tokenizer = Tokenizer.from_dir(spec["tokenizer"] or spec["lm"])
    if tokenizer.vocab_size > lm.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the LM only {lm.config.vocab_size}")
    model = ReportModel(encoder, lm, tokenizer, ReportConfig.from_dict(spec["report"])).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: ReportModel, optimizer, scheduler, epoch: int, step: int, spec: dict,
                    extra: dict | None = None) -> None:
    state = {"trained": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
             "step": step, "spec": spec, "rng": torch.get_rng_state(), **(extra or {})}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_trained(model: ReportModel, state: dict) -> None:
    """Put a checkpoint's trained tensors into the model; names must match exactly."""
    expected = set(model.trainable_state_dict())
    got = set(state["trained"])
    if expected != got:
        raise ValueError(f"checkpoint does not fit this model: missing {sorted(expected - got)[:5]}, "
                         f"unexpected {sorted(got - expected)[:5]}")
    model.load_state_dict(state["trained"], strict=False)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: ReportModel, loader, device, limit: int | None = None, desc="eval", **gen) -> dict:
    """Generate for every study of `loader` and score against the references."""
    model.eval()
    refs, hyps, samples = {}, {}, []
    for batch in tqdm(loader, desc=desc, leave=False):
        texts = model.generate(batch["images"].to(device, model.lm.embed.weight.dtype),
                               batch["image_mask"].to(device), **gen)
        for sid, ref, hyp in zip(batch["ids"], batch["reports"], texts):
            refs[sid], hyps[sid] = [ref], [hyp]
            samples.append({"id": sid, "reference": ref, "generated": hyp})
        if limit and len(samples) >= limit:
            break
    return {"scores": compute_scores(refs, hyps), "samples": samples}


# ---------------------------------------------------------------------------- training
def train(spec: dict, config: TrainConfig, annotation: dict, image_dir, out: Path, device,
          resume: str | Path | None = None) -> dict:
    """Train, validating after every epoch: `last.pt` every epoch, `best.pt` when the weighted validation score
    improves, OUT/results.json. `resume` continues from a last.pt."""
    torch.manual_seed(config.seed)
    device = torch.device(device)
    model = build_model(spec, device, spec["precision"])
    train_set = ReportDataset(annotation, image_dir, "train", dataset=spec["dataset"], train=config.augment)
    val_set = ReportDataset(annotation, image_dir, "val", dataset=spec["dataset"], train=False)
    gen = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=gen,
                              collate_fn=collate_reports, num_workers=config.workers, drop_last=False)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate_reports,
                            num_workers=config.workers)
    optimizer, scheduler = make_optimizer(model, config.lr, config.weight_decay, config.epochs * len(train_loader))
    results = {"spec": spec, "train": dataclasses.asdict(config), "meteor": meteor_backend(), "epochs": [],
               "best": None}
    start_epoch, step = 0, 0
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        load_trained(model, state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        results = state.get("results", results)

    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_trained:,} of {sum(p.numel() for p in model.parameters()):,}")
    for epoch in range(start_epoch, config.epochs):
        gen.manual_seed(config.seed + epoch)  # the shuffle of an epoch does not depend on earlier resumes
        model.train()
        losses, t0 = [], time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}")
        for batch in bar:
            images = batch["images"].to(device, model.lm.embed.weight.dtype)
            loss = model(images, batch["reports"], batch["image_mask"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elapsed = time.perf_counter() - t0
        val = evaluate(model, val_loader, device, config.val_limit, desc="validate")
        score = weighted_score(val["scores"], config.score_weights)
        record = {"epoch": epoch, "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                  "epoch_seconds": elapsed, "val": val["scores"], "val_score": score,
                  "val_samples": val["samples"][:3]}
        results["epochs"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "val_samples"}))
        if results["best"] is None or score > results["best"]["val_score"]:
            results["best"] = {"epoch": epoch, "val_score": score, "val": val["scores"]}
            save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, step, spec, {"results": results})
        save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, step, spec, {"results": results})
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
