"""Triton SwiGLU against its reference: forward and both gradients on the halves of a fused gate_up output and
other strided views, plus input validation (CPU interpreter; GPU test at StableLM-3B size)."""
import pytest
import torch

import stablelm.ops as ops
from kernels.mlp import swiglu_ref, swiglu_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 math rounded once to the dtype (about one ulp of the dtype).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def fused(*lead, inter, dtype, scale=3.0):
    """A fused [..., 2 * inter] projection output as a leaf; values spread over silu's curved range."""
    return (scale * torch.randn(*lead, 2 * inter, device=DEVICE)).to(dtype).requires_grad_()


def run_both(make_inputs, leaves, grad=None):
    """(output, grads of `leaves`) from Triton and from the reference on the same inputs and output grad."""
    results = []
    for fn in (swiglu_triton, swiglu_ref):
        for t in leaves:
            t.grad = None
        out = fn(*make_inputs())
        if grad is None:
            grad = torch.randn(out.shape, device=DEVICE).to(out.dtype)
        out.backward(grad)
        results.append((out.detach(), [t.grad.clone() if t.grad is not None else None for t in leaves]))
    return results


def assert_match(results, dtype):
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,inter", [((2, 3), 45), ((5,), 1100), ((), 7)])
def test_fused_halves_match_reference(lead, inter, dtype):
    """gate and up are the two halves of one fused output (strided views, no copies); I not a power of two."""
    gate_up = fused(*lead, inter=inter, dtype=dtype)
    results = run_both(lambda: gate_up.split(inter, dim=-1), [gate_up])
    assert_match(results, dtype)


def test_separate_tensors_and_strided_layouts():
    """Separate leaves, a transposed view (rows need two strides) and a last dim of stride 2."""
    gate = fused(3, 4, inter=12, dtype=torch.float32)
    up = fused(4, 3, inter=12, dtype=torch.float32)
    layouts = [
        lambda: (gate[..., :12], up[..., 12:].transpose(0, 1)),
        lambda: (gate[..., ::2], up.transpose(0, 1)[..., 1::2]),
    ]
    for make in layouts:
        assert_match(run_both(make, [gate, up]), torch.float32)


@pytest.mark.parametrize("trainable", ["gate", "up"])
def test_one_input_requires_grad(trainable):
    gate = fused(6, inter=10, dtype=torch.float32).detach().requires_grad_(trainable == "gate")
    up = fused(6, inter=10, dtype=torch.float32).detach().requires_grad_(trainable == "up")
    results = run_both(lambda: (gate, up), [gate, up])
    assert_match(results, torch.float32)
    assert [g is not None for g in results[0][1]] == [trainable == "gate", trainable == "up"]


def test_no_grad_path_and_empty_input():
    gate_up = fused(4, inter=9, dtype=torch.float32)
    with torch.no_grad():
        out = swiglu_triton(*gate_up.split(9, dim=-1))
        assert not out.requires_grad
        torch.testing.assert_close(out, swiglu_ref(*gate_up.split(9, dim=-1)), **TOL[torch.float32])
        assert swiglu_triton(torch.randn(0, 9), torch.randn(0, 9)).shape == (0, 9)


def test_gradient_of_unusual_layout():
    """An expanded (stride 0) incoming grad, as from out.sum(), is read as is."""
    gate_up = fused(3, 2, inter=5, dtype=torch.float32)
    grads = []
    for fn in (swiglu_triton, swiglu_ref):
        gate_up.grad = None
        fn(*gate_up.split(5, dim=-1)).sum().backward()
        grads.append(gate_up.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float32])


def test_registered_in_ops():
    assert "triton" in ops.available("swiglu")
    gate, up = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE)
    with ops.using(swiglu="triton"):
        out = ops.swiglu(gate, up)
    torch.testing.assert_close(out, swiglu_ref(gate, up), **TOL[torch.float32])
    torch.testing.assert_close(ops.implementation("swiglu", "triton")(gate, up), out, rtol=0, atol=0)
    assert ops.implementation("swiglu", "torch") is swiglu_ref
    with pytest.raises(KeyError, match="no implementation 'nope'"):
        ops.implementation("swiglu", "nope")


@pytest.mark.parametrize("gate,up,error,match", [
    (torch.randn(2, 8), torch.randn(2, 7), ValueError, r"gate \(2, 8\) and up \(2, 7\) must have the same shape"),
    (torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float16), TypeError, "up dtype torch.float16 must equal"),
    (torch.randint(0, 3, (2, 8)), torch.randint(0, 3, (2, 8)), TypeError, "gate dtype torch.int64 is not supported"),
    (torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64), TypeError, "torch.float64"),
    (torch.randn(2, 8), torch.randn(2, 8, device="meta"), ValueError, "up is on meta but gate is on cpu"),
    (torch.randn(()), torch.randn(()), ValueError, "at least one dim"),
    # Leading dims [4, 2, 3] with strides (8, 96, 32): no two strides walk the rows.
    (torch.randn(2, 3, 4, 8).permute(2, 0, 1, 3), torch.randn(4, 2, 3, 8), ValueError,
     r"gate with shape \(4, 2, 3, 8\) and strides \(8, 96, 32, 1\) cannot be addressed"),
])
def test_rejects_bad_input(gate, up, error, match):
    with pytest.raises(error, match=match):
        swiglu_triton(gate, up)


# ----------------------------------------------------------------------------------------------------------------
# GPU, real sizes

def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4096, 1])
def test_gpu_stablelm_3b_fused_view(rows):
    """bf16 on the halves of a [rows, 2 * 6912] gate_up output vs the float32 reference, forward and backward."""
    inter = 6912
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = swiglu_triton(*gate_up.split(inter, dim=-1))
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_in = gate_up.detach().float().requires_grad_()
    ref = swiglu_ref(*ref_in.split(inter, dim=-1))
    ref.backward(dout.float())
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(gate_up.grad[:, :inter], ref_in.grad[:, :inter]) < 1e-2
    assert _rel_err(gate_up.grad[:, inter:], ref_in.grad[:, inter:]) < 1e-2
