"""Evaluate a trained report model: generate reports for a split and score them.

    python -m vision.evaluate --checkpoint runs/iu_lora/best.pt --annotation DATA/annotation.json \
        --image-dir DATA/images --split test --out runs/iu_lora/test_results.json [--num-beams 3 ...]

The checkpoint carries what is needed to rebuild the model (LM / encoder / tokenizer locations and the report
config); only its trained tensors are loaded on top. Writes the metric scores and every generated report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import ReportDataset, collate_reports, load_annotation
from .train import build_model, evaluate, load_trained


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--annotation", required=True)
    ap.add_argument("--image-dir", required=True)
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--num-beams", type=int)
    ap.add_argument("--min-new-tokens", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = state["spec"]
    device = torch.device(args.device)
    model = build_model(spec, device, spec.get("precision", "fp32") if device.type == "cuda" else "fp32")
    load_trained(model, state)
    dataset = ReportDataset(load_annotation(args.annotation), args.image_dir, args.split, dataset=spec["dataset"],
                            train=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_reports)
    gen = {k: v for k, v in dict(num_beams=args.num_beams, min_new_tokens=args.min_new_tokens,
                                  max_new_tokens=args.max_new_tokens,
                                  repetition_penalty=args.repetition_penalty).items() if v is not None}
    t0 = time.perf_counter()
    result = evaluate(model, loader, device, args.limit, desc=f"generate {args.split}", **gen)
    result.update(split=args.split, checkpoint=args.checkpoint, epoch=state["epoch"],
                  seconds=time.perf_counter() - t0, generation={**{k: spec["report"][k] for k in (
                      "num_beams", "min_new_tokens", "max_new_tokens", "repetition_penalty")}, **gen})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["scores"], indent=2))
    return result


if __name__ == "__main__":
    main()
