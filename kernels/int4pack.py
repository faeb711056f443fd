"""Batch-1 int4 decode through torch's tinygemm kernel (torch._weight_int4pack_mm, the kernel gpt-fast's int4 uses):
kernels/quant.py's int4 weights repacked into tinygemm's tiled layout, for the "triton" quant_linear on CUDA at one
row of bfloat16 x.

Why: at M = 1 this project's Triton int4 kernels reach 16-42% of the copy bandwidth on the StableLM-3B shapes, and
tinygemm 27-63% (bench/quant_gemv_peers.py on an H200, 2026-12-02: the GEMVs of one decode step 1.72 ms through the
tiled kernel, 1.17 ms through tinygemm, bf16 cuBLAS 1.95 ms). A 3B int4 weight is 3-24 MB per projection, a few
microseconds of bytes, so load latency and ramp, not bytes, set those times; tinygemm runs its dequantisation on
packed registers into tensor-core MMAs, which our Triton kernels (one code per 32-bit lane) do not.
At 8 rows it ties the tiled kernel and at 32 it is 2x slower, so only M = 1 is routed here.

Formats. Ours: w = code * scale + zero (float32 scales / zeros [N, K // group_size], low nibble = even k).
tinygemm: w = (code - 8) * scale + zero' with bfloat16 [K // group_size, N, 2] (scale, zero') pairs and the high
nibble holding the even k of its input; so zero' = zero + 8 * scale, and the nibbles are swapped before
torch._convert_weight_to_int4pack tiles them. Rounding the scales and zeros to bfloat16 adds up to 2^-9 relative
error per group on top of int4's own (a quarter of a code step for a group's largest weights; the quant_linear
contract's bfloat16 tolerance holds, tests/test_int4pack.py).

Memory: the repacked copy is held beside the checkpoint-format tensors, which every other path (prefill, the QLoRA
backward, CPU) reads: +0.5 bytes per weight plus 4 bytes per group (StableLM-3B int4 g128: +1.3 GB). It is made on
the first batch-1 call for a weight (a CUDA-graph capture's warm-up runs make it before the capture) and dropped
with the weight (a weak-keyed cache), remade if the tensors change in place. ops.use(quant_linear="tiled") keeps
to the Triton kernels and never makes it.
"""
import torch
from torch.utils.weak import WeakTensorKeyDictionary

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm accepts

# qweight -> (what it was made from, (packed, pairs)); keyed by tensor identity (a plain WeakKeyDictionary would
# compare tensors with ==, elementwise)
_cache = WeakTensorKeyDictionary()


def _inner_k_tiles(K: int) -> int | None:
    """tinygemm's K tiling: K must be a multiple of 16 * inner_k_tiles (8 is its fastest, measured)."""
    for tiles in (8, 4, 2):
        if K % (16 * tiles) == 0:
            return tiles
    return None


def usable(x: torch.Tensor, N: int, K: int, group_size: int) -> bool:
    """Whether tinygemm can take this call: CUDA, bfloat16 x, N a multiple of 8, K of 32, a group size it knows;
    and not while torch.compile traces (the repack cache is host state a graph cannot hold: a compiled step keeps
    to the Triton kernels)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and N % 8 == 0 and _inner_k_tiles(K) is not None
            and group_size in GROUP_SIZES and hasattr(torch, "_weight_int4pack_mm")
            and not torch.compiler.is_compiling())


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    """(packed int32 weight, bfloat16 scales-and-zeros) in tinygemm's layout from kernels/quant.py's int4 format."""
    K = 2 * qweight.shape[1]
    swapped = ((qweight << 4) | (qweight >> 4)).contiguous()  # uint8: even k to the high nibble
    packed = torch._convert_weight_to_int4pack(swapped, _inner_k_tiles(K))
    scales = scales.float()
    pairs = torch.stack([scales, zeros.float() + 8 * scales], dim=-1)  # [N, groups, 2]
    return packed, pairs.transpose(0, 1).contiguous().to(torch.bfloat16)


def _packed(qweight, scales, zeros, group_size):
    key = (qweight._version, scales.data_ptr(), scales._version, zeros.data_ptr(), zeros._version, group_size)
    entry = _cache.get(qweight)
    if entry is None or entry[0] != key:
        entry = (key, repack(qweight, scales, zeros, group_size))
        _cache[qweight] = entry
    return entry[1]


def int4pack_linear(x, qweight, scales, zeros, bias, group_size):
    """quant_linear (int4) through tinygemm: x [..., K] bfloat16 on CUDA, arguments validated by the caller and
    usable() true -> [..., N] bfloat16."""
    N, K = qweight.shape[0], x.shape[-1]
    packed, pairs = _packed(qweight, scales, zeros, group_size)
    out = torch._weight_int4pack_mm(x.reshape(-1, K).contiguous(), packed, group_size, pairs)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], N)
