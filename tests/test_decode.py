"""Split-KV decode attention (Triton) and the SDPA variant against the reference; CUDA-graph capture on GPU."""
import pytest
import torch

from kernels.decode import decode_attention_ref, decode_attention_sdpa, decode_attention_triton
from kernels.rotary import rotary_cache_ref, rotary_cache_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: exact-math kernel vs fp32 reference. fp16: q/k/v rounded inputs are shared, p is rounded to fp16 for P@V.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make_inputs(B, Hq, Hkv, T, D, dtype, kv_len, kv_start=None, layers=2):
    """q is a strided view of a fused qkv row; each cache is a contiguous [B, Hkv, T, D] buffer as KVCache holds one
    per layer, taken as the last of a stack so that an offset gone wrong reads other layers' data."""
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, device=DEVICE).to(dtype)
    q = qkv[:, 0, :Hq]
    k_all = torch.randn(layers, B, Hkv, T, D, device=DEVICE).to(dtype)
    v_all = torch.randn(layers, B, Hkv, T, D, device=DEVICE).to(dtype)
    kv_len = torch.tensor(kv_len, dtype=torch.int32, device=DEVICE)
    if kv_start is not None:
        kv_start = torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    return q, k_all[-1], v_all[-1], kv_len, kv_start


# Interpreter runs fp32 and fp16: its tl.dot multiplies bfloat16 operands as raw integers, so bf16 is GPU-only.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [80, 64])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("T,splits", [(70, None), (200, 1), (200, 3), (333, None)])
def test_decode_matches_reference(T, splits, Hq, Hkv, D, dtype):
    B = 3
    # Odd lengths per sequence, one ending mid-block, one filling the cache; left padding on two of them.
    q, kc, vc, kv_len, kv_start = make_inputs(B, Hq, Hkv, T, D, dtype, [1, T // 2 + 1, T], [0, 5, T // 3])
    ref = decode_attention_ref(q, kc, vc, kv_len, kv_start)
    out = decode_attention_triton(q, kc, vc, kv_len, kv_start, splits=splits)
    assert out.shape == (B, Hq, D) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(decode_attention_triton(q, kc, vc, kv_len, splits=splits),
                               decode_attention_ref(q, kc, vc, kv_len), **TOL[dtype])


def test_decode_ignores_stale_slots_and_custom_scale():
    B, Hq, Hkv, T, D = 2, 4, 2, 150, 64
    q, kc, vc, kv_len, kv_start = make_inputs(B, Hq, Hkv, T, D, torch.float32, [97, 130], [3, 64])
    ref = decode_attention_ref(q, kc, vc, kv_len, kv_start, scale=0.3)
    invalid = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        invalid[b, kv_start[b]:kv_len[b]] = False
    kc[invalid[:, None, :, None].expand_as(kc)] = float("nan")  # padding and unwritten slots hold garbage
    vc[invalid[:, None, :, None].expand_as(vc)] = float("nan")
    out = decode_attention_triton(q, kc, vc, kv_len, kv_start, scale=0.3, splits=3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_decode_sequence_without_valid_keys_gives_zeros():
    # Sequence 1 starts after its end, inside the same key block: that block is loaded but fully masked.
    q, kc, vc, kv_len, kv_start = make_inputs(2, 4, 2, 100, 64, torch.float32, [70, 65], [65, 70])
    for impl in (decode_attention_triton, decode_attention_sdpa):
        out = impl(q, kc, vc, kv_len, kv_start)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, decode_attention_ref(q, kc, vc, kv_len, kv_start), **TOL[torch.float32])


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4)])
def test_decode_sdpa_matches_reference(Hq, Hkv):
    q, kc, vc, kv_len, kv_start = make_inputs(3, Hq, Hkv, 90, 80, torch.float32, [1, 46, 90], [0, 7, 30])
    torch.testing.assert_close(decode_attention_sdpa(q, kc, vc, kv_len, kv_start),
                               decode_attention_ref(q, kc, vc, kv_len, kv_start), **TOL[torch.float32])


