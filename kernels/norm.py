"""LayerNorm with bias, optionally fused with the residual add, optionally per head.

x [..., N]; weight, bias [N] (bias may be None), or [H, N] for a per-head LayerNorm on x [..., H, N].
With residual given, returns (layer_norm(x + residual), x + residual) so the sum is made once.

Triton implementation: the rows of x are addressed in place as (m, h) pairs with one stride each (so views such
as the q part of a fused QKV projection are read without a copy) and the last dim may have any stride. A program
normalises a tile of BLOCK_R rows of one weight row; statistics and math are float32 whatever the input dtype.
With a residual, s = x + residual is rounded to x's dtype once and both LN(s) and s come out of the same kernel.
Backward recomputes the row statistics, writes dx (and dresidual) and reduces dweight/dbias as per-program float32
partial sums followed by one small sum over programs. The row addressing (row_layout) lives in kernels/_common.py,
shared with kernels/mlp.py.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import (FLOAT_DTYPES, layout_error, pdl_launch_dependents, pdl_wait, row_layout, sm_count,
                             use_pdl)

MAX_N = 16384  # one row must fit in registers (BLOCK_N = next_pow2(N))
_TILE = 4096  # elements per program: rows are batched until a tile holds about this many
# Backward programs per SM: each writes one float32 partial of dweight (and dbias), so more programs mean a larger
# partial buffer to reduce. Two per SM is what fits anyway (the 4096-element tile takes 128 registers per thread
# on sm_90) and keeps the partials near 10% of the traffic at [4096, 2560].
_BWD_PROGRAMS_PER_SM = 2


def layer_norm_ref(x, weight, bias, eps, residual=None):
    """Reference: float32 math, output in x's dtype."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s.float(), (s.shape[-1],), eps=eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of layer_norm passes

def _layer_norm_inputs(case, seed, device):
    """x with a non-zero mean (centring matters), weight near 1 and bias near 0 (random, never exactly 1 / 0).
    `view`: x is a slice of a wider buffer (as the q part of a fused QKV projection is); `heads`: a per-head
    LayerNorm over x [B, S, H, N] with weight [H, N] (qk_layernorm)."""
    p = case.params
    B, S, N, H = p["B"], p["S"], p["N"], p.get("heads")
    gen = _c.generator(case, seed)
    lead = (B, S, H) if H else (B, S)
    wshape = (H, N) if H else (N,)
    if p.get("view"):
        x = _c.randn(gen, *lead, N + 16, dtype=case.dtype, device=device)[..., 8:N + 8]
    else:
        x = _c.randn(gen, *lead, N, dtype=case.dtype, device=device)
    x = x + torch.tensor(0.5, dtype=case.dtype)
    weight = 1 + _c.randn(gen, *wshape, dtype=case.dtype, device=device, scale=0.2)
    bias = _c.randn(gen, *wshape, dtype=case.dtype, device=device, scale=0.2) if p.get("bias") else None
    residual = _c.randn(gen, *lead, N, dtype=case.dtype, device=device) if p.get("residual") else None
    return dict(x=x, weight=weight, bias=bias, eps=1e-5, residual=residual)


def _layer_norm_grid():
    grid = []
    for B, S, N in ((2, 7, 64), (1, 33, 160), (3, 5, 2560), (1, 2, 6912)):
        for residual in (False, True):
            for bias in (True, False):
                grid.append(dict(B=B, S=S, N=N, residual=residual, bias=bias, view=S % 2 == 1))
    for H, N in ((4, 80), (8, 64)):  # qk_layernorm: per-head weights, no bias
        grid.append(dict(B=2, S=5, N=N, heads=H, view=True))
    return grid


_LAYER_NORM_TOL = {torch.float32: _c.Tol(1e-5, 1e-5), torch.float16: _c.Tol(2e-3, 2e-3),
                   torch.bfloat16: _c.Tol(2e-2, 1.6e-2)}
# Gradients sum over rows (dweight, dbias), so a little looser than the forward.
_LAYER_NORM_GRAD_TOL = {torch.float32: _c.Tol(1e-4, 1e-4), torch.float16: _c.Tol(4e-3, 4e-3),
                        torch.bfloat16: _c.Tol(4e-2, 3e-2)}
