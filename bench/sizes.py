"""Weight bytes of a StableLM shape (default StableLM-3B) in each converted format: bf16, int8, int4 (group 128) and
NF4 (block 64), the quantized ones with the lm_head float and quantized (`convert --quant ... [--quantize-head]`),
int8 and int4 also with the embedding table quantized beside the head (`--quantize-head --quantize-embedding`),
computed on the CPU in a second, with no weights and no memory to speak of.

    python -m bench.sizes [--preset stablelm-3b-4e1t | --model DIR] [--group-size 128]
                          [--out bench/results/sizes_3b.json]

Each row is the model `stablelm.load` builds for such a checkpoint (stablelm.checkpoint.skeleton, on the meta
device: the converter's quantization entry, quantize_model and the formats of kernels/quant.py / kernels/nf4.py),
so the numbers follow the formats' real tensors and cannot drift from them. Counted: the bytes of its state dict,
which are the tensors of the converted model.safetensors (the file adds a JSON header of some KB) and what a
loaded model holds resident as weights (plus the rotary table, under 1 MB at the 3B's 4096 positions). The
source's floats are taken as bf16 (`--dtype bf16`, as the published checkpoints are stored); quantization
scales, zeros and NF4's second-level scales are float32, as the formats keep them. GB = 1e9 bytes, GiB = 2^30.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from bench.common import environment, markdown_table, write_json
from stablelm.checkpoint import INT4_GROUP_SIZE, quantization_entry, read_config, skeleton
from stablelm.config import preset
from stablelm.quantize import QUANTIZED_LINEARS

DTYPE = torch.bfloat16
# (--quant, --quantize-head, --quantize-embedding) of each row, as the converter takes them (nf4 has no quantized
# embedding: its block scales do not gather by row).
ROWS = [(None, False, False), ("int8", False, False), ("int8", True, False), ("int8", True, True),
        ("int4", False, False), ("int4", True, False), ("int4", True, True), ("nf4", False, False),
        ("nf4", True, False)]
PARTS = ("embed", "lm_head", "linear weights", "scales", "other")


def breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's state dict by part: the embedding table and the lm_head (all the tensors of each, float
    or quantized), the layers' linear weights (float or packed), their quantization scales / zeros, and the rest
    (norms, biases)."""
    parts = dict.fromkeys(PARTS, 0)
    for name, t in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        top = name.split(".")[0]
        if top in ("embed", "lm_head"):
            part = top
        elif isinstance(module, QUANTIZED_LINEARS):
            part = "linear weights" if leaf == "qweight" else "other" if leaf == "bias" else "scales"
        else:
            part = "linear weights" if isinstance(module, nn.Linear) and leaf == "weight" else "other"
        parts[part] += t.numel() * t.element_size()
    return parts


def size_row(cfg, quant: str | None, quantize_head: bool, group_size: int, quantize_embedding: bool = False) -> dict:
    """One format's bytes, or its error where the shape does not fit the format (a group that does not divide K) or
    the model refuses it (a tied model's quantized embedding)."""
    entry = quantization_entry(quant, group_size if quant == "int4" else None, quantize_head, quantize_embedding)
    name = ("bf16" if entry is None else f"nf4 b{entry['group_size']}" if entry.get("format") == "nf4" else
            "int8" if entry["bits"] == 8 else f"int4 g{entry['group_size']}")
    row = {"format": name, "lm_head": "quantized" if quantize_head else "bf16",
           "embed": "quantized" if quantize_embedding else "bf16", "quantization": entry}
    try:
        parts = breakdown(skeleton(cfg, entry, DTYPE))
    except ValueError as e:
        return {**row, "error": str(e)}
    total = sum(parts.values())
    return {**row, "bytes": total, "GB": total / 1e9, "GiB": total / 2**30, "parts_bytes": parts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = ap.add_mutually_exclusive_group()
    shape.add_argument("--preset", default="stablelm-3b-4e1t", help="a stablelm.config preset (default: %(default)s)")
    shape.add_argument("--model", help="a checkpoint directory (converted or Hugging Face) whose shape to use; only "
                                       "its config.json is read")
    ap.add_argument("--group-size", type=int, default=INT4_GROUP_SIZE, help="int4's (default: %(default)s)")
    ap.add_argument("--out", help="JSON file to write (e.g. bench/results/sizes_3b.json)")
    args = ap.parse_args(argv)
    try:
        cfg = read_config(args.model)[0] if args.model else preset(args.preset)
    except (KeyError, ValueError, OSError) as e:
        ap.error(str(e).strip("'\""))
    rows = [size_row(cfg, quant, head, args.group_size, embed) for quant, head, embed in ROWS]
    table = [{**r, "GB": f"{r['GB']:.3f}", "GiB": f"{r['GiB']:.3f}",
              **{f"{p} GB": f"{r['parts_bytes'][p] / 1e9:.3f}" for p in PARTS}} if "bytes" in r else
             {**r, "GB": "n/a", "GiB": "n/a", "bytes": r["error"]} for r in rows]
    what = f"model {args.model}" if args.model else f"preset {args.preset}"
    print(f"weight bytes of {what} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}, tied {cfg.tie_word_embeddings}); floats bf16, GB = 1e9 bytes")
    print(markdown_table(table, ["format", "lm_head", "embed", "bytes", "GB", "GiB", *(f"{p} GB" for p in PARTS)]))
    if args.out:
        write_json(args.out, {"benchmark": "sizes", "environment": environment(), "source": what,
                              "config": cfg.to_dict(), "float_dtype": "bf16", "rows": rows})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