@pytest.mark.parametrize("fused", [True, False])
def test_decode_split_combine_edge_cases(fused, monkeypatch):
    """Many splits of one key block (fp32: 32 slots) over rows that exercise every arrival count: one valid key,
    a start inside a block and past the first split, a start after the end (no chunk has keys: zeros), kv_len 0,
    a full cache, a kv_len past T (read as T). The fused combine leaves every arrival counter at 0, and a second
    call (fresh inputs, same buffers) is right too."""
    import kernels.decode as Dm
    B, Hq, Hkv, T, D = 6, 6, 2, 230, 64
    lens, starts = [1, 170, 100, 0, T, T + 40], [0, 75, 120, 0, 0, 33]
    for call in range(2):
        q, kc, vc, kv_len, kv_start = make_inputs(B, Hq, Hkv, T, D, torch.float32, lens, starts)
        want = decode_attention_ref(q, kc, vc, kv_len.clamp(max=T), kv_start)
        poison = torch.full((B, Hq, D), float("nan"), device=DEVICE)  # freed just before: the output's memory
        del poison  # (the caching allocator hands the same block back), so an unwritten element stays NaN
        out = decode_attention_triton(q, kc, vc, kv_len, kv_start, splits=8, fused_combine=fused)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, **TOL[torch.float32])
        assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(out[3], torch.zeros_like(out[3]))
        if fused:
            assert all(int(buf.abs().sum()) == 0 for buf in Dm._COUNTERS[q.device]), call
    # The default split count: one block per split when fused (more programs at a short context), 256 slots else.
    monkeypatch.setattr(Dm, "sm_count", lambda device, interpreted: 132)  # an H200's
    assert Dm.num_splits(1, 32, 512, torch.bfloat16, torch.device("cpu"), fused=True) == 8
    assert Dm.num_splits(1, 32, 512, torch.bfloat16, torch.device("cpu"), fused=False) == 2


def test_decode_fused_and_two_kernel_combine_agree():
    q, kc, vc, kv_len, kv_start = make_inputs(2, 8, 2, 300, 80, torch.float16, [300, 131], [0, 70])
    outs = [decode_attention_triton(q, kc, vc, kv_len, kv_start, splits=5, fused_combine=f) for f in (True, False)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outs[0], decode_attention_ref(q, kc, vc, kv_len, kv_start), **TOL[torch.float16])


def _args():
    q, kc, vc, kv_len, kv_start = make_inputs(2, 4, 2, 64, 64, torch.float32, [10, 20], [0, 1])
    return dict(q=q, k_cache=kc, v_cache=vc, kv_len=kv_len, kv_start=kv_start)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(q=a["q"][0]), r"q must be \[B, Hq, D\]"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :, :32]), r"k_cache must be \[B=2, Hkv, T, D=64\]"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :32]), "v_cache .* must match k_cache"),
    (lambda a: a.update(q=a["q"][:, :3]), "query heads 3 must be a multiple of kv heads 2"),
    (lambda a: a.update(q=a["q"].half()), "dtypes must match"),
    (lambda a: a.update(q=a["q"].double(), k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()),
     "dtype torch.float64 is not supported"),
    (lambda a: a.update(kv_len=a["kv_len"].long()), "kv_len must be int32"),
    (lambda a: a.update(kv_start=a["kv_start"][:1]), r"kv_start must be int32 \[B=2\]"),
    (lambda a: a.update(kv_len=a["kv_len"].to("meta")), "kv_len is on meta"),
    (lambda a: a.update(splits=5), r"splits=5 must be in \[1, 2\]"),
])
def test_decode_rejects_bad_input(change, match):
    args = _args()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention_triton(**args)


# ----------------------------------------------------------------------------------------------------------------
# GPU, real sizes

