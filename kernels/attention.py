"""Causal prefill attention with GQA and left padding.

Layout: q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] with Sk >= Sq and Hq % Hkv == 0 (any strides).
Query i sits at key position Sk - Sq + i (bottom-right aligned causal mask), so the same call serves a plain
prefill (Sq == Sk) and a prefill that continues a KV cache. kv_start (int32 [B], optional): keys j < kv_start[b]
are left padding and masked out. Rows with no visible key return zeros. Output [B, Hq, Sq, D] in q's dtype.

Implementations: "torch" (attention_ref), "sdpa" (attention_sdpa), "triton" (attention_triton: flash-attention
forward and backward written here), and "flash_attn" when that package imports.

The Triton kernels never materialise the Sq x Sk score matrix: the forward keeps an online softmax in base 2
(scores are prescaled by scale * log2(e) inside one FMA) and saves the per-row log-sum-exp; the backward recomputes
the probabilities block by block from it. Key blocks that the causal mask or the left padding hide entirely are
never visited, and only the blocks that straddle a mask boundary pay for the masking. A head_dim that is not a power
of two is split into two power-of-two parts (80 = 64 + 16), each with its own tl.dot, so StableLM-3B's head_dim 80
does 80-wide work rather than 128-wide work with 48 masked lanes. float32 inputs use three-pass tf32 products
(fp32-level accuracy on the tensor cores); float16/bfloat16 use their own tensor-core products with fp32 accumulation.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES, INTERPRET, cdiv, next_power_of_2

_LOG2E = 1.4426950408889634


def _mask(B, Sq, Sk, kv_start, causal, device):
    """Boolean [B, 1, Sq, Sk] mask of visible keys."""
    qpos = torch.arange(Sk - Sq, Sk, device=device)[:, None]
    kpos = torch.arange(Sk, device=device)[None, :]
    visible = (kpos <= qpos) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    visible = visible[None].expand(B, Sq, Sk)
    if kv_start is not None:
        visible = visible & (kpos[None] >= kv_start.to(device).long()[:, None, None])
    return visible[:, None]


def attention_ref(q, k, v, kv_start=None, causal=True, scale=None):
    """Reference: materialises the score matrix in float32."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    visible = _mask(B, Sq, Sk, kv_start, causal, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf).to(q.dtype)


