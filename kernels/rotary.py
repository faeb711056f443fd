"""Partial rotary position embedding (rotate-half convention) on the first rotary_dim dims of each head.

Layout: q [B, S, Hq, D], k [B, S, Hkv, D] (views of the fused QKV projection are fine: any strides),
cos/sin [B, S, R/2] float32 where R = rotary_dim <= D, R even. Dims R..D pass through unchanged.
Implementations may rotate in place (so callers use only the returned tensors).

rotary_cache additionally writes the rotated k and v [B, S, Hkv, D] into one layer of the KV cache
(k_cache, v_cache [B, Hkv, T, D]) at slots write_pos[b] .. write_pos[b] + S - 1 (write_pos int32 [B], on the
device, so a CUDA graph can capture the call) and returns the rotated q.

Triton implementation: one program per (token, tensor) rotates every head of that tensor, so q and k (and v's
cache copy) go in a single launch. Without autograd the rotation is in place and touches only the R rotated dims
(the pass-through dims are never read or written). When q or k requires grad, a torch.autograd.Function returns
new tensors instead (in-place writes to the views of a split are not allowed under autograd) and its backward is
the inverse rotation of the incoming grads, by the same kernel. Math in float32 for fp32/fp16/bf16 inputs.
"""
import torch
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, pdl_launch_dependents, pdl_wait, use_pdl


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Reference: returns new (q, k) with the first 2*cos.shape[-1] dims rotated; math in float32."""
    def rot(x):
        half = cos.shape[-1]
        c = cos[:, :, None, :]
        s = sin[:, :, None, :]
        x1 = x[..., :half].float()
        x2 = x[..., half:2 * half].float()
        out = x.clone()
        out[..., :half] = (x1 * c - x2 * s).to(x.dtype)
        out[..., half:2 * half] = (x2 * c + x1 * s).to(x.dtype)
        return out

    return rot(q), rot(k)


def rotary_cache_ref(q, k, v, cos, sin, k_cache, v_cache, write_pos):
    """Reference: rotary_ref, then an indexed write of k and v into the cache; returns the rotated q."""
    q, k = rotary_ref(q, k, cos, sin)
    B, S = k.shape[:2]
    slots = write_pos.long()[:, None] + torch.arange(S, device=k.device)[None, :]
    rows = torch.arange(B, device=k.device)[:, None].expand(B, S)
    # Advanced indices around a slice put the indexed dims first: k_cache[rows, :, slots] is [B, S, Hkv, D].
    k_cache[rows, :, slots] = k.to(k_cache.dtype)
    v_cache[rows, :, slots] = v.to(v_cache.dtype)
    return q


# ----------------------------------------------------------------------------------------------------------------
# Contracts (kernels/contract.py): the checks every implementation of rotary / rotary_cache passes

def _rotary_inputs(case, seed, device):
    """q, k as views of a fused QKV projection (as the model passes them) or contiguous; random positions."""
    p = case.params
    B, S, Hq, Hkv, D, R = p["B"], p["S"], p["Hq"], p["Hkv"], p["D"], p["R"]
    gen = _c.generator(case, seed)
    if p.get("fused", True):
        # Three extra columns per token so token rows are not packed: strides are the model's, never assumed.
        buf = _c.randn(gen, B, S, (Hq + 2 * Hkv) * D + 3, dtype=case.dtype, device=device)
        q, k, v = buf[..., :(Hq + 2 * Hkv) * D].view(B, S, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    else:
        q, k, v = (_c.randn(gen, B, S, h, D, dtype=case.dtype, device=device) for h in (Hq, Hkv, Hkv))
    cos, sin = _c.rope_tables(gen, B, S, R, device=device)
    inputs = dict(q=q, k=k, cos=cos, sin=sin)
    if case.params.get("T"):
        T = p["T"]
        inputs.update(v=v, k_cache=_c.randn(gen, B, Hkv, T, D, dtype=case.dtype, device=device),
                      v_cache=_c.randn(gen, B, Hkv, T, D, dtype=case.dtype, device=device),
                      write_pos=_c.randint(gen, 0, T - S + 1, (B,), device=device))
    return inputs


# head_dim / rotary_dim pairs: StableLM-3B is (80, 20); 32 of 64 and all of 80 (partial_rotary_factor 1.0) too.
_ROTARY_SHAPES = [(64, 20), (64, 32), (80, 20), (80, 32), (80, 80), (128, 32), (128, 80)]
_ROTARY_TOL = {torch.float32: _c.Tol(1e-5, 1e-5), torch.float16: _c.Tol(1e-3, 1e-3),
               torch.bfloat16: _c.Tol(1e-2, 1.6e-2)}  # one rotation in float32 rounded to the dtype (~1 ulp)
_ROTARY_CPU = {  # the CI grid: every head_dim, rotary dim, GQA ratio and dtype at least once
    "B2-S7-Hq4-Hkv2-D80-R20-fused-bf16", "B2-S5-Hq4-Hkv4-D64-R32-fp16", "B2-S3-Hq8-Hkv2-D128-R80-fused-fp32",
    "B2-S7-Hq8-Hkv1-D80-R20-fp16", "B2-S3-Hq4-Hkv2-D80-R20-fused-fp32-grad", "B2-S5-Hq4-Hkv4-D64-R32-bf16-grad",
    "B2-S1-Hq4-Hkv2-D80-R20-T16-fused-bf16", "B2-S5-Hq8-Hkv2-D128-R32-T16-fp32"}
_ROTARY_CACHE_CPU = {n for n in _ROTARY_CPU if "-T" in n}


def _rotary_grid(cache: bool):
    """All GQA ratios and both layouts at StableLM-3B's (80, 20); the other dims at two ratios, fused views."""
    grid = []
    for D, R in _ROTARY_SHAPES:
        for Hq, Hkv in ([(4, 4), (4, 2), (8, 1), (8, 2)] if (D, R) == (80, 20) else [(4, 4), (8, 2)]):
            for S in (1, 3, 5, 7, 33):
                for fused in ((True, False) if (D, R) == (80, 20) or S == 5 else (True,)):
                    grid.append(dict(B=1 if S == 33 else 2, S=S, Hq=Hq, Hkv=Hkv, D=D, R=R,
                                     T=(48 if S == 33 else 16) if cache else None, fused=fused))
    return grid


