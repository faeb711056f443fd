"""Hugging Face <-> project tensor layouts, and reading Hugging Face checkpoint directories.

WEIGHT_MAP is the whole conversion: project name -> Hugging Face name(s), `{}` standing for the layer index. A
plain string is a rename; `Concat` fuses several HF tensors along dim 0 (q/k/v -> `qkv`, weights and biases;
gate/up -> `gate_up`); `PerHead` stacks transformers' one-LayerNorm-per-head weights into one [heads, head_dim]
tensor. The same map is read both ways (`hf_to_project`, `project_to_hf`), and which tensors a config has, with
their shapes, comes from a meta-device model, so nothing here restates the model's layout.

`weight_files` is the one shard-discovery routine (the converter, `load` and `info` all use it). Errors about
a checkpoint's contents are CheckpointError and name the tensor or the file.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import StableLMConfig
from .model import StableLMModel, model_class


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has extra ones, or has wrong shapes (the message names them)."""


class Concat(NamedTuple):
    """A project tensor that is these HF tensors concatenated along dim 0; `rows(cfg)` gives each part's rows."""
    parts: tuple[str, ...]
    rows: Callable[[StableLMConfig], tuple[int, ...]]


class PerHead(NamedTuple):
    """A project [heads, ...] tensor stacked from one HF tensor per head; the template's second `{}` is the head."""
    template: str


def _qkv_rows(cfg: StableLMConfig) -> tuple[int, int, int]:
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_attention_heads * cfg.head_dim, kv, kv


def _gate_up_rows(cfg: StableLMConfig) -> tuple[int, int]:
    return cfg.intermediate_size, cfg.intermediate_size


_ATTN = "model.layers.{}.self_attn."
WEIGHT_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "norm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
    "layers.{}.ln1.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ln1.bias": "model.layers.{}.input_layernorm.bias",
    "layers.{}.ln2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.ln2.bias": "model.layers.{}.post_attention_layernorm.bias",
    "layers.{}.attn.qkv.weight": Concat(tuple(_ATTN + f"{x}_proj.weight" for x in "qkv"), _qkv_rows),
    "layers.{}.attn.qkv.bias": Concat(tuple(_ATTN + f"{x}_proj.bias" for x in "qkv"), _qkv_rows),
    "layers.{}.attn.o.weight": _ATTN + "o_proj.weight",
    "layers.{}.attn.q_norm.weight": PerHead(_ATTN + "q_layernorm.norms.{}.weight"),
    "layers.{}.attn.k_norm.weight": PerHead(_ATTN + "k_layernorm.norms.{}.weight"),
    "layers.{}.mlp.gate_up.weight": Concat(("model.layers.{}.mlp.gate_proj.weight",
                                            "model.layers.{}.mlp.up_proj.weight"), _gate_up_rows),
    "layers.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
    # the classification heads (same names in transformers' StableLmFor{Sequence,Token}Classification)
    "score.weight": "score.weight",
    "score.bias": "score.bias",
}
# The task classes put the decoder under `model.`; transformers saves a bare StableLmModel without that prefix.
_BARE_MODEL = "StableLmModel"
# Which class a set of head tensors belongs to (by role: a quantized head's qweight/scales/zeros are its weight).
_HEAD_CLASSES = {(): "StableLmModel or a tied StableLmForCausalLM", ("lm_head.weight",): "StableLmForCausalLM",
                 ("score.weight",): "StableLmForSequenceClassification",
                 ("score.bias", "score.weight"): "StableLmForTokenClassification"}


def _heads(names) -> tuple[str, ...]:
    return tuple(sorted({f"{n.split('.')[0]}.{'bias' if n.endswith('.bias') else 'weight'}" for n in names
                         if n.split(".")[0] in ("lm_head", "score")}))


_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# The config fields that say how the stored tensors are read without showing in their shapes (the head split of
# qkv, how much of each head rotates, which norms and residual form apply): a converted checkpoint records them
# and loading checks config.json still says the same (see stablelm.checkpoint).
LAYOUT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "partial_rotary_factor", "use_qkv_bias", "qk_layernorm",
                 "use_parallel_residual", "tie_word_embeddings")