def attention_sdpa(q, k, v, kv_start=None, causal=True, scale=None):
    """torch.nn.functional.scaled_dot_product_attention; uses its is_causal fast path when nothing is padded."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    gqa = Hq != Hkv
    if kv_start is None and (not causal or Sq == Sk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Sq > 1, scale=scale, enable_gqa=gqa)
    visible = _mask(B, Sq, Sk, kv_start, causal, q.device)
    # A row with no visible key would come back NaN from SDPA, and its NaN probabilities would reach dk and dv in
    # the backward even with a zero upstream gradient: such rows attend to every key here and are zeroed after
    # (the contract's output for them), so their gradient is exactly zero.
    empty = ~visible.any(-1, keepdim=True)
    if gqa:
        # With a mask SDPA's memory-efficient kernel takes no enable_gqa (math would materialise every score
        # instead): one key / value head per query head, as repeat_interleave orders them, is cheaper.
        k, v = (t[:, :, None].expand(B, Hkv, Hq // Hkv, Sk, D).reshape(B, Hq, Sk, D) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): the checks every implementation of attention passes

def _attention_inputs(case, seed, device):
    """q, k, v as the model passes them (transposed views of [B, S, H, D]) or contiguous [B, H, S, D];
    kv_start with row 0 unpadded and the others padded at random (some query rows then see no key)."""
    p = case.params
    B, Hq, Hkv, Sq, Sk, D = p["B"], p["Hq"], p["Hkv"], p["Sq"], p["Sk"], p["D"]
    gen = _c.generator(case, seed)

    def one(H, S):
        if not p.get("contig"):
            return _c.randn(gen, B, S, H, D, dtype=case.dtype, device=device).transpose(1, 2)
        return _c.randn(gen, B, H, S, D, dtype=case.dtype, device=device)

    q, k, v = one(Hq, Sq), one(Hkv, Sk), one(Hkv, Sk)
    kv_start = None
    if p.get("pad"):
        kv_start = _c.randint(gen, 0, Sk, (B,), device=device)
        kv_start[0] = 0
    return dict(q=q, k=k, v=v, kv_start=kv_start, causal=not p.get("noncausal"), scale=p.get("scale"))


def _attention_grid():
    grid = []
    for D in (64, 80, 128):
        for Hq, Hkv in ((4, 4), (4, 2), (8, 1)):
            # plain prefill (odd, several key blocks), one token, a prefill continuing a cache (Sq < Sk)
            for Sq, Sk in ((37, 37), (1, 1), (13, 45), (130, 130)):
                for pad in (False, True):
                    grid.append(dict(B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, pad=pad))
    grid += [dict(B=2, Hq=4, Hkv=2, Sq=21, Sk=21, D=80, noncausal=True),  # non-causal, explicit scale, contiguous
             dict(B=2, Hq=4, Hkv=2, Sq=19, Sk=19, D=80, pad=True, scale=0.05, contig=True)]
    return grid


_ATTENTION_TOL = {torch.float32: _c.Tol(2e-5, 1e-4), torch.float16: _c.Tol(1e-2, 1e-2),
                  torch.bfloat16: _c.Tol(2e-2, 2e-2)}
# Gradients sum over every query row (dk, dv: and over the GQA group's heads): their rounding follows the size of
# the summed terms, so the 16-bit atol is relative to the tensor's largest value (Tol.of_max).
_ATTENTION_GRAD_TOL = {torch.float32: _c.Tol(1e-4, 1e-3), torch.float16: _c.Tol(5e-3, 2e-2, of_max=True),
                       torch.bfloat16: _c.Tol(2e-2, 5e-2, of_max=True)}
# CPU grid in fp16/fp32 only: the Triton interpreter's bf16 tl.dot gives wrong results (a GPU checks bf16 too).
_ATTENTION_CPU = {
    "B2-Hq4-Hkv2-Sq37-Sk37-D80-pad-fp32", "B2-Hq8-Hkv1-Sq13-Sk45-D64-pad-fp16", "B2-Hq4-Hkv4-Sq1-Sk1-D128-fp16",
    "B2-Hq4-Hkv2-Sq21-Sk21-D80-noncausal-fp32",
    "B2-Hq4-Hkv2-Sq19-Sk19-D80-pad-scale0.05-contig-fp32-grad"}


def _attention_work(inputs):
    q, k = inputs["q"], inputs["k"]
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    # Causal: about half of the Sq x Sk products are visible (bottom-right aligned), two matmuls of 2*D flops each.
    pairs = Sq * Sk - (Sq * (Sq - 1)) // 2 if inputs["causal"] else Sq * Sk
    return {"flops": 4 * B * H * pairs * D}


CONTRACTS = {"attention": _c.Contract(
    op="attention", reference=attention_ref, make_inputs=_attention_inputs,
    cases=_c.make_cases(_attention_grid(), _c.FLOAT_DTYPES, grad=(False, True), cpu=_ATTENTION_CPU),
    tol=_ATTENTION_TOL, grad_tol=_ATTENTION_GRAD_TOL, grad_inputs=("q", "k", "v"),
    bench=[_c.Case("3b-prefill-B1-S4096", dict(B=1, Hq=32, Hkv=32, Sq=4096, Sk=4096, D=80), torch.bfloat16),
           _c.Case("3b-prefill-B4-S1024-pad", dict(B=4, Hq=32, Hkv=32, Sq=1024, Sk=1024, D=80, pad=True),
                   torch.bfloat16)],
    work=_attention_work)}


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

def _configs(params, fallback, interpret_params):
    """Autotune candidates on a GPU; one small fixed config in the interpreter so CPU tests stay fast.

    params: (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) tuples; fallback: a small unpipelined config that
    fits in shared memory for any supported head_dim and dtype (see _keep_fallback_for_wide_rows).
    """
    if INTERPRET:
        params = [interpret_params]
    else:
        params = params + [fallback]
    return [triton.Config({"BLOCK_M": p[0], "BLOCK_N": p[1]}, num_warps=p[2], num_stages=p[3],
                          maxnreg=p[4] if len(p) > 4 else None) for p in params]


def _keep_fallback_for_wide_rows(configs, named_args, **kwargs):
    """Bench the fallback config only for rows wider than 256 bytes (fp32, or head_dim > 128), where the tuned
    configs may exceed shared memory and the autotuner would otherwise be left with nothing that launches."""
    row_bytes = named_args["Q"].element_size() * (kwargs["D_LO"] + kwargs["D_HI"])
    return configs if row_bytes > 256 else configs[:-1]


# Chosen for Hopper (H100: 228 KB shared memory and 64K registers per SM) by compiling for sm_90 offline and keeping
# the candidates that do not spill registers at head_dim 80 (ptxas -v); the autotuner picks among them on the GPU.
# At head_dim 80 the forward is bound by the softmax (exp2 and row reductions) more than by the tensor cores, so
# 128-row query blocks over 8 warps (two warpgroups of 64 rows) amortise the per-block bookkeeping best. Capped at
# 128 registers (it needs 152, and still does not spill at 128), that config fits two CTAs per SM, so one CTA's
# softmax overlaps the other's matmuls. 64-row blocks are there for short query lengths.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 64, 8, 2, 128), (128, 128, 8, 3),
                         (128, 64, 4, 3), (64, 64, 4, 3)],
                        fallback=(32, 32, 4, 1), interpret_params=(32, 16, 4, 1))
# Backward, per key block: the dk and dv accumulators (2 x BLOCK_N x D fp32) stay in registers for the whole
# kernel, so the query step (BLOCK_M) stays small to leave room for the [BLOCK_N, BLOCK_M] score tiles.
# The (32, 64, 8 warps) dk/dv candidate is gone: on the H200 it faulted (illegal address) at head_dim 80 in fp32
# when pinned alone. Unpipelined (num_stages 1) candidates did not remove the split-head_dim fault either (see
# SPLIT_HEAD_BACKWARD_VIA_SDPA), so the pipelined ones stay: head_dim 64's gradient cases passed on the GPU with them.
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (16, 128, 8, 3)],
                         fallback=(16, 32, 4, 1), interpret_params=(16, 32, 4, 1))
_DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
                       fallback=(32, 16, 4, 1), interpret_params=(32, 16, 4, 1))
# Autotune keys: head_dim split, causal and padding flags, and power-of-two buckets of the lengths (tuning per exact
# length would re-tune on every new prompt length). Tensor dtypes are part of the key automatically.
_KEY = ["Q_BUCKET", "K_BUCKET", "D_LO", "D_HI", "CAUSAL", "HAS_KV_START"]
_PRUNE = {"early_config_prune": _keep_fallback_for_wide_rows}

# Cheap launches (issue 11 item 5). Through triton.autotune every call pays the Autotuner's own host work (its key
# rebuilt from all ~36 arguments with a dtype string per tensor, config kwargs merged, a grid callback) on top of
# the JIT launch; in eager use a short prefill is host bound, so that overhead decided SDPA vs Triton below ~8K
# tokens per call (bench/results/launch_h200.json: 90 us per call vs SDPA's 20). _Launch asks the Autotuner once
# per autotune key (it benchmarks there, as before) and remembers the config it chose; later calls with that key go
# straight to the JIT function with the config's constexprs and launch options. False: every call through the
# Autotuner (the old path; bench/gemv_wired.py measures both).
CHEAP_LAUNCH = True


class _Launch:
    """Launch an autotuned kernel `tuned` (triton.autotune over a JIT function) by the config it chose for `key`.

    key: what the Autotuner's own key holds for these calls (the _KEY values and the tensor dtypes), so a hit picks
    the config the Autotuner would. grid: (BLOCK_M, BLOCK_N) -> launch grid."""

    def __init__(self, tuned):
        self.tuned = tuned
        self.chosen = {}  # key -> (BLOCK_M, BLOCK_N, the config's kwargs + launch options)

    def __call__(self, key, grid, args, meta):
        hit = self.chosen.get(key) if CHEAP_LAUNCH else None
        if hit is None:
            self.tuned[lambda cfg: grid(cfg["BLOCK_M"], cfg["BLOCK_N"])](*args, **meta)
            cfg = self.tuned.best_config
            self.chosen[key] = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.all_kwargs())
            return
        block_m, block_n, kwargs = hit
        self.tuned.fn[grid(block_m, block_n)](*args, **meta, **kwargs)


@triton.jit
def _key_block_ranges(start_m, kv_first, Sk, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Key bounds for query rows start_m .. start_m + BLOCK_M - 1.

    Returns (first, full_lo, full_hi, end): blocks in [first, full_lo) straddle the left padding, blocks in
    [full_lo, full_hi) are visible to every row of the query block (no mask), blocks in [max(full_lo, full_hi), end)
    straddle the causal diagonal or the end of the keys. Keys before `first` or from `end` on are never visited.
    """
    first = (kv_first // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(kv_first, BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Row r sees keys <= r + shift; the block's first row bounds the unmasked region, its last row the end.
        full_hi = ((start_m + shift + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M + shift, Sk)
    else:
        full_hi = (Sk // BLOCK_N) * BLOCK_N
        end = Sk
    return first, full_lo, full_hi, end


@triton.jit
def _fwd_blocks(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo_ptrs, k_hi_ptrs, v_lo_ptrs, v_hi_ptrs,
                stride_kn, stride_vn, rows, kv_first, Sk, shift, qk_scale, lo, hi,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Online-softmax update of one query block over key blocks [lo, hi); m_i and l_i are in base 2."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        if MASKED:
            in_range = keys < Sk
            k_lo = tl.load(k_lo_ptrs + start_n * stride_kn, mask=in_range[:, None], other=0.0)
        else:
            k_lo = tl.load(k_lo_ptrs + start_n * stride_kn)
        qk = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION)
        if HAS_HI:
            if MASKED:
                k_hi = tl.load(k_hi_ptrs + start_n * stride_kn, mask=in_range[:, None], other=0.0)
            else:
                k_hi = tl.load(k_hi_ptrs + start_n * stride_kn)
            qk = tl.dot(q_hi, tl.trans(k_hi), qk, input_precision=PRECISION)
        if MASKED:
            visible = (keys[None, :] >= kv_first) & in_range[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # A row with no visible key yet keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v_lo = tl.load(v_lo_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
        else:
            v_lo = tl.load(v_lo_ptrs + start_n * stride_vn)
        p = p.to(v_lo.dtype)
        acc_lo = tl.dot(p, v_lo, acc_lo * alpha[:, None], input_precision=PRECISION)
        if HAS_HI:
            if MASKED:
                v_hi = tl.load(v_hi_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
            else:
                v_hi = tl.load(v_hi_ptrs + start_n * stride_vn)
            acc_hi = tl.dot(p, v_hi, acc_hi * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc_lo, acc_hi, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KV_START,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     Hq, Sq, Sk, group, qk_scale, Q_BUCKET, K_BUCKET,
                     D_LO: tl.constexpr, D_HI: tl.constexpr, D_HI_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q_BUCKET and K_BUCKET (here and in the backward kernels) are only read by the autotuner, as part of its key.
    # Causal query blocks near the end do the most work: launch them first so the grid's tail is short blocks.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    shift = Sk - Sq
    HAS_HI: tl.constexpr = D_HI > 0

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    offs_n = tl.arange(0, BLOCK_N)
    d_lo = tl.arange(0, D_LO)
    d_hi = D_LO + tl.arange(0, D_HI_BLOCK)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q_lo = tl.load(q_base + rows[:, None] * stride_qm + d_lo[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    k_lo_ptrs = k_base + offs_n[:, None] * stride_kn + d_lo[None, :] * stride_kd
    v_lo_ptrs = v_base + offs_n[:, None] * stride_vn + d_lo[None, :] * stride_vd
    k_hi_ptrs = k_base + offs_n[:, None] * stride_kn + d_hi[None, :] * stride_kd
    v_hi_ptrs = v_base + offs_n[:, None] * stride_vn + d_hi[None, :] * stride_vd
    if HAS_HI:
        q_hi = tl.load(q_base + rows[:, None] * stride_qm + d_hi[None, :] * stride_qd, mask=row_ok[:, None],
                       other=0.0)
    else:
        q_hi = tl.zeros([BLOCK_M, D_HI_BLOCK], dtype=q_lo.dtype)

    if HAS_KV_START:
        kv_first = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        kv_first = 0
    first, full_lo, full_hi, end = _key_block_ranges(start_m, kv_first, Sk, shift, CAUSAL, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D_HI_BLOCK], dtype=tl.float32)
    if HAS_KV_START:
        acc_lo, acc_hi, m_i, l_i = _fwd_blocks(
            acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo_ptrs, k_hi_ptrs, v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn,
            rows, kv_first, Sk, shift, qk_scale, first, tl.minimum(full_lo, end),
            True, CAUSAL, HAS_HI, PRECISION, BLOCK_N)
    acc_lo, acc_hi, m_i, l_i = _fwd_blocks(
        acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo_ptrs, k_hi_ptrs, v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn,
        rows, kv_first, Sk, shift, qk_scale, full_lo, full_hi,
        False, CAUSAL, HAS_HI, PRECISION, BLOCK_N)
    acc_lo, acc_hi, m_i, l_i = _fwd_blocks(
        acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo_ptrs, k_hi_ptrs, v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn,
        rows, kv_first, Sk, shift, qk_scale, tl.maximum(full_lo, full_hi), end,
        True, CAUSAL, HAS_HI, PRECISION, BLOCK_N)

    # l_i == 0 exactly when the row saw no key (a visible row's maximum contributes exp2(0) = 1): output zeros and
    # LSE = +inf, which makes every recomputed probability of the row 0 in the backward.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * Sq + rows, lse, mask=row_ok)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + d_lo[None, :] * stride_od,
             (acc_lo * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    if HAS_HI:
        tl.store(o_base + rows[:, None] * stride_om + d_hi[None, :] * stride_od,
                 (acc_hi * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                      stride_dob, stride_doh, stride_dom, stride_dod, Hq, Sq,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in float32: the softmax-backward term shared by every key of a row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Sq) & (d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om
                + d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dom
                 + d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + rows, delta, mask=rows < Sq)


@triton.jit
def _dkdv_blocks(dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, lse_base, delta_base,
                 stride_qm, stride_qd, stride_dom, stride_dod, keys, kv_first, Sq, shift, qk_scale, lo, hi,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr,
                 D_LO: tl.constexpr, D_HI_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one key block's dk, dv over the query blocks [lo, hi) of one query head (transposed tiles)."""
    d_lo = tl.arange(0, D_LO)
    d_hi = D_LO + tl.arange(0, D_HI_BLOCK)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        q_lo = tl.load(q_base + rows[:, None] * stride_qm + d_lo[None, :] * stride_qd, mask=row_ok[:, None],
                       other=0.0)
        qkT = tl.dot(k_lo, tl.trans(q_lo), input_precision=PRECISION)
        if HAS_HI:
            q_hi = tl.load(q_base + rows[:, None] * stride_qm + d_hi[None, :] * stride_qd, mask=row_ok[:, None],
                           other=0.0)
            qkT = tl.dot(k_hi, tl.trans(q_hi), qkT, input_precision=PRECISION)
        # Rows past Sq get LSE = +inf, hence probability 0.
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            visible = keys[:, None] >= kv_first
            if CAUSAL:
                visible = visible & (keys[:, None] <= rows[None, :] + shift)
            pT = tl.where(visible, pT, 0.0)
        do_lo = tl.load(do_base + rows[:, None] * stride_dom + d_lo[None, :] * stride_dod, mask=row_ok[:, None],
                        other=0.0)
        p_op = pT.to(do_lo.dtype)
        dv_lo = tl.dot(p_op, do_lo, dv_lo, input_precision=PRECISION)
        dpT = tl.dot(v_lo, tl.trans(do_lo), input_precision=PRECISION)
        if HAS_HI:
            do_hi = tl.load(do_base + rows[:, None] * stride_dom + d_hi[None, :] * stride_dod,
                            mask=row_ok[:, None], other=0.0)
            dv_hi = tl.dot(p_op, do_hi, dv_hi, input_precision=PRECISION)
            dpT = tl.dot(v_hi, tl.trans(do_hi), dpT, input_precision=PRECISION)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(q_lo.dtype)
        dk_lo = tl.dot(dsT, q_lo, dk_lo, input_precision=PRECISION)
        if HAS_HI:
            dk_hi = tl.dot(dsT, q_hi, dk_hi, input_precision=PRECISION)
    return dk_lo, dk_hi, dv_lo, dv_hi


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          Hq, Hkv, Sq, Sk, group, qk_scale, scale, Q_BUCKET, K_BUCKET,
                          D_LO: tl.constexpr, D_HI: tl.constexpr, D_HI_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, batch, kv head): loops over the query heads of its GQA group, so the group's
    dk, dv sum stays in registers and no atomics are needed."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    shift = Sk - Sq
    HAS_HI: tl.constexpr = D_HI > 0

    keys = start_n + tl.arange(0, BLOCK_N)
    key_ok = keys < Sk
    d_lo = tl.arange(0, D_LO)
    d_hi = D_LO + tl.arange(0, D_HI_BLOCK)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k_lo = tl.load(k_base + keys[:, None] * stride_kn + d_lo[None, :] * stride_kd, mask=key_ok[:, None], other=0.0)
    v_lo = tl.load(v_base + keys[:, None] * stride_vn + d_lo[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
    if HAS_HI:
        k_hi = tl.load(k_base + keys[:, None] * stride_kn + d_hi[None, :] * stride_kd, mask=key_ok[:, None],
                       other=0.0)
        v_hi = tl.load(v_base + keys[:, None] * stride_vn + d_hi[None, :] * stride_vd, mask=key_ok[:, None],
                       other=0.0)
    else:
        k_hi = tl.zeros([BLOCK_N, D_HI_BLOCK], dtype=k_lo.dtype)
        v_hi = tl.zeros([BLOCK_N, D_HI_BLOCK], dtype=v_lo.dtype)

    # Query blocks [m_first, m_full) straddle the causal diagonal (masked); [m_full, Sq) see the whole key block.
    q_end = tl.cdiv(Sq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        m_first = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, q_end)
    else:
        m_first = 0
        m_full = 0
    if HAS_KV_START:
        kv_first = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
        # A key block reaching into the padding is masked for every query; one wholly inside it is skipped.
        m_full = tl.where(kv_first > start_n, q_end, m_full)
        m_first = tl.where(start_n + BLOCK_N <= kv_first, q_end, m_first)
    else:
        kv_first = 0

    dk_lo = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dv_lo = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dk_hi = tl.zeros([BLOCK_N, D_HI_BLOCK], dtype=tl.float32)
    dv_hi = tl.zeros([BLOCK_N, D_HI_BLOCK], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * Hq + h).to(tl.int64) * Sq
        delta_base = DELTA + (b * Hq + h).to(tl.int64) * Sq
        dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_blocks(
            dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, keys, kv_first, Sq, shift, qk_scale,
            m_first, tl.maximum(m_full, m_first), True, CAUSAL, HAS_HI, PRECISION, D_LO, D_HI_BLOCK, BLOCK_M)
        dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_blocks(
            dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, keys, kv_first, Sq, shift, qk_scale,
            tl.maximum(m_full, m_first), q_end, False, CAUSAL, HAS_HI, PRECISION, D_LO, D_HI_BLOCK, BLOCK_M)

    dk_base = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    tl.store(dk_base + keys[:, None] * stride_dkn + d_lo[None, :] * stride_dkd,
             (dk_lo * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_base + keys[:, None] * stride_dvn + d_lo[None, :] * stride_dvd,
             dv_lo.to(DV.dtype.element_ty), mask=key_ok[:, None])
    if HAS_HI:
        tl.store(dk_base + keys[:, None] * stride_dkn + d_hi[None, :] * stride_dkd,
                 (dk_hi * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(dv_base + keys[:, None] * stride_dvn + d_hi[None, :] * stride_dvd,
                 dv_hi.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_blocks(dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_ptrs, k_hi_ptrs, v_lo_ptrs, v_hi_ptrs,
               stride_kn, stride_vn, rows, kv_first, Sk, shift, qk_scale, lo, hi,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_HI: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Accumulate one query block's dq over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        in_range = keys < Sk
        if MASKED:
            k_lo = tl.load(k_lo_ptrs + start_n * stride_kn, mask=in_range[:, None], other=0.0)
            v_lo = tl.load(v_lo_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
        else:
            k_lo = tl.load(k_lo_ptrs + start_n * stride_kn)
            v_lo = tl.load(v_lo_ptrs + start_n * stride_vn)
        qk = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION)
        dp = tl.dot(do_lo, tl.trans(v_lo), input_precision=PRECISION)
        if HAS_HI:
            if MASKED:
                k_hi = tl.load(k_hi_ptrs + start_n * stride_kn, mask=in_range[:, None], other=0.0)
                v_hi = tl.load(v_hi_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
            else:
                k_hi = tl.load(k_hi_ptrs + start_n * stride_kn)
                v_hi = tl.load(v_hi_ptrs + start_n * stride_vn)
            qk = tl.dot(q_hi, tl.trans(k_hi), qk, input_precision=PRECISION)
            dp = tl.dot(do_hi, tl.trans(v_hi), dp, input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            visible = (keys[None, :] >= kv_first) & in_range[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_lo.dtype)
        dq_lo = tl.dot(ds, k_lo, dq_lo, input_precision=PRECISION)
        if HAS_HI:
            dq_hi = tl.dot(ds, k_hi, dq_hi, input_precision=PRECISION)
    return dq_lo, dq_hi


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_START,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                        Hq, Sq, Sk, group, qk_scale, scale, Q_BUCKET, K_BUCKET,
                        D_LO: tl.constexpr, D_HI: tl.constexpr, D_HI_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    shift = Sk - Sq
    HAS_HI: tl.constexpr = D_HI > 0

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    offs_n = tl.arange(0, BLOCK_N)
    d_lo = tl.arange(0, D_LO)
    d_hi = D_LO + tl.arange(0, D_HI_BLOCK)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q_lo = tl.load(q_base + rows[:, None] * stride_qm + d_lo[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do_lo = tl.load(do_base + rows[:, None] * stride_dom + d_lo[None, :] * stride_dod, mask=row_ok[:, None],
                    other=0.0)
    if HAS_HI:
        q_hi = tl.load(q_base + rows[:, None] * stride_qm + d_hi[None, :] * stride_qd, mask=row_ok[:, None],
                       other=0.0)
        do_hi = tl.load(do_base + rows[:, None] * stride_dom + d_hi[None, :] * stride_dod, mask=row_ok[:, None],
                        other=0.0)
    else:
        q_hi = tl.zeros([BLOCK_M, D_HI_BLOCK], dtype=q_lo.dtype)
        do_hi = tl.zeros([BLOCK_M, D_HI_BLOCK], dtype=do_lo.dtype)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + rows, mask=row_ok, other=0.0)
    k_lo_ptrs = k_base + offs_n[:, None] * stride_kn + d_lo[None, :] * stride_kd
    v_lo_ptrs = v_base + offs_n[:, None] * stride_vn + d_lo[None, :] * stride_vd
    k_hi_ptrs = k_base + offs_n[:, None] * stride_kn + d_hi[None, :] * stride_kd
    v_hi_ptrs = v_base + offs_n[:, None] * stride_vn + d_hi[None, :] * stride_vd

    if HAS_KV_START:
        kv_first = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        kv_first = 0
    first, full_lo, full_hi, end = _key_block_ranges(start_m, kv_first, Sk, shift, CAUSAL, BLOCK_M, BLOCK_N)

    dq_lo = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, D_HI_BLOCK], dtype=tl.float32)
    if HAS_KV_START:
        dq_lo, dq_hi = _dq_blocks(dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_ptrs, k_hi_ptrs,
                                  v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn, rows, kv_first, Sk, shift, qk_scale,
                                  first, tl.minimum(full_lo, end), True, CAUSAL, HAS_HI, PRECISION, BLOCK_N)
    dq_lo, dq_hi = _dq_blocks(dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_ptrs, k_hi_ptrs,
                              v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn, rows, kv_first, Sk, shift, qk_scale,
                              full_lo, full_hi, False, CAUSAL, HAS_HI, PRECISION, BLOCK_N)
    dq_lo, dq_hi = _dq_blocks(dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_ptrs, k_hi_ptrs,
                              v_lo_ptrs, v_hi_ptrs, stride_kn, stride_vn, rows, kv_first, Sk, shift, qk_scale,
                              tl.maximum(full_lo, full_hi), end, True, CAUSAL, HAS_HI, PRECISION, BLOCK_N)

    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + rows[:, None] * stride_dqm + d_lo[None, :] * stride_dqd,
             (dq_lo * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if HAS_HI:
        tl.store(dq_base + rows[:, None] * stride_dqm + d_hi[None, :] * stride_dqd,
                 (dq_hi * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

_FWD, _DKDV, _DQ = _Launch(_attn_fwd_kernel), _Launch(_attn_bwd_dkdv_kernel), _Launch(_attn_bwd_dq_kernel)

# head_dim = one power of two >= 16, or two of them (80 = 64 + 16): tl.dot needs power-of-two tiles of at least 16.
_HEAD_DIMS = sorted({lo + hi for lo in (16, 32, 64, 128, 256) for hi in (0, 16, 32, 64, 128) if hi < lo <= 256 - hi})


def _split_head_dim(D):
    """(D_LO, D_HI) with D = D_LO + D_HI, D_LO the largest power of two <= D, D_HI 0 or a smaller power of two."""
    if D not in _HEAD_DIMS:
        raise ValueError(f"attention_triton: head_dim {D} is not supported; supported head dims are {_HEAD_DIMS}")
    lo = 1 << (D.bit_length() - 1)
    return lo, D - lo


def _bucket(n):
    """Power-of-two bucket (16 .. 16384) of a length, for the autotune key."""
    return min(max(16, next_power_of_2(n)), 16384)


def _check(q, k, v, kv_start, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention_triton: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention_triton: q, k, v must share one dtype among float16/bfloat16/float32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention_triton: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"attention_triton: needs CUDA tensors (got {q.device}); on the CPU set TRITON_INTERPRET=1 "
                         "before importing triton, or use the 'torch' implementation")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention_triton: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"attention_triton: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention_triton: query heads {Hq} must be a multiple of key/value heads {Hkv}")
    if Sk < Sq:
        raise ValueError(f"attention_triton: key length {Sk} must be >= query length {Sq}")
    _split_head_dim(D)
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.shape != (B,) or kv_start.dtype not in (torch.int32,
                                                                                                      torch.int64):
            raise ValueError(f"attention_triton: kv_start must be an int32 (or int64) tensor of shape ({B},), got "
                             f"{kv_start.dtype if isinstance(kv_start, torch.Tensor) else type(kv_start).__name__} "
                             f"{tuple(kv_start.shape) if isinstance(kv_start, torch.Tensor) else ''}")
        if kv_start.device != q.device:
            raise ValueError(f"attention_triton: kv_start is on {kv_start.device}, q on {q.device}")
    if scale is not None and not scale > 0:
        raise ValueError(f"attention_triton: scale must be > 0, got {scale}")


def _common_args(q, k, kv_start, causal):
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    d_lo, d_hi = _split_head_dim(D)
    meta = dict(D_LO=d_lo, D_HI=d_hi, D_HI_BLOCK=max(d_hi, 16), CAUSAL=bool(causal),
                HAS_KV_START=kv_start is not None,
                # fp32 inputs: three tf32 passes (operands split into high and low parts) give fp32-level products
                # on the tensor cores; plain tf32 would lose ~3 decimal digits and "ieee" runs on the FMA units.
                PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")
    # The kernels never read kv_start when HAS_KV_START is False; any pointer will do.
    return meta, (kv_start if kv_start is not None else q), _bucket(Sq), _bucket(Sk)


def _forward(q, k, v, kv_start, causal, scale):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    # [B, Sq, Hq, D] memory so that the model's out.transpose(1, 2).reshape(B, Sq, Hq * D) needs no copy.
    out = torch.empty(B, Sq, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    meta, kv_ptr, q_bucket, k_bucket = _common_args(q, k, kv_start, causal)
    key = (q_bucket, k_bucket, meta["D_LO"], meta["D_HI"], meta["CAUSAL"], meta["HAS_KV_START"], q.dtype,
           kv_ptr.dtype)
    _FWD(key, lambda bm, bn: (cdiv(Sq, bm), B * Hq),
         (q, k, v, out, lse, kv_ptr, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
          Hq, Sq, Sk, Hq // Hkv, scale * _LOG2E, q_bucket, k_bucket), meta)
    return out, lse


def _backward(dout, q, k, v, out, lse, kv_start, causal, scale):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq = torch.empty(B, Sq, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty(B, Sk, Hkv, D, device=k.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty(B, Sk, Hkv, D, device=v.device, dtype=v.dtype).transpose(1, 2)
    if dk.numel() == 0:
        return dq, dk, dv
    delta = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    meta, kv_ptr, q_bucket, k_bucket = _common_args(q, k, kv_start, causal)
    if Sq > 0:
        block = 64 if D <= 128 else 32
        _bwd_delta_kernel[(cdiv(Sq, block), B * Hq)](
            out, dout, delta, *out.stride(), *dout.stride(), Hq, Sq,
            D=D, BLOCK_D=next_power_of_2(D), BLOCK_M=block)
    group = Hq // Hkv
    qk_scale = scale * _LOG2E
    key = (q_bucket, k_bucket, meta["D_LO"], meta["D_HI"], meta["CAUSAL"], meta["HAS_KV_START"], q.dtype,
           dout.dtype, kv_ptr.dtype)
    _DKDV(key, lambda bm, bn: (cdiv(Sk, bn), B * Hkv),
          (q, k, v, dout, lse, delta, dk, dv, kv_ptr, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
           *dk.stride(), *dv.stride(), Hq, Hkv, Sq, Sk, group, qk_scale, scale, q_bucket, k_bucket), meta)
    if Sq > 0:
        _DQ(key, lambda bm, bn: (cdiv(Sq, bm), B * Hq),
            (q, k, v, dout, lse, delta, dq, kv_ptr, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
             *dq.stride(), Hq, Sq, Sk, group, qk_scale, scale, q_bucket, k_bucket), meta)
    return dq, dk, dv


# Devices where the backward of a split head_dim (D_HI > 0: 80 = 64 + 16, StableLM-3B's) runs through SDPA's
# backward instead of the Triton kernels. On the H200 (Triton 3.6, sm_90) the split backward kernels hit an illegal
# address in the GPU contract grid at head_dim 80, in fp16/bf16 under autotuning, pipelined or not, and in fp32 at
# one config, while head_dim 64 passed every case and the CPU interpreter's bounds check finds no out-of-range
# access: until the fault is found, gradients at these head dims come from torch's own attention backward
# (recomputed forward, the flash or memory-efficient kernel). The forward stays Triton everywhere; on the CPU the
# interpreter runs the Triton backward (the CPU tests keep checking it).
SPLIT_HEAD_BACKWARD_VIA_SDPA = {"cuda"}


def _backward_via_sdpa(q):
    return q.device.type in SPLIT_HEAD_BACKWARD_VIA_SDPA and _split_head_dim(q.shape[-1])[1] > 0


def _sdpa_grads(dout, q, k, v, kv_start, causal, scale):
    """dq, dk, dv by recomputing the forward with attention_sdpa under autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention_sdpa(*leaves, kv_start, causal, scale)
        return torch.autograd.grad(out, leaves, dout)


def _compact(t):
    """t, or a compact copy of it when t views a larger storage: the model's q / k / v are views of the fused qkv
    projection's output, and saving such a view for the backward keeps that whole output alive (for v, which no
    rotary copies, three times its own size at StableLM-3B's shape)."""
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.contiguous()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_start, causal, scale):
        out, lse = _forward(q, k, v, kv_start, causal, scale)
        ctx.via_sdpa = _backward_via_sdpa(q)
        q, k, v = _compact(q), _compact(k), _compact(v)
        if ctx.via_sdpa:
            ctx.save_for_backward(q, k, v, kv_start)
        else:
            ctx.save_for_backward(q, k, v, out, lse, kv_start)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.via_sdpa:
            q, k, v, kv_start = ctx.saved_tensors
            dq, dk, dv = _sdpa_grads(dout, q, k, v, kv_start, ctx.causal, ctx.scale)
        else:
            q, k, v, out, lse, kv_start = ctx.saved_tensors
            dq, dk, dv = _backward(dout, q, k, v, out, lse, kv_start, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, kv_start=None, causal=True, scale=None):
    """Flash attention in Triton (forward and backward); same contract as attention_ref. When autograd will not
    record the call (no grad mode, or no input requiring grad: inference, prefill) the forward runs without the
    autograd.Function, whose apply() is host time an eager short prefill would pay for nothing."""
    _check(q, k, v, kv_start, scale)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if (CHEAP_LAUNCH and not (torch.is_grad_enabled()
                              and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return _forward(q, k, v, kv_start, bool(causal), scale)[0]
    return _TritonAttention.apply(q, k, v, kv_start, bool(causal), scale)


IMPLEMENTATIONS = {"attention": {"torch": attention_ref, "sdpa": attention_sdpa, "triton": attention_triton}}

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

if flash_attn_func is not None:
    def attention_flash_attn(q, k, v, kv_start=None, causal=True, scale=None):
        """flash-attn 2 (bottom-right causal alignment, native GQA) on [B, S, H, D] views of our layout."""
        if kv_start is not None:
            raise NotImplementedError("attention 'flash_attn': left padding (kv_start) needs its varlen API, which "
                                      "this wrapper does not use; pick attention='triton' for padded batches")
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=causal)
        return out.transpose(1, 2)

    IMPLEMENTATIONS["attention"]["flash_attn"] = attention_flash_attn
