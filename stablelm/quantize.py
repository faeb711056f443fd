"""Weight-only quantization of a model: QuantLinear (an nn.Linear stand-in whose forward is ops.quant_linear),
QuantEmbedding (an nn.Embedding stand-in over a quantized table, opt-in), quantize_model (module surgery, in place)
and quantize_state_dict (the same change on a bare state dict, for the converter). The formats, kernels and
accuracy bounds are in kernels/quant.py.

The lm_head is skipped by default; skip=() quantizes it too (a converted checkpoint made with `convert
--quantize-head` records that as "lm_head": true in its quantization entry, read by quantize_kwargs). A StableLM with
tied embeddings has no lm_head module (its forward multiplies by the embedding table), so quantizing the head gives
it one: a QuantLinear quantized from the embedding table, while `embed` stays the float table (why: below). The
lookup reads only one row per token, while the head reads the whole table every decode step: the quantized copy
costs 1 (int8) / 0.5 + 8 / group_size (int4) bytes per table entry of residency next to the float table, and saves
that step most of the head's bytes. A state dict then holds both `embed.weight` and `lm_head.qweight` (+ scales,
zeros), as quantize_state_dict writes it.

The embedding table stays float by default: quantizing it adds the table's rounding error to every token's input
activations (the first layer's inputs, and the residual stream every later layer adds to), the packed format needs
a lookup of its own (nn.Embedding cannot read it), and it buys no decode speed, a step reading one row of it per
token. It is most of what is left of a small int4 model's bytes, though (StableLM-3B, int4 g128 with the head
quantized: 0.258 GB of bf16 table in 1.758 GB, 0.072 GB of int4 table in 1.573 GB; bench/sizes.py), so embed=True
(`convert --quantize-embedding`, "embed": true in the quantization entry) trades that error for the bytes: `embed`
becomes a QuantEmbedding holding the table in kernels/quant.py's int8 / int4 format for a [vocab, hidden] matrix
(rows are tokens, int4 groups run along hidden), whose lookup gathers the ids' rows of codes, scales and zeros and
dequantizes only those rows. Not for a tied model (its head multiplies by the float table; quantize_model /
quantize_state_dict refuse it) nor nf4 (its double-quantized block scales do not gather by row).

Formats: fmt="int" is kernels/quant.py's int8 (bits 8) / int4 (bits 4, group_size along K), held by QuantLinear;
fmt="nf4" is kernels/nf4.py's NF4 with double-quantized block scales (bits 4, group_size = the block size, 64 by
default), held by NF4Linear (buffers qweight, absmax, absmax_scale, absmax_mean, bias). Both train: their forward
is differentiable with respect to the input (grad_x = grad_y @ dequant(W)), the quantized weights are buffers and
never get gradients, so LoRA (stablelm/lora.py) and the report model's projector train over a frozen quantized LM.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from kernels.nf4 import NF4_BLOCK_SIZE, quantize_nf4
from kernels.quant import dequantize_weight, quantize_weight

from . import ops
from .model import StableLM


class QuantLinear(nn.Module):
    """A weight-only quantized nn.Linear; its tensors are buffers, so state_dict holds the quantized format
    (qweight, scales, zeros for int4, bias if any) under the replaced Linear's name."""

    def __init__(self, qweight, scales, zeros, bias, bits: int, group_size: int):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        self.bits = bits
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> "QuantLinear":
        qweight, scales, zeros = quantize_weight(linear.weight, bits, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight, scales, zeros, bias, bits, group_size)

    def forward(self, x):
        return ops.quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size)

    def logical_numel(self) -> int:
        """Elements of the float weight and bias this layer stands for (StableLMModel.num_params counts these)."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}{group}")


class NF4Linear(nn.Module):
    """An NF4-quantized nn.Linear (QLoRA's format, kernels/nf4.py); its tensors are buffers, so state_dict holds
    qweight, absmax, absmax_scale, absmax_mean (and bias if any) under the replaced Linear's name."""

    bits = 4

    def __init__(self, qweight, absmax, absmax_scale, absmax_mean, bias, block_size: int = NF4_BLOCK_SIZE):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = block_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("absmax", absmax)
        self.register_buffer("absmax_scale", absmax_scale)
        self.register_buffer("absmax_mean", absmax_mean)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = NF4_BLOCK_SIZE) -> "NF4Linear":
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(*quantize_nf4(linear.weight, block_size), bias, block_size)

    def forward(self, x):
        return ops.nf4_linear(x, self.qweight, self.absmax, self.absmax_scale, self.absmax_mean, self.bias,
                              self.group_size)

    logical_numel = QuantLinear.logical_numel

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4, block_size={self.group_size}")


