"""Convert a Hugging Face StableLM checkpoint directory to the project's layout, or back with --to-hf.

    python convert_weights.py SRC_HF_DIR DST_DIR [--dtype bf16|fp16|fp32] [--quant int8|int4|nf4 [--quantize-head]
                              [--quantize-embedding]]
                              [--overwrite]
    python convert_weights.py SRC_CONVERTED_DIR DST_HF_DIR --to-hf
    python convert_weights.py SRC_HF_SWIN_DIR DST_DIR --vision [--dtype ...]   # a transformers SwinModel

Every expected tensor must be present with the right shape and none may be left over; errors name the tensor.
DST is written to a temporary directory and renamed at the end, so an interrupted run leaves nothing behind.
The language-model conversion is `python -m stablelm convert` (stablelm/cli.py over stablelm/checkpoint.py and
the weight map in stablelm/convert.py); this script adds --vision, which the stablelm package cannot import.
"""
import argparse
import sys

from stablelm.checkpoint import DTYPES
from stablelm.cli import HelpFormatter, add_convert_arguments, report_user_errors, run_convert


def vision_to_project(src, dst, dtype=None, overwrite=False) -> None:
    from vision.swin_checkpoint import load_hf_swin, save_converted  # only --vision needs the image side
    encoder = load_hf_swin(src)
    if dtype is not None:
        encoder.to(DTYPES[dtype])
    save_converted(encoder, dst, overwrite=overwrite)


def convert(args, parser) -> int:
    if not args.vision:
        return run_convert(args, parser)
    args.src, args.dst = args.src.expanduser(), args.dst.expanduser()
    if args.quant or args.to_hf or args.group_size is not None or args.quantize_head or args.quantize_embedding:
        parser.error("--vision converts a Swin checkpoint to the project format only (no --quant, --group-size, "
                     "--quantize-head, --quantize-embedding or --to-hf)")
    vision_to_project(args.src, args.dst, args.dtype, args.overwrite)
    print(f"wrote {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_weights.py", description=__doc__, formatter_class=HelpFormatter)
    add_convert_arguments(parser)
    parser.add_argument("--vision", action="store_true", help="SRC is a transformers SwinModel (the image encoder)")
    return parser


def main(argv=None) -> int:
    """Convert as the arguments say; errors propagate as exceptions (to callers and tests)."""
    parser = build_parser()
    return convert(parser.parse_args(argv), parser)


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(report_user_errors(convert, parser.parse_args(), parser))
