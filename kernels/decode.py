"""Decode attention: one new query per sequence against the KV cache.

Layout: q [B, Hq, D]; k_cache, v_cache [B, Hkv, T, D] (one layer of the cache); kv_len int32 [B]: keys
0..kv_len[b]-1 are valid (the new token's key is already written); kv_start int32 [B] (optional): keys before it
are left padding. Output [B, Hq, D] in q's dtype. Nothing here reads host values of kv_len, so a CUDA graph can
capture the call.

Triton implementation (flash-decoding): the cache's T slots are cut into `splits` equal chunks, and a program per
(batch, kv head, chunk) attends all G = Hq/Hkv query heads of its kv head to its chunk, so each K/V byte is read
once; chunks past kv_len[b] (or before kv_start[b]) exit at once, so the cost follows the real context. The split
count depends only on T, B, Hkv and the SM count (never on kv_len values). With one split the kernel writes the
output itself. With several, each chunk that holds valid keys writes its (max, sum, acc) partial, and the last of
them to finish (a per-(batch, kv head) arrival counter, atomically incremented after the partial is stored; the last
arrival resets it to 0 for the next call) combines the partials in split order and writes the output: one launch
per call, so chunks can be small (one key block) and short contexts still spread over many SMs. The older second
combine kernel is kept (FUSED_COMBINE = False, or fused_combine=False) for comparison.

The counters live in a per-device buffer that is allocated once and never freed (a captured graph holds it by
address): calls that run concurrently on two streams of one device must not share it (nothing here does that).

head_dim 80 is padded to a 128-wide tile with masks rather than split 64 + 16: decode is bandwidth-bound, and
masked lanes issue no memory traffic, so the bytes read are exactly the 80 real dims; the idle lanes cost only
registers, while a 64 + 16 split would double every dot and accumulator for no bandwidth gain (and would need
a separate split for every head size).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, cdiv, next_power_of_2, pdl_launch_dependents, pdl_wait, sm_count, use_pdl


def decode_attention_ref(q, k_cache, v_cache, kv_len, kv_start=None, scale=None):
    """Reference: full softmax over all T slots in float32 with invalid slots masked."""
    B, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().view(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhgd,bhtd->bhgt", qf, k_cache.float()) * scale
    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] < kv_len.long()[:, None]
    if kv_start is not None:
        valid = valid & (pos[None, :] >= kv_start.long()[:, None])
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, v_cache.float())
    return out.reshape(B, Hq, D).to(q.dtype)


def decode_attention_sdpa(q, k_cache, v_cache, kv_len, kv_start=None, scale=None):
    """torch SDPA over all T cache slots with a boolean mask of the valid ones (no host read of kv_len)."""
    B, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] < kv_len.long()[:, None]
    if kv_start is not None:
        valid = valid & (pos[None, :] >= kv_start.long()[:, None])
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=Hq != Hkv)[:, :, 0]
    # A sequence with no valid key comes back as NaN from SDPA; the contract says zeros.
    return out.masked_fill(~valid.any(-1)[:, None, None], 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of decode_attention passes

def _decode_inputs(case, seed, device):
    """A random cache (slots past kv_len hold random values too: reading them shows); row 0 full, the other
    rows at random lengths, with random left padding when `pad`."""
    p = case.params
    B, Hq, Hkv, T, D = p["B"], p["Hq"], p["Hkv"], p["T"], p["D"]
    gen = _c.generator(case, seed)
    q = _c.randn(gen, B, Hq, D, dtype=case.dtype, device=device)
    k_cache = _c.randn(gen, B, Hkv, T, D, dtype=case.dtype, device=device)
    v_cache = _c.randn(gen, B, Hkv, T, D, dtype=case.dtype, device=device)
    kv_len = _c.randint(gen, 1, T + 1, (B,))
    kv_len[0] = T
    kv_start = None
    if p.get("pad"):
        kv_start = (torch.rand(B, generator=gen) * kv_len.float()).to(torch.int32)  # in [0, kv_len)
        kv_start = kv_start.to(device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, kv_len=kv_len.to(device), kv_start=kv_start,
                scale=p.get("scale"))


def _decode_grid():
    grid = []
    for D in (64, 80, 128):
        for Hq, Hkv in ((4, 4), (4, 2), (8, 1), (32, 8)):
            # T past 256 slots per split gives split-KV (two splits in the interpreter, more on a GPU)
            for B, T in ((2, 1), (3, 17), (2, 300), (2, 1030), (1, 4100)):
                for pad in (False, True):
                    grid.append(dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, pad=pad))
    grid.append(dict(B=2, Hq=4, Hkv=2, T=70, D=80, pad=True, scale=0.3))
    return grid


_DECODE_TOL = {torch.float32: _c.Tol(1e-5, 1e-5), torch.float16: _c.Tol(2e-3, 2e-3),
               torch.bfloat16: _c.Tol(1e-2, 1.6e-2)}
# CPU grid in fp16/fp32 only: the Triton interpreter's bf16 tl.dot gives wrong results (a GPU checks bf16 too).
_DECODE_CPU = {"B2-Hq4-Hkv2-T300-D80-pad-fp32", "B3-Hq8-Hkv1-T17-D64-fp16", "B2-Hq4-Hkv4-T300-D128-fp16",
               "B2-Hq4-Hkv2-T1-D80-fp32", "B2-Hq4-Hkv2-T70-D80-pad-scale0.3-fp16"}


def _decode_work(inputs):
    # The bytes a decode step must read: the valid K and V slots of each row, plus q and the output.
    kc, q = inputs["k_cache"], inputs["q"]
    valid = inputs["kv_len"].long() - (0 if inputs["kv_start"] is None else inputs["kv_start"].long())
    per_slot = kc.shape[1] * kc.shape[3] * kc.element_size()
    return {"bytes": 2 * int(valid.sum()) * per_slot + 2 * q.nbytes}


CONTRACTS = {"decode_attention": _c.Contract(
    op="decode_attention", reference=decode_attention_ref, make_inputs=_decode_inputs,
    cases=_c.make_cases(_decode_grid(), _c.FLOAT_DTYPES, cpu=_DECODE_CPU), tol=_DECODE_TOL,
    bench=[_c.Case("3b-B1-T4096", dict(B=1, Hq=32, Hkv=32, T=4096, D=80), torch.bfloat16),
           _c.Case("3b-B8-T4096", dict(B=8, Hq=32, Hkv=32, T=4096, D=80), torch.bfloat16)],
    work=_decode_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

_LOG2E = math.log2(math.e)

@triton.jit
def _decode_split_kernel(Q, K, V, KV_LEN, KV_START, OUT, PART, COUNTER,
                         q_sb, q_sh, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd, o_sb, o_sh, o_sd,
                         T, chunk, qk_scale,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         HAS_START: tl.constexpr, IEEE_DOT: tl.constexpr, FUSED: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, Hkv, NUM_SPLITS). Attends the G query heads of kv head `hk` to keys [split*chunk, +chunk).

    With NUM_SPLITS == 1 it writes the normalised output; otherwise PART[b, h, split, :] gets the unnormalised
    accumulator in [:HEAD_DIM], the running max (log2 domain, scale included) at HEAD_DIM and the sum at
    HEAD_DIM + 1 (max -inf, sum 0, acc 0 for a chunk with no valid key). FUSED: only chunks with keys to visit
    (lo < hi: a contiguous run of splits) write partials, and the last of them to arrive at COUNTER[b, hk]
    combines them into OUT (see the module docstring); with no such chunk, split 0 writes zeros.
    PDL: kernels/_common.py.
    """
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    kv_len = tl.minimum(tl.load(KV_LEN + b), T)  # never read past the cache, whatever kv_len says
    if HAS_START:
        start = tl.maximum(tl.load(KV_START + b), 0)
    else:
        start = 0
    lo = tl.maximum(split * chunk, (start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(split * chunk + chunk, kv_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < HEAD_DIM
    heads = hk * G + g
    q = tl.load(Q + b64 * q_sb + heads[:, None] * q_sh + d[None, :] * q_sd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(K.dtype.element_ty)

    k_base = K + b64 * k_sb + hk64 * k_sh
    v_base = V + b64 * v_sb + hk64 * v_sh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (n >= start) & (n < hi)
        # Invalid slots are masked on load (other=0), so stale or NaN cache contents never reach the sums.
        kt = tl.load(k_base + n[None, :] * k_st + d[:, None] * k_sd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A block can be fully masked (kv_start inside it, nothing valid yet): subtract 0 instead of -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * v_st + d[None, :] * v_sd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b64 * o_sb + heads[:, None] * o_sh + d[None, :] * o_sd, out.to(OUT.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    elif FUSED:
        # Splits with lo < hi are s_first .. s_first + n_active - 1 (chunk is a multiple of BLOCK_N).
        aligned = (start // BLOCK_N) * BLOCK_N
        n_active = tl.where(aligned < kv_len, (tl.maximum(kv_len, 1) - 1) // chunk - aligned // chunk + 1, 0)
        if lo < hi:
            hq = G * tl.num_programs(1)
            row = PART + ((b64 * hq + heads) * NUM_SPLITS + split) * (HEAD_DIM + 2)
            tl.store(row[:, None] + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
            tl.store(row + HEAD_DIM, m_i, mask=g_ok)
            tl.store(row + HEAD_DIM + 1, l_i, mask=g_ok)
            # Every thread's partial stores precede the counter update (CTA barrier), which releases them at GPU
            # scope; the last arrival's acquire makes every other chunk's partial visible to it.
            tl.debug_barrier()
            counter = COUNTER + b64 * tl.num_programs(1) + hk64
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == n_active - 1:
                tl.store(counter, 0)  # ready for the next call (kernel boundaries order it)
                sp = tl.arange(0, BLOCK_S)
                s_ok = sp < n_active
                s_idx = aligned // chunk + sp
                for gi in tl.static_range(G):
                    prow = PART + ((b64 * hq + hk64 * G + gi) * NUM_SPLITS + s_idx) * (HEAD_DIM + 2)
                    pm = tl.load(prow + HEAD_DIM, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                    pl = tl.load(prow + HEAD_DIM + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
                    pacc = tl.load(prow[:, None] + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0,
                                   cache_modifier=".cg")
                    m_max = tl.max(pm, 0)
                    w = tl.exp2(pm - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty chunks: weight 0
                    den = tl.sum(w * pl, 0)
                    res = tl.sum(w[:, None] * pacc, 0) / tl.where(den > 0, den, 1.0)  # no valid key: zeros
                    tl.store(OUT + b64 * o_sb + (hk64 * G + gi) * o_sh + d * o_sd, res.to(OUT.dtype.element_ty),
                             mask=d_ok)
        elif split == 0 and n_active == 0:
            zero = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            tl.store(OUT + b64 * o_sb + heads[:, None] * o_sh + d[None, :] * o_sd, zero.to(OUT.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
    else:
        row = PART + ((b64 * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split) * (HEAD_DIM + 2)
        tl.store(row[:, None] + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(row + HEAD_DIM, m_i, mask=g_ok)
        tl.store(row + HEAD_DIM + 1, l_i, mask=g_ok)


@triton.jit
def _decode_combine_kernel(PART, OUT, o_sb, o_sh, o_sd, HQ,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (B * Hq,): softmax-weighted sum of the per-split partials of one (batch, query head)."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = sp < NUM_SPLITS
    rows = PART + (pid.to(tl.int64) * NUM_SPLITS + sp) * (HEAD_DIM + 2)
    m = tl.load(rows + HEAD_DIM, mask=s_ok, other=float("-inf"))
    l = tl.load(rows + HEAD_DIM + 1, mask=s_ok, other=0.0)
    acc = tl.load(rows[:, None] + d[None, :], mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: exp2(-inf) = 0
    den = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(den > 0, den, 1.0)  # no valid key at all: zeros
    tl.store(OUT + b * o_sb + h * o_sh + d * o_sd, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Launcher

# Programs to aim for per SM: enough resident blocks to keep loads in flight even when part of the cache is empty.
_PROGRAMS_PER_SM = 8
# The combine kernel holds all partials of one head in one [splits, D] tile.
_MAX_SPLITS = 64
# Without the fused combine: below this many cache slots per split the second (combine) launch costs more than the
# parallelism gains: on an H100 a bs=1 decode step at context 128 spent 44 us of its 2.8 ms in 32 combine launches.
# With it (the default) a split is as small as one key block: a short context then spreads over many SMs instead of
# a few programs walking it block after block (latency bound), and the combine costs no launch.
_MIN_SLOTS_PER_SPLIT = 256
FUSED_COMBINE = True


def _block_n(dtype: torch.dtype) -> int:
    # 64 keys of a 128-wide tile per step for 16-bit caches; half that for float32 to keep K and V tiles in SRAM.
    return 32 if dtype == torch.float32 else 64


def num_splits(B: int, Hkv: int, T: int, dtype: torch.dtype, device: torch.device, fused: bool = True) -> int:
    """Split count for a cache of T slots: from static sizes only, so a captured graph stays valid."""
    min_slots = _block_n(dtype) if fused else max(_block_n(dtype), _MIN_SLOTS_PER_SPLIT)
    max_splits = min(_MAX_SPLITS, cdiv(T, min_slots))
    # In the interpreter parallelism does not matter: one "SM" keeps the split count small.
    wanted = cdiv(_PROGRAMS_PER_SM * sm_count(device, interpreted=1), B * Hkv)
    return max(1, min(wanted, max_splits))


def _check_decode_args(q, k_cache, v_cache, kv_len, kv_start):
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: k_cache must be [B={B}, Hkv, T, D={D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"decode_attention: query heads {Hq} must be a multiple of kv heads {Hkv}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"decode_attention: dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: q, k_cache, v_cache dtypes must match, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if D > 256:
        raise ValueError(f"decode_attention: head_dim {D} > 256 is not supported")
    for name, t in (("kv_len", kv_len), ("kv_start", kv_start)):
        if t is None:
            continue
        if t.dtype != torch.int32 or t.shape != (B,):
            raise ValueError(f"decode_attention: {name} must be int32 [B={B}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("kv_len", kv_len), ("kv_start", kv_start)):
        if t is not None and t.device != q.device:
            raise ValueError(f"decode_attention: {name} is on {t.device} but q is on {q.device}")


_COUNTERS: dict = {}  # device -> arrival-counter buffers (int32, zero between calls), newest last


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of >= n counters on `device`. A larger one replaces it for later calls, but every
    buffer stays allocated: a CUDA graph captured earlier keeps using the one it recorded."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096, 2 * bufs[-1].numel() if bufs else 0), dtype=torch.int32,
                                device=device))
    return bufs[-1]


def decode_attention_triton(q, k_cache, v_cache, kv_len, kv_start=None, scale=None, splits=None,
                            fused_combine=None):
    """Flash-decoding over the cache; `splits` overrides the static split count (tests, tuning); fused_combine
    None: FUSED_COMBINE (True: the last chunk combines, one launch; False: a second combine kernel)."""
    _check_decode_args(q, k_cache, v_cache, kv_len, kv_start)
    fused = FUSED_COMBINE if fused_combine is None else bool(fused_combine)
    B, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0 or T == 0:
        return out.zero_()
    block_n = _block_n(q.dtype)
    if splits is None:
        splits = num_splits(B, Hkv, T, q.dtype, q.device, fused)
    elif not 1 <= splits <= min(_MAX_SPLITS, cdiv(T, block_n)):
        raise ValueError(f"decode_attention: splits={splits} must be in [1, "
                         f"{min(_MAX_SPLITS, cdiv(T, block_n))}] for T={T} and {q.dtype}")
    chunk = cdiv(cdiv(T, splits), block_n) * block_n  # whole blocks per split
    splits = cdiv(T, chunk)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    block_d = max(16, next_power_of_2(D))
    part = out if splits == 1 else torch.empty((B, Hq, splits, D + 2), dtype=torch.float32, device=q.device)
    fused = fused and splits > 1
    counter = _counters(q.device, B * Hkv) if fused else kv_len
    pdl = use_pdl(q.device)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, kv_len, kv_len if kv_start is None else kv_start, out, part, counter,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        T, chunk, scale * _LOG2E,
        G=G, HEAD_DIM=D, NUM_SPLITS=splits, HAS_START=kv_start is not None, IEEE_DOT=q.dtype == torch.float32,
        FUSED=fused, BLOCK_G=max(16, next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_S=next_power_of_2(splits), num_warps=4, num_stages=2, PDL=pdl, launch_pdl=pdl)
    if splits > 1 and not fused:
        _decode_combine_kernel[(B * Hq,)](
            part, out, *out.stride(), Hq,
            HEAD_DIM=D, NUM_SPLITS=splits, BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d,
            num_warps=4, PDL=pdl, launch_pdl=pdl)
    return out


IMPLEMENTATIONS = {"decode_attention": {"torch": decode_attention_ref, "triton": decode_attention_triton,
                                        "sdpa": decode_attention_sdpa}}
