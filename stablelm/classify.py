"""Fine-tune a StableLM sequence classifier on a CSV / JSONL of (text, label): LoRA, full or head-only.

    python -m stablelm.classify train --model CONVERTED_OR_HF_DIR --data train.jsonl --eval val.jsonl \\
        --lora-r 8 --epochs 3 --out runs/triage
    python -m stablelm.classify evaluate --model runs/triage --data test.jsonl

--model is a causal LM (a fresh `score` head goes on its decoder, labels taken from the training data) or a
sequence classifier saved by an earlier run (trained further, same labels). JSONL lines are objects with "text"
and "label" fields, CSV files have a header with those columns (--text-field / --label-field rename them).
Labels are strings or integers; integers 0..n-1 are kept as the ids, anything else is numbered in sorted order.

Training uses the same pieces as the report model (stablelm.lora: the adapters on every decoder linear, AdamW with
cosine decay): with --mode lora the decoder is frozen and adapters plus the head train, --mode full trains
everything, --mode head the head alone. Each epoch shows a tqdm bar and ends with one metrics line
(`epoch 1/3  train_loss ...  eval_loss ...  accuracy ...  macro_f1 ...`). The result is written to --out as a
converted checkpoint (adapters merged into the weights, safetensors, no pickles) with the tokenizer files and
metrics.json: `stablelm.load(out)` returns the StableLMForSequenceClassification.

The same as an API:

    from stablelm import classify
    examples = classify.read_examples("train.jsonl")
    model, tokenizer = classify.build("CONVERTED_DIR", classify.label_names(examples))
    classify.set_trainable(model, "lora", r=8)
    history = classify.fit(model, tokenizer, examples, eval_examples, epochs=3)
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .cli import HelpFormatter
from .lora import LM_TARGETS, apply_lora, make_optimizer, merge_lora
from .model import StableLMForSequenceClassification
from .tokenizer import Tokenizer

MODES = ("lora", "full", "head")


# ---------------------------------------------------------------- data
def read_examples(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs of a .jsonl or .csv file; labels as strings. Errors name the file and line."""
    path = Path(path).expanduser()
    rows = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for field in (text_field, label_field):
                if field not in (reader.fieldnames or []):
                    raise ValueError(f"{path}: no {field!r} column (columns: {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                rows.append((line, row[text_field], row[label_field]))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line}: not JSON ({e})") from e
                if not isinstance(row, dict) or text_field not in row or label_field not in row:
                    raise ValueError(f"{path}:{line}: expected an object with {text_field!r} and {label_field!r}")
                rows.append((line, row[text_field], row[label_field]))
    else:
        raise ValueError(f"{path}: expected a .jsonl or .csv file")
    out = []
    for line, text, label in rows:
        if not isinstance(text, str) or isinstance(label, (bool, float, list, dict)) or label is None:
            raise ValueError(f"{path}:{line}: text must be a string and label a string or an integer")
        out.append((text, str(label)))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def label_names(examples: list[tuple[str, str]]) -> dict[int, str]:
    """id2label for the labels in `examples`: integers 0..n-1 keep their value as the id, otherwise sorted order."""
    names = sorted({label for _, label in examples})
    if all(n.lstrip("-").isdigit() for n in names):
        ids = sorted(int(n) for n in names)
        if ids == list(range(len(ids))):
            return {i: str(i) for i in ids}
        names = [str(i) for i in ids]
    return dict(enumerate(names))


def batches(examples, tokenizer: Tokenizer, label2id: dict[str, int], batch_size: int, max_length: int,
            pad_id: int, shuffle: bool = False, seed: int = 0):
    """(input_ids, attention_mask, labels) batches, right padded with pad_id; texts cut to max_length tokens."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for at in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[at:at + batch_size]]
        for text, label in chunk:
            if label not in label2id:
                raise ValueError(f"label {label!r} is not one of the model's labels {sorted(label2id)}")
        seqs = [tokenizer.encode(text)[:max_length] or [pad_id] for text, _ in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        yield ids, mask, torch.tensor([label2id[label] for _, label in chunk])


# ---------------------------------------------------------------- model
def build(model_dir: str | Path, id2label: dict[int, str] | None = None, tokenizer_dir: str | Path | None = None,
          device="cpu", dtype: str | None = None) -> tuple[StableLMForSequenceClassification, Tokenizer]:
    """(classifier, tokenizer) from a checkpoint directory: a saved classifier as it is (its labels must equal
    id2label when given), anything else as the decoder under a new `score` head for id2label."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir or model_dir)
    base = checkpoint.load(model_dir, device=device, dtype=dtype)
    if isinstance(base, StableLMForSequenceClassification):
        have = base.config.labels()[0]
        if id2label is not None and have != id2label:
            raise ValueError(f"{model_dir} classifies into {have}, the data has labels {id2label}")
        if base.config.pad_token_id is None:
            # Batches need a pad id to find each row's last token; the tokenizer's is what they are padded with.
            base.config.pad_token_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        return base, tokenizer
    if id2label is None:
        raise ValueError(f"{model_dir} is not a sequence classifier: give the labels (id2label) for a new head")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    model = StableLMForSequenceClassification.from_backbone(
        base, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        pad_token_id=pad_id, problem_type="single_label_classification")
    return model, tokenizer


