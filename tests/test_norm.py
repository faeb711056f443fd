"""Triton LayerNorm (plain / residual-fused / per-head) against its reference: forward and every gradient, on
views and strided layouts, plus input validation (CPU interpreter; GPU tests at StableLM sizes)."""
import pytest
import torch

import stablelm.ops as ops
from kernels.norm import MAX_N, layer_norm_ref, layer_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# One LayerNorm in float32 math rounded to the dtype (a few ulp); gradients sum over rows, so a little looser.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=4e-3, atol=4e-3),
            torch.bfloat16: dict(rtol=3e-2, atol=4e-2)}


def params(shape, dtype, bias=True):
    """Weight near 1 and bias near 0, random (never exactly 1 / 0), as leaves that require grad."""
    w = (1 + 0.2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_() if bias else None
    return w, b


def leaf(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    """Random input with a non-zero mean (so centring matters), as a leaf that requires grad."""
    return (offset + scale * torch.randn(*shape, device=DEVICE)).to(dtype).requires_grad_()


def run_both(make_inputs, leaves, weight, bias, residual_form, out_grads=None):
    """Run Triton and the reference on the same inputs; returns (outputs, grads of `leaves`, weight, bias) each."""
    results = []
    for fn in (layer_norm_triton, layer_norm_ref):
        for t in [*leaves, weight, bias]:
            if t is not None:
                t.grad = None
        x, residual = make_inputs()
        out = fn(x, weight, bias, EPS, residual=residual)
        outs = out if residual_form else (out,)
        if out_grads is None:
            out_grads = [torch.randn(o.shape, device=DEVICE).to(o.dtype) for o in outs]
        # The reference's sum needs no grad when only the weights train.
        torch.autograd.backward(*zip(*[(o, g) for o, g in zip(outs, out_grads) if o.requires_grad]))
        grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in [*leaves, weight, bias]]
        results.append(([o.detach() for o in outs], grads))
    return results


def assert_match(results, dtype):
    (t_outs, t_grads), (r_outs, r_grads) = results
    for a, b in zip(t_outs, r_outs):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for a, b in zip(t_grads, r_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


def assert_same_rounding(out, ref):
    """Bit-equal, except that the interpreter truncates to bfloat16 where torch rounds (one ulp apart)."""
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out, ref)


# (per_head, residual, bias)
FORMS = [(False, False, True), (False, True, True), (False, True, False), (True, False, False), (True, True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_head,with_residual,with_bias", FORMS)
def test_matches_reference_on_views(per_head, with_residual, with_bias, dtype):
    """x is a view of a wider buffer (the q part of a fused projection, per head); N is not a power of two."""
    B, S, H, N, extra = 2, 3, 4, 20, 3
    if per_head:
        buf = leaf(B, S, H + extra, N, dtype=dtype, offset=0.5)
        res_buf = leaf(B, S, H, N, dtype=dtype) if with_residual else None
        weight, bias = params((H, N), dtype, with_bias)
        make = lambda: (buf[:, :, :H], res_buf)  # noqa: E731
    else:
        buf = leaf(B, S, N + extra, dtype=dtype, offset=0.5)
        res_buf = leaf(B, S, 2 * N, dtype=dtype) if with_residual else None
        weight, bias = params(N, dtype, with_bias)
        make = lambda: (buf[..., extra:], None if res_buf is None else res_buf[..., N:])  # noqa: E731
    results = run_both(make, [buf, res_buf], weight, bias, with_residual)
    assert_match(results, dtype)
    if with_residual:  # the returned sum is x + residual as the dtype rounds it
        x, residual = make()
        assert_same_rounding(results[0][0][1], (x + residual).detach())


@pytest.mark.parametrize("with_residual", [False, True])
def test_strided_layouts(with_residual):
    """Transposed leading dims (rows need two strides), a last dim of stride 2 and a residual laid out differently."""
    S, B, N = 5, 3, 24
    xt = leaf(B, S, N)
    wide = leaf(S, B, 2 * N)
    residual = leaf(S, B, N) if with_residual else None
    weight, bias = params(N, torch.float32)

    for make in (lambda: (xt.transpose(0, 1), residual), lambda: (wide[..., ::2], residual)):
        results = run_both(make, [xt, wide, residual], weight, bias, with_residual)
        assert_match(results, torch.float32)


@pytest.mark.parametrize("per_head", [False, True])
def test_many_rows_backward_loops(per_head):
    """Enough rows that each backward program loops over several tiles and several programs write partials."""
    N = 80
    if per_head:
        x = leaf(300, 4, N, scale=2.0, offset=-1.0)
        weight, bias = params((4, N), torch.float32)
    else:
        x = leaf(1100, N, scale=2.0, offset=-1.0)
        weight, bias = params(N, torch.float32)
    assert_match(run_both(lambda: (x, None), [x], weight, bias, False), torch.float32)


@pytest.mark.parametrize("N", [2560, 5120, 8192])
def test_model_widths(N):
    """StableLM-3B / 12B hidden sizes and N = 8192, with the residual form."""
    x, residual = leaf(2, N), leaf(2, N, offset=3.0)
    weight, bias = params(N, torch.float32)
    assert_match(run_both(lambda: (x, residual), [x, residual], weight, bias, True), torch.float32)


@pytest.mark.parametrize("trainable", ["x", "weight", "residual"])
def test_partial_requires_grad(trainable):
    """Only some inputs need grads (a frozen LM, or a frozen norm): the others get none, the rest still match."""
    N = 12
    x = leaf(3, N).detach().requires_grad_(trainable == "x")
    residual = leaf(3, N).detach().requires_grad_(trainable == "residual")
    weight, bias = params(N, torch.float32)
    weight.requires_grad_(trainable == "weight")
    bias.requires_grad_(trainable == "weight")
    results = run_both(lambda: (x, residual), [x, residual], weight, bias, True)
    assert_match(results, torch.float32)
    assert sum(g is not None for g in results[0][1]) == (2 if trainable == "weight" else 1)


def test_unused_sum_output_and_no_grad_path():
    N = 16
    x, residual = leaf(4, N), leaf(4, N)
    weight, bias = params(N, torch.float32)
    # Only y is used: the sum's grad is materialised as zeros, so dx = dresidual = the LN grad alone.
    dy = torch.randn(4, N, device=DEVICE)
    grads = []
    for fn in (layer_norm_triton, layer_norm_ref):
        x.grad = residual.grad = None
        y, _ = fn(x, weight, bias, EPS, residual=residual)
        y.backward(dy)
        grads.append((x.grad, residual.grad))
    torch.testing.assert_close(grads[0], grads[1], **GRAD_TOL[torch.float32])
    with torch.no_grad():
        y, s = layer_norm_triton(x, weight, bias, EPS, residual=residual)
    assert not y.requires_grad and not s.requires_grad
    ref_y, ref_s = layer_norm_ref(x.detach(), weight.detach(), bias.detach(), EPS, residual=residual.detach())
    torch.testing.assert_close(y, ref_y, **TOL[torch.float32])
    assert torch.equal(s, ref_s)


def test_constant_rows_and_empty_input():
    weight, bias = params(10, torch.float32)
    with torch.no_grad():
        x = torch.full((3, 10), 7.0, device=DEVICE)  # zero variance: eps keeps it finite, y = bias
        torch.testing.assert_close(layer_norm_triton(x, weight, bias, EPS), bias.expand(3, 10))
        empty = torch.randn(0, 10, device=DEVICE)
        assert layer_norm_triton(empty, weight, bias, EPS).shape == (0, 10)
    e = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    layer_norm_triton(e, weight, bias, EPS).sum().backward()
    assert e.grad.shape == (0, 10) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_registered_in_ops():
    assert "triton" in ops.available("layer_norm")
    x = torch.randn(2, 3, 8, device=DEVICE)
    weight, bias = (t.detach() for t in params(8, torch.float32))
    with ops.using(layer_norm="triton"):
        out = ops.layer_norm(x, weight, bias, EPS)
    torch.testing.assert_close(out, layer_norm_ref(x, weight, bias, EPS), **TOL[torch.float32])


def _bad(**change):
    args = dict(x=torch.randn(2, 3, 4, 8), weight=torch.ones(8), bias=torch.zeros(8), eps=EPS, residual=None)
    args.update(change)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(x=torch.randint(0, 5, (2, 8))), TypeError, "x dtype torch.int64 is not supported"),
    (_bad(x=torch.randn(2, 8, dtype=torch.float64)), TypeError, "x dtype torch.float64"),
    (_bad(weight=torch.ones(7), bias=None), ValueError, r"weight \(7,\) does not match x's last dim N=8"),
    (_bad(weight=torch.ones(3, 8), bias=None), ValueError, r"per-head weight \(3, 8\) must be \[H, N\]"),
    (_bad(weight=torch.ones(1, 4, 8)), ValueError, r"weight must be \[N\] or \[H, N\]"),
    (_bad(bias=torch.zeros(4, 8)), ValueError, r"bias \(4, 8\) must have weight's shape \(8,\)"),
    (_bad(weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight dtype torch.int32"),
    (_bad(residual=torch.randn(2, 3, 1, 8)), ValueError, r"residual \(2, 3, 1, 8\) must have x's shape"),
    (_bad(residual=torch.randn(2, 3, 4, 8, dtype=torch.float16)), TypeError, "residual dtype torch.float16"),
    (_bad(weight=torch.ones(8, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (_bad(residual=torch.randn(2, 3, 4, 8, device="meta")), ValueError, "residual is on meta"),
    (_bad(x=torch.randn(1, MAX_N + 1), weight=torch.ones(MAX_N + 1), bias=None), ValueError,
     f"N={MAX_N + 1} must be in"),
    (_bad(eps=0.0), ValueError, "eps must be positive"),
    # Leading dims [4, 2, 3] with strides (8, 96, 32): no two strides walk the rows.
    (_bad(x=torch.randn(2, 3, 4, 8).permute(2, 0, 1, 3)), ValueError,
     r"x with shape \(4, 2, 3, 8\) and strides \(8, 96, 32, 1\) cannot be addressed"),
    (_bad(x=torch.randn(4, 2, 3, 8), residual=torch.randn(2, 3, 4, 8).permute(2, 0, 1, 3)), ValueError,
     "residual with shape .* cannot be addressed"),
])
def test_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        layer_norm_triton(**args)


# ----------------------------------------------------------------------------------------------------------------
# GPU, real sizes: bfloat16 against a float32 reference

def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _gpu_check(x, residual, weight, bias, leaves):
    """Forward and backward in bf16 vs the float32 reference on the same (upcast) values."""
    out = layer_norm_triton(x, weight, bias, EPS, residual=residual)
    outs = out if residual is not None else (out,)
    out_grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, out_grads)
    params_ = [weight] + ([bias] if bias is not None else [])
    ref_leaves = [t.detach().float().requires_grad_() for t in [*leaves, *params_]]
    by_id = {id(t): r for t, r in zip([*leaves, *params_], ref_leaves)}
    ref_out = layer_norm_ref(*(by_id.get(id(t), t) for t in (x, weight, bias)), EPS,
                             residual=None if residual is None else by_id[id(residual)])
    ref_outs = ref_out if residual is not None else (ref_out,)
    torch.autograd.backward(ref_outs, [g.float() for g in out_grads])
    for o, r in zip(outs, ref_outs):
        assert _rel_err(o, r) < 1e-2
    for t, r in zip([*leaves, *params_], ref_leaves):
        assert _rel_err(t.grad, r.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("N", [2560, 5120, 8192, MAX_N])
def test_gpu_residual_rows(N):
    rows = 4096 if N <= 5120 else 256
    x = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    residual = (torch.randn(rows, N, device="cuda") + 0.5).to(torch.bfloat16).requires_grad_()
    weight, bias = params(N, torch.bfloat16)
    _gpu_check(x, residual, weight, bias, [x, residual])


@pytest.mark.gpu
def test_gpu_per_head_on_fused_qkv():
    """StableLM-2-12B style q norm on the q part of a fused QKV output [8, 2048, 32 + 2 * 32, 80]."""
    B, S, H, D = 8, 2048, 32, 80
    qkv = torch.randn(B, S, 3 * H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, _ = params((H, D), torch.bfloat16, bias=False)
    q = qkv[:, :, :H]
    out = layer_norm_triton(q, weight, None, EPS)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref_q = qkv.detach()[:, :, :H].float().requires_grad_()
    ref_w = weight.detach().float().requires_grad_()
    ref = layer_norm_ref(ref_q, ref_w, None, EPS)
    ref.backward(dy.float())
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(qkv.grad[:, :, :H], ref_q.grad) < 1e-2
    assert torch.count_nonzero(qkv.grad[:, :, H:]) == 0
    assert _rel_err(weight.grad, ref_w.grad) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_rows_no_grad():
    """The decode step: a handful of rows, inference only, the sum handed on as the next residual."""
    x = torch.randn(8, 1, 2560, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight, bias = (t.detach() for t in params(2560, torch.bfloat16))
    with torch.no_grad():
        y, s = layer_norm_triton(x, weight, bias, EPS, residual=residual)
    ref_y, _ = layer_norm_ref(x.float(), weight, bias, EPS, residual=residual.float())
    assert _rel_err(y, ref_y) < 1e-2 and torch.equal(s, x + residual)
