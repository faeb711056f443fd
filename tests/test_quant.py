"""Weight-only int8 / int4 quantization: format round trips, Triton quant_linear vs the reference (kernels/quant.py),
QuantLinear, quantize_model / quantize_state_dict (stablelm/quantize.py), checkpoint loading, argument errors; GPU
tests at StableLM-3B sizes."""
import pytest
import torch
import torch.nn as nn

import stablelm.checkpoint as ckpt
from bench.common import resident_bytes
from kernels.quant import (QuantMatmulConfig, choose_config, dequantize_weight, pack_int4, quant_linear_ref,
                           quant_linear_triton, quant_matmul, quantize_weight, unpack_int4)
from stablelm import ops
from stablelm.config import preset
from stablelm.model import Linear, StableLM
from stablelm.quantize import QuantLinear, quantize_model, quantize_state_dict

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton vs reference on the same quantized weights: only the fp32 summation order differs, then both round to
# x's dtype (fp16: at most an ulp, 2^-10 relative). The interpreter's tl.dot mishandles bf16 (GPU-only).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}
# Quantized vs float nn.Linear on gaussian weights, ||y_q - y|| / ||y||. Measured (K = 256..512, 16 rows):
# int8 0.0067-0.0074; int4 group 128: 0.098-0.104, group 32: 0.079 (a uniform error of step/sqrt(12), with a
# step of max|w|/127 resp. a group's range/15).
LINEAR_REL_ERR = {8: 1.2e-2, 4: 1.3e-1}


