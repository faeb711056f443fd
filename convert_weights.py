"""Convert a Hugging Face StableLM checkpoint directory to the project's layout, or back with --to-hf.

    python convert_weights.py SRC_HF_DIR DST_DIR [--dtype bf16|fp16|fp32] [--quant int8|int4] [--overwrite]
    python convert_weights.py SRC_CONVERTED_DIR DST_HF_DIR --to-hf
    python convert_weights.py SRC_HF_SWIN_DIR DST_DIR --vision [--dtype ...]   # a transformers SwinModel

Every expected tensor must be present with the right shape and none may be left over; errors name the tensor.
DST is written to a temporary directory and renamed at the end, so an interrupted run leaves nothing behind.
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from stablelm.checkpoint import (DTYPES, atomic_dir, copy_tokenizer_files, hf_to_project, project_to_hf,
                                 read_hf_tensors, read_project_dir, write_project_dir)
from stablelm.config import StableLMConfig


def to_project(src: Path, dst: Path, dtype=None, quant=None, group_size=128, overwrite=False) -> None:
    cfg = StableLMConfig.from_hf(json.loads((src / "config.json").read_text()))
    tensors = hf_to_project(read_hf_tensors(src), cfg)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    quantization = None
    if quant is not None:
        from kernels.quant import quantize_state_dict
        bits = {"int8": 8, "int4": 4}[quant]
        tensors = quantize_state_dict(tensors, bits, group_size)
        quantization = {"bits": bits, "group_size": group_size}
    with atomic_dir(dst, overwrite) as out:
        write_project_dir(out, cfg, tensors, quantization)
        copy_tokenizer_files(src, out)


def to_hf(src: Path, dst: Path, dtype=None, overwrite=False) -> None:
    cfg, quantization, tensors = read_project_dir(src)
    if quantization:
        raise ValueError(f"{src} is quantized ({quantization}); --to-hf needs an unquantized checkpoint")
    tensors = project_to_hf(tensors, cfg)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    with atomic_dir(dst, overwrite) as out:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        copy_tokenizer_files(src, out)


def vision_to_project(src: Path, dst: Path, dtype=None, overwrite=False) -> None:
    from vision.swin import load_hf_swin, save_converted
    encoder = load_hf_swin(src)
    if dtype is not None:
        encoder.to(DTYPES[dtype])
    save_converted(encoder, dst, overwrite=overwrite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--quant", choices=["int8", "int4"], help="weight-only quantization of the linear layers")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dim")
    ap.add_argument("--to-hf", action="store_true", help="convert a converted directory back to transformers")
    ap.add_argument("--vision", action="store_true", help="SRC is a transformers SwinModel (the image encoder)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)
    if not (args.src / "config.json").exists():
        ap.error(f"{args.src}: no config.json")
    if args.vision:
        if args.quant or args.to_hf:
            ap.error("--vision converts a Swin checkpoint to the project format only")
        vision_to_project(args.src, args.dst, args.dtype, args.overwrite)
    elif args.to_hf:
        if args.quant:
            ap.error("--quant applies to HF -> project conversion only")
        to_hf(args.src, args.dst, args.dtype, args.overwrite)
    else:
        to_project(args.src, args.dst, args.dtype, args.quant, args.group_size, args.overwrite)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
