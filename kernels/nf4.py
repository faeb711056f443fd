"""NF4 (4-bit NormalFloat, QLoRA) weight-only quantization with double-quantized block scales, and the nf4_linear op
over it: format (quantize / dequantize), the reference, the Triton kernels (decode GEMV, prefill / training GEMM,
and the input-gradient GEMM of training) and the autograd.Function that trains through it.

kernels/quant.py holds the linear formats (int8, int4); NF4 lives in its own file because its storage, its code
table and its two-level scales share nothing with them but the nibble packing (kernels/quant.py's pack_int4 /
unpack_int4; tests/test_nf4.py pins the order, so a change of the int4 layout cannot silently change this one).

Format (plain tensors, so it lives in safetensors checkpoints; a weight is [N, K] = [out, in]; B = block_size,
default 64, a multiple of 16 dividing K; D = DQ_BLOCK = 256):
  qweight       uint8 [N, K // 2]: two 4-bit codes per byte, the LOW nibble holds the even column k = 2j, the HIGH
                nibble the odd column k = 2j + 1 (the int4 order of kernels/quant.py). A code c in [0, 15] stands for
                NF4_VALUES[c] in [-1, 1].
  absmax        int8 [N, K // B]: the block scales, quantized. Block (n, b) covers w[n, b*B : (b+1)*B].
  absmax_scale  float32 [ceil(N * (K // B) / D)]: the second-level scale of each run of D consecutive blocks in
                row-major (n, b) order (flat index f = n * (K // B) + b belongs to run f // D).
  absmax_mean   float32 [1]: the mean of the tensor's fp32 block absmax values.
Dequantization:
  scale[n, b] = absmax[n, b] * absmax_scale[(n * (K // B) + b) // D] + absmax_mean
  w[n, k]     = NF4_VALUES[code(n, k)] * scale[n, k // B]

Quantization, as the QLoRA paper describes it (bitsandbytes' `nf4` with `compress_statistics`): each block of B
weights is scaled by its absolute maximum; the fp32 absmax values are then double-quantized: their mean is
subtracted (they are all positive; centring them makes a symmetric 8-bit code use its whole range) and each run of
D blocks is quantized to 8 bits with one fp32 scale. The second-level code here is linear symmetric int8
(round(c / s), s = max |c| / 127 over the run), as torchao's NF4Tensor does; bitsandbytes uses its 8-bit dynamic
(tree) float map instead. Either costs 8 + 32 / D bits per block, so 4 + (8 + 32 / 256) / 64 = 4.127 bits per weight
(vs 4.5 with fp32 absmax). The weight codes are chosen against the *dequantized* block scale (the scale the
kernels will multiply by), each weight getting the nearest NF4 value of w / scale.

NF4_VALUES are derived from their definition rather than typed in: the quantiles of N(0, 1) at 8 evenly spaced
probabilities from 1/2 to `offset` on the positive side (7 values, 1/2 excluded, plus the top one) and 7 on the
negative side, an exact zero, normalised to [-1, 1]; `offset` = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 is the midpoint of
the two quantile grids' last steps (tests/test_nf4.py checks the 16 values against the published table).

Error bound (tests): with the dequantized scale s of a block, a weight with |w| <= |s| is within half the widest gap
between neighbouring NF4 values (0.1385) times |s| of its dequantized value; a weight above |s| (the scale rounded
down by the second level) is clamped to +-|s|. Layer / model accuracy bounds are in tests/test_nf4.py.

Op (stablelm.ops.nf4_linear): nf4_linear(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size) with x
[..., K] float32 / float16 / bfloat16 -> [..., N] in x's dtype (+ bias [N]). Differentiable with respect to x (and
bias): the backward is grad_x = grad_out @ dequant(W), the weight itself never gets a gradient (it is frozen, as in
QLoRA), so training saves only the quantized tensors for the backward, not x.

Triton kernels: the weight tile is dequantized in registers (a 16-entry table lookup, then the block scale) to x's
dtype, then multiplied on the tensor cores (tl.dot, float32 accumulation) or, for a single row (decode), multiplied
and reduced on the CUDA cores. Forward: one program per BLOCK_M x BLOCK_N output tile over a range of K tiles
(split-K for skinny M, partials summed in a fixed order: deterministic); BLOCK_K divides B, so one scale per row of
a K tile. Backward: one program per BLOCK_M x BLOCK_K tile of grad_x, looping over N (grad_out tile @ dequantized
weight tile); no split, so no partials. From DEQUANT_MATMUL_MIN_ROWS rows (kernels/quant.py: training, long
prefills) forward and backward instead dequantize the whole weight to x's dtype in one pass (_nf4_dequant_kernel)
and multiply with cuBLAS: at those shapes the per-tile table lookups cost more than the temporary.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, check_tiles, skinny_split_k, sm_count
from kernels.quant import DEQUANT_MATMUL_MIN_ROWS, pack_int4, unpack_int4

NF4_BLOCK_SIZE = 64      # weights per first-level scale (QLoRA's choice)
DQ_BLOCK = 256           # first-level scales per second-level scale (QLoRA's choice)
BLOCK_MULTIPLE = 16      # the smallest tl.dot depth: a K tile never straddles two blocks


def _nf4_values() -> torch.Tensor:
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


NF4_VALUES = _nf4_values()  # float32 [16], ascending; code 7 is exactly 0
_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2


# ----------------------------------------------------------------------------------------------------------------
# Format

def _check_block(K: int, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 \
            or block_size % BLOCK_MULTIPLE:
        raise ValueError(f"nf4: block_size must be a positive multiple of {BLOCK_MULTIPLE}, got {block_size!r}")
    if K % block_size:
        raise ValueError(f"nf4: block_size {block_size} does not divide in_features K={K}")


def double_quantize(absmax: torch.Tensor):
    """(codes int8 [N, KB], scale float32 [ceil(N*KB / DQ_BLOCK)], mean float32 [1]) of fp32 block scales [N, KB]."""
    flat = absmax.float().reshape(-1)
    mean = flat.mean() if flat.numel() else flat.new_zeros(())
    centred = flat - mean
    runs = -(-flat.numel() // DQ_BLOCK)
    padded = F.pad(centred, (0, runs * DQ_BLOCK - flat.numel())).view(runs, DQ_BLOCK)
    scale = padded.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(padded / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:flat.numel()].view(absmax.shape), scale, mean.reshape(1)


def dequantize_absmax(absmax, absmax_scale, absmax_mean) -> torch.Tensor:
    """float32 block scales [N, KB] from the double-quantized form."""
    flat = absmax.reshape(-1).float()
    run = torch.arange(flat.numel(), device=flat.device) // DQ_BLOCK
    return (flat * absmax_scale.float()[run] + absmax_mean.float()).view(absmax.shape)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE):
    """(qweight, absmax, absmax_scale, absmax_mean) of a float weight [N, K] in the format above. Any device."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_nf4: expected a float [N, K] weight, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    _check_block(K, block_size)
    w = weight.detach().float().view(N, K // block_size, block_size)
    absmax, absmax_scale, absmax_mean = double_quantize(w.abs().amax(dim=2))
    if weight.device.type == "meta":  # shapes only (checkpoint loading builds modules there)
        qweight = torch.empty(N, K // 2, dtype=torch.uint8, device="meta")
        return qweight, absmax, absmax_scale, absmax_mean
    scale = dequantize_absmax(absmax, absmax_scale, absmax_mean)
    # A (near-)zero scale means a block of (near-)zero weights: any divisor keeps them at code 0.0.
    divisor = torch.where(scale.abs() > 0, scale, torch.ones_like(scale))
    normalised = (w / divisor[..., None]).clamp(-1, 1)
    codes = torch.bucketize(normalised, _MIDPOINTS.to(w.device))
    return pack_int4(codes.view(N, K)), absmax, absmax_scale, absmax_mean


def dequantize_nf4(qweight, absmax, absmax_scale, absmax_mean, block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """float32 weight [N, K] from the format above."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_block(K, block_size)
    values = NF4_VALUES.to(qweight.device)[unpack_int4(qweight).long()]
    scale = dequantize_absmax(absmax, absmax_scale, absmax_mean)
    return (values.view(N, K // block_size, block_size) * scale[..., None]).view(N, K)


# ----------------------------------------------------------------------------------------------------------------
# Reference

def _check_args(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size):
    """Validate nf4_linear's arguments; returns (N, K)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"nf4_linear: x dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"nf4_linear: qweight must be torch.uint8 2-D, got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_block(K, block_size)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} must end in in_features K={K}")
    if absmax.shape != (N, K // block_size) or absmax.dtype != torch.int8:
        raise ValueError(f"nf4_linear: absmax must be int8 {(N, K // block_size)}, got {absmax.dtype} "
                         f"{tuple(absmax.shape)}")
    runs = -(-N * (K // block_size) // DQ_BLOCK)
    if absmax_scale.shape != (runs,) or not absmax_scale.is_floating_point():
        raise ValueError(f"nf4_linear: absmax_scale must be float [{runs}], got {absmax_scale.dtype} "
                         f"{tuple(absmax_scale.shape)}")
    if absmax_mean.shape != (1,) or not absmax_mean.is_floating_point():
        raise ValueError(f"nf4_linear: absmax_mean must be float [1], got {absmax_mean.dtype} "
                         f"{tuple(absmax_mean.shape)}")
    if bias is not None and (bias.shape != (N,) or not bias.is_floating_point()):
        raise ValueError(f"nf4_linear: bias must be float [N={N}], got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("absmax", absmax), ("absmax_scale", absmax_scale),
                    ("absmax_mean", absmax_mean), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"nf4_linear: {name} is on {t.device} but x is on {x.device}")
    return N, K


def nf4_linear_ref(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size=NF4_BLOCK_SIZE):
    """Reference: dequantize to float32, F.linear in float32, output in x's dtype (autograd gives grad_x)."""
    _check_args(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size)
    w = dequantize_nf4(qweight, absmax, absmax_scale, absmax_mean, block_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of nf4_linear passes (forward, and the gradients
# of x and bias in the grad cases)

def _nf4_inputs(case, seed, device):
    p = case.params
    M, N, K, block = p["M"], p["N"], p["K"], p.get("block", NF4_BLOCK_SIZE)
    gen = _c.generator(case, seed)
    q = quantize_nf4(_c.randn(gen, N, K, scale=K ** -0.5), block)
    x = _c.randn(gen, *((2, M) if p.get("batched") else (M,)), K, dtype=case.dtype, device=device)
    bias = _c.randn(gen, N, dtype=case.dtype, device=device) if p.get("bias") else None
    return dict(x=x, qweight=q[0].to(device), absmax=q[1].to(device), absmax_scale=q[2].to(device),
                absmax_mean=q[3].to(device), bias=bias, block_size=block)


# M 1024: DEQUANT_MATMUL_MIN_ROWS, the dequantize + cuBLAS path (forward and input gradient)
_NF4_GRID = [dict(M=M, N=N, K=K, block=block, bias=M in (5, 1024), batched=M == 33)
             for M in (1, 5, 33, 190, 1024) for N, K in ((96, 256), (250, 512), (7680, 2560)) for block in (32, 64)
             if not (N == 7680 and block == 32)]
_NF4_TOL = {torch.float32: _c.Tol(1e-4, 1e-5), torch.float16: _c.Tol(4e-3, 4e-3), torch.bfloat16: _c.Tol(2e-2, 2e-2)}
_NF4_CPU = {"M1-N96-K256-block64-fp32", "M5-N96-K256-block32-bias-fp16-grad", "M33-N250-K512-block64-batched-fp32-grad",
            "M1024-N96-K256-block64-bias-fp32-grad", "M1024-N250-K512-block32-bias-fp16"}

CONTRACTS = {"nf4_linear": _c.Contract(
    op="nf4_linear", reference=nf4_linear_ref, make_inputs=_nf4_inputs,
    cases=_c.make_cases(_NF4_GRID, _c.FLOAT_DTYPES, grad=(False, True), cpu=_NF4_CPU), tol=_NF4_TOL,
    grad_tol=_NF4_TOL, grad_inputs=("x", "bias"),
    bench=[_c.Case("3b-qkv-nf4-M1", dict(M=1, N=7680, K=2560, block=64), torch.bfloat16),
           _c.Case("3b-qkv-nf4-M1520", dict(M=1520, N=7680, K=2560, block=64), torch.bfloat16)],
    work=lambda i: {"bytes": sum(t.nbytes for t in (i["qweight"], i["absmax"], i["x"])),
                    "flops": 2 * i["x"].numel() * i["qweight"].shape[0]})}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _nf4_block_scale(ABS, ABS_SCALE, mean, offs_n, n_ok, b, KB, DQ: tl.constexpr):
    """float32 [BLOCK_N] scales of block column b for rows offs_n."""
    flat = offs_n.to(tl.int64) * KB + b
    code = tl.load(ABS + flat, mask=n_ok, other=0).to(tl.float32)
    s2 = tl.load(ABS_SCALE + flat // DQ, mask=n_ok, other=0.0).to(tl.float32)
    return code * s2 + mean


@triton.jit
def _nf4_tile(QW, sqn, offs_n, n_ok, k0, LUT, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] NF4 values (unscaled) of columns k0 .. k0 + BLOCK_K of rows offs_n."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(QW + offs_n.to(tl.int64)[:, None] * sqn + offs_b[None, :], mask=n_ok[:, None], other=0)
    codes = tl.interleave(packed & 15, packed >> 4).to(tl.int32)
    return tl.load(LUT + codes)


@triton.jit
def _nf4_matmul_kernel(X, QW, ABS, ABS_SCALE, ABS_MEAN, LUT, BIAS, OUT,
                       M, N, K, KB, tiles_per_split, sxm, sxk, sqn, so_split, som, son,
                       BLOCK_SIZE: tl.constexpr, DQ: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (m blocks, n blocks, K splits): OUT[split, m, n] = sum over this split's K tiles of x * dequant(w)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mean = tl.load(ABS_MEAN).to(tl.float32)
    x_rows = X + offs_m.to(tl.int64)[:, None] * sxm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, K // BLOCK_K)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * sxk, mask=m_ok[:, None], other=0.0)
        scale = _nf4_block_scale(ABS, ABS_SCALE, mean, offs_n, n_ok, k0 // BLOCK_SIZE, KB, DQ)
        w = _nf4_tile(QW, sqn, offs_n, n_ok, k0, LUT, BLOCK_K) * scale[:, None]
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = OUT + pid_k * so_split + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _nf4_grad_input_kernel(G, QW, ABS, ABS_SCALE, ABS_MEAN, LUT, DX,
                           M, N, K, KB, sgm, sgn, sqn, sdm, sdk,
                           BLOCK_SIZE: tl.constexpr, DQ: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (m blocks, k blocks): DX[m, k] = sum_n G[m, n] * dequant(w)[n, k]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    mean = tl.load(ABS_MEAN).to(tl.float32)
    g_rows = G + offs_m.to(tl.int64)[:, None] * sgm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        g = tl.load(g_rows + offs_n[None, :] * sgn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        scale = _nf4_block_scale(ABS, ABS_SCALE, mean, offs_n, n_ok, k0 // BLOCK_SIZE, KB, DQ)
        w = _nf4_tile(QW, sqn, offs_n, n_ok, k0, LUT, BLOCK_K) * scale[:, None]
        if IEEE:
            acc += tl.dot(g, w, input_precision="ieee")
        else:
            acc += tl.dot(g, w.to(g.dtype))
    out = DX + offs_m.to(tl.int64)[:, None] * sdm + offs_k[None, :] * sdk
    tl.store(out, acc.to(DX.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _nf4_dequant_kernel(QW, ABS, ABS_SCALE, ABS_MEAN, LUT, OUT, N, KB, sqn, son, sok,
                        BLOCK_SIZE: tl.constexpr, DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (n blocks, k blocks): OUT[n, k] = dequant(w)[n, k], computed in float32 and rounded once to OUT's
    dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    mean = tl.load(ABS_MEAN).to(tl.float32)
    scale = _nf4_block_scale(ABS, ABS_SCALE, mean, offs_n, n_ok, k0 // BLOCK_SIZE, KB, DQ)
    w = _nf4_tile(QW, sqn, offs_n, n_ok, k0, LUT, BLOCK_K) * scale[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + offs_n.to(tl.int64)[:, None] * son + offs_k[None, :] * sok, w.to(OUT.dtype.element_ty),
             mask=n_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launchers

@dataclass(frozen=True)
class NF4Config:
    """Tiling of the forward kernel: block_m 1 (CUDA-core GEMV) or a power of two >= 16 (tl.dot); block_n, block_k
    powers of two >= 16, block_k dividing the block size; split_k an upper bound on the K splits."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def choose_config(M: int, N: int, K: int, block_size: int, device: torch.device) -> NF4Config:
    """Heuristic tiling (no autotuning, so a first call may happen inside CUDA-graph capture)."""
    k_cap = min(64, block_size & -block_size)
    sms = sm_count(device, interpreted=4)
    if M > 64:
        block_m, block_n = 128, 128
        if triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < sms:
            block_n = 64
        if triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < sms:
            block_m = 64
        return NF4Config(block_m, block_n, k_cap, num_warps=8 if block_m == 128 else 4)
    if M == 1:
        block_m, block_n = 1, 128
    else:
        block_m, block_n = max(16, triton.next_power_of_2(M)), 64
    return NF4Config(block_m, block_n, k_cap, skinny_split_k(M, N, K // k_cap, block_m, block_n, sms))


def _check_config(cfg: NF4Config, block_size: int) -> None:
    check_tiles("nf4_matmul", cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k)
    if block_size % cfg.block_k:
        raise ValueError(f"nf4_matmul: block_k {cfg.block_k} must divide block_size {block_size}")


@functools.lru_cache(maxsize=None)
def _lut(device: torch.device) -> torch.Tensor:
    return NF4_VALUES.to(device)


def nf4_matmul(x2, qweight, absmax, absmax_scale, absmax_mean, bias, block_size, config: NF4Config):
    """x2 [M, K] -> [M, N] in x2's dtype with an explicit tiling (arguments validated by the caller)."""
    _check_config(config, block_size)
    M, K = x2.shape
    N = qweight.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0 or K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    tiles = K // config.block_k
    tiles_per_split = triton.cdiv(tiles, config.split_k)
    n_splits = triton.cdiv(tiles, tiles_per_split)
    target = out if n_splits == 1 else torch.empty((n_splits, M, N), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), n_splits)
    _nf4_matmul_kernel[grid](
        x2, qweight, absmax, absmax_scale, absmax_mean, _lut(x2.device), bias if bias is not None else absmax_mean,
        target, M, N, K, K // block_size, tiles_per_split, *x2.stride(), qweight.stride(0),
        target.stride(0) if n_splits > 1 else 0, target.stride(-2), target.stride(-1),
        BLOCK_SIZE=block_size, DQ=DQ_BLOCK, HAS_BIAS=bias is not None and n_splits == 1,
        IEEE=x2.dtype == torch.float32, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if n_splits > 1:  # partials summed in split order (torch.sum over a fixed dim: deterministic)
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
    return out


def nf4_grad_input(grad2, qweight, absmax, absmax_scale, absmax_mean, block_size, block_m=None, block_n=64,
                   block_k=None):
    """grad_x [M, K] = grad2 [M, N] @ dequant(W) [N, K], in grad2's dtype (Triton, weight dequantized in-kernel)."""
    M, N = grad2.shape
    K = 2 * qweight.shape[1]
    dx = torch.empty((M, K), dtype=grad2.dtype, device=grad2.device)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    block_m = block_m or (128 if M > 64 else max(16, triton.next_power_of_2(M)))
    block_k = block_k or min(64, block_size & -block_size)
    _check_config(NF4Config(block_m, block_n, block_k), block_size)
    grid = (triton.cdiv(M, block_m), K // block_k)
    _nf4_grad_input_kernel[grid](
        grad2, qweight, absmax, absmax_scale, absmax_mean, _lut(grad2.device), dx,
        M, N, K, K // block_size, *grad2.stride(), qweight.stride(0), *dx.stride(),
        BLOCK_SIZE=block_size, DQ=DQ_BLOCK, IEEE=grad2.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_m == 128 else 4)
    return dx


def dequantize_nf4_triton(qweight, absmax, absmax_scale, absmax_mean, block_size, dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, dequantized in float32 by one Triton pass and rounded once (the reference
    dequantize_nf4's values, rounded to dtype)."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    if N == 0 or K == 0:
        return out
    block_k = min(64, block_size & -block_size)
    _nf4_dequant_kernel[(triton.cdiv(N, 64), K // block_k)](
        qweight, absmax, absmax_scale, absmax_mean, _lut(qweight.device), out, N, K // block_size,
        qweight.stride(0), *out.stride(), BLOCK_SIZE=block_size, DQ=DQ_BLOCK, BLOCK_N=64, BLOCK_K=block_k)
    return out


def _forward(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size, N, K):
    if x.shape[:-1].numel() >= DEQUANT_MATMUL_MIN_ROWS:  # many rows: cuBLAS over the dequantized weight
        w = dequantize_nf4_triton(qweight, absmax, absmax_scale, absmax_mean, block_size, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(x.shape[:-1].numel(), K)
    cfg = choose_config(x2.shape[0], N, K, block_size, x.device)
    return nf4_matmul(x2, qweight, absmax, absmax_scale, absmax_mean, bias, block_size, cfg).view(*x.shape[:-1], N)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b; backward grad_x = grad_y @ dequant(W) (Triton, or cuBLAS over the weight dequantized
    again from DEQUANT_MATMUL_MIN_ROWS rows), grad_b = sum grad_y. Saves only the quantized weight (the frozen W
    gets no gradient, so x is not needed)."""

    @staticmethod
    def forward(ctx, x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size):
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        ctx.save_for_backward(qweight, absmax, absmax_scale, absmax_mean)
        ctx.block_size, ctx.bias_dtype = block_size, None if bias is None else bias.dtype
        return _forward(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size, N, K)

    @staticmethod
    def backward(ctx, grad):
        qweight, absmax, absmax_scale, absmax_mean = ctx.saved_tensors
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        grad2 = grad.reshape(-1, N)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            if grad2.shape[0] >= DEQUANT_MATMUL_MIN_ROWS:
                dx = grad2 @ dequantize_nf4_triton(qweight, absmax, absmax_scale, absmax_mean, ctx.block_size,
                                                   grad2.dtype)
            else:
                dx = nf4_grad_input(grad2, qweight, absmax, absmax_scale, absmax_mean, ctx.block_size)
            dx = dx.view(*grad.shape[:-1], K)
        if ctx.needs_input_grad[5]:
            dbias = grad2.float().sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, None, dbias, None


def nf4_linear_triton(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size=NF4_BLOCK_SIZE):
    """Triton nf4_linear: x [..., K] -> [..., N]; differentiable with respect to x and bias."""
    N, K = _check_args(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _NF4LinearFunction.apply(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size)
    return _forward(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size, N, K)


IMPLEMENTATIONS = {"nf4_linear": {"torch": nf4_linear_ref, "triton": nf4_linear_triton}}
