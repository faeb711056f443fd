"""Weight-only quantization formats (int8 per output channel, int4 grouped along K) and the quant_linear op over
them: quantize / dequantize, the reference and the Triton kernels. The model surgery over this file (QuantLinear,
quantize_model, quantize_state_dict) is stablelm/quantize.py.

Formats (plain tensors, so they live in safetensors checkpoints; a weight is [N, K] = [out, in]):

  int8   qweight int8 [N, K]; scales float32 [N]; zeros None.
         Symmetric: w[n, k] ~= qweight[n, k] * scales[n], codes in [-127, 127], scale = max|w[n, :]| / 127.
  int4   qweight uint8 [N, K // 2], two codes per byte: the LOW nibble holds the even column k = 2j, the HIGH
         nibble the odd column k = 2j + 1. scales, zeros float32 [N, K // group_size].
         Asymmetric min/max: w[n, k] ~= code * scales[n, g] + zeros[n, g] with g = k // group_size, codes in
         [0, 15], scale = (max - min) / 15 over the group and zeros = the group minimum (the value of code 0, a
         float, not an integer zero point: every weight is then within half a step of its dequantized value,
         and dequantizing is one multiply-add). group_size must divide K and be a multiple of 16.
  A constant row or group (zero range) gets scale 1, so it dequantizes exactly with no division by zero.

Why float32 scales and zeros: the kernels do their math in float32, the round-trip bound above then holds for
any weight magnitudes (bf16 scales add up to 2^-9 relative error per channel, fp16 ones under/overflow for
unusual weights), and they are small: 4 bytes per output channel for int8 (0.16% of the weight bytes at
K = 2560); 8 bytes per 128-weight group for int4 (12.5% on top of the 64 packed bytes; group_size 256 halves it).
A QuantLinear moved with .to(dtype) converts them too; every function here accepts any float dtype for them.

Op (stablelm.ops.quant_linear): x [..., K] (float32 / float16 / bfloat16) -> [..., N] in x's dtype, plus bias
[N] if given. Differentiable with respect to x and bias (QLoRA: LoRA and the projector train over a frozen
quantized LM): grad_x = grad_out @ dequant(W); the quantized weight never gets a gradient. The reference gets it
from autograd through its float32 dequantized weight; the Triton path is an autograd.Function (_QuantLinearFunction)
whose backward is a second tiled kernel (_quant_grad_input_kernel: grad_out tile @ weight tile dequantized in
registers, looping over N; no split), saving only the quantized tensors (not x) for the backward.

Accuracy (tests/test_quant.py): a quantized linear layer's output is within 1.2e-2 (int8) / 1.3e-1 (int4) relative
L2 error of the float layer on gaussian weights; a whole quantized model's logits within 2e-2 (int8, top-1 token
agreeing on >= 90% of positions) / 2e-1 (int4, group 32) of the float model's, with the lm_head quantized or not.

Triton kernel: one program computes a BLOCK_M x BLOCK_N output tile over a range of K tiles (split-K), loading
each weight tile once and dequantizing it in registers. The dequantization is factored out of the inner
product so the tile product is exact in bf16/fp16 (codes are small integers):
  int8: acc = sum_k x * code, times scales[n] once at the end;
  int4: per K tile (inside one group): acc += scale * sum_k x * code + zero * sum_k x.
Decode (M <= 64) uses a single row block, so every packed weight byte is read exactly once, and splits K so
there are a few programs per SM (memory bound: the weight read is the cost); the split partials are summed by
a second small kernel in a fixed order (deterministic, unlike atomics). M == 1 uses a multiply-and-reduce tile
product on the CUDA cores (no 16-row tl.dot padding); larger M use tl.dot with float32 accumulation. Prefill
keeps the fused tiled matmul rather than dequantizing to a bf16 temporary for torch.matmul: for the 3B qkv
projection (K = 2560, N = 7680) at M = 512 the temporary's write + read is ~80 MB, ~27 us at 3 TB/s, about
the time of the matmul itself (20 GFLOP); only for M in the thousands does cuBLAS's speed win that back, so from
DEQUANT_MATMUL_MIN_ROWS rows (training) the weight is dequantized to x's dtype by one Triton pass
(dequantize_triton) and multiplied by cuBLAS, forward and input gradient alike.
Tiling comes from choose_config (a heuristic, so nothing autotunes inside CUDA-graph capture); quant_matmul
takes an explicit QuantMatmulConfig for tests and tuning.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels import gemv as _gemv
from kernels import int4pack as _int4pack
from kernels._common import (FLOAT_DTYPES, check_tiles, pdl_launch_dependents, pdl_wait, prefetch_l2, skinny_split_k,
                             sm_count, use_pdl)

_QWEIGHT_DTYPES = {8: torch.int8, 4: torch.uint8}

# From this many rows (training: 8 studies x 190 positions = 1520; long prefills) the Triton implementations
# dequantize the whole weight to x's dtype in one pass and multiply with cuBLAS, as bitsandbytes does for QLoRA.
# Measured on the H200 at 1520 rows (3B shape, a QLoRA step through the fused kernels): the step's GPU time was
# 1.3x (int8), 2.1x (int4) and 7.7x (nf4) the bf16 LoRA step's (117 / 195 / 705 ms against 91), while the
# temporary costs one write + read of the weight in bf16 (~25 us for gate_up) against ~140 us of its matmul.
# Below it the fused kernels read the packed weight once and win (this file's docstring: at 512 rows the temporary
# costs about the matmul's time). kernels/nf4.py uses the same threshold.
DEQUANT_MATMUL_MIN_ROWS = 1024
INT4_GROUP_MULTIPLE = 16  # the smallest tl.dot depth: one group's scale covers whole K tiles


# ----------------------------------------------------------------------------------------------------------------
# Format: quantize / pack / dequantize

def _check_format(K: int, bits: int, group_size: int) -> None:
    if bits not in _QWEIGHT_DTYPES:
        raise ValueError(f"quant: bits must be 4 or 8, got {bits!r}")
    if bits == 4:
        if not isinstance(group_size, int) or group_size <= 0 or group_size % INT4_GROUP_MULTIPLE:
            raise ValueError(f"quant: int4 group_size must be a positive multiple of {INT4_GROUP_MULTIPLE}, "
                             f"got {group_size!r}")
        if K % group_size:
            raise ValueError(f"quant: int4 group_size {group_size} does not divide in_features K={K}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] codes in [0, 15] (K even) -> uint8 [..., K // 2]: low nibble = even k, high = odd k."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dim {codes.shape[-1]} must be even")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K // 2] -> uint8 [..., K]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8, got {packed.dtype}")
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128):
    """(qweight, scales, zeros) of a float weight [N, K] in the format above (zeros None for int8).

    Works on any device, the meta device included (checkpoint loading builds quantized modules there).
    group_size applies to int4 only.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: expected a float [N, K] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    _check_format(K, bits, group_size)
    w = weight.detach().float()
    if bits == 8:
        scales = w.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return qweight, scales, None
    groups = w.view(N, K // group_size, group_size)
    zeros = groups.amin(dim=2)
    scales = (groups.amax(dim=2) - zeros) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - zeros[..., None]) / scales[..., None]).clamp(0, 15)
    return pack_int4(codes.view(N, K)), scales, zeros


