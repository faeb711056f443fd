r"""Evaluate a trained report model: generate reports for a split and score them.

    python -m vision.evaluate --checkpoint runs/iu_lora/best.pt --annotation DATA/annotation.json \
        --image-dir DATA/images --split test --out runs/iu_lora/test_results.json [--num-beams 3 ...]

The checkpoint carries what is needed to rebuild the model (LM / encoder / tokenizer locations and the report
config); only its trained tensors are loaded on top. Decoding flags left out keep the checkpoint's settings.
Writes the metric scores and every generated report.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stablelm.generate import GenerationConfig

from . import cli
from .data import SPLITS, ReportDataset, collate_reports, load_annotation
from .pipeline import build_model, evaluate, load_trained
from .report_model import GENERATION_SET_BY_MODEL


def parse_args(argv=None):
    ap = cli.parser("python -m vision.evaluate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="a run checkpoint (best.pt or last.pt)")
    ap.add_argument("--annotation", required=True, help="R2GenGPT-style annotation.json")
    ap.add_argument("--image-dir", required=True, help="directory the annotation's image paths are relative to")
    ap.add_argument("--split", default="test", choices=SPLITS, help="split to generate for")
    ap.add_argument("--batch-size", type=int, default=8, help="studies per generate call")
    ap.add_argument("--limit", type=int, help="stop after this many studies")
    cli.add_fields(ap.add_argument_group("decoding (GenerationConfig)"), GenerationConfig, "generation",
                   skip=GENERATION_SET_BY_MODEL, rename={"seed": "sampling_seed"}, unset=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--out", required=True, help="JSON file for the scores and generated reports")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = state["spec"]
    device = torch.device(args.device)
    model = build_model(spec, device, spec.get("precision", "fp32") if device.type == "cuda" else "fp32")
    load_trained(model, state)
    overrides = cli.fields_of(args, "generation")
    generation = model.config.generation.replace(**overrides)
    dataset = ReportDataset(load_annotation(args.annotation), args.image_dir, args.split, dataset=spec["dataset"],
                            train=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_reports)
    t0 = time.perf_counter()
    result = evaluate(model, loader, device, args.limit, desc=f"generate {args.split}", **overrides)
    result.update(split=args.split, checkpoint=args.checkpoint, epoch=state["epoch"],
                  seconds=time.perf_counter() - t0, generation=dataclasses.asdict(generation))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["scores"], indent=2))
    return result


if __name__ == "__main__":
    main()
