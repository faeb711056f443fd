"""SwiGLU activation: silu(gate) * up, the middle of StableLM's MLP (down(silu(gate(x)) * up(x))).

Triton implementation: one elementwise pass in float32 with the output in gate's dtype. gate and up are read in
place through (row, column) strides, so the two halves of the fused gate_up projection output need no copy.
Backward (dgate, dup) is one more pass, through a torch.autograd.Function.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, layout_error, pdl_launch_dependents, pdl_wait, row_layout, use_pdl


def swiglu_ref(gate, up):
    """Reference: float32 math, output in gate's dtype. gate and up have the same shape (views are fine)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of swiglu passes

def _swiglu_inputs(case, seed, device):
    """gate, up as the two halves of a fused gate_up projection output (`fused`, as the model passes them) or
    contiguous; values spread over silu's curved range."""
    p = case.params
    B, S, inter = p["B"], p["S"], p["I"]
    gen = _c.generator(case, seed)
    if p.get("fused"):
        gate, up = _c.randn(gen, B, S, 2 * inter, dtype=case.dtype, device=device, scale=3.0).split(inter, dim=-1)
    else:
        gate, up = (_c.randn(gen, B, S, inter, dtype=case.dtype, device=device, scale=3.0) for _ in range(2))
    return dict(gate=gate, up=up)


def _swiglu_grid():
    return [dict(B=B, S=S, I=inter, fused=fused) for B, S, inter in ((2, 7, 176), (1, 33, 352), (3, 5, 6912),
                                                                      (1, 1, 1000)) for fused in (True, False)]


_SWIGLU_TOL = {torch.float32: _c.Tol(1e-5, 1e-5), torch.float16: _c.Tol(2e-3, 2e-3),
               torch.bfloat16: _c.Tol(1e-2, 1.6e-2)}
_SWIGLU_CPU = {"B2-S7-I176-fused-bf16", "B1-S33-I352-fp16", "B1-S1-I1000-fused-fp32", "B2-S7-I176-fused-fp32-grad",
               "B1-S33-I352-bf16-grad"}


def _swiglu_work(inputs):
    return {"bytes": 3 * inputs["gate"].numel() * inputs["gate"].element_size()}