def dequantize_weight(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """float32 weight [N, K] from the format above."""
    if bits == 8:
        _check_format(qweight.shape[1], bits, group_size)
        return qweight.float() * scales.float()[:, None]
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_format(K, bits, group_size)
    codes = unpack_int4(qweight).float().view(N, K // group_size, group_size)
    return (codes * scales.float()[..., None] + zeros.float()[..., None]).view(N, K)


# ----------------------------------------------------------------------------------------------------------------
# Reference

def _check_op_args(x, qweight, scales, zeros, bias, bits, group_size):
    """Validate quant_linear's arguments; returns (N, K)."""
    if bits not in _QWEIGHT_DTYPES:
        raise ValueError(f"quant_linear: bits must be 4 or 8, got {bits!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quant_linear: x dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if qweight.dim() != 2 or qweight.dtype != _QWEIGHT_DTYPES[bits]:
        raise ValueError(f"quant_linear: int{bits} qweight must be {_QWEIGHT_DTYPES[bits]} 2-D, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    _check_format(K, bits, group_size)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} must end in in_features K={K}")
    expected = (N,) if bits == 8 else (N, K // group_size)
    if scales.shape != expected or not scales.is_floating_point():
        raise ValueError(f"quant_linear: int{bits} scales must be float {expected}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if bits == 8 and zeros is not None:
        raise ValueError("quant_linear: int8 is symmetric, zeros must be None")
    if bits == 4 and (zeros is None or zeros.shape != expected or not zeros.is_floating_point()):
        got = None if zeros is None else f"{zeros.dtype} {tuple(zeros.shape)}"
        raise ValueError(f"quant_linear: int4 zeros must be float {expected}, got {got}")
    if bias is not None and (bias.shape != (N,) or not bias.is_floating_point()):
        raise ValueError(f"quant_linear: bias must be float [N={N}], got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"quant_linear: {name} is on {t.device} but x is on {x.device}")
    return N, K


def quant_linear_ref(x, qweight, scales, zeros, bias, bits, group_size):
    """Reference: dequantize to float32, F.linear in float32, output in x's dtype."""
    _check_op_args(x, qweight, scales, zeros, bias, bits, group_size)
    w = dequantize_weight(qweight, scales, zeros, bits, group_size)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of quant_linear passes (inference only)

def _quant_linear_inputs(case, seed, device):
    """A random gaussian weight quantized with quantize_weight; x [..., K] with `M` rows (x 3-D when S is given)."""
    p = case.params
    M, N, K, bits, group = p["M"], p["N"], p["K"], p["bits"], p.get("group", 128)
    gen = _c.generator(case, seed)
    w = _c.randn(gen, N, K, scale=K ** -0.5)
    qweight, scales, zeros = quantize_weight(w, bits, group)
    x = _c.randn(gen, *((2, M) if p.get("batched") else (M,)), K, dtype=case.dtype, device=device)
    bias = _c.randn(gen, N, dtype=case.dtype, device=device) if p.get("bias") else None
    return dict(x=x, qweight=qweight.to(device), scales=scales.to(device),
                zeros=None if zeros is None else zeros.to(device), bias=bias, bits=bits, group_size=group)


def _quant_linear_grid():
    grid = []
    for bits, groups in ((8, (128,)), (4, (32, 64, 128))):
        # M 1024: DEQUANT_MATMUL_MIN_ROWS, the dequantize + cuBLAS path of quant_linear_triton
        for M in (1, 5, 33, 1024):
            for N, K in ((96, 256), (250, 512), (7680, 2560)):
                for group in groups:
                    if bits == 4 and (N, K) == (7680, 2560) and group != 128:
                        continue
                    grid.append(dict(M=M, N=N, K=K, bits=bits, group=group if bits == 4 else None,
                                     bias=M in (5, 1024), batched=M == 33))
    return grid


_QUANT_TOL = {torch.float32: _c.Tol(1e-4, 1e-5), torch.float16: _c.Tol(2e-3, 2e-3),
              torch.bfloat16: _c.Tol(1e-2, 1.6e-2)}
# CPU grid in fp16/fp32 only: the Triton interpreter's bf16 tl.dot gives wrong results (a GPU checks bf16 too).
_QUANT_CPU = {"M1-N96-K256-bits8-fp32", "M5-N96-K256-bits4-group32-bias-fp16", "M33-N250-K512-bits4-group64-batched-fp16",
              "M1-N250-K512-bits4-group128-fp32", "M5-N250-K512-bits8-bias-fp32",
              "M1024-N96-K256-bits4-group32-bias-fp32", "M1024-N250-K512-bits8-bias-fp16"}


def _quant_linear_work(inputs):
    x, qw = inputs["x"], inputs["qweight"]
    N = qw.shape[0]
    K = x.shape[-1]
    M = x.numel() // K
    nbytes = sum(t.nbytes for t in (qw, inputs["scales"], inputs["zeros"]) if t is not None)
    return {"bytes": nbytes + x.nbytes + M * N * x.element_size(), "flops": 2 * M * N * K}


CONTRACTS = {"quant_linear": _c.Contract(
    op="quant_linear", reference=quant_linear_ref, make_inputs=_quant_linear_inputs,
    cases=_c.make_cases(_quant_linear_grid(), _c.FLOAT_DTYPES, cpu=_QUANT_CPU), tol=_QUANT_TOL,
    bench=[_c.Case("3b-qkv-int8-M1", dict(M=1, N=7680, K=2560, bits=8), torch.bfloat16),
           _c.Case("3b-qkv-int4-M1", dict(M=1, N=7680, K=2560, bits=4, group=128), torch.bfloat16),
           _c.Case("3b-mlp-int4-M8", dict(M=8, N=13824, K=2560, bits=4, group=128), torch.bfloat16)],
    work=_quant_linear_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _quant_matmul_kernel(X, QW, SCALES, ZEROS, BIAS, OUT,
                         M, N, K, tiles_per_split,
                         sxm, sxk, sqn, sqk, ssn, ssg, szn, szg, so_split, som, son,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Grid (m blocks, n blocks, K splits): OUT[split, m, n] = sum over this split's K tiles of x * dequant(w).

    BLOCK_M == 1 multiplies and reduces on the CUDA cores; BLOCK_M >= 16 uses tl.dot. For int4, BLOCK_K
    divides GROUP, so each K tile lies inside one group. PDL (kernels/_common.py): the first line of each weight
    row's first tile is prefetched into L2 before waiting for the previous kernel.
    """
    pdl_launch_dependents(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * sxm
    w_rows = QW + offs_n.to(tl.int64)[:, None] * sqn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if PDL:
        first = tl.minimum(t_begin * (BLOCK_K if BITS == 8 else BLOCK_K // 2), (K if BITS == 8 else K // 2) - 1)
        prefetch_l2(QW + tl.minimum(offs_n, N - 1).to(tl.int64) * sqn + first * sqk)
    pdl_wait(PDL)
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * sxk, mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        # Codes are small integers, exact in x's dtype, so the tile product below is exact before summing.
        if BLOCK_M == 1:
            w_dtype = tl.float32
        else:
            w_dtype = x.dtype
        if BITS == 8:
            codes = tl.load(w_rows + offs_k[None, :] * sqk, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0)
            w = codes.to(w_dtype)
        else:
            offs_b = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + offs_b[None, :] * sqk, mask=n_ok[:, None], other=0)
            w = tl.interleave((packed & 15).to(w_dtype), (packed >> 4).to(w_dtype))
        if BLOCK_M == 1:
            # [1, BK] broadcast over the [BN, BK] weight tile: a 2-D multiply and row reduction.
            prod = tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        elif IEEE:
            prod = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            prod = tl.dot(x, tl.trans(w))
        if BITS == 8:
            acc += prod
        else:
            g = (t * BLOCK_K) // GROUP
            scale = tl.load(SCALES + offs_n * ssn + g * ssg, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(ZEROS + offs_n * szn + g * szg, mask=n_ok, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += prod * scale[None, :] + x_sum[:, None] * zero[None, :]
    if BITS == 8:
        acc *= tl.load(SCALES + offs_n * ssn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = OUT + pid_k * so_split + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(P, BIAS, OUT, N, n_splits, sps, spm, som,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """OUT[m, n] = sum_s P[s, m, n] (+ bias[n]), summed in split order, so results are reproducible."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(n_splits):
        acc += tl.load(P + s * sps + m * spm + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + m * som + offs_n, acc.to(OUT.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

@dataclass(frozen=True)
class QuantMatmulConfig:
    """Tiling of _quant_matmul_kernel. block_m is 1 (CUDA-core tile product) or a power of two >= 16 (tl.dot);
    block_n, block_k are powers of two >= 16 (for int4 block_k must divide group_size); split_k is an upper
    bound on the K splits (the launcher drops splits that would get no tiles)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _pow2_divisor(n: int) -> int:
    return n & -n


@functools.lru_cache(maxsize=None)
def choose_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device) -> QuantMatmulConfig:
    """Heuristic tiling (not autotuned, so the first call may happen inside CUDA-graph capture); cached, since
    eager decode pays it on every call."""
    k_cap = _pow2_divisor(group_size) if bits == 4 else 1 << 30
    # In the interpreter a small count still makes the heuristic split K on small test shapes.
    sms = sm_count(device, interpreted=4)
    if M > 64:
        # Prefill: big tiles, narrowed while there would be less than one program per SM.
        block_m, block_n = 128, 128
        if triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < sms:
            block_n = 64
        if triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < sms:
            block_m = 64
        return QuantMatmulConfig(block_m, block_n, min(64, k_cap), num_warps=8 if block_m == 128 else 4)
    if M == 1:
        # ~8K weights per tile: enough bytes in flight per program without spilling the product tile.
        # int8 at 16 x 512 was the fastest tiling of a sweep over the 3B shapes on an H200; int4 stays 64 x 128.
        block_m, block_k = 1, min(512 if bits == 8 else 128, k_cap)
        block_n = 8192 // block_k
    else:
        block_m, block_n, block_k = max(16, triton.next_power_of_2(M)), 64, min(128, k_cap)
    split_k = skinny_split_k(M, N, triton.cdiv(K, block_k), block_m, block_n, sms)
    return QuantMatmulConfig(block_m, block_n, block_k, split_k)


def _check_config(cfg: QuantMatmulConfig, bits: int, group_size: int) -> None:
    check_tiles("quant_matmul", cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k)
    if bits == 4 and group_size % cfg.block_k:
        raise ValueError(f"quant_matmul: int4 block_k {cfg.block_k} must divide group_size {group_size}")


def quant_matmul(x2, qweight, scales, zeros, bias, bits, group_size, config: QuantMatmulConfig):
    """x2 [M, K] -> [M, N] in x2's dtype with an explicit tiling (quant_linear_triton picks one).

    Arguments are validated by the caller (_check_op_args); exposed for tests and tuning.
    """
    _check_config(config, bits, group_size)
    M, K = x2.shape
    N = qweight.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0 or K == 0:  # an empty sum leaves just the bias
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    tiles = triton.cdiv(K, config.block_k)
    tiles_per_split = triton.cdiv(tiles, config.split_k)
    n_splits = triton.cdiv(tiles, tiles_per_split)
    target = out if n_splits == 1 else torch.empty((n_splits, M, N), dtype=torch.float32, device=x2.device)
    zeros_strides = (0, 0) if zeros is None else zeros.stride()
    scales_strides = (scales.stride(0), 0) if bits == 8 else scales.stride()
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), n_splits)
    pdl = use_pdl(x2.device)
    _quant_matmul_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, target,
        M, N, K, tiles_per_split,
        *x2.stride(), *qweight.stride(), *scales_strides, *zeros_strides,
        target.stride(0) if n_splits > 1 else 0, target.stride(-2), target.stride(-1),
        BITS=bits, GROUP=group_size if bits == 4 else 1, HAS_BIAS=bias is not None and n_splits == 1,
        IEEE=x2.dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, PDL=pdl, launch_pdl=pdl)
    if n_splits > 1:
        block_n = min(1024, triton.next_power_of_2(N))
        _split_sum_kernel[(M, triton.cdiv(N, block_n))](
            target, bias if bias is not None else target, out, N, n_splits, target.stride(0), target.stride(1),
            out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n, PDL=pdl, launch_pdl=pdl)
    return out


def quant_linear_tiled(x, qweight, scales, zeros, bias, bits, group_size):
    """quant_linear through the tiled kernel above at every M: x [..., K] -> [..., N]; tiling from choose_config."""
    N, K = _check_op_args(x, qweight, scales, zeros, bias, bits, group_size)
    if _needs_grad(x, bias):
        return _QuantLinearFunction.apply(quant_linear_tiled, x, qweight, scales, zeros, bias, bits, group_size)
    x2 = x.reshape(x.shape[:-1].numel(), K)  # not -1: ambiguous when K == 0
    cfg = choose_config(x2.shape[0], N, K, bits, group_size, x.device)
    return quant_matmul(x2, qweight, scales, zeros, bias, bits, group_size, cfg).view(*x.shape[:-1], N)


def quant_linear_triton(x, qweight, scales, zeros, bias, bits, group_size):
    """Triton quant_linear: kernels/gemv.py's decode GEMV where it measures faster (kernels.gemv.prefer_gemv:
    batch-1 decode in bf16 / int8); int4 at one row of bf16 x on CUDA through torch's tinygemm kernel
    (kernels/int4pack.py says why and what it costs); from DEQUANT_MATMUL_MIN_ROWS rows the weight dequantized to
    x's dtype (one Triton pass) and cuBLAS; the tiled kernel between. Differentiable in x and bias (_QuantLinearFunction)."""
    N, K = _check_op_args(x, qweight, scales, zeros, bias, bits, group_size)
    if _needs_grad(x, bias):
        return _QuantLinearFunction.apply(quant_linear_triton, x, qweight, scales, zeros, bias, bits, group_size)
    M = x.shape[:-1].numel()
    if M > 0 and K > 0 and _gemv.prefer_gemv(M, bits):
        return _gemv.quant_gemv(x, qweight, scales, zeros, bias, bits, group_size)
    if M == 1 and bits == 4 and _int4pack.usable(x, N, K, group_size):
        return _int4pack.int4pack_linear(x, qweight, scales, zeros, bias, group_size)
    if M >= DEQUANT_MATMUL_MIN_ROWS:
        w = dequantize_triton(qweight, scales, zeros, bits, group_size, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return quant_linear_tiled(x, qweight, scales, zeros, bias, bits, group_size)


# ----------------------------------------------------------------------------------------------------------------
# Whole-weight dequantization (the path of many rows) and the backward (training over a frozen quantized weight):
# grad_x = grad_out @ dequant(W)

@triton.jit
def _dequant_tile(QW, SCALES, ZEROS, offs_n, n_ok, k0, K, sqn, sqk, ssn, ssg, szn, szg,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] dequantized weights of columns k0 .. k0 + BLOCK_K of rows offs_n (zero where
    masked). For int4, BLOCK_K divides GROUP, so the tile lies inside one group."""
    w_rows = QW + offs_n.to(tl.int64)[:, None] * sqn
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(w_rows + offs_k[None, :] * sqk, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0)
        scale = tl.load(SCALES + offs_n * ssn, mask=n_ok, other=0.0).to(tl.float32)
        return codes.to(tl.float32) * scale[:, None]
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_rows + offs_b[None, :] * sqk, mask=n_ok[:, None], other=0)
    codes = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
    grp = k0 // GROUP
    scale = tl.load(SCALES + offs_n * ssn + grp * ssg, mask=n_ok, other=0.0).to(tl.float32)
    zero = tl.load(ZEROS + offs_n * szn + grp * szg, mask=n_ok, other=0.0).to(tl.float32)
    return codes * scale[:, None] + zero[:, None]


@triton.jit
def _dequant_kernel(QW, SCALES, ZEROS, OUT, N, K, sqn, sqk, ssn, ssg, szn, szg, son, sok,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (n blocks, k blocks): OUT[n, k] = dequant(w)[n, k], rounded once to OUT's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w = _dequant_tile(QW, SCALES, ZEROS, offs_n, n_ok, k0, K, sqn, sqk, ssn, ssg, szn, szg, BITS, GROUP, BLOCK_K)
    out = OUT + offs_n.to(tl.int64)[:, None] * son + offs_k[None, :] * sok
    tl.store(out, w.to(OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_k < K)[None, :])


def dequantize_triton(qweight, scales, zeros, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, dequantized in float32 by one Triton pass and rounded once (the reference
    dequantize_weight's values, rounded to dtype)."""
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    if N == 0 or K == 0:
        return out
    block_k = min(64, _pow2_divisor(group_size)) if bits == 4 else 64
    zeros_strides = (0, 0) if zeros is None else zeros.stride()
    scales_strides = (scales.stride(0), 0) if bits == 8 else scales.stride()
    _dequant_kernel[(triton.cdiv(N, 64), triton.cdiv(K, block_k))](
        qweight, scales, zeros if zeros is not None else scales, out, N, K, *qweight.stride(), *scales_strides,
        *zeros_strides, *out.stride(), BITS=bits, GROUP=group_size if bits == 4 else 1, BLOCK_N=64, BLOCK_K=block_k)
    return out


@triton.jit
def _quant_grad_input_kernel(G, QW, SCALES, ZEROS, DX, M, N, K,
                             sgm, sgn, sqn, sqk, ssn, ssg, szn, szg, sdm, sdk,
                             BITS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (m blocks, k blocks): DX[m, k] = sum_n G[m, n] * dequant(w)[n, k]. For int4, BLOCK_K divides GROUP, so
    a K tile lies inside one group; the weight tile is dequantized to float32, then to G's dtype for tl.dot."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    k_ok = offs_k < K
    g_rows = G + offs_m.to(tl.int64)[:, None] * sgm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        g = tl.load(g_rows + offs_n[None, :] * sgn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = _dequant_tile(QW, SCALES, ZEROS, offs_n, n_ok, k0, K, sqn, sqk, ssn, ssg, szn, szg, BITS, GROUP, BLOCK_K)
        if IEEE:
            acc += tl.dot(g, w, input_precision="ieee")
        else:
            acc += tl.dot(g, w.to(g.dtype))
    out = DX + offs_m.to(tl.int64)[:, None] * sdm + offs_k[None, :] * sdk
    tl.store(out, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


def quant_grad_input(grad2, qweight, scales, zeros, bits, group_size, block_m=None, block_n=64, block_k=None):
    """grad_x [M, K] = grad2 [M, N] @ dequant(W) [N, K] in grad2's dtype; explicit tiles for tests."""
    M, N = grad2.shape
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    dx = torch.empty((M, K), dtype=grad2.dtype, device=grad2.device)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    block_m = block_m or (128 if M > 64 else max(16, triton.next_power_of_2(M)))
    block_k = block_k or (min(64, _pow2_divisor(group_size)) if bits == 4 else 64)
    _check_config(QuantMatmulConfig(block_m, block_n, block_k), bits, group_size)
    zeros_strides = (0, 0) if zeros is None else zeros.stride()
    scales_strides = (scales.stride(0), 0) if bits == 8 else scales.stride()
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _quant_grad_input_kernel[grid](
        grad2, qweight, scales, zeros if zeros is not None else scales, dx, M, N, K,
        *grad2.stride(), *qweight.stride(), *scales_strides, *zeros_strides, *dx.stride(),
        BITS=bits, GROUP=group_size if bits == 4 else 1, IEEE=grad2.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_m == 128 else 4)
    return dx


class _QuantLinearFunction(torch.autograd.Function):
    """y = forward(x, ...) (quant_linear_triton or quant_linear_tiled; grad is off inside); backward grad_x by
    quant_grad_input (quant_linear_triton from DEQUANT_MATMUL_MIN_ROWS rows: grad_y @ the dequantized weight, by
    cuBLAS), grad_bias = sum of grad_y. Saves only the quantized tensors (the dequantized weight is made again)."""

    @staticmethod
    def forward(ctx, forward, x, qweight, scales, zeros, bias, bits, group_size):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.forward, ctx.bits, ctx.group_size = forward, bits, group_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        return forward(x, qweight, scales, zeros, bias, bits, group_size)  # grad is off inside forward

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        N = qweight.shape[0]
        grad2 = grad.reshape(-1, N)
        dx = dbias = None
        if ctx.needs_input_grad[1]:
            if ctx.forward is quant_linear_triton and grad2.shape[0] >= DEQUANT_MATMUL_MIN_ROWS:
                dx = grad2 @ dequantize_triton(qweight, scales, zeros, ctx.bits, ctx.group_size, grad2.dtype)
            else:
                dx = quant_grad_input(grad2, qweight, scales, zeros, ctx.bits, ctx.group_size)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[5]:
            dbias = grad2.float().sum(0).to(ctx.bias_dtype)
        return None, dx, None, None, None, dbias, None, None


def _needs_grad(x, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


IMPLEMENTATIONS = {"quant_linear": {"torch": quant_linear_ref, "triton": quant_linear_triton,
                                    "tiled": quant_linear_tiled}}

