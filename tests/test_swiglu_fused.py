"""swiglu_fused(gate_up) (kernels/mlp.py): the op on the fused [gate | up] projection output, whose backward writes
both gradients into one [..., 2I] buffer; against the reference with gradients, per dtype; the model's MLP uses it
and an explicit swiglu choice still reaches the model."""
import pytest
import torch

from kernels.mlp import swiglu_fused_ref, swiglu_fused_triton, swiglu_ref
from stablelm import ops
from stablelm.config import preset
from stablelm.model import StableLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Both sides compute in float32 and round once to the dtype (output and each gradient): at most an ulp apart.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 80), (7, 2 * 1100), (1, 1, 2)])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference_with_grads(shape, dtype, strided):
    gen = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    full = (torch.randn(*shape[:-1], n + (6 if strided else 0), generator=gen) * 3).to(DEVICE, dtype)
    upstream = torch.randn(*shape[:-1], n // 2, generator=gen).to(DEVICE, dtype)
    results = []
    for fn in (swiglu_fused_triton, swiglu_fused_ref):
        leaf = full.clone().requires_grad_()
        x = leaf[..., :n]  # a row-strided view of a wider tensor when strided
        assert x.is_contiguous() != strided or n == 2
        y = fn(x)
        y.backward(upstream)
        results.append((y, leaf.grad))
    (y, g), (y_ref, g_ref) = results
    assert y.dtype == dtype and y.shape == (*shape[:-1], n // 2)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert g.dtype == dtype
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


def test_backward_is_one_node_into_one_buffer():
    """No split / cat in the graph: the op's backward node feeds the input's gradient directly."""
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    y = swiglu_fused_triton(x)
    assert type(y.grad_fn).__name__ == "_SwiGLUFusedFunctionBackward"
    assert y.grad_fn.next_functions[0][0].variable is x
    x.grad = None
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape and x.grad.is_contiguous()


def test_no_grad_path_and_errors():
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(swiglu_fused_triton(x), swiglu_ref(x[:, :8], x[:, 8:]), **TOL[torch.float32])
    with pytest.raises(ValueError, match="even dim"):
        swiglu_fused_triton(torch.randn(3, 15, device=DEVICE))
    with pytest.raises(TypeError, match="dtype torch.int32"):
        swiglu_fused_ref(torch.ones(2, 4, dtype=torch.int32))


def test_model_uses_it_and_explicit_swiglu_choice_still_applies():
    cfg = preset("tiny")
    model = StableLM.random(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    calls = []

    def spy(gate, up):
        calls.append(gate.shape)
        return swiglu_ref(gate, up)

    ops.register("swiglu", "spy", spy)
    with torch.no_grad():
        want = model(ids)
        with ops.using(swiglu="spy"):
            got = model(ids)
    assert len(calls) == cfg.num_hidden_layers and torch.equal(got, want)