# ---------------------------------------------------------------- expected tensors
# More layers than any published model has by far: a config asking for more is corrupt, and building its
# meta-device model would take minutes (a config.json may hold any integer).
MAX_LAYERS = 4096


def meta_model(cfg: StableLMConfig) -> StableLMModel:
    """The model of `cfg` (the class its `architectures` names) on the meta device: tensor names and shapes, no
    memory. A config no model can be built from is a CheckpointError."""
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise CheckpointError(f"config: num_hidden_layers={cfg.num_hidden_layers} is past {MAX_LAYERS}; the config "
                              f"is corrupt")
    try:
        with torch.device("meta"):
            return model_class(cfg)(cfg)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # sizes torch cannot make a tensor of
        raise CheckpointError(f"config: no model can be built from it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from e


def project_shapes(cfg: StableLMConfig) -> dict[str, tuple]:
    """Every tensor of the project layout with its shape."""
    return {name: tuple(t.shape) for name, t in meta_model(cfg).state_dict().items()}


def _plan(cfg: StableLMConfig) -> list[tuple[str, object, dict[str, tuple]]]:
    """(project name, its WEIGHT_MAP rule, {HF name: shape} of its parts) for every tensor of the model."""
    plan = []
    for name, shape in project_shapes(cfg).items():
        layer = _LAYER_INDEX.search(name)
        index = () if layer is None else (layer.group(1),)
        rule = WEIGHT_MAP[_LAYER_INDEX.sub(".{}.", name, count=1)]
        if isinstance(rule, str):
            parts = {rule.format(*index): shape}
        elif isinstance(rule, Concat):
            parts = {t.format(*index): (rows, *shape[1:]) for t, rows in zip(rule.parts, rule.rows(cfg))}
        else:
            parts = {rule.template.format(*index, head): shape[1:] for head in range(shape[0])}
        plan.append((name, rule, parts))
    return plan


def hf_shapes(cfg: StableLMConfig) -> dict[str, tuple]:
    """Every tensor of a transformers StableLmForCausalLM checkpoint with its shape."""
    return {hf: shape for _, _, parts in _plan(cfg) for hf, shape in parts.items()}


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
    have, want = _heads(tensors), _heads(expected)
    if have != want:
        problems.append(f"its head tensors {list(have)} are those of {_HEAD_CLASSES.get(have, 'no StableLM class')}, "
                        f"not of the {_HEAD_CLASSES.get(want, want)} that config.json's `architectures` names")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


# ---------------------------------------------------------------- the map, both ways
def hf_to_project(hf: dict, cfg: StableLMConfig) -> dict:
    """Map a transformers state dict to the project layout (q/k/v and gate/up fused). Checks names and shapes."""
    hf = dict(hf)
    if cfg.architecture == _BARE_MODEL and not any(k.startswith("model.") for k in hf):
        hf = {"model." + k: v for k, v in hf.items()}
    if cfg.tie_word_embeddings and "lm_head.weight" in hf:
        # Older saves keep the tied copy; accept it only if it really is the embedding.
        if not torch.equal(hf["lm_head.weight"], hf.get("model.embed_tokens.weight", torch.empty(0))):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings "
                                  "is true")
        del hf["lm_head.weight"]
    plan = _plan(cfg)
    check_tensors(hf, {n: s for _, _, parts in plan for n, s in parts.items()}, "Hugging Face checkpoint")
    out = {}
    for name, rule, parts in plan:
        tensors = [hf[n] for n in parts]
        out[name] = (tensors[0] if isinstance(rule, str) else
                     torch.cat(tensors) if isinstance(rule, Concat) else torch.stack(tensors))
    return out


