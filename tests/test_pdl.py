"""Programmatic dependent launch (kernels/_common.py): the switch (ops.use(pdl=...)), the decode session recording
again when it changes, and on the GPU the same bits with and without it, in CUDA graphs replayed many times (a
kernel reading before its wait would race with the kernel before it and change them)."""
import os

import pytest
import torch

import stablelm
import stablelm.ops as ops
from kernels._common import pdl_on, set_pdl, use_pdl
from kernels.gemv import GemvConfig, gemv
from kernels.quant import quantize_weight
from stablelm.generate import DecodeSession, ops_key
from stablelm.graph import GraphDecodeStep


@pytest.fixture(autouse=True)
def _restore_pdl():
    before = pdl_on()
    yield
    set_pdl(before)


def test_pdl_switch_through_ops():
    ops.use(pdl=False)
    assert not ops.pdl() and not pdl_on()
    with ops.using(pdl=True, layer_norm="torch"):
        assert ops.pdl() and ops.current("layer_norm", "cuda") == "torch"
    assert not ops.pdl() and ops.current("layer_norm", "cuda") != "torch"
    ops.use(pdl=None)  # the default: on unless STABLELM_PDL=0
    assert ops.pdl() == (os.environ.get("STABLELM_PDL", "1") != "0")
    with pytest.raises(TypeError, match="pdl"):
        ops.use(pdl="yes")
    with pytest.raises(KeyError, match="no implementation"):  # nothing applied from a call that fails
        ops.use(pdl=False, layer_norm="nope")
    assert ops.pdl() == pdl_on()


def test_pdl_never_on_the_cpu():
    ops.use(pdl=True)
    assert not use_pdl(torch.device("cpu"))


def test_pdl_is_part_of_what_a_recording_is_keyed_on():
    with ops.using(pdl=True):
        on = ops_key("cuda")
    with ops.using(pdl=False):
        off = ops_key("cuda")
    assert on != off and ("pdl", True) in on and ("pdl", False) in off


# ------------------------------------------------------------------------------------------------ GPU

def _graph(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and load every kernel before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 8])
def test_gpu_pdl_chain_in_a_graph_gives_the_same_bits(bits):
    """A decode-like chain (LayerNorm + residual -> GEMV -> SwiGLU -> GEMV with K splits -> ...) recorded with and
    without PDL: every replay of the PDL graph equals the graph without it and the eager chain, bit for bit."""
    assert use_pdl(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, F = 1024, 1536
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    ln_w = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=gen)
    ln_b = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=gen)

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5
        if bits == 16:
            return (w.to(torch.bfloat16), None, None)
        return quantize_weight(w, bits, 128)

    layers = [(weight(2 * F, H), weight(H, F)) for _ in range(4)]
    split = GemvConfig(1, 8, 256, split_k=3)

    def chain():
        h, delta = x, torch.zeros_like(x)
        for up, down in layers:
            n, h = ops.layer_norm(delta, ln_w, ln_b, 1e-5, residual=h)
            g = gemv(n, *up, bits=bits)
            a = ops.swiglu_fused(g)
            delta = gemv(a, *down, bits=bits, config=split)
        return h + delta

    with ops.using(pdl=False, layer_norm="triton", swiglu_fused="triton"):
        eager = chain()
        g_off, out_off = _graph(chain)
    with ops.using(pdl=True, layer_norm="triton", swiglu_fused="triton"):
        g_on, out_on = _graph(chain)
    g_off.replay()
    torch.testing.assert_close(out_off, eager, rtol=0, atol=0)
    assert torch.isfinite(eager).all() and eager.abs().sum() > 0
    for _ in range(50):
        out_on.zero_()
        g_on.replay()
        torch.testing.assert_close(out_on, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_decode_with_pdl_equals_without_and_recaptures():
    """Two layers of the StableLM-3B shape at batch 1 (its decode GEMVs take kernels/gemv.py, every other op its
    Triton kernel): a recorded decode step's logits are the same bits with and without PDL, step after step, so
    are generate()'s greedy tokens, and switching PDL records the session's step again."""
    model = stablelm.StableLM.random(stablelm.preset("stablelm-3b-4e1t", num_hidden_layers=2), device="cuda",
                                     dtype=torch.bfloat16)
    ids = torch.randint(0, 50000, (1, 40), device="cuda")

    def steps():
        cache = model.make_cache(1, 128)
        with torch.no_grad():
            token = model.prefill(cache, ids).argmax(-1, keepdim=True)
        step = GraphDecodeStep(model, cache)
        logits = []
        for _ in range(24):
            logits.append(step(token).clone())
            token = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits)

    with ops.using(pdl=False):
        logits_off = steps()
    with ops.using(pdl=True):
        logits_on = steps()
    torch.testing.assert_close(logits_on, logits_off, rtol=0, atol=0)

    session = DecodeSession(model)
    with ops.using(pdl=False):
        off = session.generate(ids, max_new_tokens=48, stop_ids=[])
    with ops.using(pdl=True):
        for _ in range(3):
            assert torch.equal(session.generate(ids, max_new_tokens=48, stop_ids=[]), off)
    assert session.builds == 2