class QuantEmbedding(nn.Module):
    """An nn.Embedding stand-in over a quantized table (see the module docstring): buffers qweight, scales (and zeros
    for int4) exactly as quantize_weight(table, bits, group_size) makes them for the [vocab, hidden] table, so
    state_dict holds `embed.qweight`, `embed.scales` (, `embed.zeros`).

    forward(ids [...]) -> [..., hidden] in `dtype`, the model's float dtype (that of the table it was quantized from;
    it follows model.to(dtype) as a float parameter would, and load() sets it to the loaded model's): the ids' rows
    of the codes, scales and zeros are gathered (index_select) and only they go through dequantize_weight. Pure
    tensor indexing, so it runs inside a CUDA graph and on the meta device; an id outside [0, vocab) raises
    IndexError on the CPU, as nn.Embedding does (index_select checks it; on CUDA it is a device-side assert).

    It has no `weight`: the model's device and float dtype are StableLMModel.device / .dtype (its final LayerNorm's),
    which every caller reads instead of the table's."""

    def __init__(self, qweight, scales, zeros, bits: int, group_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings = qweight.shape[0]
        self.embedding_dim = qweight.shape[1] * (2 if bits == 4 else 1)
        self.bits = bits
        self.group_size = group_size
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @classmethod
    def from_embedding(cls, embed: nn.Embedding, bits: int, group_size: int = 128) -> "QuantEmbedding":
        return cls(*quantize_weight(embed.weight, bits, group_size), bits, group_size, embed.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zeros = None if self.zeros is None else self.zeros.index_select(0, flat)
        rows = dequantize_weight(self.qweight.index_select(0, flat), self.scales.index_select(0, flat), zeros,
                                 self.bits, self.group_size)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() / .float() change the output dtype as they change a float parameter:
        # ask fn what it makes of an (empty) float tensor of the current dtype, on the buffers' new device.
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def logical_numel(self) -> int:
        """Elements of the float table this module stands for (StableLMModel.num_params counts these)."""
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}, dtype={self.dtype}"


def match_embedding_dtype(model: nn.Module) -> None:
    """Give a QuantEmbedding the model's float dtype (that of the final LayerNorm's weight), which its own tensors
    (integer codes, float32 scales) do not carry: for load paths that swap stored tensors into a meta-device
    skeleton with load_state_dict(assign=True) (checkpoint.load, parallel.load_sharded)."""
    embed = getattr(model, "embed", None)
    if isinstance(embed, QuantEmbedding):
        embed.dtype = model.dtype


# The modules that stand in for a frozen nn.Linear (LoRA wraps them as it wraps nn.Linear).
QUANTIZED_LINEARS = (QuantLinear, NF4Linear)
FORMATS = ("int", "nf4")
# The output heads stay float by default: lm_head is one layer that every token's logits go through, and a
# classifier's score head is tiny (num_labels rows), so quantizing it saves nothing.
DEFAULT_SKIP = ("lm_head", "score")
# A converted checkpoint with its lm_head quantized too (`convert --quantize-head`): the score head stays float.
HEAD_QUANTIZED_SKIP = tuple(s for s in DEFAULT_SKIP if s != "lm_head")


def quantize_kwargs(quant: dict) -> dict:
    """quantize_model / quantize_state_dict keyword arguments for a converted checkpoint's quantization entry
    (config.json's {"bits", "group_size"[, "format"][, "lm_head"][, "embed"]}, written by stablelm/checkpoint.py;
    read here, below checkpoint.py, so that stablelm/parallel.py, which checkpoint.py imports, can read it too). A
    missing "lm_head" / "embed" is a float head / embedding table, as every checkpoint written before the options
    has."""
    return {"bits": quant["bits"], "group_size": quant["group_size"], "fmt": quant.get("format", "int"),
            "skip": HEAD_QUANTIZED_SKIP if quant.get("lm_head") else DEFAULT_SKIP,
            "embed": bool(quant.get("embed", False))}


def _check_fmt(fmt: str, bits) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "nf4" and bits != 4:
        raise ValueError(f"nf4 is a 4-bit format, got bits={bits!r}")


# Why a quantized embedding is refused: the messages of quantize_model and quantize_state_dict (and the converter's).
TIED_EMBED_REFUSAL = ("a tied model's head multiplies by the embedding table (tie_word_embeddings), which a "
                      "quantized lookup table cannot stand in for; quantize the embedding of untied models only (the "
                      "head of a tied one is quantized as a copy of the table, the table staying float)")
NF4_EMBED_REFUSAL = ("the embedding table is quantized in the int8 / int4 formats only: nf4's double-quantized "
                     "block scales do not gather by row")


def _check_embed_fmt(fmt: str) -> None:
    if fmt != "int":
        raise ValueError(NF4_EMBED_REFUSAL)


def _quantized_module(weight, bias, bits: int, group_size: int, fmt: str) -> nn.Module:
    if fmt == "nf4":
        return NF4Linear(*quantize_nf4(weight, group_size), bias, group_size)
    return QuantLinear(*quantize_weight(weight, bits, group_size), bias, bits, group_size)


def _skipped(name: str, skip) -> bool:
    """A skip entry (an fnmatch pattern) matches the qualified name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, s) or fnmatch.fnmatchcase(leaf, s) for s in skip)


def quantize_model(module: nn.Module, bits: int, group_size: int = 128, skip=DEFAULT_SKIP,
                   fmt: str = "int", embed: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name matches no skip entry by a QuantLinear (fmt "int")
    or an NF4Linear (fmt "nf4", bits 4, group_size the block size); a StableLM with tied embeddings gets a
    quantized lm_head unless "lm_head" is skipped (see the module docstring). embed: the model's `embed` table
    becomes a QuantEmbedding too (fmt "int" only; refused for a tied StableLM), checked before anything is
    replaced."""
    _check_fmt(fmt, bits)
    if isinstance(module, nn.Linear):
        raise ValueError("quantize_model: cannot replace the root module in place; use QuantLinear.from_linear")
    if embed:
        _check_embed_fmt(fmt)
        if not isinstance(getattr(module, "embed", None), nn.Embedding):
            raise ValueError(f"quantize_model: embed=True needs a model whose `embed` is an nn.Embedding; "
                             f"{type(module).__name__}.embed is {type(getattr(module, 'embed', None)).__name__}")
        if isinstance(module, StableLM) and module.lm_head is None:
            raise ValueError(f"quantize_model: embed=True: {TIED_EMBED_REFUSAL}")
        try:
            quantized_embed = QuantEmbedding.from_embedding(module.embed, bits, group_size)
        except ValueError as e:
            raise ValueError(f"quantize_model: embedding table (embed.weight): {e}") from None
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) and not _skipped(name, skip)]
    for name, linear in targets:
        try:
            bias = None if linear.bias is None else linear.bias.detach().clone()
            quantized = _quantized_module(linear.weight, bias, bits, group_size, fmt)
        except ValueError as e:
            raise ValueError(f"quantize_model: layer {name!r}: {e}") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, quantized)
    if isinstance(module, StableLM) and module.lm_head is None and not _skipped("lm_head", skip):
        try:
            module.lm_head = _quantized_module(module.embed.weight, None, bits, group_size, fmt)
        except ValueError as e:
            raise ValueError(f"quantize_model: tied lm_head (embed.weight): {e}") from None
    if embed:
        module.embed = quantized_embed
    return module