def quantized(N, K, bits, group_size, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    q, s, z = quantize_weight(w.to(DEVICE), bits, group_size)
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    return q, s, z, b


# ------------------------------------------------------------------------------------------------ format
def test_int8_round_trip_within_half_a_step():
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # row magnitudes over four decades
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s, z = quantize_weight(w, 8)
    assert q.dtype == torch.int8 and q.shape == (37, 50) and s.dtype == torch.float32 and s.shape == (37,)
    assert z is None and q.abs().max() <= 127
    err = (dequantize_weight(q, s, z, 8, 128) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert err[5].max() == 0
    # Each row's largest weight maps to +-127 exactly (the scale is not wasted).
    assert (q.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all()


@pytest.mark.parametrize("group_size", [16, 32, 48])
def test_int4_round_trip_within_half_a_step(group_size):
    N, K = 37, 96
    w = torch.randn(N, K) + torch.randn(N, 1) * 3  # offset rows: asymmetric ranges
    w[3, :group_size] = 0.25  # a constant group reconstructs exactly
    q, s, z = quantize_weight(w, 4, group_size)
    G = K // group_size
    assert q.dtype == torch.uint8 and q.shape == (N, K // 2)
    assert s.shape == z.shape == (N, G) and s.dtype == z.dtype == torch.float32
    deq = dequantize_weight(q, s, z, 4, group_size)
    err = (deq - w).abs().view(N, G, group_size)
    assert (err <= s[..., None] / 2 * (1 + 1e-5) + 1e-6).all()
    assert err[3, 0].max() == 0
    codes = unpack_int4(q).view(N, G, group_size)
    # min/max quantization uses both ends of the code range in every non-constant group.
    assert (codes.amin(dim=2) == 0).all() and (codes.amax(dim=2)[s != 1] == 15).all()


def test_pack_unpack_identity_and_nibble_order():
    codes = torch.randint(0, 16, (5, 3, 34), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 3, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]  # low nibble = even column


def test_quantize_bf16_and_meta_weights():
    w = torch.randn(24, 64)
    for bits in (8, 4):
        ref = quantize_weight(w.bfloat16().float(), bits, 32)
        got = quantize_weight(w.bfloat16(), bits, 32)
        for a, b in zip(ref, got):
            assert (a is None and b is None) or torch.equal(a, b)
        meta = quantize_weight(torch.empty(24, 64, device="meta"), bits, 32)
        for a, m in zip(ref, meta):
            assert (a is None and m is None) or (m.is_meta and m.shape == a.shape and m.dtype == a.dtype)


# ------------------------------------------------------------------------------------------------ the op
def test_registered_in_op_table():
    assert ops.available("quant_linear") == ["tiled", "torch", "triton"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("bits,N,K,group_size", [(8, 45, 100, 128), (4, 45, 96, 32)])
def test_triton_matches_reference(bits, N, K, group_size, M, bias, dtype):
    q, s, z, b = quantized(N, K, bits, group_size, bias)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    ref = quant_linear_ref(x, q, s, z, b, bits, group_size)
    out = quant_linear_triton(x, q, s, z, b, bits, group_size)
    assert out.shape == (M, N) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_bf16_single_row_matches_reference():
    # M == 1 takes the CUDA-core tile product, which the interpreter runs correctly in bf16.
    for bits in (8, 4):
        q, s, z, b = quantized(40, 64, bits, 32)
        x = torch.randn(1, 64, device=DEVICE).bfloat16()
        torch.testing.assert_close(quant_linear_triton(x, q, s, z, b, bits, 32),
                                   quant_linear_ref(x, q, s, z, b, bits, 32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("config", [
    QuantMatmulConfig(block_m=1, block_n=16, block_k=16, split_k=3),   # 5 K tiles -> splits of 2, 2, 1
    QuantMatmulConfig(block_m=16, block_n=32, block_k=16, split_k=4),  # 5 tiles -> 3 splits
    QuantMatmulConfig(block_m=16, block_n=16, block_k=16, split_k=16),  # one tile per split
])
def test_split_k_matches_reference(bits, config):
    N, K = 21, 80
    q, s, z, b = quantized(N, K, bits, 16)
    for M in (1, 5):
        x = torch.randn(M, K, device=DEVICE)
        torch.testing.assert_close(quant_matmul(x, q, s, z, b, bits, 16, config),
                                   quant_linear_ref(x, q, s, z, b, bits, 16), **TOL[torch.float32])


def test_leading_dims_and_strided_input():
    q, s, z, b = quantized(24, 64, 4, 32)
    wide = torch.randn(2, 3, 80, device=DEVICE)
    x = wide[..., 8:72]  # last dim contiguous, rows strided
    out = quant_linear_triton(x, q, s, z, b, 4, 32)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, quant_linear_ref(x, q, s, z, b, 4, 32), **TOL[torch.float32])
    # Scales moved to another float dtype (module.to(dtype)) are read as they are.
    torch.testing.assert_close(quant_linear_triton(x, q, s.half(), z.half(), b, 4, 32),
                               quant_linear_ref(x, q, s.half(), z.half(), b, 4, 32), **TOL[torch.float32])


@pytest.mark.parametrize("impl", [quant_linear_ref, quant_linear_triton])
def test_empty_inputs(impl):
    q, s, _, b = quantized(5, 16, 8, 128)
    assert impl(torch.randn(2, 0, 16, device=DEVICE), q, s, None, b, 8, 128).shape == (2, 0, 5)
    # K == 0: the empty sum leaves the bias.
    out = impl(torch.randn(3, 0, device=DEVICE), q[:, :0], s, None, b, 8, 128)
    assert torch.equal(out, b.expand(3, 5))


def test_heuristic_splits_skinny_inputs_only():
    cpu = torch.device("cpu")
    assert choose_config(1, 64, 4096, 8, 128, cpu).split_k > 1
    assert choose_config(8, 64, 4096, 4, 128, cpu).split_k > 1
    assert choose_config(512, 64, 4096, 4, 128, cpu).split_k == 1
    assert choose_config(1, 64, 4096, 4, 32, cpu).block_k == 32  # int4 tiles never straddle a group


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("impl", [quant_linear_ref, quant_linear_triton])
def test_op_argument_errors(impl):
    q8, s8, _, _ = quantized(8, 64, 8, 128)
    q4, s4, z4, _ = quantized(8, 64, 4, 32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        impl(x, q8, s8, None, None, 3, 128)
    with pytest.raises(ValueError, match="does not divide"):
        impl(x, q4, s4, z4, None, 4, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        impl(x, q4, s4, z4, None, 4, 8)
    with pytest.raises(ValueError, match="must end in in_features K=64"):
        impl(torch.randn(2, 63, device=DEVICE), q8, s8, None, None, 8, 128)
    with pytest.raises(ValueError, match="qweight must be torch.uint8"):
        impl(x, q8, s4, z4, None, 4, 32)
    with pytest.raises(ValueError, match="zeros must be None"):
        impl(x, q8, s8, s8, None, 8, 128)
    with pytest.raises(ValueError, match=r"zeros must be float \(8, 2\)"):
        impl(x, q4, s4, None, None, 4, 32)
    with pytest.raises(ValueError, match=r"scales must be float \(8, 2\)"):
        impl(x, q4, s8, z4, None, 4, 32)
    with pytest.raises(ValueError, match=r"bias must be float \[N=8\]"):
        impl(x, q8, s8, None, torch.randn(9, device=DEVICE), 8, 128)
    with pytest.raises(TypeError, match="x dtype torch.int32"):
        impl(x.int(), q8, s8, None, None, 8, 128)
    # Differentiable in x (QLoRA; the gradients are checked in tests/test_qlora.py).
    assert impl(x.clone().requires_grad_(), q8, s8, None, None, 8, 128).requires_grad


def test_quantize_and_config_errors():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features K=96"):
        quantize_weight(w, 4, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_weight(w, 2)
    with pytest.raises(ValueError, match="float \\[N, K\\] weight"):
        quantize_weight(w[0], 8)
    q, s, z, _ = quantized(8, 64, 4, 32)
    with pytest.raises(ValueError, match="block_k 64 must divide group_size 32"):
        quant_matmul(torch.randn(1, 64, device=DEVICE), q, s, z, None, 4, 32, QuantMatmulConfig(1, 16, 64))
    with pytest.raises(ValueError, match="block_m must be 1 or a power of two >= 16"):
        quant_matmul(torch.randn(1, 64, device=DEVICE), q, s, z, None, 4, 32, QuantMatmulConfig(8, 16, 16))


# ------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 128), (4, 32)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_quant_linear_close_to_linear(bits, group_size, impl):
    linear = nn.Linear(256, 96).to(DEVICE)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(16, 256, device=DEVICE)
    ql = QuantLinear.from_linear(linear, bits, group_size)
    assert (ql.in_features, ql.out_features, ql.bits, ql.group_size) == (256, 96, bits, group_size)
    with torch.no_grad(), ops.using(quant_linear=impl):
        y, yq = linear(x), ql(x)
    rel = ((yq - y).norm() / y.norm()).item()
    assert rel < LINEAR_REL_ERR[bits], rel
    if bits == 4:  # and int4 is really coarser than int8 (the bound above is not vacuous)
        assert rel > LINEAR_REL_ERR[8]


def test_quant_linear_state_dict():
    lin = nn.Linear(64, 24)
    q4 = QuantLinear.from_linear(lin, 4, 32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in q4.state_dict().items()} == {
        "qweight": ((24, 32), torch.uint8), "scales": ((24, 2), torch.float32),
        "zeros": ((24, 2), torch.float32), "bias": ((24,), torch.float32)}
    q8 = QuantLinear.from_linear(nn.Linear(64, 24, bias=False), 8)
    assert sorted(q8.state_dict()) == ["qweight", "scales"]
    fresh = QuantLinear.from_linear(nn.Linear(64, 24), 4, 32)
    fresh.load_state_dict(q4.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), q4(x))


def test_quantize_model_replaces_and_skips():
    tree = nn.ModuleDict({
        "enc": nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)),
        "heads": nn.ModuleDict({"a": nn.Linear(32, 16), "b": nn.Linear(32, 16)}),
        "emb": nn.Embedding(10, 32),
        "lm_head": nn.Linear(32, 10),
    })
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = tree["heads"]["a"](tree["enc"](x))
    assert quantize_model(tree, 4, 32, skip=("lm_head", "heads.b")) is tree
    assert isinstance(tree["enc"][0], QuantLinear) and isinstance(tree["enc"][2], QuantLinear)
    assert isinstance(tree["heads"]["a"], QuantLinear) and type(tree["heads"]["b"]) is nn.Linear
    assert type(tree["lm_head"]) is nn.Linear and type(tree["emb"]) is nn.Embedding
    with torch.no_grad():
        out = tree["heads"]["a"](tree["enc"](x))
    assert ((out - ref).norm() / ref.norm()) < 2 * LINEAR_REL_ERR[4]
    # Glob patterns match qualified names.
    tree2 = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)))
    quantize_model(tree2, 8, skip=("1.*",))
    assert [type(m).__name__ for m in (tree2[0], tree2[1][0], tree2[1][1])] == ["QuantLinear", "Linear", "Linear"]


def test_quantize_model_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"layer '1': .*group_size 32 does not divide in_features K=48"):
        quantize_model(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 8)), 4, 32)
    with pytest.raises(ValueError, match="root module"):
        quantize_model(nn.Linear(32, 32), 8)


