"""Weight-only quantization of a model: QuantLinear (an nn.Linear stand-in whose forward is ops.quant_linear),
quantize_model (module surgery, in place) and quantize_state_dict (the same change on a bare state dict, for the
converter). The formats, kernels and accuracy bounds are in kernels/quant.py.

The lm_head is skipped by default; skip=() quantizes it too (a converted checkpoint made with `convert
--quantize-head` records that as "lm_head": true in its quantization entry, read by quantize_kwargs). A StableLM with
tied embeddings has no lm_head module (its forward multiplies by the embedding table), so quantizing the head gives
it one: a QuantLinear quantized from the embedding table, while `embed` stays the float table. The lookup needs float
rows (quantizing the inputs of the first layer as well would add the table's rounding error to every activation, and
nn.Embedding cannot read the packed format), and it reads only one row per token, while the head reads the whole
table every decode step: the quantized copy costs 1 (int8) / 0.5 + 8 / group_size (int4) bytes per table entry of
residency next to the float table, and saves that step most of the head's bytes. A state dict then holds both
`embed.weight` and `lm_head.qweight` (+ scales, zeros), as quantize_state_dict writes it.

Formats: fmt="int" is kernels/quant.py's int8 (bits 8) / int4 (bits 4, group_size along K), held by QuantLinear;
fmt="nf4" is kernels/nf4.py's NF4 with double-quantized block scales (bits 4, group_size = the block size, 64 by
default), held by NF4Linear (buffers qweight, absmax, absmax_scale, absmax_mean, bias). Both train: their forward
is differentiable with respect to the input (grad_x = grad_y @ dequant(W)), the quantized weights are buffers and
never get gradients, so LoRA (stablelm/lora.py) and the report model's projector train over a frozen quantized LM.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from kernels.nf4 import NF4_BLOCK_SIZE, quantize_nf4
from kernels.quant import quantize_weight

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
    (config.json's {"bits", "group_size"[, "format"][, "lm_head"]}, written by stablelm/checkpoint.py; read here,
    below checkpoint.py, so that stablelm/parallel.py, which checkpoint.py imports, can read it too). A missing
    "lm_head" is a float head, as every checkpoint written before the option has."""
    return {"bits": quant["bits"], "group_size": quant["group_size"], "fmt": quant.get("format", "int"),
            "skip": HEAD_QUANTIZED_SKIP if quant.get("lm_head") else DEFAULT_SKIP}


def _check_fmt(fmt: str, bits) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "nf4" and bits != 4:
        raise ValueError(f"nf4 is a 4-bit format, got bits={bits!r}")


def _quantized_module(weight, bias, bits: int, group_size: int, fmt: str) -> nn.Module:
    if fmt == "nf4":
        return NF4Linear(*quantize_nf4(weight, group_size), bias, group_size)
    return QuantLinear(*quantize_weight(weight, bits, group_size), bias, bits, group_size)


def _skipped(name: str, skip) -> bool:
    """A skip entry (an fnmatch pattern) matches the qualified name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, s) or fnmatch.fnmatchcase(leaf, s) for s in skip)


def quantize_model(module: nn.Module, bits: int, group_size: int = 128, skip=DEFAULT_SKIP,
                   fmt: str = "int") -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name matches no skip entry by a QuantLinear (fmt "int")
    or an NF4Linear (fmt "nf4", bits 4, group_size the block size); a StableLM with tied embeddings gets a
    quantized lm_head unless "lm_head" is skipped (see the module docstring)."""
    _check_fmt(fmt, bits)
    if isinstance(module, nn.Linear):
        raise ValueError("quantize_model: cannot replace the root module in place; use QuantLinear.from_linear")
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
    return module


# The nn.Linear modules of the project's layout (stablelm/model.py). A bare state dict does not say which 2-D
# tensors are Linear weights (embed.weight and the q_norm/k_norm weights are 2-D too); the tests check this
# list against quantize_model on a StableLM.
STABLELM_LINEARS = ("qkv", "o", "gate_up", "down", "lm_head", "score")


def quantize_state_dict(tensors: dict, bits: int, group_size: int = 128, skip=DEFAULT_SKIP,
                        linears=STABLELM_LINEARS, fmt: str = "int") -> dict:
    """The state dict quantize_model(model, bits, group_size, skip) would have, from the float one: each
    `<module>.weight` whose module's last name is in `linears` (and matches no skip entry) becomes
    `<module>.qweight`, `.scales` (and `.zeros` for int4); every other tensor is kept as is. A StableLM state dict
    with `embed.weight` and no `lm_head.weight` is a tied one: unless skipped, its head is quantized from the
    embedding table into `lm_head.*`, and `embed.weight` stays. fmt "nf4" writes NF4Linear's tensors instead."""
    _check_fmt(fmt, bits)
    out = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or module.rsplit(".", 1)[-1] not in linears or _skipped(module, skip):
            out[key] = tensor
            continue
        out.update(_quantized(key, module, tensor, bits, group_size, fmt))
    # Only a causal LM has a tied head: a classifier's state dict has a score head and no lm_head at all.
    tied = "embed.weight" in tensors and "lm_head.weight" not in tensors and "score.weight" not in tensors
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
