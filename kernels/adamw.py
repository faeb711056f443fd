"""AdamW's update of a 16-bit parameter from its float32 master weight: mixed-precision training, where the model
holds and computes with bf16 / fp16 weights and the optimizer keeps float32 master weights and moments. (A float32
parameter is accepted too, its master then a plain copy: stablelm.optim.MasterAdamW does not ask for that.)

One op, `adamw_master`, in place: the float32 master weight and both moments take torch.optim.AdamW's update
(decoupled weight decay, bias-corrected moments, no amsgrad) from the 16-bit gradient, and the parameter becomes
the master rounded to its dtype. The Triton kernel does it in one pass: it reads the gradient, master and moments
and writes them back with the rounded parameter, 28 bytes per bf16 parameter (torch's fused AdamW over float32
parameters moves the same 28 bytes and leaves no 16-bit copy for the model to compute with).
"""
import math

import torch
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, cdiv

BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 16-byte loads of the float32 state


def _check(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """The one input check both implementations run: the names say which tensor is wrong."""
    if param.dtype not in FLOAT_DTYPES:
        raise ValueError(f"adamw_master: param is {param.dtype}, not a floating dtype of {FLOAT_DTYPES}")
    if grad.dtype != param.dtype:
        raise ValueError(f"adamw_master: grad is {grad.dtype}, param {param.dtype}")
    for name, t in (("grad", grad), ("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"adamw_master: {name} has shape {tuple(t.shape)}, param {tuple(param.shape)}")
        if t.device != param.device:
            raise ValueError(f"adamw_master: {name} is on {t.device}, param on {param.device}")
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"adamw_master: {name} is {t.dtype}; the optimizer's state is float32")
    for name, t in (("param", param), ("grad", grad), ("master", master), ("exp_avg", exp_avg),
                    ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"adamw_master: {name} is not contiguous (strides {t.stride()})")
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"adamw_master: step={step!r} must be the step count after this update, an int >= 1")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0 and lr >= 0 and weight_decay >= 0):
        raise ValueError(f"adamw_master: lr={lr}, betas=({beta1}, {beta2}), eps={eps}, weight_decay={weight_decay} "
                         f"out of range")


def adamw_master_ref(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """Reference, in place: torch.optim.AdamW's single-tensor update on the float32 master weight with the
    gradient in float32, then param <- master rounded to param's dtype. `step` counts this update (1 on the
    first). Returns None."""
    _check(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
    g = grad.float()
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    param.copy_(master)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py). The compared outputs are the float32 state; that the parameter is the master
# rounded to its dtype, bit for bit, is checked by tests/test_adamw.py for every implementation.

def _adamw_inputs(case, seed, device):
    """A parameter mid-training: a master within a 16-bit step of it, moments of a few earlier steps. lr is large
    so that a wrong update, bias correction or decay stands far outside the tolerance."""
    shape = (case.params["R"], case.params["C"])
    gen = _c.generator(case, seed)
    master = _c.randn(gen, *shape)
    param = master.to(case.dtype)
    exp_avg = _c.randn(gen, *shape, scale=0.05)
    exp_avg_sq = _c.randn(gen, *shape, scale=0.05) ** 2 + 1e-6
    return dict(param=param.to(device), grad=_c.randn(gen, *shape, dtype=case.dtype, device=device, scale=0.3),
                master=master.to(device), exp_avg=exp_avg.to(device), exp_avg_sq=exp_avg_sq.to(device),
                lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=case.params["step"])


def _adamw_outputs(result, inputs):
    return {k: inputs[k] for k in ("master", "exp_avg", "exp_avg_sq")}


def _adamw_work(inputs):
    return {"bytes": inputs["param"].numel() * (2 * inputs["param"].element_size() + 2 * 12)}


_ADAMW_GRID = [dict(R=rows, C=cols, step=step) for rows, cols, step in ((1, 1000, 1), (3, 257, 7), (96, 2560, 250))]
# float32 state either way: the kernel's IEEE sqrt / division against torch's, a few ulp apart
_ADAMW_TOL = {dtype: _c.Tol(2e-6, 2e-6) for dtype in FLOAT_DTYPES}
CONTRACTS = {"adamw_master": _c.Contract(
    op="adamw_master", reference=adamw_master_ref, make_inputs=_adamw_inputs,
    cases=_c.make_cases(_ADAMW_GRID, FLOAT_DTYPES, cpu={"R1-C1000-step1-bf16", "R3-C257-step7-fp16"}),
    tol=_ADAMW_TOL, outputs=_adamw_outputs,
    bench=[_c.Case("3b-gate_up-13824x2560", dict(R=13824, C=2560, step=100), torch.bfloat16)],
    work=_adamw_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton

@triton.jit
def _adamw_master_kernel(P, G, W, M, V, n, decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
                         step_size, BLOCK: tl.constexpr):
    """Grid (cdiv(n, BLOCK),): every tensor flat and contiguous; W (master), M, V float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    w = w * decay
    m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight below one half
    v = v * beta2 + one_minus_beta2 * (g * g)
    # IEEE-rounded sqrt and division, as torch computes them (the defaults are approximate on the GPU)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w - step_size * tl.div_rn(m, denom)
    tl.store(W + offs, w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, w.to(P.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def adamw_master_triton(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_master_ref in one Triton pass (in place; returns None)."""
    _check(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
    n = param.numel()
    if n == 0:
        return
    _adamw_master_kernel[(cdiv(n, BLOCK),)](
        param, grad, master, exp_avg, exp_avg_sq, n, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
        math.sqrt(1 - beta2 ** step), eps, lr / (1 - beta1 ** step), BLOCK=BLOCK, num_warps=8)


IMPLEMENTATIONS = {"adamw_master": {"torch": adamw_master_ref, "triton": adamw_master_triton}}
