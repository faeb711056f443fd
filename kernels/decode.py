"""Decode attention: one new query per sequence against the KV cache.

Layout: q [B, Hq, D]; k_cache, v_cache [B, Hkv, T, D] (one layer of the cache); kv_len int32 [B]: keys
0..kv_len[b]-1 are valid (the new token's key is already written); kv_start int32 [B] (optional): keys before it
are left padding. Output [B, Hq, D] in q's dtype. Nothing here reads host values of kv_len, so a CUDA graph can
capture the call.
"""
import math

import torch


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


IMPLEMENTATIONS = {"decode_attention": {"torch": decode_attention_ref}}
