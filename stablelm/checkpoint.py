"""Checkpoint I/O: the converted format (reading, writing atomically), converting whole directories, `load`.

The converted format is a directory with `model.safetensors` (project names: fused `qkv` and `gate_up`),
`config.json` ({"format": "stablelm", "version": 1, "config": StableLMConfig fields, "quantization": null or
{"bits", "group_size"}}) and the tokenizer files copied from the source. The tensor layout mapping and the
reading of Hugging Face directories are stablelm/convert.py's.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import StableLMConfig
from .convert import (CheckpointError, check_tensors, hf_to_project, meta_model, project_to_hf, read_hf_tensors,
                      read_json, read_tensor_file)
from .model import Rotary
from .quantize import quantize_model, quantize_state_dict

FORMAT = "stablelm"
VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_BITS = {"int8": 8, "int4": 4}


# ---------------------------------------------------------------- reading
def read_hf_dir(path: str | Path) -> tuple[StableLMConfig, dict]:
    """(config, tensors in the project layout) of a Hugging Face checkpoint directory."""
    path = Path(path)
    cfg = StableLMConfig.from_hf(read_json(path / "config.json"))
    return cfg, hf_to_project(read_hf_tensors(path), cfg)


def read_project_dir(path: str | Path, device="cpu"):
    """(StableLMConfig, quantization or None, tensors) of a converted directory."""
    path = Path(path)
    meta = read_json(path / "config.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/config.json is not a converted stablelm checkpoint (run convert_weights.py)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} unsupported (expected {VERSION})")
    cfg = StableLMConfig.from_dict(meta["config"])
    return cfg, meta.get("quantization"), read_tensor_file(path / "model.safetensors", device)


def is_hf_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and read_json(cfg).get("format") != FORMAT


# ---------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `dst`; on success it is renamed to `dst`, on any error removed, so an
    interrupted run leaves neither a half-written dst nor the temporary."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_project_dir(out: Path, cfg: StableLMConfig, tensors: dict, quantization: dict | None = None) -> None:
    """Write model.safetensors + config.json into an (already temporary) directory."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "quantization": quantization}
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, out / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------- converting directories
def convert_hf_dir(src: str | Path, dst: str | Path, dtype: str | None = None, quant: str | None = None,
                   group_size: int = 128, overwrite: bool = False) -> None:
    """Write the converted form of the Hugging Face checkpoint `src` to `dst` (dtype: a DTYPES key; quant:
    "int8" / "int4", weight-only, of the linear layers), with its tokenizer files."""
    cfg, tensors = read_hf_dir(src)
    tensors = _cast(tensors, dtype)
    quantization = None
    if quant is not None:
        bits = QUANT_BITS[quant]
        tensors = quantize_state_dict(tensors, bits, group_size)
        quantization = {"bits": bits, "group_size": group_size}
    with atomic_dir(dst, overwrite) as out:
        write_project_dir(out, cfg, tensors, quantization)
        copy_tokenizer_files(src, out)


def export_hf_dir(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False) -> None:
    """Write the converted checkpoint `src` back as a transformers checkpoint directory `dst`."""
    cfg, quantization, tensors = read_project_dir(src)
    if quantization:
        raise ValueError(f"{src} is quantized ({quantization}); --to-hf needs an unquantized checkpoint")
    tensors = _cast(project_to_hf(tensors, cfg), dtype)
    with atomic_dir(dst, overwrite) as out:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        copy_tokenizer_files(src, out)


def _cast(tensors: dict, dtype: str | None) -> dict:
    return tensors if dtype is None else {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}


# ---------------------------------------------------------------- loading a model
def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """The model of a converted directory (or, converting in memory, a Hugging Face checkpoint directory), of the
    class its config's `architectures` names: StableLM, StableLMModel, StableLMForSequenceClassification or
    StableLMForTokenClassification (stablelm.model.MODEL_CLASSES).

    dtype: torch dtype or "fp32"/"bf16"/"fp16"; None keeps the stored dtype (quantized tensors keep theirs).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json")
    if is_hf_dir(path):
        (cfg, tensors), quant = read_hf_dir(path), None
    else:
        cfg, quant, tensors = read_project_dir(path)
    model = meta_model(cfg)
    if quant:
        quantize_model(model, quant["bits"], quant["group_size"])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(tensors, expected, str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and _is_float_param(k, quant) else v
                   for k, v in tensors.items()}
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True, strict=True)
    model.rotary = Rotary(cfg).to(device)  # its non-persistent table was built on the meta device
    return model.eval()


def _is_float_param(name: str, quant) -> bool:
    # Quantization scales/zeros keep the precision they were stored with.
    return not (quant and (name.endswith(".scales") or name.endswith(".zeros")))
