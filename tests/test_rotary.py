"""Triton rotary / rotary_cache against their references (CPU interpreter; GPU tests at real sizes)."""
import pytest
import torch

from kernels.rotary import rotary_cache_ref, rotary_cache_triton, rotary_ref, rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per-dtype tolerances for one rotation in fp32 math rounded back to the input dtype (about one ulp).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def fused_qkv(B, S, Hq, Hkv, D, dtype, pad=3):
    """Random fused projection output with `pad` extra columns after it; q, k, v are views of it."""
    width = (Hq + 2 * Hkv) * D
    buf = torch.randn(B, S, width + pad, device=DEVICE).to(dtype)
    qkv = buf[..., :width].view(B, S, Hq + 2 * Hkv, D)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    return buf, q, k, v


def tables(B, S, rotary_dim, max_pos=4096):
    """cos/sin for random per-token positions (as with left padding or decode offsets)."""
    pos = torch.randint(0, max_pos, (B, S), device=DEVICE).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=DEVICE).float() / rotary_dim))
    freqs = pos[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def bits(x):
    """The raw bits of x, so -0.0 and +0.0 differ."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


SHAPES = [(80, 20), (80, 32), (80, 80), (64, 32)]  # (head_dim, rotary_dim); StableLM-3B is (80, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,R", SHAPES)
def test_rotary_in_place_matches_reference(D, R, dtype):
    B, S, Hq, Hkv = 2, 3, 4, 2
    buf, q, k, v = fused_qkv(B, S, Hq, Hkv, D, dtype)
    cos, sin = tables(B, S, R)
    # -0.0 in pass-through dims: rewriting one with its own value (x * 1 + 0) would turn it into +0.0.
    q[..., R::2] = -0.0
    k[..., R::2] = -0.0
    before = buf.clone()
    ref_q, ref_k = rotary_ref(q.clone(), k.clone(), cos, sin)
    with torch.no_grad():
        out_q, out_k = rotary_triton(q, k, cos, sin)
    assert out_q is q and out_k is k
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    torch.testing.assert_close(k, ref_k, **TOL[dtype])
    # Only the rotated dims of q and k may change: pass-through dims, v and the padding stay bit-identical.
    width = (Hq + 2 * Hkv) * D
    rotated = torch.zeros_like(buf, dtype=torch.bool)
    rotated[..., :width].view(B, S, Hq + 2 * Hkv, D)[:, :, :Hq + Hkv, :R] = True
    assert torch.equal(bits(buf[~rotated]), bits(before[~rotated]))


def test_rotary_accepts_tables_broadcast_over_batch():
    B, S, Hq, Hkv, D, R = 3, 4, 2, 2, 64, 32
    _, q, k, _ = fused_qkv(B, S, Hq, Hkv, D, torch.float32)
    cos, sin = tables(1, S, R)
    cos, sin = cos.expand(B, S, R // 2), sin.expand(B, S, R // 2)  # stride 0 over the batch
    ref_q, ref_k = rotary_ref(q.clone(), k.clone(), cos, sin)
    rotary_triton(q, k, cos, sin)
    torch.testing.assert_close(q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(k, ref_k, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,R", [(80, 20), (64, 32)])
def test_rotary_gradients_match_reference(D, R, dtype):
    B, S, Hq, Hkv = 2, 3, 4, 2
    buf, *_ = fused_qkv(B, S, Hq, Hkv, D, dtype)
    cos, sin = tables(B, S, R)
    grads = [torch.randn(B, S, h, D, device=DEVICE).to(dtype) for h in (Hq, Hkv)]

    def run(fn):
        qkv = buf[..., :(Hq + 2 * Hkv) * D].detach().clone().view(B, S, Hq + 2 * Hkv, D).requires_grad_()
        q, k, _ = qkv.split([Hq, Hkv, Hkv], dim=2)
        out = fn(q, k, cos, sin)
        torch.autograd.backward(out, grads)
        return out, qkv, q

    (tq, tk), t_qkv, t_in = run(rotary_triton)
    (rq, rk), r_qkv, _ = run(rotary_ref)
    assert tq.data_ptr() != t_in.data_ptr()  # under autograd the result is a new tensor
    torch.testing.assert_close(tq, rq, **TOL[dtype])
    torch.testing.assert_close(tk, rk, **TOL[dtype])
    torch.testing.assert_close(t_qkv.grad, r_qkv.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("D,R,S", [(80, 20, 1), (80, 20, 3), (64, 32, 2)])
def test_rotary_cache_matches_reference(D, R, S, dtype, cache_dtype):
    B, Hq, Hkv, T = 3, 4, 2, 9
    buf, q, k, v = fused_qkv(B, S, Hq, Hkv, D, dtype)
    cos, sin = tables(B, S, R)
    write_pos = torch.tensor([0, 5, T - S], dtype=torch.int32, device=DEVICE)[:B]
    # Poisoned caches: every slot starts random, so a stray write anywhere shows up.
    k_cache = torch.randn(B, Hkv, T, D, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn(B, Hkv, T, D, device=DEVICE).to(cache_dtype)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q = rotary_cache_ref(q.clone(), k.clone(), v.clone(), cos, sin, ref_kc, ref_vc, write_pos)
    k_before, v_before = k.clone(), v.clone()
    with torch.no_grad():
        out = rotary_cache_triton(q, k, v, cos, sin, k_cache, v_cache, write_pos)
    assert out is q
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    tol = TOL[cache_dtype] if cache_dtype != torch.float32 else TOL[dtype]
    torch.testing.assert_close(k_cache, ref_kc, **tol)
    if cache_dtype == dtype:
        assert torch.equal(v_cache, ref_vc)  # v is copied, not rotated
    else:  # a cast (the interpreter truncates to bfloat16 where the GPU rounds: one ulp apart)
        torch.testing.assert_close(v_cache, ref_vc, **tol)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k and v are only read
    written = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        written[b, write_pos[b]:write_pos[b] + S] = True
    untouched = ~written[:, None, :, None].expand_as(k_cache)
    assert torch.equal(k_cache[untouched], ref_kc[untouched])


def test_rotary_cache_masks_slots_past_the_end():
    B, S, Hq, Hkv, D, R, T = 2, 3, 2, 2, 64, 32, 6
    _, q, k, v = fused_qkv(B, S, Hq, Hkv, D, torch.float32)
    cos, sin = tables(B, S, R)
    # The cache is the front of a longer buffer: a write past T would land in the guard slots.
    k_buf = torch.randn(B, Hkv, T + S, D, device=DEVICE)
    v_buf = torch.randn(B, Hkv, T + S, D, device=DEVICE)
    k_before, v_before = k_buf.clone(), v_buf.clone()
    write_pos = torch.tensor([T - 1, 1], dtype=torch.int32, device=DEVICE)  # sequence 0 has room for one token
    rotary_cache_triton(q, k, v, cos, sin, k_buf[:, :, :T], v_buf[:, :, :T], write_pos)
    assert torch.equal(k_buf[0, :, T:], k_before[0, :, T:]) and torch.equal(v_buf[0, :, T:], v_before[0, :, T:])
    assert torch.equal(v_buf[0, :, T - 1], v[0, 0])
    assert torch.equal(v_buf[1, :, 1:1 + S], v[1].transpose(0, 1))


def _rotary_args(dtype=torch.float32):
    _, q, k, v = fused_qkv(1, 2, 2, 1, 64, dtype)
    cos, sin = tables(1, 2, 32)
    return q, k, v, cos, sin


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(cos=a["cos"].double()), "cos must be float32"),
    (lambda a: a.update(cos=a["cos"][:, :1]), r"must both be \[B=1, S=2"),
    (lambda a: a.update(cos=torch.zeros(1, 2, 40), sin=torch.zeros(1, 2, 40)), "rotary_dim"),
    (lambda a: a.update(q=a["q"][0]), r"q must be \[B, S, H, D\]"),
    (lambda a: a.update(q=a["q"].double()), "q dtype torch.float64"),
    (lambda a: a.update(k=a["k"][:, :1]), "must share B, S and D"),
    (lambda a: a.update(sin=a["sin"].to("meta")), "sin is on meta"),
    (lambda a: a.update(cos=a["cos"].clone().requires_grad_()), "no gradient flows to cos"),
])
def test_rotary_rejects_bad_input(change, match):
    q, k, _, cos, sin = _rotary_args()
    args = dict(q=q, k=k, cos=cos, sin=sin)
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        rotary_triton(**args)


def test_rotary_cache_rejects_bad_input():
    q, k, v, cos, sin = _rotary_args()
    kc, vc = torch.zeros(1, 1, 8, 64), torch.zeros(1, 1, 8, 64)
    pos = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="write_pos must be int32"):
        rotary_cache_triton(q, k, v, cos, sin, kc, vc, pos.long())
    with pytest.raises(ValueError, match=r"k_cache must be \[B=1, Hkv=1, T, D=64\]"):
        rotary_cache_triton(q, k, v, cos, sin, torch.zeros(1, 2, 8, 64), vc, pos)
    with pytest.raises(ValueError, match="k_cache .* and v_cache .* differ"):
        rotary_cache_triton(q, k, v, cos, sin, kc, torch.zeros(1, 1, 9, 64), pos)
    with pytest.raises(RuntimeError, match="inference-only"):
        rotary_cache_triton(q.clone().requires_grad_(), k, v, cos, sin, kc, vc, pos)


# ----------------------------------------------------------------------------------------------------------------
# GPU, real sizes

def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.gpu
def test_rotary_gpu_stablelm_3b_fused_qkv():
    B, S, Hq, Hkv, D, R = 8, 2048, 32, 32, 80, 20
    buf, q, k, v = fused_qkv(B, S, Hq, Hkv, D, torch.bfloat16)
    cos, sin = tables(B, S, R)
    ref_q, ref_k = rotary_ref(q.float(), k.float(), cos, sin)
    before = buf.clone()
    with torch.no_grad():
        rotary_triton(q, k, cos, sin)
    assert _rel_err(q, ref_q) < 1e-2 and _rel_err(k, ref_k) < 1e-2
    assert torch.equal(v, before[..., :(Hq + 2 * Hkv) * D].view(B, S, -1, D)[:, :, Hq + Hkv:])
    assert torch.equal(q[..., R:], before[..., :Hq * D].view(B, S, Hq, D)[..., R:])


@pytest.mark.gpu
def test_rotary_gpu_gradients():
    B, S, Hq, Hkv, D, R = 2, 256, 32, 8, 80, 20
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = tables(B, S, R)
    grads = [torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv)]
    q, k, _ = qkv.split([Hq, Hkv, Hkv], dim=2)
    torch.autograd.backward(rotary_triton(q, k, cos, sin), grads)
    ref_qkv = qkv.detach().float().requires_grad_()
    rq, rk, _ = ref_qkv.split([Hq, Hkv, Hkv], dim=2)
    torch.autograd.backward(rotary_ref(rq, rk, cos, sin), [g.float() for g in grads])
    assert _rel_err(qkv.grad, ref_qkv.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hkv", [(1, 32), (8, 8)])
def test_rotary_cache_gpu_decode_step(B, Hkv):
    Hq, D, R, T = 32, 80, 20, 4096
    _, q, k, v = fused_qkv(B, 1, Hq, Hkv, D, torch.bfloat16)
    cos, sin = tables(B, 1, R)
    k_cache = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    ref_kc, ref_vc = k_cache.float(), v_cache.float()
    write_pos = torch.randint(0, T, (B,), device="cuda", dtype=torch.int32)
    ref_q = rotary_cache_ref(q.float(), k.float(), v.float(), cos, sin, ref_kc, ref_vc, write_pos)
    with torch.no_grad():
        rotary_cache_triton(q, k, v, cos, sin, k_cache, v_cache, write_pos)
    assert _rel_err(q, ref_q) < 1e-2
    assert _rel_err(k_cache, ref_kc) < 1e-2 and torch.equal(v_cache.float(), ref_vc)