def _tiny_model():
    cfg = preset("tiny", qk_layernorm=True, use_qkv_bias=True)  # 2-D q_norm/k_norm weights are not Linears
    return cfg, StableLM.random(cfg, seed=1)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_conversion_matches_quantize_model_and_loads(bits, tmp_path):
    cfg, model = _tiny_model()
    tensors = quantize_state_dict(model.state_dict(), bits, 32)
    quantize_model(model, bits, 32)
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    # The converter's path: write the quantized tensors, load() rebuilds QuantLinears on the meta device.
    ckpt.write_project_dir(tmp_path, cfg, tensors, {"bits": bits, "group_size": 32})
    loaded = ckpt.load(tmp_path)
    assert isinstance(loaded.layers[0].mlp.down, QuantLinear) and type(loaded.lm_head) is Linear
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# The whole model, quantized vs float: ||logits_q - logits|| / ||logits||. Measured on the tiny random model (3 seeds,
# 2 x 24 tokens): int8 0.0118-0.0122 with top-1 agreement 0.96-1.0; int4 group 32: 0.126-0.146, agreement 0.77-0.85.
# With the lm_head quantized too (skip=(), tied or not): int8 0.0123-0.0131, agreement 0.96-1.0; int4 group 32:
# 0.134-0.151, agreement 0.77-1.0.
MODEL_REL_ERR = {8: 2e-2, 4: 2e-1}


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 32)])
def test_quantized_model_logits_close_to_float(bits, group_size):
    cfg = preset("tiny")
    ref = StableLM.random(cfg, seed=5, device=DEVICE)
    model = quantize_model(StableLM.random(cfg, seed=5, device=DEVICE), bits, group_size)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    with torch.no_grad(), ops.using(quant_linear="triton"):
        want, got = ref(ids), model(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < MODEL_REL_ERR[bits], rel
    if bits == 8:
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9



@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 32)])
def test_quantized_lm_head(bits, group_size, tied):
    cfg = preset("tiny", tie_word_embeddings=tied)
    ref = StableLM.random(cfg, seed=5, device=DEVICE)
    head_kept = quantize_model(StableLM.random(cfg, seed=5, device=DEVICE), bits, group_size)
    tensors = quantize_state_dict(ref.state_dict(), bits, group_size, skip=())
    model = quantize_model(StableLM.random(cfg, seed=5, device=DEVICE), bits, group_size, skip=())
    assert isinstance(model.lm_head, QuantLinear)
    # A tied model keeps the float table for the lookups; its quantized head is a copy quantized from it.
    assert type(model.embed) is nn.Embedding and torch.equal(model.embed.weight, ref.embed.weight)
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    for impl in ("torch", "triton"):
        with torch.no_grad(), ops.using(quant_linear=impl):
            want, got = ref(ids), model(ids)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < MODEL_REL_ERR[bits], (impl, rel)
        if bits == 8:
            assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    assert resident_bytes(model) < resident_bytes(ref)
    if not tied:
        assert resident_bytes(model) < resident_bytes(head_kept)