def _rotary_work(inputs):
    q, k = inputs["q"], inputs["k"]
    R = 2 * inputs["cos"].shape[-1]
    moved = (q[..., :R].numel() + k[..., :R].numel()) * q.element_size() * 2 + inputs["cos"].nbytes * 2
    if "k_cache" in inputs:  # k, v read at full width and written into the cache
        moved += 2 * (inputs["v"].nbytes + inputs["v"].nbytes)
    return {"bytes": moved}


def _bench_case(name, dtype=torch.bfloat16, **params):
    return _c.Case(name, params, dtype)


CONTRACTS = {
    "rotary": _c.Contract(
        op="rotary", reference=rotary_ref, make_inputs=_rotary_inputs,
        cases=_c.make_cases(_rotary_grid(False), _c.FLOAT_DTYPES, grad=(False, True),
                            cpu=_ROTARY_CPU - _ROTARY_CACHE_CPU),
        tol=_ROTARY_TOL, grad_tol=_ROTARY_TOL, grad_inputs=("q", "k"),
        outputs=lambda out, inputs: {"q": out[0], "k": out[1]},
        bench=[_bench_case("3b-prefill-B1-S4096", B=1, S=4096, Hq=32, Hkv=32, D=80, R=20),
               _bench_case("3b-decode-B8-S1", B=8, S=1, Hq=32, Hkv=32, D=80, R=20)],
        work=_rotary_work),
    "rotary_cache": _c.Contract(
        op="rotary_cache", reference=rotary_cache_ref, make_inputs=_rotary_inputs,
        cases=_c.make_cases(_rotary_grid(True), _c.FLOAT_DTYPES,
                            cpu=_ROTARY_CACHE_CPU),
        tol=_ROTARY_TOL,
        # The cache slots outside the written ones are compared too: they must keep their (random) values.
        outputs=lambda out, inputs: {"q": out, "k_cache": inputs["k_cache"], "v_cache": inputs["v_cache"]},
        bench=[_bench_case("3b-decode-B8-S1-T4096", B=8, S=1, Hq=32, Hkv=32, D=80, R=20, T=4096),
               _bench_case("3b-prefill-B1-S2048-T4096", B=1, S=2048, Hq=32, Hkv=32, D=80, R=20, T=4096)],
        work=_rotary_work),
}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _rotate_heads(src, dst, src_sh, src_sd, dst_sh, dst_sd, n_heads, cos, sin, cos_sd, sin_sd, sign,
                  HALF: tl.constexpr, N_COLS: tl.constexpr, ROTATE: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[h, d] = rotated src[h, d] for h < n_heads, d < N_COLS (one token; src may equal dst).

    With N_COLS = R only the rotated dims are touched; with N_COLS = D the pass-through dims are copied too
    (cos = 1, sin = 0 there). sign = -1 applies the inverse rotation. ROTATE = False is a plain copy.
    HALF and N_COLS are constexpr so the column masks are constant and loads vectorise.
    """
    d = tl.arange(0, BLOCK_D)
    col_ok = d < N_COLS
    if ROTATE:
        rotated = d < 2 * HALF
        first = d < HALF
        # Rotate-half pairs dim j with j + HALF: out_j = x_j * cos_j - x_{j+HALF} * sin_j and
        # out_{j+HALF} = x_{j+HALF} * cos_j + x_j * sin_j, i.e. out = x * c + partner * s with a signed s.
        partner = tl.where(first, d + HALF, d - HALF)
        freq = tl.where(first, d, d - HALF)
        c = tl.load(cos + freq * cos_sd, mask=rotated, other=1.0)
        s = tl.load(sin + freq * sin_sd, mask=rotated, other=0.0)
        s = tl.where(first, -s, s) * sign
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & col_ok[None, :]
        x = tl.load(src + h[:, None] * src_sh + d[None, :] * src_sd, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            # Both halves are loaded before anything is stored, so src == dst (in place) is safe.
            xp = tl.load(src + h[:, None] * src_sh + partner[None, :] * src_sd, mask=mask & rotated[None, :],
                         other=0.0).to(tl.float32)
            x = x * c[None, :] + xp * s[None, :]
        tl.store(dst + h[:, None] * dst_sh + d[None, :] * dst_sd, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN,
                   q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd,
                   qo_sb, qo_ss, qo_sh, qo_sd, ko_sb, ko_ss, ko_sh, ko_sd,
                   c_sb, c_ss, c_sd, s_sb, s_ss, s_sd,
                   S, HQ, HKV, sign,
                   HALF: tl.constexpr, N_COLS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B*S, 2): axis 1 picks q (0) or k (1); writes QO/KO (which may be Q/K themselves)."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    cos = COS + b * c_sb + s * c_ss
    sin = SIN + b * s_sb + s * s_ss
    if tl.program_id(1) == 0:
        _rotate_heads(Q + b * q_sb + s * q_ss, QO + b * qo_sb + s * qo_ss, q_sh, q_sd, qo_sh, qo_sd, HQ,
                      cos, sin, c_sd, s_sd, sign, HALF, N_COLS, True, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(K + b * k_sb + s * k_ss, KO + b * ko_sb + s * ko_ss, k_sh, k_sd, ko_sh, ko_sd, HKV,
                      cos, sin, c_sd, s_sd, sign, HALF, N_COLS, True, BLOCK_H, BLOCK_D)


@triton.jit
def _rotary_cache_kernel(Q, K, V, KC, VC, COS, SIN, WRITE_POS,
                         q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd,
                         kc_sb, kc_sh, kc_st, kc_sd, vc_sb, vc_sh, vc_st, vc_sd,
                         c_sb, c_ss, c_sd, s_sb, s_ss, s_sd,
                         S, T, HQ, HKV,
                         HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (B*S, 3): axis 1 picks q rotated in place (0), k rotated into k_cache (1), v copied into v_cache (2).
    PDL: kernels/_common.py."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    tok = tl.program_id(0)
    which = tl.program_id(1)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    cos = COS + b * c_sb + s * c_ss
    sin = SIN + b * s_sb + s * s_ss
    if which == 0:
        q = Q + b * q_sb + s * q_ss
        _rotate_heads(q, q, q_sh, q_sd, q_sh, q_sd, HQ, cos, sin, c_sd, s_sd, 1.0,
                      HALF, 2 * HALF, True, BLOCK_H, BLOCK_R)
    else:
        slot = tl.load(WRITE_POS + b).to(tl.int64) + s
        # A slot outside the cache writes nothing (zero heads); KVCache.check_room raises on the host before that.
        n_heads = tl.where((slot >= 0) & (slot < T), HKV, 0)
        if which == 1:
            _rotate_heads(K + b * k_sb + s * k_ss, KC + b * kc_sb + slot * kc_st, k_sh, k_sd, kc_sh, kc_sd,
                          n_heads, cos, sin, c_sd, s_sd, 1.0, HALF, HEAD_DIM, True, BLOCK_H, BLOCK_D)
        else:
            _rotate_heads(V + b * v_sb + s * v_ss, VC + b * vc_sb + slot * vc_st, v_sh, v_sd, vc_sh, vc_sd,
                          n_heads, cos, sin, c_sd, s_sd, 1.0, HALF, HEAD_DIM, False, BLOCK_H, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

def _block_h(n_heads: int, block_d: int) -> int:
    # About 2K elements per tile: enough work per load without spilling.
    return max(1, min(triton.next_power_of_2(n_heads), 2048 // block_d))


def _check_rotary_args(q, k, cos, sin):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"rotary: {name} must be [B, S, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rotary: {name} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"rotary: {name} must be float32, got {t.dtype}")
        if t.requires_grad:
            raise ValueError(f"rotary: no gradient flows to {name}; pass it without requires_grad")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"rotary: {name} is on {t.device} but q is on {q.device}")
    B, S, _, D = q.shape
    if k.shape[:2] != (B, S) or k.shape[3] != D:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, S and D")
    if cos.dim() != 3 or cos.shape[:2] != (B, S) or sin.shape != cos.shape:
        raise ValueError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [B={B}, S={S}, R/2]")
    half = cos.shape[2]
    if half < 1 or 2 * half > D:
        raise ValueError(f"rotary: rotary_dim 2*{half} must be in [2, head_dim={D}]")


def _launch_rotary(q, k, q_out, k_out, cos, sin, n_cols: int, sign: float):
    B, S, Hq, _ = q.shape
    Hkv = k.shape[2]
    if B * S == 0:
        return
    block_d = triton.next_power_of_2(n_cols)
    _rotary_kernel[(B * S, 2)](
        q, k, q_out, k_out, cos, sin,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        S, Hq, Hkv, sign,
        HALF=cos.shape[2], N_COLS=n_cols, BLOCK_H=_block_h(max(Hq, Hkv), block_d), BLOCK_D=block_d)


class _RotaryFunction(torch.autograd.Function):
    """Out-of-place rotary for training; backward rotates the incoming grads by -angle."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        _launch_rotary(q, k, q_out, k_out, cos, sin, n_cols=q.shape[3], sign=1.0)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq = torch.empty(grad_q.shape, dtype=grad_q.dtype, device=grad_q.device)
        dk = torch.empty(grad_k.shape, dtype=grad_k.dtype, device=grad_k.device)
        _launch_rotary(grad_q, grad_k, dq, dk, cos, sin, n_cols=grad_q.shape[3], sign=-1.0)
        return dq, dk, None, None


def rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k in one launch: in place (returns q, k themselves) unless autograd needs their graph."""
    _check_rotary_args(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RotaryFunction.apply(q, k, cos, sin)
    _launch_rotary(q, k, q, k, cos, sin, n_cols=2 * cos.shape[2], sign=1.0)
    return q, k


def rotary_cache_triton(q, k, v, cos, sin, k_cache, v_cache, write_pos):
    """Rotate q in place and write rotated k and v into the cache, in one launch; returns q. Inference only.

    Slots past T are not written (masked on the device, where they cannot be reported without a sync): the
    caller checks room on the host first (KVCache.check_room). k and v are only read.
    """
    _check_rotary_args(q, k, cos, sin)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("rotary_cache_triton is inference-only (no autograd): call it under torch.no_grad()")
    if v.shape != k.shape:
        raise ValueError(f"rotary_cache: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rotary_cache: v dtype {v.dtype} is not supported (float32, float16, bfloat16)")
    B, S, Hkv, D = k.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[0] != B or c.shape[1] != Hkv or c.shape[3] != D:
            raise ValueError(f"rotary_cache: {name} must be [B={B}, Hkv={Hkv}, T, D={D}], got {tuple(c.shape)}")
        if c.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rotary_cache: {name} dtype {c.dtype} is not supported (float32, float16, bfloat16)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"rotary_cache: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if write_pos.dtype != torch.int32 or write_pos.shape != (B,):
        raise ValueError(f"rotary_cache: write_pos must be int32 [B={B}], got {write_pos.dtype} "
                         f"{tuple(write_pos.shape)}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("write_pos", write_pos)):
        if t.device != q.device:
            raise ValueError(f"rotary_cache: {name} is on {t.device} but q is on {q.device}")
    if B * S == 0:
        return q
    half = cos.shape[2]
    block_r = triton.next_power_of_2(2 * half)
    block_d = triton.next_power_of_2(D)
    pdl = use_pdl(q.device)
    _rotary_cache_kernel[(B * S, 3)](
        q, k, v, k_cache, v_cache, cos, sin, write_pos,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *cos.stride(), *sin.stride(),
        S, k_cache.shape[2], q.shape[2], Hkv,
        HALF=half, HEAD_DIM=D, BLOCK_H=_block_h(max(q.shape[2], Hkv), block_d), BLOCK_R=block_r, BLOCK_D=block_d,
        PDL=pdl, launch_pdl=pdl)
    return q


IMPLEMENTATIONS = {
    "rotary": {"torch": rotary_ref, "triton": rotary_triton},
    "rotary_cache": {"torch": rotary_cache_ref, "triton": rotary_cache_triton},
}
