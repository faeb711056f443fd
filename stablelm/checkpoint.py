"""Checkpoint I/O: Hugging Face <-> project tensor layouts, reading HF directories, atomic writes, `load`.

The converted format is a directory with `model.safetensors` (project names: fused `qkv` and `gate_up`),
`config.json` ({"format": "stablelm", "version": 1, "config": StableLMConfig fields, "quantization": null or
{"bits", "group_size"}}) and the tokenizer files copied from the source.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import StableLMConfig

FORMAT = "stablelm"
VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has extra ones, or has wrong shapes (the message names them)."""


# ---------------------------------------------------------------- expected tensors
def project_shapes(cfg: StableLMConfig) -> dict[str, tuple]:
    """Every tensor of the project layout with its shape."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D
    shapes = {"embed.weight": (cfg.vocab_size, H), "norm.weight": (H,), "norm.bias": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({p + "ln1.weight": (H,), p + "ln1.bias": (H,), p + "attn.qkv.weight": (qkv, H),
                       p + "attn.o.weight": (H, cfg.num_attention_heads * D), p + "mlp.gate_up.weight": (2 * I, H),
                       p + "mlp.down.weight": (H, I)})
        if cfg.use_qkv_bias:
            shapes[p + "attn.qkv.bias"] = (qkv,)
        if cfg.qk_layernorm:
            shapes[p + "attn.q_norm.weight"] = (cfg.num_attention_heads, D)
            shapes[p + "attn.k_norm.weight"] = (cfg.num_key_value_heads, D)
        if not cfg.use_parallel_residual:
            shapes[p + "ln2.weight"] = (H,)
            shapes[p + "ln2.bias"] = (H,)
    return shapes


def hf_shapes(cfg: StableLMConfig) -> dict[str, tuple]:
    """Every tensor of a transformers StableLmForCausalLM checkpoint with its shape."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,), "model.norm.bias": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update({p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
                       a + "q_proj.weight": (Hq * D, H), a + "k_proj.weight": (Hkv * D, H),
                       a + "v_proj.weight": (Hkv * D, H), a + "o_proj.weight": (H, Hq * D),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)})
        if cfg.use_qkv_bias:
            shapes.update({a + "q_proj.bias": (Hq * D,), a + "k_proj.bias": (Hkv * D,), a + "v_proj.bias": (Hkv * D,)})
        if cfg.qk_layernorm:
            shapes.update({a + f"q_layernorm.norms.{h}.weight": (D,) for h in range(Hq)})
            shapes.update({a + f"k_layernorm.norms.{h}.weight": (D,) for h in range(Hkv)})
        if not cfg.use_parallel_residual:
            shapes.update({p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,)})
    return shapes


