"""NF4 with double-quantized block scales (kernels/nf4.py): the code table, format round trips, Triton forward
(decode GEMV, tiled GEMM, split-K) and input-gradient GEMM against the reference, NF4Linear / quantize_model /
quantize_state_dict / checkpoint loading (stablelm/quantize.py), and accuracy bounds against the float layer and
the float model (the same kinds of bounds as tests/test_quant.py gives int8 / int4)."""
import pytest
import torch
import torch.nn as nn

import stablelm.checkpoint as ckpt
import torch.nn.functional as F

from kernels.nf4 import (DQ_BLOCK, NF4_VALUES, NF4Config, choose_config, dequantize_absmax, dequantize_nf4,
                         dequantize_nf4_triton, double_quantize, nf4_grad_input, nf4_linear_ref, nf4_linear_triton,
                         nf4_matmul, quantize_nf4)
from kernels.quant import DEQUANT_MATMUL_MIN_ROWS, pack_int4, unpack_int4
from stablelm import ops
from stablelm.config import preset
from stablelm.model import StableLM
from stablelm.quantize import NF4Linear, quantize_model, quantize_state_dict

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton vs reference on the same quantized weights: fp32 differs in summation order only; fp16 rounds the
# dequantized weight tile to fp16 before tl.dot (2^-11 relative per weight) and the output to fp16.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=4e-3, atol=4e-3)}
# The QLoRA paper's published NF4 table (Appendix E), which NF4_VALUES derives from the normal quantiles.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
# Float vs NF4 nn.Linear on gaussian weights, ||y_q - y|| / ||y||, 16 rows, K = 256, block 64: measured 0.090-0.091
# over 3 seeds (int4 measures 0.098-0.104 at group 128, 0.079 at group 32 with 6 bits per weight; NF4 block 64 is
# 4.127 bits).
LINEAR_REL_ERR = 1.1e-1
# The whole tiny model (block 32: its intermediate size 352 is no multiple of 64), logits: measured over 3 seeds
# 0.150-0.156 with the lm_head float, 0.177-0.179 with it NF4 too; top-1 agreement 0.67-0.83 (int4 group 32:
# 0.126-0.151, 0.77-1.0).
MODEL_REL_ERR = 2e-1


def quantized(N, K, block=64, bias=True, seed=0, scale=None):
    """Gaussian weights of std K^-1/2 by default (outputs of order 1, so fp16's absolute tolerance means the
    same at every K)."""
    scale = K ** -0.5 if scale is None else scale
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * scale
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    return tuple(t.to(DEVICE) for t in quantize_nf4(w, block)), b, w


# ------------------------------------------------------------------------------------------------ format
def test_code_table_is_the_published_nf4():
    assert NF4_VALUES.dtype == torch.float32 and NF4_VALUES[7] == 0 and NF4_VALUES[0] == -1 and NF4_VALUES[15] == 1
    assert torch.allclose(NF4_VALUES, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)


def test_pack_unpack_identity_and_nibble_order():
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8)).item() == 3 | (12 << 4)


