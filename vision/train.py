r"""Train the report-generation model on an R2GenGPT-style annotation.json.

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

from pathlib import Path

import torch

import stablelm
from stablelm.generate import GenerationConfig

from . import cli
from .data import DATASETS, clean_report, load_annotation
from .pipeline import ENCODER_PRESETS, PRECISIONS, TrainConfig, build_tokenizer, train
from .report_model import GENERATION_SET_BY_MODEL, ReportConfig


def parse_args(argv=None):
    ap = cli.parser("python -m vision.train", __doc__)
    data = ap.add_argument_group("data")
    data.add_argument("--annotation", required=True, help="R2GenGPT-style annotation.json")
    data.add_argument("--image-dir", required=True, help="directory the annotation's image paths are relative to")
    data.add_argument("--dataset", choices=DATASETS, default=DATASETS[0], help="report cleaning rules")
    models = ap.add_argument_group("models")
    models.add_argument("--lm", help="converted (or Hugging Face) StableLM directory")
    models.add_argument("--lm-preset", default="tiny", choices=sorted(stablelm.PRESETS),
                        help="random-weight LM preset when --lm is not given")
    models.add_argument("--tokenizer", help="directory with tokenizer.json (default: the LM's, or a BPE trained on "
                                            "the training reports without --lm)")
    models.add_argument("--encoder", help="Hugging Face SwinModel directory or a converted encoder")
    models.add_argument("--encoder-preset", default="tiny", choices=sorted(ENCODER_PRESETS),
                        help="random-weight encoder preset when --encoder is not given")
    models.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on the CPU")
    cli.add_fields(ap.add_argument_group("report model (ReportConfig)"), ReportConfig, "report", skip={"generation"})
    cli.add_fields(ap.add_argument_group("validation decoding (GenerationConfig)"), GenerationConfig, "generation",
                   skip=GENERATION_SET_BY_MODEL, defaults=ReportConfig().generation, rename={"seed": "sampling_seed"})
    cli.add_fields(ap.add_argument_group("training (TrainConfig)"), TrainConfig, "train")
    run = ap.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    run.add_argument("--out", required=True, help="run directory (checkpoints, results.json)")
    run.add_argument("--resume", help="a last.pt to continue from")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(**cli.fields_of(args, "train"))
    generation = GenerationConfig(**cli.fields_of(args, "generation"))
    report = ReportConfig(**cli.fields_of(args, "report"), generation=generation)
    device = torch.device(args.device)
    annotation = load_annotation(args.annotation)
    tokenizer_dir = args.tokenizer
    if not tokenizer_dir and not args.lm:
        lm_vocab = stablelm.preset(args.lm_preset).vocab_size
        texts = [clean_report(e["report"], args.dataset) for e in annotation["train"]] + [report.instruction]
        tokenizer_dir = str(build_tokenizer(texts, out / "tokenizer", lm_vocab))
    spec = {"lm": args.lm, "lm_preset": args.lm_preset, "encoder": args.encoder,
            "encoder_preset": args.encoder_preset, "tokenizer": tokenizer_dir, "seed": config.seed,
            "report": report.to_dict(), "dataset": args.dataset,
            "precision": args.precision or ("bf16" if device.type == "cuda" else "fp32")}
    return train(spec, config, annotation, args.image_dir, out, device, args.resume)


if __name__ == "__main__":
    main()
