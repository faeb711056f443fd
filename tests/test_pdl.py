"""Programmatic dependent launch (kernels/_common.py): the switch (ops.use(pdl=...)), the decode session recording
again when it changes, the kernels' sm_90 machine code (built here with Triton's own ptxas, no GPU needed: the wait
comes before every global load or store, only L2 prefetches before it), and on the GPU the same bits with and without
PDL, in CUDA graphs replayed many times (a kernel reading before its wait would race with the kernel before it).

Run as a script (`python tests/test_pdl.py`, without TRITON_INTERPRET) it prints that machine-code summary as JSON.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import stablelm
import stablelm.ops as ops
from kernels._common import pdl_on, set_pdl, use_pdl
from kernels.gemv import GemvConfig, gemv
from kernels.quant import QuantMatmulConfig, quant_matmul, quantize_weight
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
    assert ops.pdl() == (os.environ.get("STABLELM_PDL") != "0")
    with pytest.raises(TypeError, match="pdl"):
        ops.use(pdl="yes")
    with pytest.raises(KeyError, match="no implementation"):  # nothing applied from a call that fails
        ops.use(pdl=False, layer_norm="nope")
    assert ops.pdl() == pdl_on()


def test_pdl_never_on_the_cpu():
    ops.use(pdl=True)
    assert not use_pdl(torch.device("cpu"))


def test_gemv_launch_key_covers_pdl_and_prefetch(monkeypatch):
    """linear_triton runs a key's kernel eagerly once so that a later CUDA-graph capture finds its module loaded: a
    PDL switch or another prefetch depth compiles another variant, so it must be another key."""
    import kernels.gemv as G
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    plain = G._launch_key(x, w, None)
    monkeypatch.setattr(G, "use_pdl", lambda device: True)
    with_pdl = G._launch_key(x, w, None)
    monkeypatch.setattr(G, "PREFETCH_TILES", G.PREFETCH_TILES + 1)
    assert len({plain, with_pdl, G._launch_key(x, w, None)}) == 3


def test_pdl_is_part_of_what_a_recording_is_keyed_on():
    with ops.using(pdl=True):
        on = ops_key("cuda")
    with ops.using(pdl=False):
        off = ops_key("cuda")
    assert on != off and ("pdl", True) in on and ("pdl", False) in off


# ------------------------------------------------------------------------------------------------ sm_90 machine code

def _kernels_to_build():
    """(name, JITFunction, pointer dtypes, float args, constexprs, num_warps) at StableLM-3B decode shapes."""
    import kernels.decode as d
    import kernels.gemv as g
    import kernels.mlp as m
    import kernels.norm as n
    import kernels.quant as q
    import kernels.rotary as r
    bf = "*bf16"
    gemv_ptrs = dict(X=bf, W=bf, S=bf, Z=bf, BIAS=bf, OUT=bf)
    gemv_const = dict(GROUP=1, HAS_BIAS=False, PARTIAL=False, EVEN=True, UNROLL=True)
    return [
        ("gemv-bf16", g._gemv_fma_kernel, gemv_ptrs, (),
         dict(gemv_const, BITS=16, BLOCK_N=8, BLOCK_K=256, TILES=10, PF_LINES=64, PF_STEP=64), 4),
        ("gemv-int8", g._gemv_fma_kernel, dict(gemv_ptrs, W="*i8"), (),
         dict(gemv_const, BITS=8, BLOCK_N=32, BLOCK_K=512, TILES=5, PF_LINES=32, PF_STEP=128), 8),
        ("quant-matmul-int4", q._quant_matmul_kernel,
         dict(X=bf, QW="*u8", SCALES=bf, ZEROS=bf, BIAS=bf, OUT="*fp32"), (),
         dict(BITS=4, GROUP=128, HAS_BIAS=False, IEEE=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 4),
        ("quant-matmul-int8", q._quant_matmul_kernel,
         dict(X=bf, QW="*i8", SCALES=bf, ZEROS=bf, BIAS=bf, OUT=bf), (),
         dict(BITS=8, GROUP=1, HAS_BIAS=True, IEEE=False, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128), 4),
        ("quant-split-sum", q._split_sum_kernel, dict(P="*fp32", BIAS=bf, OUT=bf), (),
         dict(HAS_BIAS=True, BLOCK_N=1024), 4),
        ("split-sum", g._split_sum_kernel, dict(P="*fp32", BIAS="*fp32", OUT=bf), (), dict(HAS_BIAS=False, BLOCK=1024),
         4),
        ("layer-norm", n._layer_norm_fwd_kernel, dict(X=bf, RES=bf, W=bf, BIAS=bf, Y=bf, S=bf), ("eps",),
         dict(N=2560, PER_HEAD=False, HAS_RES=True, HAS_BIAS=True, BLOCK_R=1, BLOCK_N=4096), 8),
        ("swiglu", m._swiglu_fwd_kernel, dict(G=bf, U=bf, O=bf), (), dict(BLOCK_R=1, BLOCK_C=1024), 4),
        ("rotary-cache", r._rotary_cache_kernel,
         dict(Q=bf, K=bf, V=bf, KC=bf, VC=bf, COS="*fp32", SIN="*fp32", WRITE_POS="*i32"), (),
         dict(HALF=10, HEAD_DIM=80, BLOCK_H=16, BLOCK_R=32, BLOCK_D=128), 4),
        ("decode-attention", d._decode_split_kernel,
         dict(Q=bf, K=bf, V=bf, KV_LEN="*i32", KV_START="*i32", OUT=bf, PART="*fp32", COUNTER="*i32"), ("qk_scale",),
         dict(G=1, HEAD_DIM=80, NUM_SPLITS=4, HAS_START=True, IEEE_DOT=False, FUSED=True, BLOCK_G=16, BLOCK_N=64,
              BLOCK_D=128, BLOCK_S=4), 4),
        ("decode-combine", d._decode_combine_kernel, dict(PART="*fp32", OUT=bf), (),
         dict(HEAD_DIM=80, NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=128), 4),
    ]


_GLOBAL_MEMORY = re.compile(r"\b(LDG|STG|ATOMG|ATOM|RED|LD|ST)(\.|\s)")


def _sass_summary() -> dict:
    """For each kernel with PDL on and off: the order of the first PDL instructions and global memory accesses in
    its sm_90 machine code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    summary = {}
    for name, fn, ptrs, floats, const, warps in _kernels_to_build():
        for pdl in (True, False):
            consts = dict(const, PDL=pdl)
            sig = {a: ("constexpr" if a in consts else ptrs.get(a, "fp32" if a in floats else "i32"))
                   for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps,
                                                                                        launch_pdl=pdl))
            path = f"/tmp/stablelm_pdl_{os.getpid()}.cubin"
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
            os.remove(path)
            lines = sass.splitlines()

            def first(pattern):
                return next((i for i, line in enumerate(lines) if re.search(pattern, line)), None)
            summary[f"{name}/{'pdl' if pdl else 'plain'}"] = dict(
                launch_dependents=first(r"\bPREEXIT\b"), wait=first(r"\bACQBULK\b"),
                prefetch=first(r"CCTL\.E\.PF2"), memory=first(_GLOBAL_MEMORY.pattern))
    return summary