CONTRACTS = {"swiglu": _c.Contract(
    op="swiglu", reference=swiglu_ref, make_inputs=_swiglu_inputs,
    cases=_c.make_cases(_swiglu_grid(), _c.FLOAT_DTYPES, grad=(False, True), cpu=_SWIGLU_CPU),
    tol=_SWIGLU_TOL, grad_tol=_SWIGLU_TOL, grad_inputs=("gate", "up"),
    bench=[_c.Case("3b-prefill-16384x6912", dict(B=1, S=16384, I=6912, fused=True), torch.bfloat16),
           _c.Case("3b-decode-8x6912", dict(B=8, S=1, I=6912, fused=True), torch.bfloat16)],
    work=_swiglu_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _tile(n_rows, H, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(m, h, contiguous row index, columns, mask) of this program's [BLOCK_R, BLOCK_C] tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows // H, rows % H, rows, cols, mask


@triton.jit
def _swiglu_fwd_kernel(G, U, O, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, n_rows, H, n_cols,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(rows, BLOCK_R), cdiv(cols, BLOCK_C)); O is contiguous [rows, cols]. PDL: kernels/_common.py."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    m, h, rows, cols, mask = _tile(n_rows, H, n_cols, BLOCK_R, BLOCK_C)
    g = tl.load(G + (m * g_sm + h * g_sh)[:, None] + cols[None, :] * g_sn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + (m * u_sm + h * u_sh)[:, None] + cols[None, :] * u_sn, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(O + rows[:, None] * n_cols + cols[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_grads(G, U, DO, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn, n_rows, H, n_cols,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of (rows, columns, mask, dgate, dup) in float32, for both backward kernels."""
    m, h, rows, cols, mask = _tile(n_rows, H, n_cols, BLOCK_R, BLOCK_C)
    g = tl.load(G + (m * g_sm + h * g_sh)[:, None] + cols[None, :] * g_sn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + (m * u_sm + h * u_sh)[:, None] + cols[None, :] * u_sn, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + (m * d_sm + h * d_sh)[:, None] + cols[None, :] * d_sn, mask=mask, other=0.0)
    do = do.to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    return rows, cols, mask, do * u * sig * (1.0 + g * (1.0 - sig)), do * g * sig


@triton.jit
def _swiglu_bwd_kernel(G, U, DO, DG, DU,
                       g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn, n_rows, H, n_cols,
                       STORE_DG: tl.constexpr, STORE_DU: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Same grid as the forward; DG and DU are contiguous [rows, cols]."""
    rows, cols, mask, dg, du = _swiglu_grads(G, U, DO, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn,
                                             n_rows, H, n_cols, BLOCK_R, BLOCK_C)
    out = rows[:, None] * n_cols + cols[None, :]
    if STORE_DG:
        tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=mask)
    if STORE_DU:
        tl.store(DU + out, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

def _grid(n_rows: int, n_cols: int):
    """(grid, BLOCK_R, BLOCK_C, num_warps): tiles of 1024 elements, 8 per thread (16-byte half-type accesses)."""
    block_c = min(triton.next_power_of_2(n_cols), 1024)
    block_r = max(1, min(triton.next_power_of_2(n_rows), 1024 // block_c))
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    return grid, block_r, block_c, max(1, block_r * block_c // 256)


def _check_swiglu_args(gate, up):
    for name, t in (("gate", gate), ("up", up)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"swiglu: {name} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    if up.dtype != gate.dtype:
        raise TypeError(f"swiglu: up dtype {up.dtype} must equal gate's dtype {gate.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if up.device != gate.device:
        raise ValueError(f"swiglu: up is on {up.device} but gate is on {gate.device}")
    if gate.dim() == 0:
        raise ValueError("swiglu: gate and up must have at least one dim")
    for name, t in (("gate", gate), ("up", up)):
        if row_layout([t]) is None:
            raise layout_error("swiglu", name, t)


def _swiglu_forward(gate, up):
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    M, H, ((g_sm, g_sh, g_sn), (u_sm, u_sh, u_sn)) = row_layout([gate, up])
    n_rows, n_cols = M * H, gate.shape[-1]
    if n_rows * n_cols == 0:
        return out
    grid, block_r, block_c, num_warps = _grid(n_rows, n_cols)
    pdl = use_pdl(gate.device)
    _swiglu_fwd_kernel[grid](gate, up, out, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, n_rows, H, n_cols,
                             BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, PDL=pdl, launch_pdl=pdl)
    return out


def _swiglu_backward(gate, up, grad, need_dgate, need_dup):
    layout = row_layout([gate, up, grad])
    if layout is None:  # an incoming grad of an unusual layout: a contiguous one always fits with gate and up
        grad = grad.contiguous()
        layout = row_layout([gate, up, grad])
    M, H, ((g_sm, g_sh, g_sn), (u_sm, u_sh, u_sn), (d_sm, d_sh, d_sn)) = layout
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dgate else None
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_dup else None
    n_rows, n_cols = M * H, gate.shape[-1]
    if n_rows * n_cols > 0:
        grid, block_r, block_c, num_warps = _grid(n_rows, n_cols)
        _swiglu_bwd_kernel[grid](gate, up, grad, gate if dgate is None else dgate, up if dup is None else dup,
                                 g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn, n_rows, H, n_cols,
                                 STORE_DG=need_dgate, STORE_DU=need_dup,
                                 BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return dgate, dup


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _swiglu_backward(gate, up, grad, *ctx.needs_input_grad)


def swiglu_triton(gate, up):
    """silu(gate) * up in one pass (views such as the halves of a fused projection are read in place)."""
    _check_swiglu_args(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFunction.apply(gate, up)
    return _swiglu_forward(gate, up)


# ----------------------------------------------------------------------------------------------------------------
# swiglu_fused(gate_up): the op on the fused projection's output [..., 2I] = [gate | up] -> [..., I]. Its backward
# writes dgate and dup straight into the two halves of one [..., 2I] gradient buffer: with swiglu(gate, up) on the
# two halves of a .split, autograd allocates both gradients and then concatenates them (an extra read + write of
# 2I per token, the whole cost of an elementwise op of this size).

def _check_fused(gate_up):
    if gate_up.dtype not in FLOAT_DTYPES:
        raise TypeError(f"swiglu_fused: gate_up dtype {gate_up.dtype} is not supported (float32, float16, bfloat16)")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_fused: gate_up must end in an even dim [..., 2I], got {tuple(gate_up.shape)}")


def swiglu_fused_ref(gate_up):
    """Reference: gate, up = the two halves of the last dim; silu(gate) * up in float32, output in the input dtype."""
    _check_fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


def _swiglu_fused_inputs(case, seed, device):
    """The fused projection output [B, S, 2I] (a row-strided view of a wider tensor when `strided`)."""
    p = case.params
    gen = _c.generator(case, seed)
    extra = 8 if p.get("strided") else 0
    full = _c.randn(gen, p["B"], p["S"], 2 * p["I"] + extra, dtype=case.dtype, device=device, scale=3.0)
    return dict(gate_up=full[..., :2 * p["I"]])


_SWIGLU_FUSED_CPU = {"B2-S7-I176-fp32-grad", "B1-S33-I352-strided-bf16-grad", "B1-S1-I1000-fp16"}

CONTRACTS["swiglu_fused"] = _c.Contract(
    op="swiglu_fused", reference=swiglu_fused_ref, make_inputs=_swiglu_fused_inputs,
    cases=_c.make_cases([dict(B=B, S=S, I=inter, strided=st) for B, S, inter in ((2, 7, 176), (1, 33, 352),
                                                                                (3, 5, 6912), (1, 1, 1000))
                         for st in (False, True)], _c.FLOAT_DTYPES, grad=(False, True), cpu=_SWIGLU_FUSED_CPU),
    tol=_SWIGLU_TOL, grad_tol=_SWIGLU_TOL, grad_inputs=("gate_up",),
    bench=[_c.Case("3b-train-1520x6912", dict(B=8, S=190, I=6912), torch.bfloat16)],
    work=lambda inputs: {"bytes": 3 * inputs["gate_up"].numel() * inputs["gate_up"].element_size()})


@triton.jit
def _swiglu_fused_bwd_kernel(G, U, DO, DGU,
                             g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn, n_rows, H, n_cols,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Same grid as the forward; DGU is contiguous [rows, 2 * cols]: dgate in columns [0, cols), dup after."""
    rows, cols, mask, dg, du = _swiglu_grads(G, U, DO, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn,
                                             n_rows, H, n_cols, BLOCK_R, BLOCK_C)
    out = DGU + rows[:, None] * (2 * n_cols) + cols[None, :]
    tl.store(out, dg.to(DGU.dtype.element_ty), mask=mask)
    tl.store(out + n_cols, du.to(DGU.dtype.element_ty), mask=mask)


class _SwiGLUFusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(*gate_up.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        layout = row_layout([gate, up, grad])
        if layout is None:
            grad = grad.contiguous()
            layout = row_layout([gate, up, grad])
        M, H, ((g_sm, g_sh, g_sn), (u_sm, u_sh, u_sn), (d_sm, d_sh, d_sn)) = layout
        dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        n_rows, n_cols = M * H, gate.shape[-1]
        if n_rows * n_cols > 0:
            grid, block_r, block_c, num_warps = _grid(n_rows, n_cols)
            _swiglu_fused_bwd_kernel[grid](gate, up, grad, dgu, g_sm, g_sh, g_sn, u_sm, u_sh, u_sn, d_sm, d_sh, d_sn,
                                           n_rows, H, n_cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        return dgu


def swiglu_fused_triton(gate_up):
    """silu(gate) * up of the fused [gate | up] tensor; the backward fills one [..., 2I] gradient buffer."""
    _check_fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    _check_swiglu_args(gate, up)
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLUFusedFunction.apply(gate_up)
    return _swiglu_forward(gate, up)


IMPLEMENTATIONS = {"swiglu": {"torch": swiglu_ref, "triton": swiglu_triton},
                   "swiglu_fused": {"torch": swiglu_fused_ref, "triton": swiglu_fused_triton}}