def project_to_hf(sd: dict, cfg: StableLMConfig) -> dict:
    """Inverse of hf_to_project: split fused tensors back into transformers names."""
    check_tensors(sd, project_shapes(cfg), "converted checkpoint")
    out = {}
    for name, rule, parts in _plan(cfg):
        t = sd[name]
        pieces = ([t] if isinstance(rule, str) else
                  t.split([shape[0] for shape in parts.values()]) if isinstance(rule, Concat) else t.unbind(0))
        out.update(zip(parts, pieces))
    if cfg.architecture == _BARE_MODEL:
        out = {k.removeprefix("model."): v for k, v in out.items()}
    return out


# ---------------------------------------------------------------- reading files
def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in transformers' order of preference: model.safetensors, the
    safetensors index's shards, unindexed `model-*-of-*.safetensors` shards, then the same for pytorch_model*.bin."""
    directory = Path(directory)
    for single, index, shards in (("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")):
        if (directory / single).exists():
            return [directory / single]
        if (directory / index).exists():
            weight_map = read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{directory / index}: no weight_map of tensor name -> shard file")
            for name in set(weight_map.values()):
                # A shard is a file of this directory: not a path out of it, nor a name no file system takes.
                if not name or "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
                    raise CheckpointError(f"{directory / index}: shard {name!r} is not a file name in {directory}")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{directory / index}: lists shard {f.name}, which is missing (shard "
                                          f"listed in the index is missing: {f})")
            return files
        if found := sorted(directory.glob(shards)):
            return found
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            f"or pytorch_model.bin.index.json")


def read_tensor_file(path: Path, device="cpu", check_finite: bool = False) -> dict:
    """All tensors of one .safetensors or .bin file (a .bin is read with weights_only=True: no code runs);
    check_finite: a floating tensor holding NaN or inf is a CheckpointError naming it and the file."""
    return dict(_tensors_of(Path(path), device, check_finite))


def _rust_errors_too(e: BaseException) -> bool:
    # safetensors and tokenizers are Rust: a panic on a malformed file arrives as pyo3's PanicException, which
    # derives from BaseException, not Exception. Interrupts and exits are never a file's fault.
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _tensors_of(path: Path, device="cpu", check_finite: bool = False):
    """(name, tensor) pairs of one weight file; a file that cannot be read is a CheckpointError naming it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if check_finite:
                        check_finite_tensor(name, t, path)
                    yield name, t
            return
        tensors = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except (FileNotFoundError, CheckpointError):
        raise
    except BaseException as e:  # safetensors, zip and unpickler errors alike: what matters is which file
        if not _rust_errors_too(e):
            raise
        raise CheckpointError(f"{path}: not a readable {path.suffix[1:]} weight file ({e})") from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: holds {type(tensors).__name__}, not a dict of tensors")
    for name, t in tensors.items():
        if check_finite:
            check_finite_tensor(name, t, path)
        yield name, t


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: the check's temporary stays small next to a large tensor


def check_finite_tensor(name: str, t: torch.Tensor, path) -> None:
    """A CheckpointError naming the tensor and the file if a floating tensor holds NaN or inf."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    if all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK)):
        return
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    raise CheckpointError(f"{path}: tensor {name} holds non-finite values ({nan} NaN, {inf} inf of {flat.numel()}): "
                          f"the weights are broken (check_finite=False / --no-check-finite loads them anyway)")


def tensor_file_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except BaseException as e:
        if not _rust_errors_too(e):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return metadata


def read_hf_tensors(directory: str | Path, progress: bool = False, check_finite: bool = False) -> dict:
    """All tensors of a Hugging Face checkpoint directory, whatever its shard layout (see weight_files);
    progress: a bar on stderr, one step per tensor; check_finite: as read_tensor_file."""
    tensors = {}
    with tqdm(desc=f"reading {directory}", unit=" tensors", disable=not progress, file=sys.stderr) as bar:
        for f in weight_files(directory):
            for name, t in _tensors_of(f, check_finite=check_finite):
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor {name} is also in another shard")
                tensors[name] = t
                bar.update()
    return tensors


def read_json(path: Path) -> dict:
    """A JSON object from a file; a file that is not one is a CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