def test_pdl_kernels_wait_before_any_global_memory_access_on_sm90():
    """The decode kernels' PDL variants assemble for sm_90; in each, griddepcontrol.launch_dependents and .wait
    come before the first global load or store (the GEMV's L2 prefetches before the wait), and the plain variants
    hold neither instruction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert len(summary) == 2 * len(_kernels_to_build())
    for key, at in summary.items():
        assert at["memory"] is not None, key
        if key.endswith("/pdl"):
            assert at["launch_dependents"] is not None and at["wait"] is not None, key
            assert at["launch_dependents"] < at["wait"] < at["memory"], (key, at)
            if key.startswith(("gemv", "quant-matmul")):
                assert at["prefetch"] is not None and at["prefetch"] < at["wait"], (key, at)
        else:
            assert at["launch_dependents"] is None and at["wait"] is None and at["prefetch"] is None, (key, at)


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
@pytest.mark.parametrize("bits,rows", [(16, 1), (8, 1), (8, 4), (4, 4)])
def test_gpu_pdl_chain_in_a_graph_gives_the_same_bits(bits, rows):
    """A decode-like chain (LayerNorm + residual -> matmul -> SwiGLU -> matmul with K splits -> ...; one row: the
    GEMV, four rows: the tiled quant matmul) recorded with and without PDL: every replay of the PDL graph equals the
    graph without it and the eager chain, bit for bit."""
    with ops.using(pdl=True):
        assert use_pdl(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, F = 1024, 1536
    x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    ln_w = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=gen)
    ln_b = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=gen)

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5
        if bits == 16:
            return (w.to(torch.bfloat16), None, None)
        return quantize_weight(w, bits, 128)

    layers = [(weight(2 * F, H), weight(H, F)) for _ in range(4)]

    def matmul(a, w, split):
        if rows == 1:
            return gemv(a, *w, bits=bits, config=GemvConfig(1, 8, 256, split_k=3) if split else None)
        return quant_matmul(a, *w, None, bits, 128, QuantMatmulConfig(16, 64, 128, split_k=3 if split else 1))

    def chain():
        h, delta = x, torch.zeros_like(x)
        for up, down in layers:
            n, h = ops.layer_norm(delta, ln_w, ln_b, 1e-5, residual=h)
            a = ops.swiglu_fused(matmul(n, up, split=False))
            delta = matmul(a, down, split=True)
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


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_sass_summary()))