def test_quantize_model_tied_head_error_names_it():
    cfg = preset("tiny", tie_word_embeddings=True, hidden_size=80, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"tied lm_head .*group_size 32 does not divide in_features K=80"):
        quantize_model(StableLM.random(cfg), 4, 32, skip=("qkv", "o", "gate_up", "down"))


# ------------------------------------------------------------------------------------------------ GPU
# StableLM-3B projections: qkv (K=2560 -> 3*2560), down (6912 -> 2560), gate_up (2560 -> 2*6912).
GPU_SHAPES = [(2560, 3 * 2560), (6912, 2560), (2560, 2 * 6912)]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 32, 512])
@pytest.mark.parametrize("K,N", GPU_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_bf16_stablelm_sizes(bits, K, N, M):
    q, s, z, b = quantized(N, K, bits, 128, bias=True)
    x = torch.randn(M, K, device=DEVICE).bfloat16()
    ref = quant_linear_ref(x, q, s, z, b, bits, 128).float()
    out = quant_linear_triton(x, q, s, z, b, bits, 128).float()
    # bf16 output rounding alone is up to 2^-9 relative per element.
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_fp32_ieee_and_fp16(bits):
    q, s, z, b = quantized(2560, 6912, bits, 128)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for M in (1, 8, 300):
            x = torch.randn(M, 6912, device=DEVICE).to(dtype)
            ref = quant_linear_ref(x, q, s, z, b, bits, 128).float()
            out = quant_linear_triton(x, q, s, z, b, bits, 128).float()
            assert ((out - ref).norm() / ref.norm()).item() < tol, (dtype, M)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_cuda_graph_replay(bits):
    """The decode step is captured in a CUDA graph: the op must capture (no host sync, no autotuning)."""
    q, s, z, b = quantized(7680, 2560, bits, 128)
    x = torch.randn(4, 2560, device=DEVICE).bfloat16()
    with torch.no_grad():
        quant_linear_triton(x, q, s, z, b, bits, 128)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = quant_linear_triton(x, q, s, z, b, bits, 128)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, quant_linear_triton(x, q, s, z, b, bits, 128), rtol=0, atol=0)
        assert ((out.float() - quant_linear_ref(x, q, s, z, b, bits, 128).float()).norm()
                / out.float().norm()) < 1e-2