_LAYER_NORM_CPU = {"B2-S7-N64-residual-bias-view-bf16", "B1-S33-N160-bias-view-fp32", "B2-S5-N80-heads4-view-fp16",
                   "B2-S7-N64-residual-bias-view-fp32-grad", "B1-S33-N160-view-bf16-grad",
                   "B2-S5-N64-heads8-view-fp32-grad"}


def _layer_norm_work(inputs):
    x, r = inputs["x"], inputs["residual"]
    n = 2 * x.numel() * x.element_size() if r is None else 4 * x.numel() * x.element_size()  # read(s), write(s)
    return {"bytes": n}


def _layer_norm_outputs(out, inputs):
    return {"y": out[0], "sum": out[1]} if inputs["residual"] is not None else {"y": out}


CONTRACTS = {"layer_norm": _c.Contract(
    op="layer_norm", reference=layer_norm_ref, make_inputs=_layer_norm_inputs,
    cases=_c.make_cases(_layer_norm_grid(), _c.FLOAT_DTYPES, grad=(False, True), cpu=_LAYER_NORM_CPU),
    tol=_LAYER_NORM_TOL, grad_tol=_LAYER_NORM_GRAD_TOL, grad_inputs=("x", "weight", "bias", "residual"),
    outputs=_layer_norm_outputs,
    bench=[_c.Case("3b-prefill-16384x2560-residual", dict(B=1, S=16384, N=2560, residual=True, bias=True),
                   torch.bfloat16),
           _c.Case("3b-decode-8x2560-residual", dict(B=8, S=1, N=2560, residual=True, bias=True), torch.bfloat16)],
    work=_layer_norm_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _tile_rows(lin, j, H, PER_HEAD: tl.constexpr):
    """(offset factors m, h and the contiguous row index) of tile rows `lin` in weight row j.

    Per head, lin runs over m and h is the program's weight row j; otherwise lin runs over all M * H rows.
    """
    if PER_HEAD:
        m = lin
        h = j
    else:
        m = lin // H
        h = lin % H
    return m, h, m * H + h


@triton.jit
def _row_stats(s, mask, N: tl.constexpr, eps):
    """(s - mean) (0 outside the mask) and 1 / std of each row of a float32 tile."""
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    return centred, rstd


@triton.jit
def _layer_norm_fwd_kernel(X, RES, W, BIAS, Y, S,
                           x_sm, x_sh, x_sn, r_sm, r_sh, r_sn,
                           n_lin, H, eps,
                           N: tl.constexpr, PER_HEAD: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(n_lin, BLOCK_R), weight rows). Y and S are contiguous [M * H, N]. PDL: kernels/_common.py."""
    pdl_launch_dependents(PDL)
    j = tl.program_id(1)
    lin = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m, h, row = _tile_rows(lin, j, H, PER_HEAD)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (lin < n_lin)[:, None] & col_ok[None, :]
    pdl_wait(PDL)
    s = tl.load(X + (m * x_sm + h * x_sh)[:, None] + cols[None, :] * x_sn, mask=mask, other=0.0).to(tl.float32)
    out = row[:, None] * N + cols[None, :]
    if HAS_RES:
        r = tl.load(RES + (m * r_sm + h * r_sh)[:, None] + cols[None, :] * r_sn, mask=mask, other=0.0)
        # Normalise the rounded sum that is returned, as the reference does (and backward recomputes from it).
        s = (s + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + out, s, mask=mask)
        s = s.to(tl.float32)
    centred, rstd = _row_stats(s, mask, N, eps)
    w_row = j * N if PER_HEAD else 0
    w = tl.load(W + w_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + w_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(S, DY, DSO, W, DX, DRES, DW, DB,
                           s_sm, s_sh, s_sn, dy_sm, dy_sh, dy_sn, o_sm, o_sh, o_sn,
                           n_lin, H, tiles_per_program, eps,
                           N: tl.constexpr, PER_HEAD: tl.constexpr, HAS_DSO: tl.constexpr,
                           STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (G, weight rows): program g takes tiles g * tiles_per_program ... of the rows of weight row j.

    S is the normalised input (x, or x + residual), DY the grad of LN(S), DSO the grad of the returned sum.
    DX/DRES are contiguous [M * H, N]; DW/DB are float32 partials [G, weight rows, N].
    """
    g = tl.program_id(0)
    j = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_row = j * N if PER_HEAD else 0
    w = tl.load(W + w_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(tiles_per_program):
        lin = (g.to(tl.int64) * tiles_per_program + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m, h, row = _tile_rows(lin, j, H, PER_HEAD)
        mask = (lin < n_lin)[:, None] & col_ok[None, :]
        s = tl.load(S + (m * s_sm + h * s_sh)[:, None] + cols[None, :] * s_sn, mask=mask, other=0.0)
        dy = tl.load(DY + (m * dy_sm + h * dy_sh)[:, None] + cols[None, :] * dy_sn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        centred, rstd = _row_stats(s.to(tl.float32), mask, N, eps)
        xhat = centred * rstd[:, None]
        wdy = dy * w[None, :]
        # d/ds of LN: rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the N valid columns.
        mean_wdy = tl.sum(wdy, axis=1) / N
        mean_wdy_xhat = tl.sum(wdy * xhat, axis=1) / N
        ds = (wdy - mean_wdy[:, None] - xhat * mean_wdy_xhat[:, None]) * rstd[:, None]
        if HAS_DSO:
            ds += tl.load(DSO + (m * o_sm + h * o_sh)[:, None] + cols[None, :] * o_sn, mask=mask,
                          other=0.0).to(tl.float32)
        out = row[:, None] * N + cols[None, :]
        if STORE_DX:
            tl.store(DX + out, ds.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(DRES + out, ds.to(DRES.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += tl.sum(dy * xhat, axis=0)  # masked rows/cols hold dy = 0 and xhat = 0
            if HAS_BIAS:
                db += tl.sum(dy, axis=0)
    if WEIGHT_GRAD:
        part = (g * tl.num_programs(1) + j) * N + cols
        tl.store(DW + part, dw, mask=col_ok)
        if HAS_BIAS:
            tl.store(DB + part, db, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

def _tile(n_lin: int, n: int):
    """(BLOCK_R, BLOCK_N, num_warps): whole rows of next_pow2(N) columns, stacked to about _TILE elements."""
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(triton.next_power_of_2(max(n_lin, 1)), _TILE // block_n))
    # About 16 elements per thread (16-byte vector accesses for half types). On sm_90 this needs at most 128
    # registers up to N = 8192; the backward at N = 16384 spills a little (the register cap of 16 warps).
    num_warps = min(16, max(1, block_r * block_n // 512))
    return block_r, block_n, num_warps


def _check_layer_norm_args(x, weight, bias, eps, residual):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dim")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"layer_norm: normalised size N={n} must be in [1, {MAX_N}]")
    if weight.dim() == 1:
        if weight.shape[0] != n:
            raise ValueError(f"layer_norm: weight {tuple(weight.shape)} does not match x's last dim N={n}")
    elif weight.dim() == 2:
        if x.dim() < 2 or tuple(weight.shape) != tuple(x.shape[-2:]):
            raise ValueError(f"layer_norm: per-head weight {tuple(weight.shape)} must be [H, N] = x's last two "
                             f"dims, x is {tuple(x.shape)}")
    else:
        raise ValueError(f"layer_norm: weight must be [N] or [H, N], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"layer_norm: bias {tuple(bias.shape)} must have weight's shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"layer_norm: {name} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"layer_norm: residual dtype {residual.dtype} must equal x's dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be positive, got {eps}")


def _forward_layout(x, residual, per_head):
    """row_layout of x (and residual); each addressable alone means both are addressable together."""
    tensors = [x] if residual is None else [x, residual]
    for name, t in zip(("x", "residual"), tensors):
        if row_layout([t], per_head) is None:
            raise layout_error("layer_norm", name, t)
    return row_layout(tensors, per_head)


def _layer_norm_forward(x, weight, bias, eps, residual):
    """(LN(s), s or None), s = x + residual; weight and bias contiguous."""
    per_head = weight.dim() == 2
    M, H, strides = _forward_layout(x, residual, per_head)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_lin = M if per_head else M * H
    if n_lin * H == 0:
        return y, s
    n = x.shape[-1]
    block_r, block_n, num_warps = _tile(n_lin, n)
    (x_sm, x_sh, x_sn), (r_sm, r_sh, r_sn) = strides[0], strides[-1]
    pdl = use_pdl(x.device)
    _layer_norm_fwd_kernel[(triton.cdiv(n_lin, block_r), H if per_head else 1)](
        x, x if residual is None else residual, weight, x if bias is None else bias, y, x if s is None else s,
        x_sm, x_sh, x_sn, r_sm, r_sh, r_sn,
        n_lin, H, eps,
        N=n, PER_HEAD=per_head, HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps, PDL=pdl, launch_pdl=pdl)
    return y, s


def _programs_per_device(device) -> int:
    # 4 in the interpreter, which runs programs one after another: few, long programs.
    return _BWD_PROGRAMS_PER_SM * sm_count(device, interpreted=2)


def _layer_norm_backward(s, weight, bias, eps, dy, ds_out, need_dx, need_dres, need_dw):
    """(dx, dres, dweight, dbias), each None where not needed; s is the normalised input."""
    per_head = weight.dim() == 2
    grads = [dy] if ds_out is None else [dy, ds_out]
    layout = row_layout([s, *grads], per_head)
    if layout is None:  # incoming grads of an unusual layout (s is addressable, so contiguous grads fit with it)
        grads = [g.contiguous() for g in grads]
        layout = row_layout([s, *grads], per_head)
    M, H, strides = layout
    n = s.shape[-1]
    n_lin = M if per_head else M * H
    n_w = H if per_head else 1
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_dx else None
    dres = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_dres else None
    block_r, block_n, num_warps = _tile(n_lin, n)
    tiles = triton.cdiv(n_lin, block_r)
    programs = max(1, min(tiles, _programs_per_device(s.device) // n_w))
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program) if tiles else 1
    dw_part = torch.zeros(programs, n_w, n, dtype=torch.float32, device=s.device) if need_dw else None
    db_part = torch.zeros_like(dw_part) if need_dw and bias is not None else None
    if tiles:
        (s_sm, s_sh, s_sn), (dy_sm, dy_sh, dy_sn), (o_sm, o_sh, o_sn) = strides[0], strides[1], strides[-1]
        _layer_norm_bwd_kernel[(programs, n_w)](
            s, grads[0], grads[-1], weight, s if dx is None else dx, s if dres is None else dres,
            s if dw_part is None else dw_part, s if db_part is None else db_part,
            s_sm, s_sh, s_sn, dy_sm, dy_sh, dy_sn, o_sm, o_sh, o_sn,
            n_lin, H, tiles_per_program, eps,
            N=n, PER_HEAD=per_head, HAS_DSO=ds_out is not None, STORE_DX=need_dx, STORE_DRES=need_dres,
            WEIGHT_GRAD=need_dw, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=num_warps)
    dw = dw_part.sum(0).view(weight.shape).to(weight.dtype) if need_dw else None
    db = db_part.sum(0).view(bias.shape).to(bias.dtype) if db_part is not None else None
    return dx, dres, dw, db


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, s = _layer_norm_forward(x, weight, bias, eps, residual)
        ctx.eps = eps
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x if s is None else s, weight, bias)
        return y if s is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, bias = ctx.saved_tensors
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        dx, dres, dw, db = _layer_norm_backward(s, weight, bias, ctx.eps, dy, ds_out, need_dx=need_x,
                                                need_dres=need_res, need_dw=need_w or need_b)
        return dx, dres, dw if need_w else None, db if need_b else None, None


def layer_norm_triton(x, weight, bias, eps, residual=None):
    """LN(x) or (LN(x + residual), x + residual) in one kernel; differentiable in every tensor argument."""
    _check_layer_norm_args(x, weight, bias, eps, residual)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        return _LayerNormFunction.apply(x, residual, weight, bias, eps)
    y, s = _layer_norm_forward(x, weight, bias, eps, residual)
    return y if s is None else (y, s)


IMPLEMENTATIONS = {"layer_norm": {"torch": layer_norm_ref, "triton": layer_norm_triton}}
