"""Partial rotary position embedding (rotate-half convention) on the first rotary_dim dims of each head.

Layout: q [B, S, Hq, D], k [B, S, Hkv, D] (views of the fused QKV projection are fine: any strides),
cos/sin [B, S, R/2] float32 where R = rotary_dim <= D, R even. Dims R..D pass through unchanged.
Implementations may rotate in place (so callers use only the returned tensors).

rotary_cache additionally writes the rotated k and v [B, S, Hkv, D] into one layer of the KV cache
(k_cache, v_cache [B, Hkv, T, D]) at slots write_pos[b] .. write_pos[b] + S - 1 (write_pos int32 [B], on the
device, so a CUDA graph can capture the call) and returns the rotated q.
"""
import torch


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


IMPLEMENTATIONS = {"rotary": {"torch": rotary_ref}, "rotary_cache": {"torch": rotary_cache_ref}}