def check_tensors(tensors: dict, expected: dict[str, tuple], what: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped tensor."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: expected {tuple(expected[n])}, got {tuple(tensors[n].shape)}"
             for n in sorted(set(expected) & set(tensors)) if tuple(tensors[n].shape) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if extra:
        problems.append(f"unexpected tensors: {extra}")
    if wrong:
        problems.append(f"wrong shapes: {wrong}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


# ---------------------------------------------------------------- layout mapping
def hf_to_project(hf: dict, cfg: StableLMConfig) -> dict:
    """Map a transformers state dict to the project layout (q/k/v and gate/up fused). Checks names and shapes."""
    hf = dict(hf)
    if cfg.tie_word_embeddings and "lm_head.weight" in hf:
        # Older saves keep the tied copy; accept it only if it really is the embedding.
        if not torch.equal(hf["lm_head.weight"], hf.get("model.embed_tokens.weight", torch.empty(0))):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings "
                                  "is true")
        del hf["lm_head.weight"]
    check_tensors(hf, hf_shapes(cfg), "Hugging Face checkpoint")
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "norm.bias": hf["model.norm.bias"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[q + "ln1.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "ln1.bias"] = hf[p + "input_layernorm.bias"]
        out[q + "attn.qkv.weight"] = torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])
        if cfg.use_qkv_bias:
            out[q + "attn.qkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        out[q + "attn.o.weight"] = hf[a + "o_proj.weight"]
        if cfg.qk_layernorm:
            out[q + "attn.q_norm.weight"] = torch.stack(
                [hf[a + f"q_layernorm.norms.{h}.weight"] for h in range(cfg.num_attention_heads)])
            out[q + "attn.k_norm.weight"] = torch.stack(
                [hf[a + f"k_layernorm.norms.{h}.weight"] for h in range(cfg.num_key_value_heads)])
        if not cfg.use_parallel_residual:
            out[q + "ln2.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[q + "ln2.bias"] = hf[p + "post_attention_layernorm.bias"]
        out[q + "mlp.gate_up.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[q + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def project_to_hf(sd: dict, cfg: StableLMConfig) -> dict:
    """Inverse of hf_to_project: split fused tensors back into transformers names."""
    check_tensors(sd, project_shapes(cfg), "converted checkpoint")
    D = cfg.head_dim
    split_qkv = [cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.num_key_value_heads * D]
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "model.norm.bias": sd["norm.bias"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = sd[q + "ln1.weight"]
        out[p + "input_layernorm.bias"] = sd[q + "ln1.bias"]
        for x, t in zip("qkv", sd[q + "attn.qkv.weight"].split(split_qkv)):
            out[a + f"{x}_proj.weight"] = t
        if cfg.use_qkv_bias:
            for x, t in zip("qkv", sd[q + "attn.qkv.bias"].split(split_qkv)):
                out[a + f"{x}_proj.bias"] = t
        out[a + "o_proj.weight"] = sd[q + "attn.o.weight"]
        if cfg.qk_layernorm:
            for h, t in enumerate(sd[q + "attn.q_norm.weight"]):
                out[a + f"q_layernorm.norms.{h}.weight"] = t
            for h, t in enumerate(sd[q + "attn.k_norm.weight"]):
                out[a + f"k_layernorm.norms.{h}.weight"] = t
        if not cfg.use_parallel_residual:
            out[p + "post_attention_layernorm.weight"] = sd[q + "ln2.weight"]
            out[p + "post_attention_layernorm.bias"] = sd[q + "ln2.bias"]
        gate, up = sd[q + "mlp.gate_up.weight"].split(cfg.intermediate_size)
        out[p + "mlp.gate_proj.weight"] = gate
        out[p + "mlp.up_proj.weight"] = up
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down.weight"]
    return out


# ---------------------------------------------------------------- reading
def read_hf_tensors(src: str | Path) -> dict:
    """All tensors of a Hugging Face checkpoint dir: model.safetensors, sharded safetensors (+ index json), or
    pytorch_model*.bin (sharded or not)."""
    src = Path(src)
    st_index, bin_index = src / "model.safetensors.index.json", src / "pytorch_model.bin.index.json"
    if (src / "model.safetensors").exists():
        files = [src / "model.safetensors"]
    elif st_index.exists():
        files = _index_shards(st_index)
    elif (src / "pytorch_model.bin").exists():
        files = [src / "pytorch_model.bin"]
    elif bin_index.exists():
        files = _index_shards(bin_index)
    else:
        raise FileNotFoundError(f"{src}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                                f"or pytorch_model.bin.index.json")
    tensors = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"shard listed in the index is missing: {f}")
        tensors.update(_read_file(f))
    return tensors


def _index_shards(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _read_file(path: Path, device="cpu") -> dict:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return torch.load(path, map_location=device, weights_only=True, mmap=True)


def read_project_dir(path: str | Path, device="cpu"):
    """(StableLMConfig, quantization or None, tensors) of a converted directory."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/config.json is not a converted stablelm checkpoint (run convert_weights.py)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} unsupported (expected {VERSION})")
    cfg = StableLMConfig.from_dict(meta["config"])
    return cfg, meta.get("quantization"), _read_file(path / "model.safetensors", device)


def is_hf_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("format") != FORMAT


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


# ---------------------------------------------------------------- loading a model
def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """A StableLM from a converted directory (or, converting in memory, a Hugging Face checkpoint directory).

    dtype: torch dtype or "fp32"/"bf16"/"fp16"; None keeps the stored dtype (quantized tensors keep theirs).
    """
    from .model import Rotary, StableLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json")
    if is_hf_dir(path):
        cfg = StableLMConfig.from_hf(json.loads((path / "config.json").read_text()))
        quant, tensors = None, hf_to_project(read_hf_tensors(path), cfg)
    else:
        cfg, quant, tensors = read_project_dir(path)
    with torch.device("meta"):
        model = StableLM(cfg)
    if quant:
        from kernels.quant import quantize_model
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