def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("Hkv", [32, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_gpu_real_sizes(B, Hkv, dtype):
    Hq, T, D = 32, 4096, 80
    lens = torch.randint(1, T + 1, (B,)).tolist()
    lens[0] = T
    starts = [0] + [int(torch.randint(0, n, ()).item()) for n in lens[1:]]
    q, kc, vc, kv_len, kv_start = make_inputs(B, Hq, Hkv, T, D, dtype, lens, starts, layers=1)
    ref = decode_attention_ref(q.float(), kc.float(), vc.float(), kv_len, kv_start)
    for impl in (decode_attention_triton, decode_attention_sdpa):
        assert _rel_err(impl(q, kc, vc, kv_len, kv_start), ref) < 1e-2, impl.__name__


@pytest.mark.gpu
def test_decode_step_captured_in_cuda_graph():
    """rotary_cache + decode_attention captured once, replayed with new positions/lengths per sequence."""
    B, Hq, Hkv, T, D, R = 4, 32, 8, 1024, 80, 20
    dt = torch.bfloat16
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, device="cuda", dtype=dt)
    cos = torch.randn(B, 1, R // 2, device="cuda")
    sin = torch.randn(B, 1, R // 2, device="cuda")
    k_cache = torch.randn(B, Hkv, T, D, device="cuda", dtype=dt)
    v_cache = torch.randn_like(k_cache)
    write_pos = torch.zeros(B, dtype=torch.int32, device="cuda")
    kv_start = torch.zeros(B, dtype=torch.int32, device="cuda")

    def step():
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
        q = rotary_cache_triton(q, k, v, cos, sin, k_cache, v_cache, write_pos)
        return decode_attention_triton(q[:, 0], k_cache, v_cache, write_pos + 1, kv_start=kv_start)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

        for _ in range(3):
            qkv.copy_(torch.randn_like(qkv))
            cos.copy_(torch.randn_like(cos))
            sin.copy_(torch.randn_like(sin))
            write_pos.copy_(torch.randint(0, T, (B,), dtype=torch.int32))
            kv_start.copy_((write_pos * torch.rand(B, device="cuda")).int())
            ref_kc, ref_vc, ref_qkv = k_cache.float(), v_cache.float(), qkv.float()
            rq, rk, rv = ref_qkv.split([Hq, Hkv, Hkv], dim=2)
            ref_q = rotary_cache_ref(rq, rk, rv, cos, sin, ref_kc, ref_vc, write_pos)
            ref = decode_attention_ref(ref_q[:, 0], ref_kc, ref_vc, write_pos + 1, kv_start)
            graph.replay()
            assert _rel_err(k_cache, ref_kc) < 1e-2 and _rel_err(v_cache, ref_vc) < 1e-2
            assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hkv,T", [(1, 32, 512), (1, 32, 4096), (8, 32, 512), (2, 8, 2048)])
def test_decode_gpu_fused_combine_many_lengths_no_race(B, Hkv, T):
    """The fused combine at the 3B shape: 40 calls with fresh lengths (short contexts included), each against the
    reference and the two-kernel combine; the same inputs twice give bit-identical outputs (a race between the
    last arrival and the partials it reads would move them), and the arrival counters end at 0."""
    import kernels.decode as Dm
    Hq, D = 32, 80
    gen = torch.Generator().manual_seed(B * T + Hkv)
    for i in range(40):
        lens = torch.randint(1, T + 1, (B,), generator=gen)
        if i % 4 == 0:
            lens = torch.randint(1, 200, (B,), generator=gen).clamp(max=T)  # short contexts
        starts = (torch.rand(B, generator=gen) * lens * (i % 2)).int()
        q, kc, vc, kv_len, kv_start = make_inputs(B, Hq, Hkv, T, D, torch.bfloat16, lens.tolist(),
                                                  starts.tolist(), layers=1)
        ref = decode_attention_ref(q.float(), kc.float(), vc.float(), kv_len, kv_start)
        fused = decode_attention_triton(q, kc, vc, kv_len, kv_start, fused_combine=True)
        again = decode_attention_triton(q, kc, vc, kv_len, kv_start, fused_combine=True)
        two = decode_attention_triton(q, kc, vc, kv_len, kv_start, fused_combine=False)
        assert torch.equal(fused, again), i
        assert _rel_err(fused, ref) < 1e-2 and _rel_err(two, ref) < 1e-2, i
    torch.cuda.synchronize()
    assert all(int(buf.abs().sum()) == 0 for buf in Dm._COUNTERS[q.device])
