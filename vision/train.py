r"""Train the report-generation model on an R2GenGPT-style annotation.json.

    python -m vision.train --annotation DATA/annotation.json --image-dir DATA/images --dataset iu_xray \
        --lm CONVERTED_LM_DIR --encoder HF_SWIN_DIR --lm-mode lora --epochs 5 --out runs/iu_lora

Without --lm / --encoder it builds small random-weight models (`--lm-preset tiny`, `--encoder-preset tiny`)
and, without --tokenizer, trains a byte-level BPE on the training reports: the whole pipeline then runs on a
CPU. The annotation, every image's header, the paths and the flags are checked before the first step. Each
epoch writes OUT/last (before validation), then validates (generation + metrics) and writes OUT/best when the
weighted validation score improves. Checkpoints are directories of safetensors + JSON (nothing is pickled) with
only the trained tensors, the optimizer and RNG state, epoch, step, what is needed to rebuild the model and a
copy of the tokenizer. `--resume runs/x/last` continues a run. Results go to OUT/results.json, per-step losses
to OUT/train_log.jsonl. `--compile reduce-overhead` runs the LM part of the loss under torch.compile (one graph of
fused kernels replayed from CUDA graphs; the first steps compile).

Several GPUs (or CPU processes, gloo), any number of hosts: start it with torchrun (README, "Several GPUs").

    torchrun --nproc-per-node 4 -m vision.train --batch-size 32 ...   # DDP (FSDP2 for --lm-mode full / --fsdp)

--batch-size is the global batch (each rank takes batch-size / world-size studies), so the same flags train the
same run at any world size; rank 0 prints and writes, and its checkpoints resume at any world size.
"""
from __future__ import annotations

import argparse

import stablelm
from stablelm.generate import GenerationConfig

from . import cli, distributed
from .data import DATASETS, clean_report, load_annotation
from .pipeline import ENCODER_PRESETS, PRECISIONS, TrainConfig, build_tokenizer, resolve_path, train
from .report_model import GENERATION_SET_BY_MODEL, ReportConfig


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m vision.train", __doc__)
    data = ap.add_argument_group("data")
    data.add_argument("--annotation", type=cli.path, required=True, help="R2GenGPT-style annotation.json")
    data.add_argument("--image-dir", type=cli.path, required=True,
                      help="directory the annotation's image paths are relative to")
    data.add_argument("--dataset", choices=DATASETS, default=DATASETS[0], help="report cleaning rules")
    models = ap.add_argument_group("models")
    models.add_argument("--lm", type=cli.path, help="converted (or Hugging Face) StableLM directory")
    models.add_argument("--lm-preset", default="tiny", choices=sorted(stablelm.PRESETS),
                        help="random-weight LM preset when --lm is not given")
    models.add_argument("--tokenizer", type=cli.path, help="directory with tokenizer.json (default: the LM's, or a "
                                                           "BPE trained on the training reports without --lm)")
    models.add_argument("--encoder", type=cli.path, help="Hugging Face SwinModel directory or a converted encoder")
    models.add_argument("--encoder-preset", default="tiny", choices=sorted(ENCODER_PRESETS),
                        help="random-weight encoder preset when --encoder is not given")
    models.add_argument("--precision", choices=PRECISIONS,
                        help="bf16: frozen weights bf16, trained ones float32; bf16-mixed: every weight bf16 with "
                             "float32 master weights in the optimizer (full fine-tuning at bf16 speed); default: "
                             "bf16 on CUDA, fp32 on the CPU")
    cli.add_fields(ap.add_argument_group("report model (ReportConfig)"), ReportConfig, "report", skip={"generation"})
    cli.add_fields(ap.add_argument_group("validation decoding (GenerationConfig)"), GenerationConfig, "generation",
                   skip=GENERATION_SET_BY_MODEL, defaults=ReportConfig().generation, rename={"seed": "sampling_seed"})
    cli.add_fields(ap.add_argument_group("training (TrainConfig)"), TrainConfig, "train")
    run = ap.add_argument_group("run")
    run.add_argument("--device", type=cli.device, default=cli.default_device(), help="torch device")
    run.add_argument("--out", type=cli.path, required=True, help="run directory (checkpoints, results.json)")
    run.add_argument("--resume", type=cli.path, help="a run's `last` checkpoint directory to continue from")
    run.add_argument("--fsdp", dest="train.data_parallel", action="store_const", const="fsdp",
                     help="same as --data-parallel fsdp")
    return ap


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Train as parsed `args` say. Flags are turned into configs (which check themselves) before anything else."""
    config = TrainConfig(**cli.fields_of(args, "train"))
    generation = GenerationConfig(**cli.fields_of(args, "generation"))
    report = ReportConfig(**cli.fields_of(args, "report"), generation=generation)
    annotation = load_annotation(args.annotation)
    tokenizer_dir = args.tokenizer
    if not tokenizer_dir and not args.lm:
        ranks = distributed.setup(args.device)  # under torchrun: rank 0 trains the tokenizer, the others wait
        tokenizer_dir = args.out / "tokenizer"
        if ranks.main:
            lm_vocab = stablelm.preset(args.lm_preset).vocab_size
            texts = [clean_report(e["report"], args.dataset) for e in annotation["train"]] + [report.instruction]
            build_tokenizer(texts, tokenizer_dir, lm_vocab)
        ranks.barrier()
    spec = {"lm": resolve_path(args.lm), "lm_preset": args.lm_preset, "encoder": resolve_path(args.encoder),
            "encoder_preset": args.encoder_preset, "tokenizer": resolve_path(tokenizer_dir), "seed": config.seed,
            "report": report.to_dict(), "dataset": args.dataset,
            "precision": args.precision or ("bf16" if args.device.type == "cuda" else "fp32")}
    return train(spec, config, annotation, args.image_dir, args.out, args.device, args.resume)


def main(argv=None) -> dict:
    """Parse `argv` and train; errors propagate as exceptions (to callers and tests)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli.run_cli(build_parser(), run)
