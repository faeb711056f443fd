"""Train the report-generation model on an R2GenGPT-style annotation.json.

    python -m vision.train --annotation DATA/annotation.json --image-dir DATA/images --dataset iu_xray \
        --lm CONVERTED_LM_DIR --encoder HF_SWIN_DIR --lm-mode lora --epochs 5 --out runs/iu_lora

Without --lm / --encoder it builds small random-weight models (`--lm-preset tiny`, `--encoder-preset tiny`)
and, without --tokenizer, trains a byte-level BPE on the training reports: the whole pipeline then runs on a
CPU. Each epoch ends with validation (generation + metrics); `last.pt` is written every epoch and `best.pt`
when the weighted validation score improves. Checkpoints keep only the trained tensors plus the optimizer,
scheduler, RNG state, epoch, step and what is needed to rebuild the model. `--resume runs/x/last.pt`
continues a run. Results go to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import stablelm
from stablelm.tokenizer import Tokenizer

from .data import ReportDataset, clean_report, collate_reports, load_annotation
from .metrics import compute_scores, meteor_backend, weighted_score
from .report_model import ReportConfig, ReportModel
from .swin import SwinEncoder, load_converted, load_hf_swin, swin_base_224, swin_tiny_test

ENCODER_PRESETS = {"swin-base": swin_base_224, "tiny": swin_tiny_test}


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
    model = ReportModel(encoder, lm, tokenizer, ReportConfig(**spec["report"])).to(device)
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


def make_optimizer(model: ReportModel, lr: float, weight_decay: float, total_steps: int, min_lr_ratio=0.01):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def cosine(step):
        progress = min(step / max(total_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


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


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotation", required=True)
    ap.add_argument("--image-dir", required=True)
    ap.add_argument("--dataset", choices=["iu_xray", "mimic_cxr"], default="iu_xray")
    ap.add_argument("--lm", help="converted (or Hugging Face) StableLM directory")
    ap.add_argument("--lm-preset", default="tiny", help="random-weight LM preset when --lm is not given")
    ap.add_argument("--tokenizer", help="directory with tokenizer.json (default: the LM's)")
    ap.add_argument("--encoder", help="Hugging Face SwinModel directory or a converted encoder")
    ap.add_argument("--encoder-preset", default="tiny", choices=sorted(ENCODER_PRESETS))
    ap.add_argument("--encoder-mode", choices=["frozen", "lora"], default="frozen")
    ap.add_argument("--lm-mode", choices=["frozen", "lora", "full"], default="frozen")
    ap.add_argument("--global-only", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--min-new-tokens", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--repetition-penalty", type=float, default=1.2)
    ap.add_argument("--val-limit", type=int, help="validate on at most this many studies")
    ap.add_argument("--score-weights", default="BLEU_4=0.5,CIDEr=0.5",
                    help="weighted sum of validation metrics that picks best.pt")
    ap.add_argument("--augment", action="store_true",
                    help="R2Gen-style random crop for training images (R2GenGPT trains without augmentation)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", help="a last.pt to continue from")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    annotation = load_annotation(args.annotation)
    tokenizer_dir = args.tokenizer
    if not tokenizer_dir and not args.lm:
        lm_vocab = stablelm.preset(args.lm_preset).vocab_size
        texts = [clean_report(e["report"], args.dataset) for e in annotation["train"]] + [ReportConfig().instruction]
        tokenizer_dir = str(build_tokenizer(texts, out / "tokenizer", lm_vocab))
    report = ReportConfig(global_only=args.global_only, encoder_mode=args.encoder_mode, lm_mode=args.lm_mode,
                          lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          max_length=args.max_length, num_beams=args.num_beams, min_new_tokens=args.min_new_tokens,
                          max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                          gradient_checkpointing=args.gradient_checkpointing)
    spec = {"lm": args.lm, "lm_preset": args.lm_preset, "encoder": args.encoder,
            "encoder_preset": args.encoder_preset, "tokenizer": tokenizer_dir, "seed": args.seed,
            "report": report.to_dict(), "dataset": args.dataset, "precision": precision}
    model = build_model(spec, device, precision)

    train_set = ReportDataset(annotation, args.image_dir, "train", dataset=args.dataset, train=args.augment)
    val_set = ReportDataset(annotation, args.image_dir, "val", dataset=args.dataset, train=False)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                              collate_fn=collate_reports, num_workers=args.workers, drop_last=False)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate_reports,
                            num_workers=args.workers)
    total_steps = args.epochs * len(train_loader)
    optimizer, scheduler = make_optimizer(model, args.lr, args.weight_decay, total_steps)
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.score_weights.split(","))}
    results = {"spec": spec, "args": vars(args), "meteor": meteor_backend(), "epochs": [], "best": None}
    start_epoch, step = 0, 0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        load_trained(model, state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        results = state.get("results", results)

    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_trained:,} of {sum(p.numel() for p in model.parameters()):,}")
    for epoch in range(start_epoch, args.epochs):
        gen.manual_seed(args.seed + epoch)  # the shuffle of an epoch does not depend on earlier resumes
        model.train()
        losses, t0, tokens = [], time.perf_counter(), 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}")
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
            tokens += images.shape[0] * args.max_length
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elapsed = time.perf_counter() - t0
        val = evaluate(model, val_loader, device, args.val_limit, desc="validate")
        score = weighted_score(val["scores"], weights)
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


if __name__ == "__main__":
    main()
