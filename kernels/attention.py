"""Causal prefill attention with GQA and left padding.

Layout: q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] with Sk >= Sq and Hq % Hkv == 0 (any strides).
Query i sits at key position Sk - Sq + i (bottom-right aligned causal mask), so the same call serves a plain
prefill (Sq == Sk) and a prefill that continues a KV cache. kv_start (int32 [B], optional): keys j < kv_start[b]
are left padding and masked out. Rows with no visible key return zeros. Output [B, Hq, Sq, D] in q's dtype.
"""
import math

import torch
import torch.nn.functional as F


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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    # Fully masked rows come back as NaN from SDPA; the contract says zeros.
    return out.masked_fill(~visible.any(-1, keepdim=True), 0.0)


IMPLEMENTATIONS = {"attention": {"torch": attention_ref, "sdpa": attention_sdpa}}