def set_trainable(model: StableLMForSequenceClassification, mode: str, r: int = 8, alpha: float = 16.0,
                  dropout: float = 0.05) -> list[str]:
    """Freeze what `mode` does not train; LoRA adapters (rank r) on every decoder linear for mode "lora". The
    trained tensors are float32 (a bf16 decoder stays bf16). Returns the trainable parameter names."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "lora":
        apply_lora(model, LM_TARGETS, r, alpha, dropout)
    for p in model.score.parameters():
        p.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- metrics
def scores(gold: list[int], pred: list[int]) -> dict[str, float]:
    """accuracy and macro F1 (mean F1 over the classes seen in gold or pred, as sklearn's default)."""
    accuracy = sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(len(f1s), 1)}


@torch.no_grad()
def evaluate(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512, desc: str = "eval") -> dict:
    """loss, accuracy and macro F1 of `model` on `examples`."""
    was_training = model.training
    model.eval()
    label2id = model.config.labels()[1]
    device = model.device
    gold, pred, loss_sum = [], [], 0.0
    for ids, mask, labels in tqdm(batches(examples, tokenizer, label2id, batch_size, max_length,
                                          model.config.pad_token_id),
                                  desc=desc, total=-(-len(examples) // batch_size), leave=False, file=sys.stderr):
        out = model(ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        loss_sum += out.loss.item() * len(labels)
        gold += labels.tolist()
        pred += out.logits.argmax(-1).tolist()
    model.train(was_training)
    return {"loss": loss_sum / len(examples), **scores(gold, pred)}


def fit(model, tokenizer, train_examples, eval_examples=None, epochs: int = 3, batch_size: int = 8,
        lr: float = 2e-4, weight_decay: float = 0.0, max_length: int = 512, seed: int = 0,
        max_grad_norm: float = 1.0, log=print) -> list[dict]:
    """Train (what set_trainable left trainable) with AdamW + cosine decay; one metrics dict per epoch, each
    also logged as one line. The eval metrics come from eval_examples, or the training set without them."""
    torch.manual_seed(seed)
    label2id = model.config.labels()[1]
    device = model.device
    steps_per_epoch = -(-len(train_examples) // batch_size)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    history = []
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(batches(train_examples, tokenizer, label2id, batch_size, max_length, model.config.pad_token_id,
                           shuffle=True, seed=seed + epoch),
                   desc=f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, file=sys.stderr)
        for ids, mask, labels in bar:
            loss = model(ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        metrics = {"epoch": epoch + 1, "train_loss": total / seen}
        ev = evaluate(model, tokenizer, eval_examples or train_examples, batch_size, max_length)
        metrics.update({"eval_loss": ev["loss"], "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"]})
        history.append(metrics)
        log(f"epoch {epoch + 1}/{epochs}  train_loss {metrics['train_loss']:.4f}  eval_loss {ev['loss']:.4f}  "
            f"accuracy {ev['accuracy']:.4f}  macro_f1 {ev['macro_f1']:.4f}")
    model.eval()
    return history


def save(model, out: str | Path, tokenizer_dir: str | Path | None = None, extra: dict | None = None,
         overwrite: bool = False) -> None:
    """Write `model` as a converted checkpoint (LoRA merged in first) + tokenizer files + metrics.json."""
    merge_lora(model)
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with checkpoint.atomic_dir(out, overwrite) as tmp:
        checkpoint.write_project_dir(tmp, model.config, tensors)
        if tokenizer_dir is not None:
            checkpoint.copy_tokenizer_files(Path(tokenizer_dir).expanduser(), tmp)
        if extra is not None:
            (tmp / "metrics.json").write_text(json.dumps(extra, indent=2))


# ---------------------------------------------------------------- CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stablelm.classify", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "evaluate"):
        p = sub.add_parser(name, formatter_class=HelpFormatter)
        p.add_argument("--model", required=True, help="converted or Hugging Face checkpoint directory")
        p.add_argument("--data", required=True, help=".jsonl or .csv of text,label (training data for train)")
        p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
        p.add_argument("--text-field", default="text")
        p.add_argument("--label-field", default="label")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-length", type=int, default=512, help="tokens per text (longer texts are cut)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), help="decoder dtype (default: as stored)")
    t = sub.choices["train"]
    t.add_argument("--eval", help=".jsonl or .csv scored after every epoch (default: the training data)")
    t.add_argument("--out", required=True, help="output directory (a converted checkpoint)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--mode", choices=MODES, default="lora")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    fields = dict(text_field=args.text_field, label_field=args.label_field)
    data = read_examples(args.data, **fields)
    tokenizer_dir = args.tokenizer or args.model
    if args.command == "evaluate":
        model, tokenizer = build(args.model, None, tokenizer_dir, args.device, args.dtype)
        result = evaluate(model, tokenizer, data, args.batch_size, args.max_length)
        print(f"eval_loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  macro_f1 {result['macro_f1']:.4f}")
        return result
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    eval_data = read_examples(args.eval, **fields) if args.eval else None
    model, tokenizer = build(args.model, label_names(data), tokenizer_dir, args.device, args.dtype)
    trainable = set_trainable(model, args.mode, args.lora_r, args.lora_alpha, args.lora_dropout)
    model.gradient_checkpointing = args.gradient_checkpointing
    n_train = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
    print(f"{type(model).__name__}: {model.num_params():,} parameters, {n_train:,} trained ({args.mode}); "
          f"labels {model.config.labels()[0]}")
    history = fit(model, tokenizer, data, eval_data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, max_length=args.max_length, seed=args.seed)
    save(model, args.out, tokenizer_dir, {"history": history, "args": vars(args)}, args.overwrite)
    print(f"saved {args.out}")
    return {"history": history}


if __name__ == "__main__":
    main()
