"""Swin encoder checkpoints: transformers' SwinModel layout -> ours, and the converted format's I/O.

    encoder = load_hf_swin("swin-base-patch4-window7-224/")       # a directory saved by save_pretrained
    save_converted(encoder, "encoder/"); encoder = load_converted("encoder/")

`convert_hf_state_dict` maps a transformers checkpoint onto vision/swin.py's layout (query/key/value fused into
`attn.qkv`); the converted format is a directory with `encoder.safetensors` and `config.json` ({"format": "swin",
"version": 1, "config": SwinConfig fields}). Reading HF directories and files, tensor checks (stablelm/convert.py)
and atomic writes (stablelm/checkpoint.py) are shared with the language model. Paths may start with `~`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from stablelm.checkpoint import atomic_dir
from stablelm.convert import CheckpointError, check_tensors, read_hf_tensors, read_json, read_tensor_file

from .swin import SwinConfig, SwinEncoder, relative_position_index

FORMAT = "swin"
VERSION = 1

# transformers >= 5 names modules differently in memory than in the files it saves (which keep the names of the
# published checkpoints); in-memory names are renamed to the saved ones first.
_HF_IN_MEMORY_NAMES = {
    "attention.q_proj.": "attention.self.query.",
    "attention.k_proj.": "attention.self.key.",
    "attention.v_proj.": "attention.self.value.",
    "attention.relative_position_bias.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attention.o_proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}


def hf_shapes(cfg: SwinConfig) -> dict[str, tuple]:
    """Every tensor of a transformers SwinModel checkpoint (names as saved) with its shape."""
    D, p = cfg.embed_dim, cfg.patch_size
    shapes = {"embeddings.patch_embeddings.projection.weight": (D, cfg.num_channels, p, p),
              "embeddings.patch_embeddings.projection.bias": (D,),
              "embeddings.norm.weight": (D,), "embeddings.norm.bias": (D,),
              "layernorm.weight": (cfg.num_features,), "layernorm.bias": (cfg.num_features,)}
    if cfg.use_absolute_embeddings:
        shapes["embeddings.position_embeddings"] = (1, cfg.num_patches, D)
    table = (2 * cfg.window_size - 1) ** 2
    for i, (dim, heads, depth) in enumerate(zip(cfg.stage_dims, cfg.num_heads, cfg.depths)):
        hidden = int(cfg.mlp_ratio * dim)
        for j in range(depth):
            b = f"encoder.layers.{i}.blocks.{j}."
            for ln in ("layernorm_before", "layernorm_after"):
                shapes.update({b + f"{ln}.weight": (dim,), b + f"{ln}.bias": (dim,)})
            for x in ("query", "key", "value"):
                shapes[b + f"attention.self.{x}.weight"] = (dim, dim)
                if cfg.qkv_bias:
                    shapes[b + f"attention.self.{x}.bias"] = (dim,)
            shapes.update({b + "attention.self.relative_position_bias_table": (table, heads),
                           b + "attention.output.dense.weight": (dim, dim), b + "attention.output.dense.bias": (dim,),
                           b + "intermediate.dense.weight": (hidden, dim), b + "intermediate.dense.bias": (hidden,),
                           b + "output.dense.weight": (dim, hidden), b + "output.dense.bias": (dim,)})
        if i < len(cfg.depths) - 1:
            d = f"encoder.layers.{i}.downsample."
            shapes.update({d + "norm.weight": (4 * dim,), d + "norm.bias": (4 * dim,),
                           d + "reduction.weight": (2 * dim, 4 * dim)})
    return shapes


def _normalise_hf_names(hf_state_dict: dict, cfg: SwinConfig) -> dict:
    """Strip the "swin." prefix of SwinForImageClassification (dropping its classifier), rename in-memory
    transformers names to saved ones, and check then drop the relative_position_index buffers that older
    checkpoints carry (they are fixed by window_size)."""
    sd = dict(hf_state_dict)
    if any(k.startswith("swin.") for k in sd):
        sd = {k.removeprefix("swin."): v for k, v in sd.items() if not k.startswith("classifier.")}
    renamed = {}
    for name, t in sd.items():
        for new, old in _HF_IN_MEMORY_NAMES.items():
            name = name.replace(new, old)
        renamed[name] = t
    expected_index = relative_position_index(cfg.window_size, cfg.window_size).flatten()
    for name in [k for k in renamed if k.endswith("attention.self.relative_position_index")]:
        index = renamed.pop(name)
        if index.numel() != expected_index.numel() or not torch.equal(index.flatten().long(), expected_index):
            raise CheckpointError(f"{name} does not match window_size={cfg.window_size} (shape "
                                  f"{tuple(index.shape)}); this encoder only implements Swin v1 relative offsets")
    return renamed


def convert_hf_state_dict(hf_state_dict: dict, config: SwinConfig) -> dict:
    """A transformers SwinModel / SwinForImageClassification state dict (as saved, or as held in memory by
    transformers >= 5) -> our names. Raises CheckpointError naming every missing, unexpected or wrongly shaped
    tensor (by its transformers name, without the "swin." prefix)."""
    hf = _normalise_hf_names(hf_state_dict, config)
    check_tensors(hf, hf_shapes(config), "Hugging Face Swin checkpoint")
    out = {"patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
           "patch_embed.norm.weight": hf["embeddings.norm.weight"], "patch_embed.norm.bias": hf["embeddings.norm.bias"],
           "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    if config.use_absolute_embeddings:
        out["pos_embed"] = hf["embeddings.position_embeddings"]
    renames = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            b, q = f"encoder.layers.{i}.blocks.{j}.", f"stages.{i}.blocks.{j}."
            for theirs, ours in renames.items():
                for part in ("weight", "bias"):
                    out[q + f"{ours}.{part}"] = hf[b + f"{theirs}.{part}"]
            out[q + "attn.qkv.weight"] = torch.cat([hf[b + f"attention.self.{x}.weight"]
                                                    for x in ("query", "key", "value")])
            if config.qkv_bias:
                out[q + "attn.qkv.bias"] = torch.cat([hf[b + f"attention.self.{x}.bias"]
                                                      for x in ("query", "key", "value")])
            out[q + "attn.bias_table"] = hf[b + "attention.self.relative_position_bias_table"]
        if i < len(config.depths) - 1:
            d, m = f"encoder.layers.{i}.downsample.", f"stages.{i}.merge."
            for name in ("norm.weight", "norm.bias", "reduction.weight"):
                out[m + name] = hf[d + name]
    return out


def _build(config: SwinConfig, tensors: dict, what: str) -> SwinEncoder:
    """An eval-mode encoder holding `tensors` (our names), which must fit exactly."""
    with torch.device("meta"):
        encoder = SwinEncoder(config)
    check_tensors(tensors, {k: tuple(v.shape) for k, v in encoder.state_dict().items()}, what)
    encoder.load_state_dict(tensors, assign=True, strict=True)
    return encoder.eval()


def load_hf_swin(directory: str | Path) -> SwinEncoder:
    """An encoder from a transformers SwinModel / SwinForImageClassification directory (config.json +
    model.safetensors, sharded safetensors with an index, or pytorch_model.bin), in the stored dtype."""
    directory = Path(directory).expanduser()
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no config.json")
    config = SwinConfig.from_hf(read_json(directory / "config.json"))
    return _build(config, convert_hf_state_dict(read_hf_tensors(directory), config), str(directory))


def save_converted(encoder: SwinEncoder, directory: str | Path, overwrite: bool = False) -> None:
    """Write encoder.safetensors + config.json. Everything goes to a temporary directory renamed at the end, so an
    interrupted write leaves nothing behind."""
    tensors = encoder.state_dict()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SwinEncoder(encoder.config).state_dict().items()}
    # Catches encoders carrying extra modules (e.g. LoRA adapters), which this format does not hold.
    check_tensors(tensors, expected, "encoder to save")
    with atomic_dir(directory, overwrite) as out:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "encoder.safetensors"),
                  metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": VERSION, "config": encoder.config.to_dict()}
        (out / "config.json").write_text(json.dumps(meta, indent=2))


def load_converted(directory: str | Path) -> SwinEncoder:
    """An encoder written by save_converted, in the stored dtype."""
    directory = Path(directory).expanduser()
    meta = read_json(directory / "config.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/config.json is not a converted Swin encoder (format "
                              f"{meta.get('format')!r}); use load_hf_swin for a transformers directory")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{directory}: format version {meta.get('version')} unsupported (expected {VERSION})")
    config = SwinConfig.from_dict(meta["config"])
    return _build(config, read_tensor_file(directory / "encoder.safetensors"), str(directory))
