"""Skinny matmul (kernels/gemv.py): float / int8 / int4 weights, CUDA-core and tensor-core kernels, K splits, bias,
against the float32 reference on the same (dequantised) weights; argument errors; GPU tests at StableLM-3B shapes."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kernels.gemv import GemvConfig, check_config, choose_config, gemv, linear_ref, linear_triton
from kernels.quant import dequantize_weight, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Same weights, only the float32 summation order differs, then both round to x's dtype.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make(M, N, K, bits, dtype, group_size=32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    w = torch.randn(N, K, generator=gen).to(DEVICE)
    b = (torch.randn(N, generator=gen) * 0.5).to(DEVICE, dtype) if bias else None
    if bits == 16:
        w = w.to(dtype)
        return x, (w, None, None), b, w.float()
    q, s, z = quantize_weight(w, bits, group_size)
    return x, (q, s, z), b, dequantize_weight(q, s, z, bits, group_size)


def reference(x, w_float, b):
    return F.linear(x.float(), w_float, None if b is None else b.float())


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


# ------------------------------------------------------------------------------------------------ CPU (interpreter)
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("cfg", [GemvConfig(1, 16, 32), GemvConfig(1, 8, 64, split_k=3),
                                 GemvConfig(16, 16, 32), GemvConfig(16, 32, 16, split_k=2)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_gemv_matches_reference(bits, cfg, M):
    # N = 37 (no multiple of any block_n), K = 224: a remainder tile for float / int8 at block_k 64,
    # 7 groups of 32 for int4.
    if cfg.block_m == 16 and M == 1 and bits == 16:
        M = 2
    if bits == 4:
        cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, 32))  # inside one group of 32
    dtype = torch.float32 if cfg.block_m > 1 else torch.float16
    x, (w, s, z), b, wf = make(M, 37, 224, bits, dtype, seed=M + bits)
    out = gemv(x, w, s, z, b, bits, 32, config=cfg)
    check(out, reference(x, wf, b), dtype)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_gemv_fp16_tensor_core_path(bits):
    # fp16 x through tl.dot: int4 codes go in as 128 + code (fp16 exponent trick) and are corrected per group.
    x, (w, s, z), b, wf = make(5, 40, 128, bits, torch.float16, seed=3)
    out = gemv(x, w, s, z, b, bits, 32, config=GemvConfig(16, 16, 32))
    check(out, reference(x, wf, b), torch.float16)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_gemv_bf16_cuda_core_path(bits):
    x, (w, s, z), b, wf = make(1, 33, 96, bits, torch.bfloat16, seed=5)
    out = gemv(x, w, s, z, b, bits, 32, config=GemvConfig(1, 8, 32, split_k=2))
    check(out, reference(x, wf, b), torch.bfloat16)


@pytest.mark.parametrize("M", [1, 2, 9])
def test_gemv_default_config_and_no_bias(M):
    for bits in (16, 8, 4):
        x, (w, s, z), _, wf = make(M, 48, 256, bits, torch.float32, bias=False, seed=M)
        check(gemv(x, w, s, z, None, bits, 32), reference(x, wf, None), torch.float32)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_gemv_loop_path_and_short_last_split(bits, monkeypatch):
    import kernels.gemv as G
    # K = 320: 10 tiles of 32 in splits of 4 -> 4 + 4 + 2 (the last split's two trailing tiles are past K).
    x, (w, s, z), b, wf = make(2, 19, 320, bits, torch.float32, seed=13)
    for unroll in (16, 1):
        monkeypatch.setattr(G, "MAX_UNROLL", unroll)
        out = gemv(x, w, s, z, b, bits, 32, config=GemvConfig(1, 8, 32, split_k=3))
        check(out, reference(x, wf, b), torch.float32)


def test_int4_wide_rows_and_large_values():
    # Offsets and magnitudes far from 0/1: the exponent trick must give exact codes, zeros added per group.
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(21, 64, generator=gen) * 30 + 100).to(DEVICE)
    q, s, z = quantize_weight(w, 4, 16)
    x = torch.randn(2, 64, generator=gen).to(DEVICE)
    for cfg in (GemvConfig(1, 4, 16), GemvConfig(16, 16, 16)):
        out = gemv(x, q, s, z, None, 4, 16, config=cfg)
        torch.testing.assert_close(out, reference(x, dequantize_weight(q, s, z, 4, 16), None), rtol=1e-5, atol=1e-3)


def test_int8_extreme_codes():
    w = torch.tensor([[1.0, -1.0, 0.5, -0.25] * 8, [-3.0] * 32], device=DEVICE)
    q, s, _ = quantize_weight(w, 8)
    assert q.min() == -127 and q.max() == 127
    x = torch.randn(1, 32, device=DEVICE)
    out = gemv(x, q, s, None, None, 8, 128, config=GemvConfig(1, 2, 16))
    torch.testing.assert_close(out, reference(x, dequantize_weight(q, s, None, 8, 128), None))


def test_non_contiguous_x_and_views():
    x, (w, s, z), b, wf = make(6, 24, 64, 8, torch.float32, seed=11)
    xt = x.t().contiguous().t()  # column-major
    check(gemv(xt, w, s, z, b, 8, 32, config=GemvConfig(1, 8, 16)), reference(x, wf, b), torch.float32)


def test_linear_op_matches_f_linear():
    x = torch.randn(2, 3, 40, device=DEVICE)
    w = torch.randn(30, 40, device=DEVICE)
    b = torch.randn(30, device=DEVICE)
    out = linear_triton(x, w, b)
    assert out.shape == (2, 3, 30)
    torch.testing.assert_close(out, linear_ref(x, w, b), **TOL[torch.float32])
    # Large M (prefill) and autograd fall back to F.linear.
    big = torch.randn(70, 40, device=DEVICE)
    torch.testing.assert_close(linear_triton(big, w, None), F.linear(big, w))
    wg = w.clone().requires_grad_()
    linear_triton(x, wg, b).sum().backward()
    assert wg.grad is not None


def test_choose_config_is_valid():
    dev = torch.device(DEVICE)
    for M in (1, 2, 16, 33, 64):
        for N, K in ((7680, 2560), (2560, 6912), (50304, 2560), (37, 224)):
            for bits in (16, 8, 4):
                check_config(choose_config(M, N, K, bits, 32, dev), bits, 32)


def test_errors():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="block_m"):
        check_config(GemvConfig(8, 16, 16), 16, 128)
    with pytest.raises(ValueError, match="divide group_size"):
        check_config(GemvConfig(1, 16, 64), 4, 32)
    with pytest.raises(ValueError, match="x's dtype"):
        gemv(x, torch.randn(4, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="int8"):
        gemv(x, torch.zeros(4, 32, dtype=torch.int8), None, None, None, 8)
    with pytest.raises(ValueError, match="bits"):
        gemv(x, torch.randn(4, 32), bits=2)


# ------------------------------------------------------------------------------------------------ GPU
SHAPES_3B = {"qkv": (7680, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912),
             "lm_head": (50304, 2560)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES_3B))
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_gpu_3b_shapes(name, bits, M):
    N, K = SHAPES_3B[name]
    x, (w, s, z), b, wf = make(M, N, K, bits, torch.bfloat16, group_size=128, bias=False, seed=M)
    out = gemv(x, w, s, z, None, bits, 128)
    ref = reference(x, wf, None)
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 4e-3, rel  # bf16 output rounding is 2^-9 relative per element


@pytest.mark.gpu
def test_gpu_split_and_tile_variants():
    N, K = SHAPES_3B["down"]
    for bits in (16, 8, 4):
        x, (w, s, z), b, wf = make(3, N, K, bits, torch.bfloat16, group_size=128, seed=bits)
        ref = reference(x, wf, b)
        for cfg in (GemvConfig(1, 16, 256 if bits != 4 else 128, 4), GemvConfig(1, 64, 128, 1, 8),
                    GemvConfig(1, 32, 64, 1), GemvConfig(16, 64, 128, 3), GemvConfig(32, 128, 64, 1, 8)):
            out = gemv(x, w, s, z, b, bits, 128, config=cfg)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            assert rel < 4e-3, (cfg, rel)
