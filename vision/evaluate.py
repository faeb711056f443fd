r"""Evaluate a trained report model: generate reports for a split and score them.

    python -m vision.evaluate --checkpoint runs/iu_lora/best --annotation DATA/annotation.json \
        --image-dir DATA/images --split test --out runs/iu_lora/test_results.json [--num-beams 3 ...]

The checkpoint directory carries what is needed to rebuild the model (LM / encoder locations, its own copy of
the tokenizer, the report config); only its trained tensors are loaded on top, and nothing in it is unpickled.
Decoding flags left out keep the checkpoint's settings. Every image header is checked before generating. Writes
the metric scores and every generated report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from torch.utils.data import DataLoader

from stablelm.generate import GenerationConfig

from . import cli
from .data import SPLITS, ReportDataset, collate_reports, load_annotation
from .pipeline import evaluate, load_run, write_json
from .report_model import GENERATION_SET_BY_MODEL


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m vision.evaluate", __doc__)
    ap.add_argument("--checkpoint", type=cli.path, required=True,
                    help="a run checkpoint directory (runs/x/best or runs/x/last)")
    ap.add_argument("--annotation", type=cli.path, required=True, help="R2GenGPT-style annotation.json")
    ap.add_argument("--image-dir", type=cli.path, required=True,
                    help="directory the annotation's image paths are relative to")
    ap.add_argument("--split", default="test", choices=SPLITS, help="split to generate for")
    ap.add_argument("--batch-size", type=int, default=8, help="studies per generate call")
    ap.add_argument("--limit", type=int, help="stop after this many studies")
    cli.add_fields(ap.add_argument_group("decoding (GenerationConfig)"), GenerationConfig, "generation",
                   skip=GENERATION_SET_BY_MODEL, rename={"seed": "sampling_seed"}, unset=True)
    ap.add_argument("--device", type=cli.device, default=cli.default_device(), help="torch device")
    ap.add_argument("--out", type=cli.path, required=True, help="JSON file for the scores and generated reports")
    return ap


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Evaluate as parsed `args` say: data and flags are checked before the model is built."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError(f"--batch-size and --limit must be >= 1 (got {args.batch_size}, {args.limit})")
    overrides = cli.fields_of(args, "generation")
    GenerationConfig().replace(**overrides)  # a bad value is reported now, not after the model is built
    annotation = load_annotation(args.annotation)
    model, run_state = load_run(args.checkpoint, args.device)
    generation = model.config.generation.replace(**overrides)
    dataset = ReportDataset(annotation, args.image_dir, args.split, dataset=run_state.spec["dataset"], train=False)
    dataset.check_images()
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_reports)
    t0 = time.perf_counter()
    result = evaluate(model, loader, args.device, args.limit, desc=f"generate {args.split}", **overrides)
    result.update(split=args.split, checkpoint=str(run_state.directory), epoch=run_state.epoch,
                  seconds=time.perf_counter() - t0, generation=dataclasses.asdict(generation))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps(result["scores"], indent=2))
    return result


def main(argv=None) -> dict:
    """Parse `argv` and evaluate; errors propagate as exceptions (to callers and tests)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli.run_cli(build_parser(), run)