def test_double_quantization_shapes_and_error():
    gen = torch.Generator().manual_seed(1)
    absmax = torch.rand(7, 100, generator=gen) * 3 + 0.5  # 700 blocks: 3 runs of 256, the last one partial
    codes, scale, mean = double_quantize(absmax)
    assert codes.dtype == torch.int8 and codes.shape == (7, 100)
    assert scale.shape == (-(-700 // DQ_BLOCK),) and scale.dtype == torch.float32 and mean.shape == (1,)
    assert torch.allclose(mean, absmax.mean().reshape(1))
    back = dequantize_absmax(codes, scale, mean)
    run = torch.arange(700) // DQ_BLOCK
    # Within half a second-level step of the fp32 value, and the step is really used (not a lossless copy).
    err = (back - absmax).abs().reshape(-1)
    assert bool((err <= scale[run] / 2 + 1e-6).all())
    assert err.max() > 0


@pytest.mark.parametrize("block", [64, 32, 128])
def test_round_trip_within_half_the_widest_gap(block):
    (q, a, s, m), _, w = quantized(24, 256, block, seed=block, scale=1.0)
    assert q.shape == (24, 128) and q.dtype == torch.uint8 and a.shape == (24, 256 // block)
    deq = dequantize_nf4(q, a, s, m, block).cpu()
    scale = dequantize_absmax(a, s, m).cpu().repeat_interleave(block, dim=1).abs()
    half_gap = (NF4_VALUES[1:] - NF4_VALUES[:-1]).max() / 2
    clamped = (w.abs() - scale).clamp(min=0)  # weights above a scale rounded down by the second level
    assert bool(((deq - w).abs() <= half_gap * scale + clamped + 1e-6).all())
    # Each block's largest weight maps to +-1 (the scale is its absmax up to the second-level rounding).
    assert ((deq - w).norm() / w.norm()) < 0.12


def test_zero_and_constant_blocks():
    w = torch.randn(4, 128)
    w[0, :64] = 0
    w[1] = 0.5
    q = quantize_nf4(w)
    deq = dequantize_nf4(*q)
    assert torch.isfinite(deq).all()
    # A zero block's scale and a constant block's values are off by at most half a second-level step.
    half_step = q[2][0].item() / 2
    assert deq[0, :64].abs().max() <= half_step + 1e-6
    assert torch.allclose(deq[1], torch.full((128,), 0.5), atol=half_step + 1e-6, rtol=0)
    assert (deq[1] == deq[1, 0]).all()  # constant stays constant (every weight is the block's +-1 code)


def test_quantize_bf16_and_meta_weights():
    w = torch.randn(16, 128)
    ref = quantize_nf4(w)
    for got, want in zip(quantize_nf4(w.bfloat16()), quantize_nf4(w.bfloat16().float())):
        assert torch.equal(got, want)
    meta = quantize_nf4(torch.empty(16, 128, device="meta"))
    assert [(t.shape, t.dtype) for t in meta] == [(t.shape, t.dtype) for t in ref]


def test_registered_in_op_table():
    assert ops.available("nf4_linear") == ["torch", "triton"]
    assert ops.current("nf4_linear", "cpu") == "torch"


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,block,bias", [(1, 96, 256, 64, True), (5, 40, 128, 32, False),
                                              (33, 96, 256, 64, True), (80, 72, 192, 64, False)])
def test_triton_forward_matches_reference(M, N, K, block, bias, dtype):
    (q, a, s, m), b, _ = quantized(N, K, block, bias, seed=M)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = None if b is None else b.to(dtype)
    got = nf4_linear_triton(x, q, a, s, m, b, block)
    want = nf4_linear_ref(x, q, a, s, m, b, block)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("config", [NF4Config(1, 16, 32, split_k=4), NF4Config(16, 32, 16, split_k=3),
                                    NF4Config(32, 64, 64, split_k=1)])
def test_explicit_tilings_and_split_k(config):
    (q, a, s, m), b, _ = quantized(50, 256, 64, seed=2)
    x = torch.randn(config.block_m + 3, 256, device=DEVICE)
    got = nf4_matmul(x, q, a, s, m, b, 64, config)
    torch.testing.assert_close(got, nf4_linear_ref(x, q, a, s, m, b, 64), **TOL[torch.float32])


def test_heuristic_splits_skinny_inputs_only():
    assert choose_config(1, 96, 2560, 64, torch.device(DEVICE)).split_k > 1
    assert choose_config(512, 96, 2560, 64, torch.device(DEVICE)).split_k == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,N,K,block", [((2, 7), 96, 256, 64), ((70,), 40, 128, 32), ((3,), 24, 64, 64)])
def test_triton_input_grad_matches_reference(shape, N, K, block, dtype):
    """grad_x through the autograd.Function (Triton GEMM, weight dequantized in-kernel) vs autograd through the
    reference; bias gets its gradient; the quantized tensors stay bit-identical."""
    (q, a, s, m), b, _ = quantized(N, K, block, seed=N)
    frozen = [t.clone() for t in (q, a, s, m)]
    x = torch.randn(*shape, K, device=DEVICE, dtype=dtype)
    bias = b.to(dtype)
    upstream = torch.randn(*shape, N, device=DEVICE, dtype=dtype)
    grads = []
    for fn in (nf4_linear_triton, nf4_linear_ref):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(xi, q, a, s, m, bi, block).backward(upstream)
        grads.append((xi.grad, bi.grad))
    (gx, gb), (rx, rb) = grads
    assert gx.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(gx, rx, **TOL[dtype])
    torch.testing.assert_close(gb, rb, **TOL[dtype])
    assert all(torch.equal(t, f) for t, f in zip((q, a, s, m), frozen))


def test_grad_input_kernel_tilings():
    (q, a, s, m), _, _ = quantized(100, 256, 64, bias=False, seed=3)
    g = torch.randn(20, 100, device=DEVICE)
    want = g @ dequantize_nf4(q, a, s, m)
    for bm, bn, bk in ((16, 16, 16), (32, 64, 64), (16, 128, 32)):
        torch.testing.assert_close(nf4_grad_input(g, q, a, s, m, 64, bm, bn, bk), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 64])
