"""Skinny matmul for decode: out[M, N] = x[M, K] @ W[N, K]^T with M small (1..64), W bf16/fp16/fp32 or weight-only
int8 / int4 in kernels/quant.py's formats, dequantised in registers. Memory bound: the weight read is the cost.

Op (stablelm.ops.linear, what the model's Linear layers call): linear(x, weight, bias=None) -> [..., N] in x's
dtype, equal to F.linear(x, weight, bias): x [..., K] (any leading dims, any strides), weight [N, K] in x's dtype,
bias [N] in x's dtype or None. "torch" (linear_ref) is F.linear (cuBLAS on CUDA). "triton" (linear_triton) runs
gemv() below only where it measured faster, and F.linear everywhere else: batch-1 decode at the tuned shapes
(gemv_pays), inside a CUDA-graph capture (linear_triton says why), never under autograd.
Quantized weights reach the same kernels through quant_gemv, which kernels/quant.py's "triton" quant_linear calls
where prefer_gemv says so (same arguments and formats as quant_linear; reference: kernels.quant.quant_linear_ref).

Weight formats read here (kernels/quant.py's docstring is the definition; nothing is re-laid at conversion):
  bits 16  weight [N, K] in x's dtype, rows contiguous.
  bits 8   qweight int8 [N, K], scales [N].
  bits 4   qweight uint8 [N, K // 2] (low nibble = even k), scales / zeros [N, K // group_size]. The kernels read
           it as little-endian int32 words [N, K // 8]: word w of a row holds the codes of k = 8w .. 8w + 7 in
           nibbles 0..7 (bits 4j..4j+3), so one 4-byte load yields 8 consecutive codes and no shuffle is needed.

Two kernels, both one program per (BLOCK_N rows of W) x (M block) x (K split), the weight tile loaded once with
wide loads and dequantised in registers:
  _gemv_fma_kernel  BLOCK_M == 1, CUDA cores: one row of x per program; a [BLOCK_N, BLOCK_K] float32 accumulator
                    (elementwise FMAs across the loop, one reduction at the end, no shuffles inside the loop).
                    Codes become floats by the exponent trick (code | 0x4B000000 read as float32 is 2^23 + code;
                    int8: code + 0x4B400000 is 1.5 * 2^23 + code) instead of int->float conversions, which issue
                    at a quarter of the FMA rate on sm_90.
  _gemv_dot_kernel  BLOCK_M >= 16, tensor cores (tl.dot, float32 accumulation): the weight tile is dequantised to
                    x's dtype (int8 codes are exact in bf16/fp16; int4 codes as 128 + code by the same exponent
                    trick, corrected by 128 * sum(x) in the group's epilogue), scales applied per group / row.
K splits (split_k > 1) write float32 partials that _split_sum_kernel adds in split order (deterministic); bias is
added once at the end. Tiling is a heuristic (choose_config) measured on an H200 by bench/gemv_sweep.py, so no
autotuning happens inside CUDA-graph capture; gemv() also takes an explicit GemvConfig for tests and sweeps.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import (FLOAT_DTYPES, INTERPRET, cdiv, next_power_of_2, pdl_launch_dependents, pdl_wait,
                             prefetch_l2, sm_count, use_pdl)

MAX_UNROLL = 16  # K tiles per program unrolled in the CUDA-core kernel (more: a loop)
# K tiles per program whose weights a PDL launch prefetches into L2 before waiting for the previous kernel: enough
# bytes in flight to cover the DRAM latency (3B qkv in bf16: 960 programs x 8 KB), few enough that what is prefetched
# stays in L2 until read. A guess until bench/pdl_sweep.py has measured 0 / 1 / 2 / 16.
PREFETCH_TILES = 2
MAX_M = 64  # above this the matmul is no longer bound by the weight read: F.linear / the tiled quant matmul

# Exponent-trick constants (see the module docstring).
_F32_MAGIC = 0x4B000000  # bits of 2^23 as float32
_F32_MAGIC_S8 = 0x4B400000  # bits of 1.5 * 2^23 as float32


def linear_ref(x, weight, bias=None):
    """Reference of the linear op: F.linear (float math of x's dtype; cuBLAS on CUDA)."""
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _fma_tile(acc, X, W, S, Z, x_row, w_rows, rows, k0, K, KL, ssn, ssg,
              BITS: tl.constexpr, GROUP: tl.constexpr, MASKED: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + this K tile's products. bits 16 / 8: acc [BLOCK_N, BLOCK_K] += x * w (int8: x * code, the per-row
    scale comes at the end); bits 4: acc [BLOCK_N, BLOCK_K // 8] (one column per int32 word of 8 codes)
    += scale * sum_j x_j * code_j + zero * sum_j x_j, with one scale / zero per row (BLOCK_K divides GROUP).
    MASKED: load units (elements; int4: words) at or past KL contribute 0."""
    if BITS == 4:
        WORDS: tl.constexpr = BLOCK_K // 8
        offs_w = k0 // 8 + tl.arange(0, WORDS)
        if MASKED:
            words = tl.load(w_rows + offs_w[None, :], mask=(offs_w < KL)[None, :], other=0)
        else:
            words = tl.load(w_rows + offs_w[None, :])
        x_base = x_row + offs_w * 8
        part = tl.zeros(words.shape, dtype=tl.float32)
        x_sum = tl.zeros((WORDS,), dtype=tl.float32)
        for j in tl.static_range(8):
            if MASKED:
                x_j = tl.load(x_base + j, mask=offs_w < KL, other=0.0).to(tl.float32)
            else:
                x_j = tl.load(x_base + j).to(tl.float32)
            if j == 0:
                nib = words & 15
            else:
                nib = (words >> (4 * j)) & 15
            code = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            part += code * x_j[None, :]
            x_sum += x_j
        g = tl.minimum(k0, K - 1) // GROUP  # a tile past K (masked: part = x_sum = 0) reads the last group
        scale = tl.load(S + rows * ssn + g * ssg).to(tl.float32)
        zero = tl.load(Z + rows * ssn + g * ssg).to(tl.float32)
        acc += part * scale[:, None] + zero[:, None] * x_sum[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if MASKED:
            k_ok = offs_k < K
            x = tl.load(x_row + offs_k, mask=k_ok, other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0)
        else:
            x = tl.load(x_row + offs_k)
            w = tl.load(w_rows + offs_k[None, :])
        if BITS == 8:
            w = (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemv_fma_kernel(X, W, S, Z, BIAS, OUT, N, K, KL, sxm, swn, ssn, ssg, som, sos,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, EVEN: tl.constexpr,
                     UNROLL: tl.constexpr, PDL: tl.constexpr, PF_LINES: tl.constexpr, PF_STEP: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), M, splits). OUT [M, N] (PARTIAL: float32 [splits, M, N], bias left out).

    Split s covers K tiles [s * TILES, (s + 1) * TILES); UNROLL unrolls them so all of a program's weight loads can
    be in flight at once (a decode GEMV is a few microseconds: one load round trip per loop trip shows). EVEN:
    every tile lies inside K, so no masks. KL: K in load units (elements; int4: int32 words, K // 8). Rows past N
    are clamped to row N - 1 so weight loads are unmasked along N; they are not stored.

    PDL (kernels/_common.py): before waiting for the previous kernel (x is its output) the program asks L2 for its
    first weights, PF_LINES lines of PF_STEP load units per row, so their DRAM latency overlaps that kernel's tail
    instead of following it.
    """
    pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_row = X + pid_m * sxm
    w_rows = W + rows[:, None] * swn
    k_begin = pid_k * (TILES * BLOCK_K)
    if PDL and PF_LINES > 0:
        unit0 = k_begin // 8 if BITS == 4 else k_begin
        lines = tl.minimum(unit0 + tl.arange(0, PF_LINES) * PF_STEP, KL - 1)
        prefetch_l2(w_rows + lines[None, :])
    pdl_wait(PDL)
    if BITS == 4:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if UNROLL:
        for t in tl.static_range(TILES):
            acc = _fma_tile(acc, X, W, S, Z, x_row, w_rows, rows, k_begin + t * BLOCK_K, K, KL, ssn, ssg,
                            BITS, GROUP, not EVEN, BLOCK_K)
    else:
        for t in range(TILES):
            acc = _fma_tile(acc, X, W, S, Z, x_row, w_rows, rows, k_begin + t * BLOCK_K, K, KL, ssn, ssg,
                            BITS, GROUP, not EVEN, BLOCK_K)
    out = tl.sum(acc, axis=1)
    if BITS == 8:
        out *= tl.load(S + rows * ssn).to(tl.float32)
    if PARTIAL:
        tl.store(OUT + pid_k * sos + pid_m * som + offs_n, out, mask=n_ok)
    else:
        if HAS_BIAS:
            out += tl.load(BIAS + rows).to(tl.float32)
        tl.store(OUT + pid_m * som + offs_n, out.to(OUT.dtype.element_ty), mask=n_ok)


@triton.jit
def _dot_weight_tile(W, rows, k0, K, swn, MASKED: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
                     DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile in DTYPE: float weights as stored, int8 codes exactly, int4 codes as
    128 + code when MAGIC (1: bf16 bits 0x4300 | code; 2: fp16 bits 0x5800 | code << 3), else as code."""
    if BITS == 4:
        WORDS: tl.constexpr = BLOCK_K // 8
        words = tl.load(W + rows[:, None] * swn + (k0 // 8 + tl.arange(0, WORDS))[None, :])
        codes = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15
        codes = tl.reshape(codes, (rows.shape[0], BLOCK_K))
        if MAGIC == 1:
            w = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        elif MAGIC == 2:
            w = ((codes << 3) | 0x5800).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            w = codes.to(tl.float32).to(DTYPE)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if MASKED:
            w = tl.load(W + rows[:, None] * swn + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
        else:
            w = tl.load(W + rows[:, None] * swn + offs_k[None, :])
        w = w.to(DTYPE)
    return w


@triton.jit
def _dot_step(acc, x, w, S, Z, rows, k0, ssn, ssg, BITS: tl.constexpr, GROUP: tl.constexpr,
              MAGIC: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        prod = tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        prod = tl.dot(x, tl.trans(w))
    if BITS == 4:
        g = k0 // GROUP
        scale = tl.load(S + rows * ssn + g * ssg).to(tl.float32)
        zero = tl.load(Z + rows * ssn + g * ssg).to(tl.float32)
        if MAGIC != 0:
            zero = zero - 128.0 * scale  # the tile held 128 + code
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += prod * scale[None, :] + x_sum[:, None] * zero[None, :]
    else:
        acc += prod
    return acc


@triton.jit
def _gemv_dot_kernel(X, W, S, Z, BIAS, OUT, M, N, K, k_split, sxm, swn, ssn, ssg, som, sos,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                     MAGIC: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), splits); same outputs as _gemv_fma_kernel. Rows of x past M and
    of W past N are clamped (loads stay unmasked) and not stored."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_rows = X + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * sxm
    DTYPE: tl.constexpr = X.dtype.element_ty
    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    k_full = k_begin + ((k_end - k_begin) // BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_full, BLOCK_K):
        x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :])
        w = _dot_weight_tile(W, rows, k0, K, swn, False, BITS, MAGIC, DTYPE, BLOCK_K)
        acc = _dot_step(acc, x, w, S, Z, rows, k0, ssn, ssg, BITS, GROUP, MAGIC, IEEE)
    if k_full < k_end:  # never for int4 (K % BLOCK_K == 0)
        offs_k = k_full + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        w = _dot_weight_tile(W, rows, k_full, K, swn, True, BITS, MAGIC, DTYPE, BLOCK_K)
        acc = _dot_step(acc, x, w, S, Z, rows, k_full, ssn, ssg, BITS, GROUP, MAGIC, IEEE)
    if BITS == 8:
        acc *= tl.load(S + rows * ssn).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    out = offs_m.to(tl.int64)[:, None] * som + offs_n[None, :]
    if PARTIAL:
        tl.store(OUT + pid_k * sos + out, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + rows).to(tl.float32)[None, :]
        tl.store(OUT + out, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(P, BIAS, OUT, MN, N, n_splits, sps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """OUT.flat[i] = sum_s P[s].flat[i] (+ bias[i % N]) in split order; P is contiguous [splits, M, N]."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(n_splits):
        acc += tl.load(P + s * sps + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

@dataclass(frozen=True)
class GemvConfig:
    """Tiling. block_m 1: _gemv_fma_kernel (one x row per program); a power of two >= 16: _gemv_dot_kernel.
    block_n, block_k: powers of two (block_k >= 16; int4: block_k divides group_size). split_k: an upper bound on
    the K splits (splits that would get no tile are dropped)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def check_config(cfg: GemvConfig, bits: int, group_size: int) -> None:
    if not (cfg.block_m == 1 or (cfg.block_m >= 16 and _pow2(cfg.block_m))):
        raise ValueError(f"gemv: block_m must be 1 or a power of two >= 16, got {cfg.block_m}")
    if not (_pow2(cfg.block_n) and cfg.block_n >= (16 if cfg.block_m > 1 else 1)):
        raise ValueError(f"gemv: block_n must be a power of two (>= 16 with block_m > 1), got {cfg.block_n}")
    if not (_pow2(cfg.block_k) and cfg.block_k >= 16):
        raise ValueError(f"gemv: block_k must be a power of two >= 16, got {cfg.block_k}")
    if bits == 4 and group_size % cfg.block_k:
        raise ValueError(f"gemv: int4 block_k {cfg.block_k} must divide group_size {group_size}")
    if cfg.split_k < 1:
        raise ValueError(f"gemv: split_k must be >= 1, got {cfg.split_k}")


# Measured tilings: (bits, M bucket = next power of two >= M, N, K) -> (block_m, block_n, block_k, split_k,
# num_warps, num_stages), the fastest of bench/gemv_sweep.py's candidates on an H200 (int4 at group_size 128).
# Shapes not listed take the heuristic below.
TUNED: dict = {
    # M = 1, bench/results/gemv_h200.json (run 2): time per call vs cuBLAS / the tiled quant kernel
    (16, 1, 7680, 2560): (1, 8, 256, 1, 4, 2),  # qkv: 12.6 us vs cuBLAS 13.3
    (16, 1, 2560, 2560): (1, 16, 512, 1, 8, 2),  # o: 6.3 us vs cuBLAS 7.4
    (16, 1, 13824, 2560): (1, 8, 256, 1, 4, 2),  # gate_up: 21.9 us vs cuBLAS 22.5
    (16, 1, 2560, 6912): (1, 4, 1024, 1, 4, 2),  # down: 12.2 us vs cuBLAS 15.0
    (16, 1, 50304, 2560): (1, 16, 512, 1, 8, 2),  # lm_head: 64.5 us vs cuBLAS 69.0
    (8, 1, 7680, 2560): (1, 32, 512, 1, 8, 2),  # qkv: 8.7 us vs tiled 12.0
    (8, 1, 2560, 2560): (1, 32, 512, 1, 8, 2),  # o: 5.4 us vs tiled 7.9
    (8, 1, 13824, 2560): (1, 32, 256, 1, 4, 2),  # gate_up: 13.8 us vs tiled 17.7
    (8, 1, 2560, 6912): (1, 8, 1024, 1, 4, 2),  # down: 9.6 us vs tiled 11.9
    (8, 1, 50304, 2560): (1, 32, 256, 1, 4, 2),  # lm_head: 40.0 us vs tiled 46.3
    (4, 1, 7680, 2560): (1, 32, 128, 1, 4, 2),  # qkv: 21.5 us vs tiled 12.6 (int4 is not routed here)
    (4, 1, 2560, 2560): (1, 32, 128, 4, 4, 2),  # o: 8.7 us vs tiled 8.6
    (4, 1, 13824, 2560): (1, 32, 128, 1, 4, 2),  # gate_up: 24.1 us vs tiled 17.5
    (4, 1, 2560, 6912): (1, 32, 128, 4, 4, 2),  # down: 22.7 us vs tiled 13.7
    (4, 1, 50304, 2560): (1, 128, 128, 1, 8, 2),  # lm_head: 46.5 us vs tiled 48.8
}


def _m_bucket(M: int) -> int:
    return 1 << (M - 1).bit_length()


@functools.lru_cache(maxsize=None)
def choose_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device) -> GemvConfig:
    """Tiling from TUNED, else a heuristic (no autotuning, so a first call inside CUDA-graph capture is fine);
    cached (call choose_config.cache_clear() after editing TUNED)."""
    tuned = TUNED.get((bits, _m_bucket(M), N, K)) if device.type == "cuda" else None
    if tuned is not None:
        cfg = GemvConfig(*tuned)
        if bits != 4 or group_size % cfg.block_k == 0:
            return cfg
    sms = sm_count(device, interpreted=4)
    if M == 1:
        if bits == 4:
            block_n, block_k, warps = 64, min(128, group_size & -group_size), 4
        elif bits == 8:
            block_n, block_k, warps = 16, 512, 4
        else:
            block_n, block_k, warps = 8, 512, 4
        block_m = 1
    else:
        block_m = min(64, max(16, next_power_of_2(M)))
        block_n, block_k, warps = 64, 128, 4
        if bits == 4:
            block_k = min(block_k, group_size & -group_size)
    programs = cdiv(N, block_n) * (M if block_m == 1 else cdiv(M, block_m))
    tiles = cdiv(K, block_k)
    # Memory bound: split K while there are fewer than ~2 programs per SM, keeping >= 4 K tiles per split.
    split_k = max(1, min(cdiv(2 * sms, programs), tiles // 4, 8))
    return GemvConfig(block_m, block_n, block_k, split_k, warps)


def _check_args(x2, weight, scales, zeros, bias, bits, group_size):
    """(N, K) after validating gemv's arguments (quant formats as in kernels/quant.py)."""
    if x2.dim() != 2 or x2.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gemv: x must be a 2-D float tensor, got {x2.dtype} {tuple(x2.shape)}")
    M, K = x2.shape
    N = weight.shape[0]
    if bits == 16:
        if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x2.dtype:
            raise ValueError(f"gemv: weight must be [N, K={K}] in x's dtype {x2.dtype}, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
    elif bits == 8:
        if weight.dtype != torch.int8 or weight.shape[1:] != (K,) or scales is None or scales.shape != (N,):
            raise ValueError("gemv: int8 needs qweight int8 [N, K] and scales [N]")
    elif bits == 4:
        if (weight.dtype != torch.uint8 or weight.shape[1:] != (K // 2,) or K % group_size or group_size % 16
                or scales is None or zeros is None or scales.shape != (N, K // group_size)
                or zeros.shape != scales.shape):
            raise ValueError("gemv: int4 needs qweight uint8 [N, K // 2], scales / zeros [N, K // group_size] "
                             "with group_size a multiple of 16 dividing K")
    else:
        raise ValueError(f"gemv: bits must be 16, 8 or 4, got {bits!r}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemv: bias must be [N={N}], got {tuple(bias.shape)}")
    return N, K


def gemv(x2, weight, scales=None, zeros=None, bias=None, bits: int = 16, group_size: int = 128,
         config: GemvConfig | None = None):
    """x2 [M, K] -> [M, N] in x2's dtype: x2 @ dequant(weight)^T (+ bias). bits 16: weight [N, K] in x's dtype;
    8 / 4: kernels/quant.py's formats. config None: choose_config's tiling."""
    N, K = _check_args(x2, weight, scales, zeros, bias, bits, group_size)
    M = x2.shape[0]
    if config is None:
        config = choose_config(M, N, K, bits, group_size, x2.device)
    check_config(config, bits, group_size)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bits == 4:
        weight = weight.view(torch.int32)  # [N, K // 8] little-endian words, 8 codes each
        if scales.stride() != zeros.stride():
            scales, zeros = scales.contiguous(), zeros.contiguous()
    ssn, ssg = (0, 0) if scales is None else (scales.stride(0), scales.stride(1) if scales.dim() == 2 else 0)
    bk = config.block_k
    tiles = cdiv(K, bk)
    k_split = cdiv(tiles, config.split_k) * bk
    n_splits = cdiv(K, k_split)
    target = out if n_splits == 1 else torch.empty((n_splits, M, N), dtype=torch.float32, device=x2.device)
    dummy = x2
    args = (x2, weight, scales if scales is not None else dummy, zeros if zeros is not None else dummy,
            bias if bias is not None else dummy, target)
    common = dict(BITS=bits, GROUP=group_size if bits == 4 else 1, HAS_BIAS=bias is not None,
                  PARTIAL=n_splits > 1, BLOCK_N=config.block_n, BLOCK_K=bk,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    sos = target.stride(0) if n_splits > 1 else 0
    pdl = use_pdl(x2.device)
    if config.block_m == 1:
        tiles_per_split = k_split // bk
        grid = (cdiv(N, config.block_n), M, n_splits)
        # L2 lines of 128 bytes: PF_STEP load units each (int4: int32 words of 8 codes), over the first tiles.
        pf_step = 128 // weight.element_size()
        pf_lines = 0
        if pdl and PREFETCH_TILES > 0:
            pf_units = min(tiles_per_split, PREFETCH_TILES) * (bk // 8 if bits == 4 else bk)
            pf_lines = next_power_of_2(cdiv(pf_units, pf_step))
        _gemv_fma_kernel[grid](*args, N, K, K // 8 if bits == 4 else K, x2.stride(0), weight.stride(0), ssn, ssg,
                               N, sos, TILES=tiles_per_split, EVEN=K % (k_split) == 0,
                               UNROLL=tiles_per_split <= MAX_UNROLL, PDL=pdl, PF_LINES=pf_lines, PF_STEP=pf_step,
                               launch_pdl=pdl, **common)
    else:
        magic = {torch.bfloat16: 1, torch.float16: 2}.get(x2.dtype, 0) if bits == 4 else 0
        grid = (cdiv(N, config.block_n), cdiv(M, config.block_m), n_splits)
        _gemv_dot_kernel[grid](*args, M, N, K, k_split, x2.stride(0), weight.stride(0), ssn, ssg, N, sos,
                               MAGIC=magic, IEEE=x2.dtype == torch.float32, BLOCK_M=config.block_m, **common)
    if n_splits > 1:
        block = 1024
        _split_sum_kernel[(cdiv(M * N, block),)](
            target, bias if bias is not None else target, out, M * N, N, n_splits, target.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, PDL=pdl, launch_pdl=pdl)
    return out


def quant_gemv(x, qweight, scales, zeros, bias, bits, group_size):
    """quant_linear for small M (arguments validated by kernels/quant.py's quant_linear): x [..., K] -> [..., N]."""
    K = x.shape[-1]
    out = gemv(x.reshape(-1, K), qweight, scales, zeros, bias, bits, group_size)
    return out.view(*x.shape[:-1], qweight.shape[0])


def prefer_gemv(M: int, bits: int) -> bool:
    """Whether these kernels beat the alternative (cuBLAS for float weights, kernels/quant.py's tiled kernel for
    int8 / int4) at M rows. On an H200 (bench/results/gemv_h200.json): at M = 1 the CUDA-core kernel wins on every
    StableLM-3B shape for bf16 (1.03-1.23x) and int8 (1.16-1.46x), but int4 loses on qkv / gate_up / down (ALU
    bound: ~5 instructions per 4-bit weight; kernels/quant.py sends int4 rows to tinygemm, kernels/int4pack.py); the
    tensor-core kernel loses at 2 <= M <= 32 for every format. Those paths stay available through gemv(config=)."""
    return M == 1 and bits != 4


def gemv_pays(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The linear op's dispatch rule: whether "triton" runs gemv() for float weights [N, K] at M rows (leading dims
    of x flattened). On CUDA: only M == 1 in bfloat16 at an (N, K) that TUNED holds a bits-16 tiling for, i.e. the
    StableLM-3B decode shapes at batch 1, where the CUDA-core kernel measured 1.03-1.23x cuBLAS per call on an H200
    and the bs-1 decode step went 2.39 -> 2.20 ms (bench/results/gemv_h200.json, bench/NOTES_decode.md). At M >= 2
    the tensor-core kernel lost to cuBLAS (0.57-0.94x), and an untuned shape or another dtype has no measurement
    behind it, so those stay on cuBLAS. On CPU tensors under TRITON_INTERPRET=1 (no speed to lose) every M == 1
    call takes the kernel, so the CPU tests exercise it; without the interpreter, F.linear."""
    if M != 1:
        return False
    if device.type != "cuda":
        return INTERPRET
    return dtype == torch.bfloat16 and (16, 1, N, K) in TUNED


# Launch keys (shape, dtype, device, bias, what Triton specialises the compiled kernel on: pointer alignment, x's
# row stride, and the PDL launch with its prefetch depth, which are constexprs) whose kernel has run once in this
# process, i.e. whose module is loaded on the device.
_READY: set = set()


def _launch_key(x2, weight, bias) -> tuple:
    sxm = x2.stride(0)
    return (weight.shape[0], x2.shape[1], x2.dtype, x2.device, bias is not None, x2.data_ptr() % 16 == 0,
            sxm % 16 == 0, sxm == 1, weight.stride(0), weight.data_ptr() % 16 == 0,
            bias is None or bias.data_ptr() % 16 == 0, use_pdl(x2.device), PREFETCH_TILES)


def linear_triton(x, weight, bias=None):
    """The linear op: gemv() where gemv_pays (batch-1 decode at the tuned shapes) and the call is being captured
    into a CUDA graph, else F.linear.

    CUDA graphs only, because of host cost: on the H200 host a gemv() call costs ~57 us of host time against
    cuBLAS's ~19 us (bench/results/gemv_wired_h200.json) to save at most ~4.5 us of device time, so an eager decode
    step, which is host bound, is faster on cuBLAS; in a captured step (stablelm.graph, generate()) host cost is
    paid once and the kernel saves 2.36 -> 2.17 ms per bs-1 step. The first eager call of a launch key also runs
    the kernel once (result discarded), which loads its module: a graph capture may not (cuModuleLoadData is refused
    while a stream captures), so a capture takes the kernel only for keys an eager warm-up call has seen (the graph
    builders warm up before capturing) and F.linear otherwise. Under torch.compile: F.linear. With CPU tensors (the
    interpreter) every call gemv_pays allows runs the kernel, so the CPU tests exercise it.

    Training: the kernels have no backward, so whenever autograd would record the call (grad mode on and x, weight
    or bias requiring grad) this is F.linear, whose gradients are the reference's."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if (not gemv_pays(M, weight.shape[0], K, x.dtype, x.device) or weight.dtype != x.dtype or weight.dim() != 2
            or (bias is not None and bias.dtype != x.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    x2 = x.reshape(M, K)
    if x.device.type == "cuda":
        if torch.compiler.is_compiling():
            return F.linear(x, weight, bias)
        key = _launch_key(x2, weight, bias)
        if not torch.cuda.is_current_stream_capturing():
            if key not in _READY:
                gemv(x2, weight, bias=bias)  # load the module now, for a later capture
                _READY.add(key)
            return F.linear(x, weight, bias)
        if key not in _READY:
            return F.linear(x, weight, bias)
    out = gemv(x2, weight, bias=bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of linear passes

def _linear_inputs(case, seed, device):
    """x [M, K] or [2, M, K] (batched) or a [1, 1, K] strided view (as the model's decode step passes it);
    weight scaled by K^-1/2 so outputs stay O(1) in every dtype."""
    p = case.params
    M, N, K = p["M"], p["N"], p["K"]
    gen = _c.generator(case, seed)
    if p.get("batched"):
        x = _c.randn(gen, 2, M, K, dtype=case.dtype, device=device)
    elif p.get("view"):  # one row of a wider buffer: leading strides that are not K
        x = _c.randn(gen, 1, 3, 2 * K, dtype=case.dtype, device=device)[:, 1:2, :K]
    else:
        x = _c.randn(gen, M, K, dtype=case.dtype, device=device)
    weight = _c.randn(gen, N, K, dtype=case.dtype, device=device, scale=K ** -0.5)
    bias = _c.randn(gen, N, dtype=case.dtype, device=device) if p.get("bias") else None
    return dict(x=x, weight=weight, bias=bias)


def _linear_grid():
    grid = []
    for M in (1, 3, 17):
        for N, K in ((37, 224), (96, 320), (250, 512)):
            grid.append(dict(M=M, N=N, K=K, bias=M == 3))
    grid += [dict(M=1, N=37, K=224, bias=True, view=True), dict(M=4, N=96, K=320, batched=True),
             dict(M=1, N=2560, K=6912), dict(M=1, N=7680, K=2560, bias=True)]
    return grid


_LINEAR_TOL = {torch.float32: _c.Tol(2e-5, 1e-4), torch.float16: _c.Tol(2e-3, 2e-3),
               torch.bfloat16: _c.Tol(1e-2, 1.6e-2)}
# M1 cases run the gemv kernel in the interpreter; M3 / grad cases check the F.linear fallback (and that gradients
# flow through the op).
_LINEAR_CPU = {"M1-N37-K224-fp32", "M1-N250-K512-bf16", "M1-N37-K224-bias-view-fp16", "M3-N96-K320-bias-fp32",
               "M1-N96-K320-fp32-grad"}


def _linear_work(inputs):
    x, w = inputs["x"], inputs["weight"]
    N, K = w.shape
    M = x.numel() // K
    return {"bytes": w.nbytes + x.nbytes + M * N * x.element_size(), "flops": 2 * M * N * K}


CONTRACTS = {"linear": _c.Contract(
    op="linear", reference=linear_ref, make_inputs=_linear_inputs,
    cases=_c.make_cases(_linear_grid(), _c.FLOAT_DTYPES, grad=(False, True), cpu=_LINEAR_CPU),
    tol=_LINEAR_TOL, grad_tol=_LINEAR_TOL, grad_inputs=("x", "weight", "bias"),
    bench=[_c.Case("3b-qkv-M1", dict(M=1, N=7680, K=2560), torch.bfloat16),
           _c.Case("3b-down-M1", dict(M=1, N=2560, K=6912), torch.bfloat16),
           _c.Case("3b-lm_head-M1", dict(M=1, N=50304, K=2560), torch.bfloat16)],
    work=_linear_work)}

IMPLEMENTATIONS = {"linear": {"torch": linear_ref, "triton": linear_triton}}
