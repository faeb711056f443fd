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


def _count_gemv(monkeypatch):
    import kernels.gemv as G
    calls = []
    real = G.gemv

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)
    monkeypatch.setattr(G, "gemv", counting)
    return calls


def test_gemv_pays_is_batch_one_at_tuned_bf16_shapes():
    from kernels.gemv import TUNED, gemv_pays
    cuda = torch.device("cuda")  # the rule reads only the device type: no GPU needed here
    for (bits, m, N, K) in TUNED:
        if bits == 16:
            assert gemv_pays(1, N, K, torch.bfloat16, cuda)
            assert not gemv_pays(2, N, K, torch.bfloat16, cuda)  # M >= 2 measured slower than cuBLAS
            assert not gemv_pays(1, N, K, torch.float32, cuda)  # not measured: cuBLAS
    assert not gemv_pays(1, 37, 224, torch.bfloat16, cuda)  # untuned shape
    # The interpreter takes the kernel at every M == 1 shape, so the CPU tests reach it.
    assert gemv_pays(1, 37, 224, torch.float32, torch.device("cpu")) == (DEVICE == "cpu")


@pytest.mark.parametrize("lead", [(1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_one_row_runs_the_kernel_any_leading_dims(lead, bias, monkeypatch):
    """CPU (interpreter): every one-row call runs the kernel. CUDA (a tuned shape): an eager call is F.linear (and
    runs the kernel once per launch key, to load it); inside a graph capture the kernel runs."""
    import kernels.gemv as G
    if DEVICE == "cuda":
        N, K, dtype = 2560, 6912, torch.bfloat16  # a tuned shape
        monkeypatch.setattr(G, "_READY", set())
    else:
        N, K, dtype = 45, 96, torch.float16
    calls = _count_gemv(monkeypatch)
    gen = torch.Generator().manual_seed(len(lead) + bias)
    x = torch.randn(*lead, K, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = linear_triton(x, w, b)
    assert calls == [(1, K)]
    assert out.shape == (*lead, N) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    if DEVICE == "cuda":
        assert torch.equal(out, F.linear(x, w, b))  # eager: cuBLAS
        assert linear_triton(x, w, b) is not None and calls == [(1, K)]  # warmed: no second kernel run
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = linear_triton(x, w, b)
        assert calls == [(1, K), (1, K)]
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured.float(), ref, **TOL[dtype])
    # A strided one-row view (the model slices the last position) too.
    wide = torch.randn(1, 3, 2 * K, generator=gen).to(DEVICE, dtype)
    xv = wide[:, 2:, :K]
    torch.testing.assert_close(linear_triton(xv, w, b).float(),
                               F.linear(xv.float(), w.float(), None if b is None else b.float()), **TOL[dtype])


def test_linear_under_autograd_is_f_linear_with_its_gradients(monkeypatch):
    # One row with grad mode on: the kernel has no backward, so the op is F.linear and gradients flow; under
    # no_grad the same call (weights still requires_grad, as a model's are in generate()) runs the kernel.
    calls = _count_gemv(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 64, generator=gen).to(DEVICE)
    w = torch.randn(24, 64, generator=gen).to(DEVICE)
    b = torch.randn(24, generator=gen).to(DEVICE)
    for needs in ("x", "weight", "bias"):
        leaves = {"x": x.clone(), "weight": w.clone(), "bias": b.clone()}
        leaves[needs].requires_grad_()
        out = linear_triton(leaves["x"], leaves["weight"], leaves["bias"])
        g = torch.randn(out.shape, generator=gen).to(DEVICE)
        (got,) = torch.autograd.grad(out, leaves[needs], g)
        ref_leaves = {k: v.detach().clone().requires_grad_(k == needs) for k, v in leaves.items()}
        ref_out = F.linear(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"])
        (want,) = torch.autograd.grad(ref_out, ref_leaves[needs], g)
        assert torch.equal(out, ref_out.detach()) and torch.equal(got, want)
    assert calls == []
    with torch.no_grad():
        linear_triton(x, w.requires_grad_(), b)
    assert len(calls) == (1 if DEVICE == "cpu" else 0)  # (24, 64) is no tuned shape on CUDA


def test_model_linears_go_through_the_op_and_stay_nn_linear(monkeypatch):
    """The model's projections are stablelm.model.Linear: nn.Linear for LoRA / quantize_model / checkpoints (same
    keys), their arithmetic ops.linear: a batch-1 decode step with linear="triton" runs every projection through
    the kernel (in the interpreter here) and matches linear="torch"; training at one row falls back to F.linear
    and gives the same gradients."""
    from torch import nn

    from stablelm import StableLM, ops, preset
    from stablelm.lora import apply_lora
    from stablelm.model import Linear
    from stablelm.quantize import QuantLinear, quantize_model

    cfg = preset("tiny")
    model = StableLM.random(cfg, seed=2, device=DEVICE)
    names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert len(names) == 4 * cfg.num_hidden_layers + 1 and all(isinstance(m, nn.Linear) for m in model.modules()
                                                               if isinstance(m, Linear))
    keys = set(model.state_dict())
    assert {f"{n}.weight" for n in names} <= keys and not any("base" in k for k in keys)
    others = {op: "torch" for op in ops.CUDA_PREFERENCE if op != "linear"}
    ids = torch.randint(0, cfg.vocab_size, (1, 7), device=DEVICE)

    def decode(impl):
        cache = model.make_cache(1, 16)
        with ops.using(linear=impl, **others), torch.no_grad():
            model.prefill(cache, ids[:, :5])
            return model(ids[:, 5:6], cache=cache)

    calls = _count_gemv(monkeypatch)
    got = decode("triton")
    if DEVICE == "cpu":
        # every projection of the step, plus the prefill's lm_head on its last position (one row too)
        assert len(calls) == len(names) + 1 and set(calls) == {(1, cfg.hidden_size), (1, cfg.intermediate_size)}
    torch.testing.assert_close(got, decode("torch"), atol=1e-4, rtol=1e-4)

    def grads(impl):
        model.zero_grad()
        with ops.using(linear=impl, **others):
            model(ids[:, :1]).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    calls.clear()
    g_triton, g_torch = grads("triton"), grads("torch")
    assert calls == [] and g_triton.keys() == g_torch.keys() and len(g_triton) == len(list(model.parameters()))
    for n in g_torch:
        assert torch.equal(g_triton[n], g_torch[n]), n

    lora = StableLM.random(cfg, seed=2, device=DEVICE)
    assert len(apply_lora(lora, {"qkv": None, "o": None}, r=2, alpha=4)) == 2 * cfg.num_hidden_layers
    quant = quantize_model(StableLM.random(cfg, seed=2, device=DEVICE), bits=8, skip=())
    assert not any(isinstance(m, nn.Linear) for m in quant.modules())
    assert sum(isinstance(m, QuantLinear) for m in quant.modules()) == len(names)


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


@pytest.mark.gpu
def test_gpu_3b_batch_one_decode_through_ops_linear(monkeypatch):
    """The 3B model at batch 1: the captured decode step with linear="triton" runs every projection through the
    kernel (loaded by the eager warm-up) and is as close to an fp32 reference as linear="torch" (cuBLAS) is."""
    import copy

    from stablelm import StableLM, ops, preset
    from stablelm.graph import GraphDecodeStep

    cfg = preset("stablelm-3b-4e1t")
    ref = StableLM.random(cfg, seed=0, device="cuda", dtype=torch.float32)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 100), device="cuda", generator=gen)
    steps = torch.randint(0, cfg.vocab_size, (1, 4), device="cuda", generator=gen)

    def decode(m, impl, graph):
        cache = m.make_cache(1, 128)
        with ops.using(linear=impl), torch.no_grad():
            m.prefill(cache, ids)
            step = GraphDecodeStep(m, cache) if graph else (lambda t: m(t, cache=cache, last_only=True)[:, -1])
            return torch.stack([step(steps[:, t:t + 1]).float().clone() for t in range(steps.shape[1])])

    want = decode(ref, "torch", graph=False)
    base = decode(model, "torch", graph=True)
    calls = _count_gemv(monkeypatch)
    got = decode(model, "triton", graph=True)
    assert len(calls) >= 4 * cfg.num_hidden_layers + 1  # captured (and warmed up) through the kernel
    eager = decode(model, "triton", graph=False)
    err_triton, err_torch, err_eager = rel(got, want), rel(base, want), rel(eager, want)
    assert err_triton < 1.5 * err_torch + 1e-3 and err_eager < 1.5 * err_torch + 1e-3, (err_triton, err_eager,
                                                                                        err_torch)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