def test_dequantize_triton_is_the_reference_weight_rounded_once(block, dtype):
    q = [t.to(DEVICE) for t in quantize_nf4(torch.randn(70, 192, generator=torch.Generator().manual_seed(block)),
                                            block)]  # 70 rows: a partial block of rows
    got = dequantize_nf4_triton(*q, block, dtype)
    assert got.dtype == dtype and got.shape == (70, 192)
    want = dequantize_nf4(*q, block)
    ulp = {torch.float32: 2 ** -22, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_rows_multiply_the_dequantized_weight(dtype):
    """From DEQUANT_MATMUL_MIN_ROWS rows nf4_linear_triton is exactly F.linear over dequantize_nf4_triton's weight,
    forward and input gradient (cuBLAS instead of the fused kernels), and within tolerance of the reference."""
    N, K, M, block = 40, 256, DEQUANT_MATMUL_MIN_ROWS, 64
    gen = torch.Generator().manual_seed(11)
    q = [t.to(DEVICE) for t in quantize_nf4(torch.randn(N, K, generator=gen) * K ** -0.5, block)]
    x = torch.randn(2, M // 2, K, generator=gen).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    upstream = torch.randn(2, M // 2, N, generator=gen).to(DEVICE, dtype)
    out = nf4_linear_triton(x, *q, bias, block)
    out.backward(upstream)
    w = dequantize_nf4_triton(*q, block, dtype)
    assert torch.equal(out, F.linear(x.detach(), w, bias))
    assert torch.equal(x.grad.reshape(M, K), upstream.reshape(M, N) @ w)
    xr = x.detach().clone().requires_grad_()
    ref = nf4_linear_ref(xr, *q, bias, block)
    ref.backward(upstream)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[dtype])


def test_argument_errors():
    (q, a, s, m), _, _ = quantized(8, 128, 64, bias=False)
    x = torch.randn(2, 128, device=DEVICE)
    for impl in (nf4_linear_ref, nf4_linear_triton):
        with pytest.raises(ValueError, match="must end in in_features K=128"):
            impl(torch.randn(2, 64, device=DEVICE), q, a, s, m, None, 64)
        with pytest.raises(ValueError, match="absmax must be int8"):
            impl(x, q, a.float(), s, m, None, 64)
        with pytest.raises(ValueError, match="block_size 48 does not divide|multiple of 16"):
            impl(x, q, a, s, m, None, 48)
        with pytest.raises(TypeError, match="x dtype torch.int32"):
            impl(x.int(), q, a, s, m, None, 64)
    with pytest.raises(ValueError, match="block_k 64 must divide block_size 32"):
        q32 = quantize_nf4(torch.randn(8, 128), 32)
        nf4_matmul(x, *[t.to(DEVICE) for t in q32], None, 32, NF4Config(16, 16, 64))


# ------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nf4_linear_close_to_linear(impl):
    linear = nn.Linear(256, 96).to(DEVICE)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(16, 256, device=DEVICE)
    ql = NF4Linear.from_linear(linear)
    assert (ql.in_features, ql.out_features, ql.group_size) == (256, 96, 64)
    with torch.no_grad(), ops.using(nf4_linear=impl):
        y, yq = linear(x), ql(x)
    rel = ((yq - y).norm() / y.norm()).item()
    assert 0.05 < rel < LINEAR_REL_ERR, rel  # and really quantized (the bound is not vacuous)


def test_nf4_linear_state_dict():
    lin = nn.Linear(128, 24)
    q = NF4Linear.from_linear(lin)
    assert {k: (tuple(v.shape), v.dtype) for k, v in q.state_dict().items()} == {
        "qweight": ((24, 64), torch.uint8), "absmax": ((24, 2), torch.int8), "absmax_scale": ((1,), torch.float32),
        "absmax_mean": ((1,), torch.float32), "bias": ((24,), torch.float32)}
    fresh = NF4Linear.from_linear(nn.Linear(128, 24))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_state_dict_conversion_matches_quantize_model_and_loads(tmp_path):
    cfg = preset("tiny", qk_layernorm=True, use_qkv_bias=True)
    model = StableLM.random(cfg, seed=1)
    # The tiny preset's intermediate size 352 is a multiple of 32, not of 64.
    tensors = quantize_state_dict(model.state_dict(), 4, 32, fmt="nf4")
    quantize_model(model, 4, 32, fmt="nf4")
    assert isinstance(model.layers[0].attn.qkv, NF4Linear) and isinstance(model.lm_head, nn.Linear)  # skipped
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    ckpt.write_project_dir(tmp_path, cfg, tensors, {"bits": 4, "group_size": 32, "format": "nf4"})
    loaded = ckpt.load(tmp_path)
    assert isinstance(loaded.layers[1].mlp.down, NF4Linear)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # A dtype cast at load keeps the second-level scales float32 (as int8 / int4 keep their scales).
    half = ckpt.load(tmp_path, dtype="bf16")
    assert half.layers[0].attn.qkv.absmax_scale.dtype == torch.float32


def test_converter_writes_nf4_and_load_trains_through_it(tmp_path):
    """`python -m stablelm convert SRC DST --quant nf4`: the format's tensors and metadata on disk; load() gives
    NF4Linear modules whose logits are close to the float model's, and gradients flow to the input embeddings."""
    from hf_utils import save_random_hf_checkpoint

    from stablelm.cli import main as cli_main
    src = save_random_hf_checkpoint(tmp_path / "hf", intermediate_size=192)  # the layers' K: 64 and 192
    assert cli_main(["convert", str(src), str(tmp_path / "nf4"), "--quant", "nf4"]) in (0, None)
    meta = __import__("json").loads((tmp_path / "nf4" / "config.json").read_text())
    assert meta["quantization"] == {"bits": 4, "group_size": 64, "format": "nf4"}
    model = ckpt.load(tmp_path / "nf4")
    float_model = ckpt.load(src)
    assert isinstance(model.layers[0].mlp.gate_up, NF4Linear) and model.layers[0].mlp.down.group_size == 64
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        got, want = model(ids), float_model(ids)
    assert ((got - want).norm() / want.norm()).item() < MODEL_REL_ERR
    embeds = model.embed(ids).detach().requires_grad_()
    model.loss(input_embeds=embeds, labels=ids).backward()
    assert embeds.grad.abs().max() > 0


def test_format_errors():
    with pytest.raises(ValueError, match="nf4 is a 4-bit format"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), 8, 64, fmt="nf4")
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), 4, 64, fmt="fp4")
    with pytest.raises(ValueError, match=r"layer '0': .*block_size 64 does not divide in_features K=96"):
        quantize_model(nn.Sequential(nn.Linear(96, 64)), 4, 64, fmt="nf4")


@pytest.mark.parametrize("skip", [("lm_head",), ()])
def test_quantized_model_logits_close_to_float(skip):
    cfg = preset("tiny")
    ref = StableLM.random(cfg, seed=5, device=DEVICE)
    model = quantize_model(StableLM.random(cfg, seed=5, device=DEVICE), 4, 32, skip=skip, fmt="nf4")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    with torch.no_grad(), ops.using(nf4_linear="triton"):
        want, got = ref(ids), model(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < MODEL_REL_ERR, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.6


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 190, 1520])
@pytest.mark.parametrize("K,N", [(2560, 7680), (6912, 2560)])
def test_gpu_bf16_stablelm_sizes_forward_and_grad(M, K, N):
    (q, a, s, m), _, _ = quantized(N, K, 64, bias=False, seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = nf4_linear_triton(x, q, a, s, m, None, 64)
    w = dequantize_nf4(q, a, s, m)
    ref = x.detach().float() @ w.t()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    g = torch.randn_like(out)
    out.backward(g)
    ref_dx = g.float() @ w
    assert ((x.grad.float() - ref_dx).norm() / ref_dx.norm()).item() < 1e-2
