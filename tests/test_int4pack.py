"""kernels/int4pack.py: batch-1 int4 through torch's tinygemm kernel against quant_linear's reference (GPU), and
when the "triton" quant_linear routes to it (CPU and GPU)."""
import types

import pytest
import torch

from kernels import int4pack
from kernels.quant import quant_linear_ref, quant_linear_tiled, quant_linear_triton, quantize_weight

# quant_linear's bfloat16 contract tolerance (kernels/quant.py _QUANT_TOL): tinygemm's bfloat16 scales and zeros
# (2^-9 relative per group) stay inside it.
RTOL, ATOL = 1e-2, 1.6e-2


def _int4(N, K, group, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * K ** -0.5
    return tuple(t.to(device) for t in quantize_weight(w, 4, group))


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_usable_only_where_tinygemm_takes_the_call():
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not int4pack.usable(x, 96, 256, 128)  # CPU
    meta = torch.empty(1, 256, dtype=torch.bfloat16, device="meta")
    assert not int4pack.usable(meta, 96, 256, 128)
    assert int4pack._inner_k_tiles(2560) == 8 and int4pack._inner_k_tiles(96) == 2
    assert int4pack._inner_k_tiles(48) is None


def test_usable_checks_shape_dtype_and_tracing(monkeypatch):
    """The predicate on a stand-in for a CUDA tensor (no GPU here): each condition alone turns tinygemm off."""
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert int4pack.usable(cuda_bf16, 7680, 2560, 128)
    assert not int4pack.usable(types.SimpleNamespace(is_cuda=True, dtype=torch.float16), 7680, 2560, 128)
    assert not int4pack.usable(cuda_bf16, 250, 2560, 128)  # N % 8
    assert not int4pack.usable(cuda_bf16, 7680, 48, 16)  # K % 32, and a group size tinygemm lacks
    assert not int4pack.usable(cuda_bf16, 7680, 2560, 512)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not int4pack.usable(cuda_bf16, 7680, 2560, 128)


def test_cpu_int4_row_stays_on_the_triton_kernels():
    qweight, scales, zeros = _int4(96, 256, 32, "cpu")
    x = torch.randn(1, 256)
    out = quant_linear_triton(x, qweight, scales, zeros, None, 4, 32)
    torch.testing.assert_close(out, quant_linear_ref(x, qweight, scales, zeros, None, 4, 32), rtol=1e-4, atol=1e-5)
    assert qweight not in int4pack._cache


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,group", [(96, 256, 32), (256, 512, 64), (7680, 2560, 128), (2560, 6912, 128),
                                       (128, 512, 256), (64, 96, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_int4pack_matches_the_reference(N, K, group, bias):
    qweight, scales, zeros = _int4(N, K, group, "cuda", seed=N + K)
    x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    ref = quant_linear_ref(x, qweight, scales, zeros, b, 4, group)
    out = int4pack.int4pack_linear(x, qweight, scales, zeros, b, group)
    assert out.shape == ref.shape == (1, 1, N) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert _rel(out, ref) < 5e-3
    # the Triton kernel it replaces is no closer to the reference than tinygemm needs to be
    assert _rel(quant_linear_tiled(x, qweight, scales, zeros, b, 4, group), ref) < 5e-3


@pytest.mark.gpu
def test_gpu_triton_quant_linear_routes_one_row_and_remakes_after_an_inplace_change():
    qweight, scales, zeros = _int4(512, 1024, 128, "cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    out = quant_linear_triton(x, qweight, scales, zeros, None, 4, 128)
    assert qweight in int4pack._cache
    torch.testing.assert_close(out, quant_linear_ref(x, qweight, scales, zeros, None, 4, 128), rtol=RTOL, atol=ATOL)
    other = _int4(512, 1024, 128, "cuda", seed=7)
    for t, new in zip((qweight, scales, zeros), other):
        t.copy_(new)
    out = quant_linear_triton(x, qweight, scales, zeros, None, 4, 128)
    torch.testing.assert_close(out, quant_linear_ref(x, *other, None, 4, 128), rtol=RTOL, atol=ATOL)
    # two rows, fp16 and fp32 x keep to the Triton kernels
    for xs in (torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16), x.half(), x.float()):
        fresh = qweight.clone()
        quant_linear_triton(xs, fresh, scales, zeros, None, 4, 128)
        assert fresh not in int4pack._cache


@pytest.mark.gpu
def test_gpu_int4pack_in_a_cuda_graph():
    qweight, scales, zeros = _int4(7680, 2560, 128, "cuda")
    x = torch.randn(1, 2560, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        quant_linear_triton(x, qweight, scales, zeros, None, 4, 128)  # the warm-up makes the packed copy
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_linear_triton(x, qweight, scales, zeros, None, 4, 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, quant_linear_ref(x, qweight, scales, zeros, None, 4, 128), rtol=RTOL, atol=ATOL)