# The nn.Linear modules of the project's layout (stablelm/model.py). A bare state dict does not say which 2-D
# tensors are Linear weights (embed.weight and the q_norm/k_norm weights are 2-D too); the tests check this
# list against quantize_model on a StableLM.
STABLELM_LINEARS = ("qkv", "o", "gate_up", "down", "lm_head", "score")


def quantize_state_dict(tensors: dict, bits: int, group_size: int = 128, skip=DEFAULT_SKIP,
                        linears=STABLELM_LINEARS, fmt: str = "int", embed: bool = False) -> dict:
    """The state dict quantize_model(model, bits, group_size, skip, fmt, embed) would have, from the float one: each
    `<module>.weight` whose module's last name is in `linears` (and matches no skip entry) becomes
    `<module>.qweight`, `.scales` (and `.zeros` for int4); every other tensor is kept as is. A StableLM state dict
    with `embed.weight` and no `lm_head.weight` is a tied one: unless skipped, its head is quantized from the
    embedding table into `lm_head.*`, and `embed.weight` stays. fmt "nf4" writes NF4Linear's tensors instead.
    embed: `embed.weight` becomes `embed.qweight`, `.scales` (, `.zeros`) too (fmt "int"; refused for a tied state
    dict, by the rule above)."""
    _check_fmt(fmt, bits)
    # Only a causal LM has a tied head: a classifier's state dict has a score head and no lm_head at all.
    tied = "embed.weight" in tensors and "lm_head.weight" not in tensors and "score.weight" not in tensors
    if embed:
        _check_embed_fmt(fmt)
        if "embed.weight" not in tensors:
            raise ValueError("quantize_state_dict: embed=True but the state dict has no embed.weight")
        if tied:
            raise ValueError(f"quantize_state_dict: embed=True: {TIED_EMBED_REFUSAL}")
    out = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if embed and key == "embed.weight":
            out.update(_quantized(key, "embed", tensor, bits, group_size))
            continue
        if leaf != "weight" or module.rsplit(".", 1)[-1] not in linears or _skipped(module, skip):
            out[key] = tensor
            continue
        out.update(_quantized(key, module, tensor, bits, group_size, fmt))
    if tied and "lm_head" in linears and not _skipped("lm_head", skip):
        out.update(_quantized("embed.weight", "lm_head", tensors["embed.weight"], bits, group_size, fmt))
    return out


def _quantized(key: str, module: str, weight, bits: int, group_size: int, fmt: str = "int") -> dict:
    """{`module`.qweight, .scales (, .zeros)} (nf4: .qweight, .absmax, .absmax_scale, .absmax_mean) of the float
    weight stored under `key`."""
    try:
        if fmt == "nf4":
            names = ("qweight", "absmax", "absmax_scale", "absmax_mean")
            return {f"{module}.{n}": t for n, t in zip(names, quantize_nf4(weight, group_size))}
        qweight, scales, zeros = quantize_weight(weight, bits, group_size)
    except ValueError as e:
        raise ValueError(f"quantize_state_dict: {key!r}: {e}") from None
    out = {f"{module}.qweight": qweight, f"{module}.scales": scales}
    if zeros is not None:
        out[f"{module}.zeros"] = zeros
    return out
